"""`dsv3 bench serve`: a load generator for any OpenAI-compatible server (dsv3, vLLM, SGLang).

dsv3 bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 8 \\
    --random-input-len 256 --random-output-len 64 --request-rate 4 --burstiness 1 --save-result r.json

Prompts are random token ids (input/output lengths drawn uniformly within +-range-ratio of the
given lengths, optionally after a shared prefix of --random-prefix-len tokens) or the lines of a
JSONL file (`{"prompt": "..." | [ids], "max_tokens": n}`, or `{"messages": [...]}` for chat).
Requests stream (`stream_options.include_usage`), arrive as a Poisson process of --request-rate
per second (inter-arrival times Gamma(burstiness, 1 / (rate * burstiness)): burstiness 1 is
Poisson, below 1 burstier) and at most --max-concurrency run at once. Reported, as vLLM's
`bench serve` does: successes/failures, request and token throughput, and TTFT, TPOT (time per
output token after the first), ITL (time between streamed chunks) and end-to-end latency: mean,
median, p99 in ms. Against dsv3 it also reads the speculative accept length from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsv3.cli import UsageError, positive_int


@dataclass
class Request:
    prompt: str | list[int] | None
    max_tokens: int
    messages: list[dict] | None = None


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3 bench serve", description="Benchmark an OpenAI-compatible server.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    p.add_argument("--dataset-path", default=None, help="JSONL file of prompts (--dataset jsonl)")
    p.add_argument("--num-prompts", type=positive_int, default=100)
    p.add_argument("--random-input-len", type=positive_int, default=128)
    p.add_argument("--random-output-len", type=positive_int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- r)")
    p.add_argument("--random-prefix-len", type=int, default=0, help="a shared prefix of this many tokens")
    p.add_argument("--vocab-size", type=positive_int, default=256, help="random token ids are below this")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of inter-arrivals (1: Poisson)")
    p.add_argument("--max-concurrency", type=positive_int, default=None, help="requests in flight at most")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default on)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--save-result", default=None, help="write the summary and per-request figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(a: argparse.Namespace) -> None:
    if not 0 <= a.random_range_ratio < 1:
        raise UsageError(f"--random-range-ratio {a.random_range_ratio}: must be in [0, 1)")
    if a.random_prefix_len < 0:
        raise UsageError(f"--random-prefix-len {a.random_prefix_len}: must be >= 0")
    if not a.request_rate > 0:
        raise UsageError(f"--request-rate {a.request_rate}: must be > 0 (inf: all at once)")
    if not a.burstiness > 0:
        raise UsageError(f"--burstiness {a.burstiness}: must be > 0")
    if a.dataset == "jsonl" and not a.dataset_path:
        raise UsageError("--dataset jsonl: needs --dataset-path FILE")


def random_requests(a: argparse.Namespace, rng: random.Random) -> list[Request]:
    def length(n: int) -> int:
        return max(
            1,
            rng.randint(
                math.floor(n * (1 - a.random_range_ratio)), math.ceil(n * (1 + a.random_range_ratio))
            ),
        )

    prefix = [rng.randrange(10, a.vocab_size) for _ in range(a.random_prefix_len)]
    out = []
    for _ in range(a.num_prompts):
        ids = prefix + [rng.randrange(10, a.vocab_size) for _ in range(length(a.random_input_len))]
        out.append(Request(ids, length(a.random_output_len)))
    return out


def jsonl_requests(a: argparse.Namespace) -> list[Request]:
    path = Path(a.dataset_path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--dataset-path {path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
            raise UsageError(f"--dataset-path {path}: line {n} needs a `prompt` or `messages` field")
        out.append(
            Request(
                item.get("prompt"), int(item.get("max_tokens", a.random_output_len)), item.get("messages")
            )
        )
    if not out:
        raise UsageError(f"--dataset-path {path}: holds no request")
    return [out[i % len(out)] for i in range(a.num_prompts)]


def arrival_gaps(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds before each request: 0 at an infinite rate, else Gamma(burstiness, 1/(rate*burstiness))."""
    if math.isinf(rate):
        return [0.0] * n
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def one(client, a: argparse.Namespace, model: str, req: Request) -> Result:
    """Send one streaming request; time its chunks."""
    body: dict = {"model": model, "max_tokens": req.max_tokens, "temperature": a.temperature, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": a.ignore_eos}  # fmt: skip
    if a.endpoint == "chat" or req.messages is not None:
        path = "/v1/chat/completions"
        body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", req.prompt
    res, t0 = Result(), time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = str(event["error"].get("message"))
                    return res
                if event.get("usage"):
                    res.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    res.output_tokens = event["usage"].get("completion_tokens", 0)
                choice = (event.get("choices") or [None])[0]
                if choice is None:
                    continue
                delta = choice.get("delta") or {}
                if "role" in delta and not delta.get("content"):
                    continue  # chat's opening chunk: no token yet
                if "text" in choice or "content" in delta or choice.get("finish_reason"):
                    # a chunk carrying tokens (its text may be empty while a character is incomplete)
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.e2e = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    s = sorted(values)
    p99 = s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]
    return {
        "mean_ms": 1e3 * statistics.fmean(s),
        "median_ms": 1e3 * statistics.median(s),
        "p99_ms": 1e3 * p99,
    }


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft": _stats([r.ttft for r in ok]),
        "tpot": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl": _stats([x for r in ok for x in r.itl]),
        "e2e": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }


def _spec_counters(text: str) -> tuple[float, float] | None:
    def value(name: str) -> float | None:
        m = re.search(rf"^dsv3:{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    drafts, accepted = value("spec_decode_num_drafts"), value("spec_decode_num_accepted_tokens")
    return None if drafts is None or accepted is None else (drafts, accepted)


async def run(a: argparse.Namespace) -> dict:
    import httpx

    rng = random.Random(a.seed)
    requests = random_requests(a, rng) if a.dataset == "random" else jsonl_requests(a)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(
        max_connections=a.max_concurrency or len(requests) or 1, max_keepalive_connections=64
    )
    async with httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=a.timeout, limits=limits) as c:
        model = a.model or await _first_model(c)
        spec0 = await _scrape(c)
        sem = asyncio.Semaphore(a.max_concurrency or len(requests))
        bar = None if a.no_progress else _bar(len(requests))

        async def limited(req: Request) -> Result:
            async with sem:
                res = await one(c, a, model, req)
            if bar is not None:
                bar.update(1)
            return res

        t0 = time.perf_counter()
        tasks = []
        for gap, req in zip(arrival_gaps(len(requests), a.request_rate, a.burstiness, rng), requests):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        spec1 = await _scrape(c)
    summary = {"base_url": a.base_url, "model": model, "num_prompts": len(requests),
               "max_concurrency": a.max_concurrency, "request_rate": a.request_rate, "burstiness": a.burstiness,
               **summarize(results, duration)}  # fmt: skip
    if spec0 is not None and spec1 is not None and spec1[0] > spec0[0]:
        summary["spec_accept_length"] = 1 + (spec1[1] - spec0[1]) / (spec1[0] - spec0[0])
    summary["requests"] = [{**asdict(r), "tpot": r.tpot} for r in results]
    return summary


async def _first_model(c) -> str:
    try:
        r = await c.get("/v1/models")
        return r.json()["data"][0]["id"]
    except Exception as e:
        raise UsageError(
            f"--base-url {c.base_url}: no model list at /v1/models ({type(e).__name__}: {e})"
        ) from None


async def _scrape(c) -> tuple[float, float] | None:
    try:
        r = await c.get("/metrics")
    except Exception:
        return None
    return _spec_counters(r.text) if r.status_code == 200 else None


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", file=sys.stderr)


def report(s: dict) -> str:
    lines = [
        f"{'successful requests':<32}{s['completed']}",
        f"{'failed requests':<32}{s['failed']}",
        f"{'duration (s)':<32}{s['duration_s']:.2f}",
        f"{'total input tokens':<32}{s['total_input_tokens']}",
        f"{'total output tokens':<32}{s['total_output_tokens']}",
        f"{'request throughput (req/s)':<32}{s['request_throughput']:.2f}",
        f"{'output throughput (tok/s)':<32}{s['output_throughput']:.2f}",
        f"{'total throughput (tok/s)':<32}{s['total_token_throughput']:.2f}",
    ]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        v = s[key]
        lines.append(
            f"{name + ' (ms) mean/median/p99':<32}{v['mean_ms']:.2f} / {v['median_ms']:.2f} / {v['p99_ms']:.2f}"
        )
    if "spec_accept_length" in s:
        lines.append(f"{'speculative accept length':<32}{s['spec_accept_length']:.3f}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def serve_bench_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    summary = asyncio.run(run(a))
    print(report(summary))
    if a.save_result:
        Path(a.save_result).write_text(json.dumps(summary, indent=2))
        print(f"saved {a.save_result}")
    return 0 if summary["completed"] else 1


def bench_main(argv: list[str] | None = None) -> int:
    """`dsv3 bench serve ...` (the one benchmark behind `dsv3 bench` so far)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        raise UsageError("usage: dsv3 bench serve [options] (see dsv3 bench serve -h)")
    return serve_bench_main(argv[1:])
