"""bench/quiet.py on a real spinning process tree: `paused` stops every process of it (its CPU seconds
stop growing), it runs again after, also when the body raises (an error or Ctrl-C); `turn` reports
a spinning other side's CPU seconds (and warns) unless it is paused."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# a parent and a child that both spin, so the tree walk has to find the child
SPIN = (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'while True: pass']); "
    "print('go', flush=True)\nwhile True: pass"
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def quiet():
    spec = importlib.util.spec_from_file_location("bench_quiet", BENCH / "quiet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def spinner(quiet):
    proc = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "go\n"
    end = time.monotonic() + 5
    while len(quiet.tree(proc.pid)) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    yield proc
    pids = quiet.tree(proc.pid)
    quiet.resume(proc.pid)
    for pid in reversed(pids):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=5)


def _grows(quiet, pids, seconds=0.3) -> float:
    before = quiet.cpu_seconds(pids)
    time.sleep(seconds)
    after = quiet.cpu_seconds(pids)
    return sum(after[p] - before[p] for p in before)


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def test_paused_stops_the_whole_tree_and_resumes_it(quiet, spinner):
    pids = quiet.tree(spinner.pid)
    assert len(pids) == 2 and pids[0] == spinner.pid
    assert _grows(quiet, pids) > 0.05  # both spin (on a loaded 2-core machine: some share of 0.6 s)
    with quiet.paused([spinner.pid]) as stopped:
        assert sorted(stopped) == sorted(pids)
        assert {_state(p) for p in pids} == {"T"}
        assert _grows(quiet, pids) == 0.0
    assert {_state(p) for p in pids} <= {"R", "S"}
    assert _grows(quiet, pids) > 0.05


@pytest.mark.parametrize("exc", [KeyError, KeyboardInterrupt])
def test_paused_resumes_when_the_body_raises(quiet, spinner, exc):
    pids = quiet.tree(spinner.pid)
    with pytest.raises(exc), quiet.paused([spinner.pid]):
        assert {_state(p) for p in pids} == {"T"}  # paused() returns once every thread is stopped
        raise exc("boom")
    assert "T" not in {_state(p) for p in pids}
    assert _grows(quiet, pids) > 0.05


def test_turn_measures_a_spinning_other_side_and_nothing_when_it_is_paused(quiet, spinner):
    others = {"spin": quiet.tree(spinner.pid)}
    warnings: list[str] = []
    with quiet.turn("me", others, warn=warnings.append) as loud:
        time.sleep(0.3)
    assert loud["wall_s"] >= 0.3 and loud["idle_cpu_s"]["spin"] > 0.05
    assert len(warnings) == 1 and "while me was timed" in warnings[0] and "spin" in warnings[0]
    with quiet.turn("me", others, pause={"spin"}, warn=warnings.append) as calm:
        time.sleep(0.3)
    assert calm["idle_cpu_s"] == {"spin": 0.0} and len(warnings) == 1
    assert _grows(quiet, others["spin"]) > 0.05  # running again
    with pytest.raises(ValueError, match="not among the other sides"):
        with quiet.turn("me", others, pause={"vLLM"}):
            pass


def test_tree_and_cpu_seconds_of_a_gone_process_are_empty(quiet):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert quiet.tree(proc.pid) == [] and quiet.cpu_seconds([proc.pid]) == {}
    with quiet.paused([proc.pid]) as stopped:
        assert stopped == []
