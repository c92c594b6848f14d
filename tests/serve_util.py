"""Helpers of the serving tests: a tiny checkpoint with a tokenizer, and a real `dsv3 serve`
subprocess on a free loopback port (`--port 0`; the port is read from the ready line)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data.tokenizer import Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "To be, or not to be: that is the question.\n"] * 20
READY = re.compile(r"ready on (http://[\d.]+:\d+)")
START_TIMEOUT = 180  # a loaded 2-core machine can take a minute to import torch and load


def make_ckpt(path: Path) -> Path:
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig.from_preset("tiny")), path)
    Tokenizer.train(TEXTS, 300, show_progress=False).save(path)
    return path


class Server:
    def __init__(self, ckpt: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "dsv3", "serve", str(ckpt), "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
        )
        self.lines: list[str] = []
        self.url = self._wait_ready()
        # keep draining its output so that the pipe never fills and blocks the server
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = READY.search(line)
                if m:
                    found.append(m.group(1))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if not found:
            self.proc.kill()
            raise RuntimeError("dsv3 serve did not become ready:\n" + "".join(self.lines[-30:]))
        return found[0]

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (kill after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def metric(text: str, name: str) -> float:
    """The value of the first sample `name{...} value` (or `name value`) in Prometheus text."""
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    if m is None:
        raise KeyError(name)
    return float(m.group(1))
