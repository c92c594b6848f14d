"""Starting a disaggregated deployment: prefill and decode ranks plus the router (DESIGN §8).

One machine (`spawn`, what `dsv3 serve CKPT --prefill-ranks P --decode-ranks D` does): the server
process listens on a loopback control address, starts P + D rank processes from a fork server
(torch imported once, as in dsv3.parallel.launch), and waits for every rank's hello. Ranks
0..P-1 prefill, P..P+D-1 decode; they form one gloo process group (a file store: no port to
collide with) used only for KV point-to-point. The result is a `Deployment` whose `router` is the
server's engine loop.

Several machines (documented, not tested here): the server process listens on a reachable address
and the ranks are started by torchrun, which provides RANK/WORLD_SIZE/MASTER_ADDR for the process
group (NCCL on GPUs):

    dsv3 serve CKPT --prefill-ranks 2 --decode-ranks 2 --listen 0.0.0.0:29600   # waits for 4 ranks
    DSV3_DEPLOY_KEY=... torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr HOST0 \\
        --master-port 29500 -m dsv3.deploy.launch --router SERVER:29600

Both sides read the control channel's shared secret from DSV3_DEPLOY_KEY; the server sends every
rank its DeploySpec (checkpoint path, which must exist on every machine, engine options, timeouts)
when it connects. Global ranks 0..P-1 prefill, the rest decode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Client, Listener

from dsv3.deploy.disagg import recv_msg, send_msg
from dsv3.deploy.router import RankState, Router
from dsv3.parallel.launch import PRELOAD as RANKS_PRELOAD

# multiprocessing's fork server is one per process and the first caller's preload list wins, so this
# extends dsv3.parallel.launch's: a test process that deploys first must still give later
# `run_ranks` workers what they need preloaded (without torch.fx.experimental.symbolic_shapes a
# worker imports it during its first backward, ~0.3 s, which broke an overlap timing test)
PRELOAD = (*RANKS_PRELOAD, "dsv3.infer.llm", "dsv3.deploy.disagg")


@dataclass
class DeploySpec:
    """What every rank needs to build its engine and worker (picklable)."""

    ckpt: str
    prefill_ranks: int = 1
    decode_ranks: int = 1
    llm_options: dict = field(default_factory=dict)  # LLM(ckpt, **llm_options): dtype, verify, engine fields
    kv_timeout: float = 5.0  # seconds a decode rank waits for a request's KV before recomputing it
    kv_attempts: int = 2  # sends of one transfer at most (a bad header or CRC asks for another)
    faults: dict | None = None  # fault injection for tests: {"delay"|"corrupt": {request-id prefix: value}}
    threads: int = 1  # torch threads per rank
    pg_timeout: float = 600.0  # the process group's timeout: a backstop only (see kv_transfer)
    beat_interval: float = 0.2
    ep: int = 1  # decode ranks per expert-parallel group (dsv3.deploy.ep_engine.EPEngine); 1: plain engines

    def __post_init__(self) -> None:
        for name in ("prefill_ranks", "decode_ranks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(self.ep, int) or self.ep < 1 or self.decode_ranks % self.ep:
            raise ValueError(
                f"ep: must be a positive divisor of decode_ranks ({self.decode_ranks}), got {self.ep!r}"
            )
        if self.kv_timeout <= 0 or self.kv_attempts < 1:
            raise ValueError(
                f"kv_timeout/kv_attempts: must be positive, got {self.kv_timeout}/{self.kv_attempts}"
            )

    @property
    def world(self) -> int:
        return self.prefill_ranks + self.decode_ranks


def rank_main(rank: int, address, authkey: bytes, init_method: str) -> None:
    """One rank: join the control channel (the router sends the DeploySpec first) and the process
    group, build the engine, serve."""
    import torch
    import torch.distributed as dist

    from dsv3.deploy.disagg import Channel, DecodeWorker, PrefillWorker
    from dsv3.infer.llm import LLM

    conn = Client(address, authkey=authkey)
    kind, spec = recv_msg(conn)
    if kind != "spec":
        raise RuntimeError(f"control channel: expected the deployment spec, got {kind!r}")
    torch.set_num_threads(spec.threads)
    channel = Channel(conn)
    cuda = str(spec.llm_options.get("device", "cpu")).startswith("cuda")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=spec.world,
        timeout=timedelta(seconds=spec.pg_timeout),
    )

    def build():
        return LLM(spec.ckpt, **spec.llm_options).engine

    build_decode, lockstep = build, False
    if spec.ep > 1:  # decode groups of `ep` consecutive decode ranks, each rank one EPEngine of its group
        from dsv3.deploy.ep_engine import EPEngine, build_engine_groups

        decode = list(range(spec.prefill_ranks, spec.world))
        group = build_engine_groups([decode[i : i + spec.ep] for i in range(0, len(decode), spec.ep)])

        def build_decode():
            e = build()
            return EPEngine(e.model, group, e.config, tokenizer=e.tokenizer)

        lockstep = True  # every rank of a group steps together, also with nothing to do
    kw = {"beat_interval": spec.beat_interval}
    if rank < spec.prefill_ranks:
        worker = PrefillWorker(rank, build(), channel, spec.faults, **kw)
    else:
        worker = DecodeWorker(rank, build_decode, channel, spec.kv_timeout, spec.kv_attempts, lockstep, **kw)
    final = worker.run()
    try:
        channel.send("final", rank, final)
    except (OSError, EOFError):
        pass
    os._exit(0)  # no destroy_process_group: a dead peer would make it wait


@dataclass
class Deployment:
    router: Router
    processes: list  # local rank processes (empty for torchrun-started ranks)
    listener: Listener

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the ranks to stop (the router has told them), then kill what is left."""
        end = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self.listener.close()


def _accept(listener: Listener, spec: DeploySpec, ranks: dict, errors: list) -> None:
    try:  # every connection first: a rank's hello comes only after the process group (all ranks) is up
        conns = [listener.accept() for _ in range(spec.world)]
        for conn in conns:
            send_msg(conn, ("spec", spec))
        for conn in conns:
            kind, rank, role, info = recv_msg(conn)
            if kind != "hello":
                raise RuntimeError(f"control channel: expected a hello, got {kind!r}")
            ranks[rank] = RankState(rank, role, conn, info)
    except Exception as e:  # the listener closed (a start that failed) or a bad peer
        errors.append(e)


def serve_ranks(
    spec: DeploySpec,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    spawn: bool = True,
    start_timeout: float = 300.0,
    tokenizer=None,
    **router_kw,
) -> Deployment:
    """Start (spawn=True) or await (torchrun-started) the ranks of `spec`; the Deployment with its
    Router, not started yet (the server starts it on its event loop)."""
    import multiprocessing as mp

    key = os.environ.get("DSV3_DEPLOY_KEY", "").encode() or os.urandom(16)
    if not spawn and not os.environ.get("DSV3_DEPLOY_KEY"):
        raise ValueError("DSV3_DEPLOY_KEY: set the control channel's secret for torchrun-started ranks")
    listener = Listener(listen, authkey=key)
    procs = []
    if spawn:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        fd, store = tempfile.mkstemp(prefix="dsv3-deploy-")
        os.close(fd)
        os.remove(store)
        for rank in range(spec.world):
            p = ctx.Process(
                target=rank_main, args=(rank, listener.address, key, f"file://{store}"), daemon=True
            )
            p.start()
            procs.append(p)
    ranks: dict[int, RankState] = {}
    errors: list = []
    t = threading.Thread(target=_accept, args=(listener, spec, ranks, errors), daemon=True)
    t.start()
    end = time.monotonic() + start_timeout
    while t.is_alive() and time.monotonic() < end:
        dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None]
        if dead:
            break
        t.join(0.1)
    if len(ranks) < spec.world:
        for p in procs:
            p.kill()
        listener.close()
        dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None]
        raise RuntimeError(
            f"deployment: {len(ranks)} of {spec.world} ranks started within {start_timeout:g} s"
            + (f"; ranks died (rank, exit code): {dead}" if dead else "")
            + (f"; {errors[0]!r}" if errors else "")
        )
    for i, p in enumerate(procs):
        ranks[i].process = p
    dep = Deployment(None, procs, listener)  # type: ignore[arg-type]
    dep.router = Router([ranks[r] for r in sorted(ranks)], tokenizer, on_stop=dep.close, **router_kw)
    return dep


def main(argv: list[str] | None = None) -> int:
    """A torchrun-started rank: `python -m dsv3.deploy.launch --router HOST:PORT` (RANK and
    WORLD_SIZE from torchrun; the checkpoint path and engine options come from the server)."""
    p = argparse.ArgumentParser(prog="python -m dsv3.deploy.launch", description=main.__doc__)
    p.add_argument("--router", required=True, help="HOST:PORT the server listens on (dsv3 serve --listen)")
    args = p.parse_args(argv)
    host, _, port = args.router.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--router {args.router}: expected HOST:PORT")
    key = os.environ.get("DSV3_DEPLOY_KEY")
    if not key:
        raise SystemExit("DSV3_DEPLOY_KEY: not set (the control channel's secret, as given to dsv3 serve)")
    rank_main(int(os.environ["RANK"]), (host, int(port)), key.encode(), "env://")
    return 0


if __name__ == "__main__":
    sys.exit(main())
