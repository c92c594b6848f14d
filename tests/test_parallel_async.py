"""Asynchronous all-to-all (comm.start_all_to_all) on 2 and 4 gloo processes: the same rows,
gradients and byte counts as the synchronous all_to_all, an overlap that is real (an injected
latency hides behind computation between start and wait, forward and backward), and failures that
are bounded and name the group.

One launch per world size computes every equality case (spawning is the slow part on 2 cores).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from dsv3.config import ConfigError
from dsv3.parallel.comm import CommStats, Link, injected_latency
from dsv3.parallel.launch import launch, run_ranks

pytestmark = pytest.mark.timeout(120)

D = 200  # row width: not a multiple of 128, so FP8 has a partial last tile
WIRE_CASES = [("same", "same"), ("bf16", "same"), ("fp8", "bf16"), ("fp8", "fp8")]
LATENCY = 0.3  # seconds injected per exchange in the overlap tests
COMPUTE = 0.3  # seconds of matmuls between start and wait
MARGIN = 0.12  # an overlapped run must beat compute + latency by this much


def splits(world: int) -> list[list[int]]:
    """rows[src][dst]: uneven, with zeros (a rank sends nothing to some peers)."""
    return [[(3 * s + 2 * d + 1) % 5 for d in range(world)] for s in range(world)]


def rank_rows(rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(sum(splits(world)[rank]), D, generator=g) * torch.logspace(-2, 2, D)


def output_grad(rank: int, world: int) -> torch.Tensor:
    recv = sum(row[rank] for row in splits(world))
    return torch.randn(recv, D, generator=torch.Generator().manual_seed(100 + rank))


def make_link(rank: int, world: int, timeout: float | None = None, latency: float | None = None) -> Link:
    # every rank its own node: all traffic to a peer counts as inter-node
    return Link("test", None, list(range(world)), rank, list(range(world)), CommStats(), timeout, latency)


# ---- what each rank runs ----------------------------------------------------------------------------------
def _one(rank, world, mode, wire, grad_wire):
    from dsv3.parallel.comm import all_to_all, start_all_to_all

    rows = splits(world)
    send, recv = rows[rank], [rows[s][rank] for s in range(world)]
    link = make_link(rank, world)
    x = rank_rows(rank, world).requires_grad_()
    gy = output_grad(rank, world)
    if mode == "sync":
        y = all_to_all(x, send, recv, link, wire, grad_wire)
        (y * gy).sum().backward()
    elif mode == "async":
        y = start_all_to_all(x, send, recv, link, wire, grad_wire).wait()
        (y * gy).sum().backward()  # not cut: the start's backward runs right after the wait's
    else:  # cut at the token, as a phase boundary does: the backward exchange is started, then waited
        pending = start_all_to_all(x, send, recv, link, wire, grad_wire)
        token = pending.token.detach().requires_grad_()
        y = pending.wait(token)
        (y * gy).sum().backward()
        assert x.grad is None  # only started
        torch.autograd.backward(pending.token, token.grad)
    return {"y": y.detach(), "x_grad": x.grad, "sent": dict(link.stats.sent), "calls": link.stats.calls}


def _two_in_flight(rank, world):
    """Two exchanges started back to back, waited in the reverse order."""
    from dsv3.parallel.comm import all_to_all, start_all_to_all

    rows = splits(world)
    send, recv = rows[rank], [rows[s][rank] for s in range(world)]
    link = make_link(rank, world)
    x = rank_rows(rank, world)
    first = start_all_to_all(x, send, recv, link, "fp8", what="dispatch")
    second = start_all_to_all(2 * x, send, recv, link, "bf16", what="combine")
    y_second = second.wait()
    y_first = first.wait()
    want = [
        all_to_all(x, send, recv, link, "fp8"),
        all_to_all(2 * x, send, recv, link, "bf16", what="combine"),
    ]
    return {"got": [y_first, y_second], "want": want}


def equality_worker(rank, world):
    res = {(m, w, g): _one(rank, world, m, w, g) for w, g in WIRE_CASES for m in ("sync", "async", "cut")}
    res["two"] = _two_in_flight(rank, world)
    return res


def _compute(seconds: float) -> float:
    """Real CPU work (matmuls) for `seconds`; returns the seconds it took."""
    a = torch.randn(128, 128)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = torch.tanh(a @ a)
    return time.perf_counter() - t0


def _timed(fn, *args):
    import torch.distributed as dist

    dist.barrier()  # both ranks start together: a late peer is not counted as latency
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


def _forward(link, x, compute: bool, synchronous_start: bool) -> tuple[float, tuple[bool, bool]]:
    """(seconds computed between start and wait, (done() after start, done() after wait))."""
    from dsv3.parallel.comm import start_all_to_all

    n = [x.shape[0] // link.size] * link.size
    pending = start_all_to_all(x, n, n, link)
    if synchronous_start:  # what the overlap tests must catch: a start that does not return at once
        pending.wait()
    started = pending.done()
    c = _compute(COMPUTE) if compute else 0.0
    pending.wait()
    return c, (started, pending.done())


def _backward(link, x, cut: bool, synchronous_start: bool) -> tuple[float, float]:
    """(seconds from the backward's start to x's gradient, seconds computed in between)."""
    import torch.distributed as dist

    from dsv3.parallel.comm import start_all_to_all

    n = [x.shape[0] // link.size] * link.size
    pending = start_all_to_all(x, n, n, link)
    token = pending.token.detach().requires_grad_()
    y = pending.wait(token if cut else None)
    dist.barrier()
    t0 = time.perf_counter()
    y.sum().backward()  # cut: starts the reverse exchange and returns
    if cut and synchronous_start:
        torch.autograd.backward(pending.token, token.grad)
    c = _compute(COMPUTE) if cut else 0.0
    if cut and not synchronous_start:
        torch.autograd.backward(pending.token, token.grad)  # waits for it
    return time.perf_counter() - t0, c


def overlap_worker(rank, world):
    from dsv3.parallel.comm import all_to_all

    link = make_link(rank, world, latency=LATENCY)
    x = torch.randn(32 * world, D, requires_grad=True)
    n = [32] * world
    out = {"sync": _timed(all_to_all, x, n, n, link)[0]}
    out["no_compute"], (_, out["done"]) = _timed(_forward, link, x, False, False)
    out["backward_uncut"], _ = _backward(link, x, False, False)
    for synchronous_start in (False, True):
        key = "sync_start_" if synchronous_start else ""
        out[key + "forward"], (out[key + "forward_c"], _) = _timed(_forward, link, x, True, synchronous_start)
        out[key + "backward"], out[key + "backward_c"] = _backward(link, x, True, synchronous_start)
    return out


@pytest.fixture(scope="module", params=[2, 4])
def equal(request):
    world = request.param
    return world, run_ranks(equality_worker, world, timeout=30, deadline=100)


@pytest.fixture(scope="module")
def overlap():
    return run_ranks(overlap_worker, 2, timeout=30, deadline=60)


# ---- tests ----------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("wire,grad_wire", WIRE_CASES)
def test_async_rows_gradients_and_bytes_equal_the_synchronous_all_to_all(equal, wire, grad_wire):
    world, results = equal
    for res in results:
        sync = res[("sync", wire, grad_wire)]
        for mode in ("async", "cut"):
            got = res[(mode, wire, grad_wire)]
            assert torch.equal(got["y"], sync["y"]) and torch.equal(got["x_grad"], sync["x_grad"]), mode
            assert got["sent"] == sync["sent"] and got["calls"] == sync["calls"] == 2, mode
            assert got["sent"]["dispatch_grad.inter"] > 0


@pytest.mark.dist
def test_async_delivers_the_rows_and_gradients_each_peer_sent(equal):
    """Against the rows themselves, so a mistake shared by both paths shows."""
    world, results = equal
    rows = splits(world)

    def block(t: torch.Tensor, counts: list[int], p: int) -> torch.Tensor:
        return t[sum(counts[:p]) : sum(counts[: p + 1])]

    for r, res in enumerate(results):
        recv = [rows[s][r] for s in range(world)]
        want_y = torch.cat([block(rank_rows(s, world), rows[s], r) for s in range(world)])
        want_grad = torch.cat(  # rank r's rows for d come back with d's output gradient of them
            [block(output_grad(d, world), [rows[s][d] for s in range(world)], r) for d in range(world)]
        )
        assert sum(recv) == want_y.shape[0]
        for mode in ("async", "cut"):
            assert torch.equal(res[(mode, "same", "same")]["y"], want_y)
            assert torch.equal(res[(mode, "same", "same")]["x_grad"], want_grad)


@pytest.mark.dist
def test_two_exchanges_in_flight_waited_out_of_order(equal):
    _, results = equal
    for res in results:
        for got, want in zip(res["two"]["got"], res["two"]["want"]):
            assert torch.equal(got, want)


@pytest.mark.dist
def test_overlap_is_real_forward(overlap):
    """Computation between start and wait hides the injected latency: about max(C, L), not C + L."""
    for t in overlap:
        assert t["sync"] >= LATENCY and t["no_compute"] >= LATENCY  # the latency is in effect
        assert t["done"] == (False, True)  # in flight after the start, complete after the wait
        assert t["forward_c"] >= COMPUTE
        assert t["forward"] < t["forward_c"] + LATENCY - MARGIN, t


@pytest.mark.dist
def test_overlap_is_real_backward(overlap):
    """Cut at the token, the backward's reverse exchange runs while other work computes."""
    for t in overlap:
        assert t["backward_uncut"] >= LATENCY  # without the cut the backward waits in place
        assert t["backward"] < t["backward_c"] + LATENCY - MARGIN, t


@pytest.mark.dist
def test_the_overlap_check_can_fail(overlap):
    """The same runs with a start that waits at once pay compute + latency: the checks above fail."""
    for t in overlap:
        assert t["sync_start_forward"] >= t["sync_start_forward_c"] + LATENCY - 0.02
        assert t["sync_start_backward"] >= t["sync_start_backward_c"] + LATENCY - 0.02


def fail_worker(rank, world, mode):
    from dsv3.parallel.comm import start_all_to_all

    link = make_link(rank, world, timeout=2.0)
    x = torch.randn(4 * world, 8, requires_grad=True)
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(4)  # alive but silent past the link's timeout, then gone without exchanging
        return {}
    t0 = time.monotonic()
    try:
        start_all_to_all(x, [4] * world, [4] * world, link).wait()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
    return {"error": "", "seconds": time.monotonic() - t0}


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_failed_peer_makes_the_wait_raise_within_the_link_timeout(mode):
    outcomes = launch(fail_worker, 2, mode, timeout=6, deadline=60, grace=5)
    survivor = outcomes[0]
    assert survivor.ok, survivor.error
    err = survivor.value["error"]
    assert re.match(
        r"PeerFailure: rank 0: all-to-all \(dispatch\) (start|wait) in group 'test' of ranks \[0, 1\]", err
    )
    assert "died or did not answer within 2 s" in err
    assert survivor.value["seconds"] < 5  # the link's 2 s, not the process group's 6 s


def test_injected_latency_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DSV3_A2A_LATENCY", raising=False)
    assert injected_latency() == 0.0
    monkeypatch.setenv("DSV3_A2A_LATENCY", "0.25")
    link = make_link(0, 2)
    assert link.delay("dispatch") == 0.25 and link.delay("meta") == 0.0
    assert make_link(0, 2, latency=0.0).delay("combine") == 0.0  # the link's own setting wins
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("DSV3_A2A_LATENCY", bad)
        with pytest.raises(ConfigError, match=rf"DSV3_A2A_LATENCY: expected seconds >= 0, got '{bad}'"):
            injected_latency()
