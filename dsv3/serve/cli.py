"""`dsv3 serve CKPT`: the OpenAI-compatible server (docs/serving.md).

dsv3 serve runs/demo/ckpt --port 8000 [--api-key KEY --served-model-name NAME --speculative ...]

The socket is bound before the model loads (so `--port 0` picks a free port and a taken port fails
at once), then the engine thread starts and one line `dsv3 serve: ready on http://HOST:PORT ...`
is printed. SIGTERM (or Ctrl-C) drains: new requests get 503, running ones finish for up to
--drain-timeout seconds, then the process exits 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from dsv3.cli import UsageError, existing_dir, positive_int
from dsv3.threads import add_threads_argument, configure_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3 serve", description="OpenAI-compatible HTTP server over the engine."
    )
    p.add_argument("ckpt", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed when ready)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) clients pass as `model` (default: the checkpoint directory name)")  # fmt: skip
    p.add_argument("--max-queued-requests", type=positive_int, default=None,
                   help="accepted requests without a first token at most; beyond: 503 + Retry-After")  # fmt: skip
    p.add_argument("--max-queued-tokens", type=positive_int, default=None,
                   help="prompt tokens of those requests at most; beyond: 503 + Retry-After")  # fmt: skip
    p.add_argument("--max-request-bytes", type=positive_int, default=4 * 2**20, help="body size limit (413)")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests"
    )
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and cache (default fp32)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    g.add_argument("--num-speculative-tokens", type=positive_int, default=1)
    g.add_argument("--draft-vocab", type=positive_int, default=None, help="MTP drafts among ids below this")
    g.add_argument("--block-size", type=positive_int, default=16, help="tokens per cache block")
    g.add_argument(
        "--num-blocks", type=positive_int, default=None, help="cache blocks (default: --cache-memory)"
    )
    g.add_argument("--cache-memory", type=positive_int, default=256, help="MiB of KV cache (default 256)")
    g.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences running at once")
    g.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=None,
        help=f"tokens per step (default: {CPU_STEP_TOKENS} on the CPU, the engine's default elsewhere)",
    )
    g.add_argument("--max-model-len", type=positive_int, default=None, help="prompt + output tokens at most")
    g.add_argument("--enable-prefix-caching", action="store_true", help="share cached prompt blocks")
    g.add_argument("--weight-dtype", choices=["fp32", "bf16"], default=None, help="fast-path decode weights")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="latent KV cache dtype (auto: bf16 for a BF16 checkpoint, else the model's)")  # fmt: skip
    g.add_argument("--fp8-weights", action="store_true", help="keep an FP8 checkpoint's projections in FP8")
    g.add_argument("--no-verify", action="store_true", help="skip the checkpoint's SHA-256 manifest check")
    g.add_argument("--seed", type=int, default=0, help="seeds requests without their own seed")
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the throwaway requests run before the server is ready (Engine.warmup)",
    )
    add_threads_argument(g)
    d = p.add_argument_group("prefill/decode disaggregation (dsv3.deploy)")
    d.add_argument("--prefill-ranks", type=positive_int, default=None,
                   help="prefill ranks (spawned processes); with --decode-ranks: a disaggregated deployment")  # fmt: skip
    d.add_argument("--decode-ranks", type=positive_int, default=None, help="decode ranks (default 1)")
    d.add_argument("--ep", type=positive_int, default=1,
                   help="decode ranks per expert-parallel group (EPEngine; must divide --decode-ranks)")  # fmt: skip
    d.add_argument("--kv-timeout", type=float, default=5.0,
                   help="seconds a decode rank waits for a request's KV before recomputing its prefill")  # fmt: skip
    d.add_argument("--health-timeout", type=float, default=5.0,
                   help="seconds without a heartbeat after which a rank counts as dead")  # fmt: skip
    d.add_argument("--listen", default=None,
                   help="HOST:PORT: await torchrun-started ranks there instead of spawning them")  # fmt: skip
    return p


# the server's token budget per step on the CPU: a CPU step's time grows with its tokens (a prefill of
# 512 FP32 tokens ~7x one of 64 on v3-mini), so a burst of prompts prefilled in smaller steps reaches
# its first tokens sooner while the running streams keep decoding between them. `dsv3 serve` on the
# AVX2 Zen 3 (v3-mini FP32, 1 thread, 64-token prompts, 64 new tokens, bench/serve.py alternating two
# servers, 4 repeats): 256 against 512 TTFT median -13% at concurrency 8 and -22% at 32, output tok/s
# 0.98x / 1.04x; 128 against 256 TTFT -12% / -20%, tok/s 1.00x / 0.97x
CPU_STEP_TOKENS = 256


def step_tokens(device: str) -> int:
    """The default --max-num-batched-tokens for a server on `device`."""
    from dsv3.infer.engine import EngineConfig

    return CPU_STEP_TOKENS if str(device).startswith("cpu") else EngineConfig.max_num_batched_tokens


def engine_options(args: argparse.Namespace) -> dict:
    opts = {
        "num_speculative_tokens": args.num_speculative_tokens,
        "draft_vocab": args.draft_vocab,
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "cache_memory": args.cache_memory * 2**20,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens or step_tokens(args.device),
        "max_model_len": args.max_model_len,
        "seed": args.seed,
    }
    if args.enable_prefix_caching:
        opts["prefix_caching"] = True
    if args.weight_dtype is not None:
        opts["weight_dtype"] = DTYPES[args.weight_dtype]
    if args.kv_cache_dtype != "auto":
        opts["kv_cache_dtype"] = DTYPES[args.kv_cache_dtype]
    return opts


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (UsageError naming --port when it is taken)."""
    if not 0 <= port < 65536:
        raise UsageError(f"--port {port}: must be in [0, 65535]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    existing_dir("CKPT", args.ckpt)
    if args.num_speculative_tokens > 1 and not args.speculative:
        raise UsageError("--num-speculative-tokens: needs --speculative")
    sock = bind(args.host, args.port)
    configure_threads("dsv3 serve", args.threads)
    from dsv3.infer.llm import LLM
    from dsv3.serve.app import ServerSettings
    from dsv3.serve.engine_loop import EngineLoop

    if args.prefill_ranks or args.decode_ranks or args.listen or args.ep > 1:
        loop = deployed_loop(args)
        engine = loop.engine
    else:
        llm = LLM(
            args.ckpt,
            dtype=DTYPES[args.dtype],
            device=args.device,
            speculative=args.speculative,
            fp8_weights=args.fp8_weights,
            verify=not args.no_verify,
            **engine_options(args),
        )
        engine = llm.engine
        if not args.no_warmup:  # weights packed and kernels built before the first request
            t = time.monotonic()
            engine.warmup()
            print(f"dsv3 serve: warmed up in {time.monotonic() - t:.1f} s", flush=True)
        loop = EngineLoop(engine, args.max_queued_requests, args.max_queued_tokens)
    names = args.served_model_name or [Path(args.ckpt).resolve().name]
    host, port = sock.getsockname()[:2]
    settings = ServerSettings(
        names,
        api_key=args.api_key,
        max_request_bytes=args.max_request_bytes,
        ready_message=f"dsv3 serve: ready on http://{host}:{port} (model {names[0]}, "
        f"{engine.cache.num_blocks} cache blocks of {args.block_size} tokens, "
        f"max_model_len {engine.max_model_len})",
    )
    return _run_server(loop, settings, sock, args)


def deployed_loop(args: argparse.Namespace):
    """The Router over spawned (or, with --listen, torchrun-started) prefill and decode ranks."""
    from dsv3.deploy.launch import DeploySpec, serve_ranks
    from dsv3.infer.llm import load_tokenizer

    if args.speculative:
        raise UsageError("--speculative: not supported with --prefill-ranks/--decode-ranks yet")
    if args.kv_timeout <= 0 or args.health_timeout <= 0:
        raise UsageError(
            f"--kv-timeout/--health-timeout: must be positive, got {args.kv_timeout}/{args.health_timeout}"
        )
    opts = dict(dtype=DTYPES[args.dtype], device=args.device, fp8_weights=args.fp8_weights,
                verify=not args.no_verify, **engine_options(args))  # fmt: skip
    decode = args.decode_ranks or 1
    if decode % args.ep:
        raise UsageError(f"--ep {args.ep}: must divide --decode-ranks {decode}")
    if args.ep > 1:
        try:
            import dsv3.deploy.ep_engine  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--ep {args.ep}: the expert-parallel engine is not available ({e})") from None
    spec = DeploySpec(args.ckpt, args.prefill_ranks or 1, decode, opts, args.kv_timeout,
                      threads=args.threads or 1, ep=args.ep)  # fmt: skip
    listen = ("127.0.0.1", 0)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--listen {args.listen}: expected HOST:PORT")
        listen = (host, int(port))
    dep = serve_ranks(spec, listen, spawn=not args.listen, tokenizer=load_tokenizer(args.ckpt),
                      max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
                      health_timeout=args.health_timeout)  # fmt: skip
    return dep.router


def _run_server(loop, settings, sock, args) -> int:
    import uvicorn

    from dsv3.serve.app import build_app

    app = build_app(loop, settings)
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=args.drain_timeout,
        access_log=False,
        lifespan="on",
    )
    server = DrainingServer(config, app)
    server.run(sockets=[sock])
    print("dsv3 serve: stopped", flush=True)
    return 0


class DrainingServer:
    """uvicorn's Server whose SIGTERM/SIGINT first marks the app draining (503 for new requests,
    /health 503) and ends with exit code 0 instead of re-raising the signal."""

    def __new__(cls, config, app):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                app.state.draining = True
                super().handle_exit(sig, frame)
                if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
                    self._captured_signals.remove(sig)  # a drained shutdown is a clean exit

        return _Server(config)


def main() -> int:
    from dsv3.errors import run_cli

    return run_cli("dsv3 serve", serve_main)


if __name__ == "__main__":
    sys.exit(main())
