"""KV-cache transfer of prefill/decode disaggregation: bytes and seconds per request, 1 prefill rank
+ 1 decode rank on gloo (DESIGN §8, paper §3.4; dsv3.deploy.kv_transfer).

    .venv/bin/python bench/deploy_kv.py [--lens 16,128,1024,4096] [--reps 5] [--requests 8]

Part 1, the wire at DeepSeek-V3's geometry: a request's latent-cache blocks of 61 layers x
(kv_lora_rank 512 + rope 64) in BF16 (70,272 bytes per token, blocks of 16 tokens), sent with
`send_kv`/`recv_kv` (header, payload, CRC-32 check) between two gloo processes on this machine;
median seconds per transfer and the rate. Bytes measured from the tensor that travelled, beside
the formula ceil(n / 16) * 16 * 61 * 576 * 2.

Part 2, end to end in a deployment of the tiny checkpoint (`serve_ranks`, 1 prefill + 1 decode
rank): per transferred request, the bytes received and the seconds from the decode rank's admit
(the router's hand-off) to the checked payload, beside the formula for its prompt length.

On this shared 2-core machine the times are loopback TCP plus copies and the CRC, under whatever
else runs (the load average is printed); they bound nothing about RDMA/NVLink transfers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from dsv3 import ModelConfig
from dsv3.deploy.kv_transfer import kv_transfer_bytes, recv_kv, send_kv
from dsv3.parallel.launch import run_ranks

V3 = {"layers": 61, "width": 512 + 64, "element": 2, "block": 16}


def _wire(rank: int, world: int, lens: list[int], reps: int) -> list[tuple[int, int, float]]:
    """Rank 0 sends each length's payload `reps` times to rank 1; rank 1 returns (n, bytes, median s)."""
    import torch.distributed as dist

    out = []
    for i, n in enumerate(lens):
        nb = -(-n // V3["block"])
        payload = torch.randn(V3["layers"], nb, V3["block"], V3["width"]).to(torch.bfloat16)
        times = []
        for r in range(reps + 1):  # the first is a warm-up
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                send_kv(payload, 1, i, r)
            else:
                got = recv_kv(0, i, r, torch.bfloat16)
                if r:
                    times.append(time.perf_counter() - t0)
        if rank == 1:
            out.append((n, got.numel() * got.element_size(), statistics.median(times)))
    return out


def wire(lens: list[int], reps: int) -> None:
    rows = run_ranks(_wire, 2, lens, reps, timeout=120, deadline=600)[1]
    print("part 1: V3 geometry (61 layers x 576 x BF16), send_kv -> recv_kv over gloo, 2 processes")
    print(f"{'prompt tokens':>14} {'bytes':>12} {'formula':>12} {'median s':>10} {'GB/s':>7}")
    for n, nbytes, sec in rows:
        f = kv_transfer_bytes(n, V3["block"], V3["layers"], V3["width"], V3["element"])
        print(f"{n:>14} {nbytes:>12} {f:>12} {sec:>10.4f} {nbytes / sec / 1e9:>7.2f}")


def end_to_end(requests: int) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsv3.deploy.launch import DeploySpec, serve_ranks
    from dsv3.infer.sampling import SamplingParams
    from tests.serve_util import make_ckpt

    ckpt = make_ckpt(Path(tempfile.mkdtemp(prefix="dsv3-bench-kv-")) / "ckpt")
    opts = dict(verify=False, num_blocks=512, block_size=16)
    dep = serve_ranks(DeploySpec(str(ckpt), 1, 1, llm_options=opts), start_timeout=300)
    router = dep.router
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router.start(loop)
    g = torch.Generator().manual_seed(0)
    lens = [16 * (2**i) for i in range(requests)][:requests]
    lens = [min(n, 200) for n in lens]

    async def one(prompt, rid):
        await router.add([prompt], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)], [rid])
        async for _ in router.stream([rid]):
            pass

    for i, n in enumerate(lens):  # one at a time: each transfer alone on the wire
        prompt = torch.randint(3, 500, (n,), generator=g).tolist()
        asyncio.run_coroutine_threadsafe(one(prompt, f"kv-{i}"), loop).result(120)
    router.stop()
    loop.call_soon_threadsafe(loop.stop)
    per = router.final.get(1, {}).get("kv", {}).get("per_request", [])
    cfg = ModelConfig.from_preset("tiny")  # make_ckpt's model, FP32; the MTP layer is not cached
    print("part 2: tiny checkpoint end to end (1 prefill + 1 decode rank), admit -> checked payload")
    print(f"{'prompt tokens':>14} {'bytes':>10} {'formula':>10} {'seconds':>9}")
    for n, (nbytes, sec) in zip(lens, per):
        f = kv_transfer_bytes(n, 16, cfg.n_layers, cfg.kv_cache_dim, 4)
        print(f"{n:>14} {nbytes:>10} {f:>10} {sec:>9.4f}")
    if len(per) != len(lens):
        print(f"(!) {len(per)} transfers reported for {len(lens)} requests")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lens", default="16,128,1024,4096", help="prompt lengths of part 1")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=5, help="requests of part 2 (prompts 16, 32, .. <= 200)")
    a = p.parse_args()
    print(f"load average before: {os.getloadavg()}")
    wire([int(x) for x in a.lens.split(",")], a.reps)
    end_to_end(a.requests)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
