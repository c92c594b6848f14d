"""Bad invocations of every sub-command: exit code 2, one line naming the culprit, no traceback.

The rows run `dsv3.cli.main(argv)` in-process (what `python -m dsv3 ...` calls), with stderr, warnings
and log records captured: argparse's SystemExit is the exit code, any other exception escaping is the
traceback a user would see. A few rows also run as a real `python -m dsv3` subprocess (the entry
point, the exit status, argv bytes that are not UTF-8), and one subprocess imports every sub-command's
module to check that importing prints nothing (the in-process rows import each module only once).
"""

import io
import logging
import os
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.infer import cli as infer_cli  # noqa: F401 - imported here, see below

# dsv3.infer.cli binds `out=sys.stdout` as a default when it is imported: imported inside a test that
# captures output, that default would be the test's capture file, closed when the test ends.

SURROGATE = b"def f(\xff):"  # not UTF-8: Python's argv holds it as a lone surrogate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint with a tokenizer, one without, and bad inputs."""
    from dsv3.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    save_pretrained(model, root / "ckpt")
    Tokenizer.train(["def add(a, b):\n    return a + b\n" * 20], 300, show_progress=False).save(root / "ckpt")
    save_pretrained(model, root / "notok")
    (root / "bad.txt").write_bytes(b"hello\n\xff\xfe world\n")
    (root / "bad.json").write_text("{not json")
    (root / "garbled.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (root / "train_ckpt").mkdir()
    (root / "train_ckpt" / "trainer.json").write_text('{"step": 3')  # truncated
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1}\n{"kind": "tr\n{"kind": "train", "step": 2}\n'
    )
    return root


EPLB = ["--replicas", "8", "--groups", "1", "--nodes", "1", "--gpus", "2"]
# (id, argv with {root} for the fixture directory, text the message must contain)
CASES = [
    ("train-model-field", ["train", "--preset", "tiny", "model.foo=1"], "model.foo: unknown model field"),
    ("train-bool", ["train", "--preset", "tiny", "recompute=maybe"], "recompute: cannot parse 'maybe'"),
    ("train-override-after-option", ["train", "--preset", "tiny", "lr=1e-3", "--quiet", "tensorboard=perhaps"],
     "tensorboard: cannot parse"),
    ("train-seq-len", ["train", "--preset", "tiny", "seq_len=512"], "seq_len: 512 exceeds model.max_seq_len (256"),
    ("train-not-key-value", ["train", "--preset", "tiny", "lr"], "override 'lr': expected key=value"),
    ("train-preset", ["train", "--preset", "huge"], "preset: unknown 'huge'"),
    ("train-seed", ["train", "seed=1180591620717411303424"], "seed: must be an integer"),
    ("train-threads-0", ["train", "--threads", "0"], "--threads: must be >= 1"),
    ("train-ep-one-process", ["train", "--preset", "tiny", "--ep", "2"], "parallel.ep=2: needs 2 processes"),
    ("train-config-file", ["train", "--config", "{root}/bad.json"], "bad.json: cannot parse"),
    ("eval-missing-ckpt", ["eval", "--ckpt", "{root}/missing"], "--ckpt {root}/missing: does not exist"),
    ("eval-ckpt-is-file", ["eval", "--ckpt", "{root}/bad.txt"], "is not a directory"),
    ("eval-truncated-state", ["eval", "--ckpt", "{root}/train_ckpt"], "trainer.json: not a trainer state"),
    ("plot-bad-log", ["plot", "{root}/run"], "metrics.jsonl: a line is not JSON"),
    ("generate-missing-ckpt", ["generate", "--ckpt", "{root}/missing", "--prompt", "x"],
     "--ckpt {root}/missing: no such directory"),
    ("generate-ckpt-is-file", ["generate", "--ckpt", "{root}/bad.txt", "--prompt", "x"], "is a file"),
    ("generate-ids", ["generate", "--ckpt", "{root}/ckpt", "--ids", "abc"], "--ids 'abc'"),
    ("generate-ids-vocab", ["generate", "--ckpt", "{root}/ckpt", "--ids", "0,9999", "--threads", "1"],
     "--ids: token ids [9999] are outside the vocabulary"),
    ("generate-input-file", ["generate", "--ckpt", "{root}/ckpt", "--input-file", "{root}/bad.txt"],
     "bad.txt: line 2 is not valid UTF-8"),
    ("generate-surrogate", ["generate", "--ckpt", "{root}/ckpt", "--prompt", SURROGATE], "--prompt: not valid UTF-8"),
    ("generate-seed", ["generate", "--ckpt", "{root}/ckpt", "--prompt", "x", "--seed", str(2**70)], "seed: must be"),
    ("generate-top-p", ["generate", "--ckpt", "{root}/ckpt", "--prompt", "x", "--top-p", "0"], "top_p: must be"),
    ("generate-device", ["generate", "--ckpt", "{root}/ckpt", "--prompt", "x", "--device", "cuda"],
     "--device cuda: CUDA is not available"),
    ("generate-threads-0", ["generate", "--ckpt", "{root}/ckpt", "--prompt", "x", "--threads", "0"], "--threads: must be >= 1"),
    ("chat-no-tokenizer", ["chat", "--ckpt", "{root}/notok", "--threads", "1"], "no tokenizer.json"),
    ("chat-temperature", ["chat", "--ckpt", "{root}/ckpt", "--temperature", "-1"], "temperature: must be"),
    ("complete-surrogate", ["complete", "--ckpt", "{root}/ckpt", "--prefix", SURROGATE], "--prefix: not valid UTF-8"),
    ("info-missing", ["info", "--ckpt", "{root}/missing"], "--ckpt {root}/missing"),
    ("info-not-config", ["info", "--ckpt", "{root}/garbled.safetensors"], "garbled.safetensors: not"),
    ("convert-missing", ["convert", "--fp8-to-bf16", "{root}/missing", "{root}/out"], "SRC {root}/missing"),
    ("plan-eplb-loads", ["plan", "eplb", "--loads", "{root}/garbled.safetensors", *EPLB], "--loads {root}/garbled"),
    ("plan-unknown", ["plan", "nothing"], "choose a planner"),
    ("pipeline-plan-pp", ["pipeline-plan", "--pp", "0"], "pp:"),
    ("demo-steps", ["demo", "--steps", "0"], "--steps: must be >= 1"),
]  # fmt: skip


def _argv(argv: list, root) -> list:
    return [a.replace("{root}", str(root)) if isinstance(a, str) else a for a in argv]


def _run(argv: list, root, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *_argv(argv, root)], capture_output=True, timeout=timeout, env=env
    )


def _run_in_process(argv: list, root, capsys, caplog) -> tuple[int, str]:
    """(exit code, stderr) of `dsv3.cli.main(argv)`: bytes in argv are decoded as Python decodes a
    command line (lone surrogates); warnings and WARNING log records, which a subprocess would print
    on stderr, are appended to stderr; an exception other than SystemExit is appended as a traceback."""
    from dsv3.cli import main

    args = [os.fsdecode(a) if isinstance(a, bytes) else a for a in _argv(argv, root)]
    capsys.readouterr()
    caplog.clear()
    threads = torch.get_num_threads()
    extra = []
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("default")  # as a fresh interpreter shows them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", "Failed to initialize NumPy")
            try:
                code = main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a user would see this traceback
                code, extra = 1, [traceback.format_exc()]
        extra += [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught]
        extra += [
            f"{r.levelname}:{r.name}:{r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING
        ]
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err + "".join(f"{x}\n" for x in extra)


def _message_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage block and the thread warning."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):  # usage continues on indented lines
            continue
        in_usage = False
        if line.strip() and ": warning: " not in line:
            lines.append(line)
    return lines


def _check_one_line(argv, expected, root, code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    lines = _message_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dsv3 {argv[0]}"), lines[0]
    assert expected.replace("{root}", str(root)) in lines[0], lines[0]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_line_and_exit_2(files, argv, expected, capsys, caplog, monkeypatch, tmp_path):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("DSV3_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, stderr = _run_in_process(argv, files, capsys, caplog)
    _check_one_line(argv, expected, files, code, stderr)


def test_bad_argv_bytes_through_python_m_dsv3(files):
    """Through the real entry point: argv bytes that are not UTF-8 (only a real command line decodes
    them to lone surrogates) give the one-line UsageError and exit code 2."""
    argv, expected = next(c[1:] for c in CASES if c[0] == "generate-surrogate")
    r = _run(argv, files)
    _check_one_line(argv, expected, files, r.returncode, r.stderr.decode("utf-8", "replace"))


def test_fresh_interpreter_imports_every_command_quietly_then_exits_2(files):
    """The in-process rows import each sub-command's module once, so here a fresh interpreter imports
    them all, then runs `dsv3 train --threads 0` as `python -m dsv3` does (runpy): stdout stays empty
    and stderr holds the usage and the one message line, nothing else (no warning, no log line)."""
    code = (
        "import importlib, runpy, sys\n"
        "from dsv3.cli import DELEGATED, PLANNERS\n"
        "for module, *_ in [*DELEGATED.values(), *PLANNERS.values()]:\n"
        "    importlib.import_module(module)\n"
        "runpy.run_module('dsv3', run_name='__main__', alter_sys=True)\n"
    )
    argv, expected = next(c[1:] for c in CASES if c[0] == "train-threads-0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, timeout=240, env=env)
    assert r.stdout == b"", r.stdout
    _check_one_line(argv, expected, files, r.returncode, r.stderr.decode("utf-8", "replace"))


def test_debug_shows_the_traceback(files, monkeypatch):
    """--debug lets the UsageError escape main (a subprocess would print its traceback)."""
    from dsv3.cli import UsageError, main

    monkeypatch.delenv("DSV3_DEBUG", raising=False)
    with pytest.raises(UsageError, match="no such directory"):
        main(_argv(["generate", "--ckpt", "{root}/missing", "--prompt", "x", "--debug"], files))


# ---- dsv3 chat: long conversations, bad lines, Ctrl-C ---------------------------------------------
CHAT = ["chat", "--ckpt", "{root}/ckpt", "--max-tokens", "4", "--temperature", "0", "--threads", "1"]


def test_chat_drops_old_turns_and_refuses_bad_lines(files):
    """The tiny model holds 256 positions: a few 100-character lines (about a token per character)
    overflow it, so the oldest turns go; a non-UTF-8 line and one longer than the context are refused
    with a note, and the chat carries on to the end of its input. In-process, on a byte stream as
    stdin (chat_main reconfigures it as it does sys.stdin); the Ctrl-C test below runs the real thing."""
    from dsv3.infer.cli import chat_main

    lines = [f"turn {i} " + "xq" * 48 for i in range(5)]
    stdin = (
        "\n".join(lines[:3]).encode()
        + b"\n\xff\xfe bytes\n"
        + b"z" * 2000
        + b"\n"
        + lines[3].encode()
        + b"\n"
    )
    out = io.StringIO()
    threads = torch.get_num_threads()
    try:
        code = chat_main(
            _argv(CHAT[1:], files), stdin=io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"), out=out
        )
    finally:
        torch.set_num_threads(threads)
    out = out.getvalue()
    assert code == 0
    assert "(dropped the 2 oldest messages" in out, out
    assert "(the line is not valid UTF-8; not sent)" in out
    assert "(message too long:" in out
    assert out.count(">>> ") == 7  # 6 lines, then the prompt that meets the end of input


def test_chat_exits_cleanly_on_ctrl_c_at_the_prompt(files):
    import select
    import signal
    import time

    args = [a.replace("{root}", str(files)) for a in CHAT]
    # a user's terminal delivers Ctrl-C; a shell that starts pytest in the background without job
    # control has SIGINT ignored, the child inherits that and Python then installs no handler
    p = subprocess.Popen([sys.executable, "-m", "dsv3", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        seen, deadline = b"", time.monotonic() + 240
        while b">>> " not in seen and time.monotonic() < deadline:  # wait until it reads the prompt
            if select.select([p.stdout], [], [], 1)[0]:
                seen += os.read(p.stdout.fileno(), 4096)
        assert b">>> " in seen, seen
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)  # stdin stays open: only the signal can end the read (communicate() would
        out, err = p.stdout.read(), p.stderr.read()  # close it, racing the signal with end of input)
    finally:
        p.kill()
    assert p.returncode == 0, err.decode()
    assert "Traceback" not in err.decode() and b"(interrupted)" in out


# ---- --threads on the inference commands (the trainer's oversubscription warning, shared) ---------
def test_inference_commands_take_threads_and_warn_when_oversubscribed(files, monkeypatch, capsys):
    import dsv3.threads
    from dsv3.infer.cli import generate_main

    monkeypatch.setattr(dsv3.threads.os, "getloadavg", lambda: (8.0, 8.0, 8.0), raising=False)
    monkeypatch.setattr(dsv3.threads.os, "cpu_count", lambda: 2)
    ckpt = str(files / "ckpt")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert generate_main(["--ckpt", ckpt, "--ids", "0,5", "--max-tokens", "1"]) == 0
        assert "dsv3 generate: warning: load average 8.0 on 2 cores" in capsys.readouterr().err
        assert generate_main(["--ckpt", ckpt, "--ids", "0,5", "--max-tokens", "1", "--threads", "1"]) == 0
        assert "warning" not in capsys.readouterr().err and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
