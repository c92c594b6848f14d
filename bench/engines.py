"""The sides of bench/vs_engines.py: the machine's description, the random checkpoints every side
reads, and one class per engine (llama.cpp through bench/llama_driver.c, vLLM through
bench/vs_vllm_worker.py in its own venv, dsv3's `LLM`), each timed the same way (`timed_rates`;
llama.cpp inside its driver). See bench/vs_engines.py for what is measured and how."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import quiet  # bench/ is on sys.path: this file is imported by bench/vs_engines.py

HERE = Path(__file__).resolve().parent

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


# ---- the machine --------------------------------------------------------------------------------
def cpu_summary() -> str:
    """`model name; N cores; flags: avx2 avx512f ...` of the flags that pick kernels, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return f"{name}; {os.cpu_count()} cores; flags: {' '.join(f for f in FLAGS if f in flags) or 'none of ' + str(FLAGS)}"


def has_amx() -> bool:
    return "amx_bf16" in cpu_summary()


def load() -> float:
    return os.getloadavg()[0]


# ---- the checkpoint -----------------------------------------------------------------------------
def tokenizer_texts(limit: int = 4 * 2**20) -> list[str]:
    """Source files of dsv3 and of Python's standard library: enough text for an 8k-entry BPE."""
    import dsv3

    roots = [Path(dsv3.__file__).parent, Path(os.__file__).parent]
    texts, size = [], 0
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            if "site-packages" in f.parts:
                continue
            t = f.read_text(errors="replace")
            texts.append(t)
            size += len(t)
            if size > limit:
                return texts
    return texts


def build_checkpoints(preset: str, work: Path, seed: int) -> dict[str, Path]:
    """{"fp32": DIR, "bf16": DIR}: one random model of `preset` saved both ways with one tokenizer
    (reused when `work` already holds them for this preset and seed)."""
    import torch

    from dsv3 import ModelConfig, Transformer
    from dsv3.checkpoint import save_pretrained
    from dsv3.data.tokenizer import Tokenizer

    root = work / f"{preset}-seed{seed}"
    dirs = {"fp32": root / "fp32", "bf16": root / "bf16"}
    if all((d / "tokenizer.json").exists() for d in dirs.values()):
        return dirs
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset(preset)).eval()
    tok = Tokenizer.train(tokenizer_texts(), model.config.vocab_size, show_progress=False)
    for name, d in dirs.items():
        save_pretrained(model, d, dtype=torch.bfloat16 if name == "bf16" else None)
        tok.save(d)
    return dirs


# ---- llama.cpp ----------------------------------------------------------------------------------
_CONVERT = """import runpy, sys
llama = sys.argv.pop(1)
sys.path[:0] = [llama, llama + "/gguf-py"]
from conversion import base
# the checkpoint's tokenizer is trained here, so the converter cannot recognise its hash; its
# pre-tokenizer is the official DeepSeek-V3 one (dsv3/data/tokenizer.py)
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
sys.argv[0] = llama + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_gguf(llama: Path, python: str, ckpt: Path, outtype: str, log) -> Path:
    """CKPT-OUTTYPE.gguf beside ckpt, written by llama.cpp's converter (reused when newer than the weights)."""
    out = ckpt.parent / f"{ckpt.name}-{outtype}.gguf"
    weights = max(p.stat().st_mtime for p in ckpt.glob("*.safetensors"))
    if out.exists() and out.stat().st_mtime > weights:
        return out
    cmd = [python, "-c", _CONVERT, str(llama), str(ckpt), "--outtype", outtype, "--outfile", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {tail[0]}")
    log(f"llama.cpp: converted {ckpt.name} -> {out.name} ({out.stat().st_size / 2**20:.0f} MiB)")
    return out


def compile_driver(llama: Path, work: Path) -> Path:
    """bench/llama_driver.c compiled against the tree's libllama into `work`."""
    exe = work / "llama_driver"
    src = HERE / "llama_driver.c"
    if exe.exists() and exe.stat().st_mtime > src.stat().st_mtime:
        return exe
    lib = llama / "build" / "bin"
    cmd = ["cc", "-O2", str(src), "-I", str(llama / "include"), "-I", str(llama / "ggml" / "include"),
           "-L", str(lib), "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling llama_driver.c failed: {r.stderr.strip().splitlines()[-1:]}")
    return exe


class LlamaCpp:
    """llama.cpp through bench/llama_driver.c: one process per measurement (its load not timed)."""

    name = "llama.cpp"

    def __init__(self, driver: Path, ggufs: dict[str, Path]) -> None:
        self.driver, self.ggufs = driver, ggufs

    def rates(
        self, weights: str, threads: int, prompts: list[list[int]], new: int
    ) -> tuple[float, float, list[list[int]]]:
        """(prompt tok/s, decode tok/s, tokens), timed as timed_rates does for the other sides."""
        # the exact comparison: F32 KV cache, flash attention off (the driver's f32 mode)
        cache = "f32" if weights == "fp32" else "f16"
        cmd = [str(self.driver), str(self.ggufs[weights]), str(new), str(threads), cache]
        if weights != "fp32" and has_amx():
            cmd.append("norepack")
        text = "".join(" ".join(map(str, p)) + "\n" for p in prompts)
        r = subprocess.run(cmd, input=text, capture_output=True, text=True)
        lines = r.stdout.splitlines()
        if r.returncode != 0 or not lines or not lines[0].startswith("@@time "):
            raise RuntimeError(f"llama_driver failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        t_pre, t_dec = map(float, lines[0].split()[1:])
        b, p = len(prompts), len(prompts[0])
        return b * p / t_pre, b * (new - 1) / t_dec, [list(map(int, ln.split())) for ln in lines[1:]]


# ---- vLLM ---------------------------------------------------------------------------------------
class VllmWorker:
    """bench/vs_vllm_worker.py in vLLM's venv, one process per (dtype, thread count), in its own
    session: its tree is stopped while the other sides are timed (bench/quiet.py), and Ctrl-C on the
    terminal reaches only this process, whose `close` resumes and ends the worker."""

    name = "vLLM"

    def __init__(
        self, python: str, ckpt: Path, weights: str, threads: int, max_seqs: int, max_len: int
    ) -> None:
        env = dict(os.environ)
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
                   VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                   OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")  # fmt: skip
        env.pop("PYTHONPATH", None)  # dsv3's checkout is not for vLLM's interpreter
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[weights]
        cmd = [python, str(HERE / "vs_vllm_worker.py"), str(ckpt), "--dtype", dtype,
               "--max-num-seqs", str(max_seqs), "--max-model-len", str(max_len)]  # fmt: skip
        self.log = open(ckpt.parent / f"vllm-{weights}-{threads}t.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            start_new_session=True,
        )
        self._read("@@ready")

    def _read(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :]
            self.log.write(line)
        self.log.flush()
        raise RuntimeError(f"vLLM worker exited ({self.proc.wait()}); see {self.log.name}")

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": new}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._read("@@result "))
        return out["seconds"], out["tokens"]

    def pids(self) -> list[int]:
        """The worker's process tree (vLLM's engine core and its workers), the worker first."""
        return quiet.tree(self.proc.pid)

    def close(self) -> None:
        quiet.resume(self.proc.pid)  # a stopped tree would neither read EOF nor die of SIGTERM
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the whole session, engine core included
                self.proc.wait()
        self.log.close()


def vllm_unsupported(ckpt: Path) -> str | None:
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("kv_lora_rank") != 512 or cfg.get("qk_rope_head_dim") != 64:
        return (f"vLLM's CPU MLA needs kv_lora_rank 512 and qk_rope_head_dim 64, the checkpoint has "
                f"{cfg.get('kv_lora_rank')} and {cfg.get('qk_rope_head_dim')}")  # fmt: skip
    return None


# ---- dsv3 ---------------------------------------------------------------------------------------
class Dsv3:
    name = "dsv3"

    def __init__(self, ckpt: Path, max_seqs: int) -> None:
        from dsv3.infer.llm import LLM

        # the defaults a user gets: FP32 compute; a BF16 checkpoint keeps the fast path's matrices in BF16
        # (the prefill budget too, 512 tokens a step: the 2048 used before gave 0.73-1.09x, median 0.80x,
        # the prompt tokens/s of 512 on BF16 v3-mini, 64 prompts of 64 tokens, 1 thread, 6 runs in one process)
        self.llm = LLM(ckpt, verify=False, max_num_seqs=max_seqs)

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        from dsv3.infer.sampling import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        return time.perf_counter() - t, [o.token_ids for o in outs]


def timed_rates(side, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(prompt tok/s, decode tok/s, tokens) of a side that runs `generate`: see the module docstring."""
    t1, _ = side.run(prompts, 1)
    tn, tokens = side.run(prompts, new)
    b, p = len(prompts), len(prompts[0])
    return b * p / t1, b * (new - 1) / (tn - t1) if tn > t1 else float("nan"), tokens
