"""Point-to-point messages between pipeline ranks: posted ahead, matched by tag, never blocking a send.

Every message of a step (the activation a forward sends to the next stage, the input gradient a
backward sends to the previous one) has a tag computed from its (micro-batch, stage, kind), so the
receiver can post its receives in any order and early: `post_recv` is called for the next few ops
while the current one computes (`torch.distributed.batch_isend_irecv`, which NCCL coalesces and gloo
runs as asynchronous isend/irecv). Sends return at once; their handles are waited at the end of the
step. A rank therefore only ever blocks waiting for an input the schedule says it needs next, so the
runtime makes progress exactly when the schedule's dependency graph does: the event simulator
(`dsv3.parallel.pipeline.plan.simulate`) checks that graph for deadlocks.

Injected latency (for the benchmark): with `latency` > 0 every message carries the sender's clock
(`time.time()`, one host) and the receiver does not use it before send time + latency. This models
a slow link: the sender is never delayed, the receiver waits only if it needs the data earlier,
which is exactly the simulator's `latency` (an input is ready at producer finish + latency).

A dead peer fails the waits fast (gloo reports the closed connection), and a silent one fails them
after the process group's timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

ACTIVATION, GRADIENT = 0, 1  # the two kinds of pipeline message


def message_tag(mb: int, stage: int, kind: int, num_stages: int) -> int:
    """Unique within a step: the output of (mb, stage) forward (ACTIVATION) or backward (GRADIENT)."""
    return 2 * (mb * num_stages + stage) + kind


@dataclass
class _Pending:
    works: list[Work]
    buf: torch.Tensor
    stamp: torch.Tensor | None  # float64 [1]: the sender's clock (latency emulation only)


class P2P:
    """The point-to-point messages of one pipeline rank, ranks counted within `group`."""

    def __init__(
        self, group: ProcessGroup | None = None, latency: float = 0.0, stamp_offset: int = 0
    ) -> None:
        if latency < 0:
            raise ValueError(f"latency: must be >= 0 seconds, got {latency}")
        self.group = group if group is not None else dist.group.WORLD
        self.latency = latency
        self.stamp_offset = stamp_offset  # tags at and above it carry clocks (distinct from data tags)
        self._recvs: dict[int, _Pending] = {}
        self._sends: list[tuple[Work, torch.Tensor]] = []
        self.waited = 0.0  # seconds spent blocked in `recv` (waiting for data, or for its latency)

    def post_recvs(self, wanted: list[tuple[int, int, torch.Size, torch.dtype]]) -> None:
        """Post irecvs for (tag, src, shape, dtype) not posted yet, as one batch."""
        ops, pending = [], []
        for tag, src, shape, dtype in wanted:
            if tag in self._recvs:
                continue
            buf = torch.empty(shape, dtype=dtype)
            ops.append(dist.P2POp(dist.irecv, buf, group=self.group, group_peer=src, tag=tag))
            stamp = None
            if self.latency > 0:
                stamp = torch.empty(1, dtype=torch.float64)
                ops.append(
                    dist.P2POp(
                        dist.irecv, stamp, group=self.group, group_peer=src, tag=self.stamp_offset + tag
                    )
                )
            pending.append((tag, buf, stamp))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        per = 2 if self.latency > 0 else 1
        for i, (tag, buf, stamp) in enumerate(pending):
            self._recvs[tag] = _Pending(works[per * i : per * (i + 1)], buf, stamp)

    def posted(self, tag: int) -> bool:
        return tag in self._recvs

    def recv(self, tag: int) -> torch.Tensor:
        """Wait for the message `tag` (posted before) and return it; with latency, not before it is due."""
        start = time.perf_counter()
        pending = self._recvs.pop(tag)
        for w in pending.works:
            w.wait()
        if pending.stamp is not None:
            delay = float(pending.stamp[0]) + self.latency - time.time()
            if delay > 0:
                time.sleep(delay)
        self.waited += time.perf_counter() - start
        return pending.buf

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        """Start sending `tensor` to `dst` and return at once (the tensor is kept alive until then)."""
        tensor = tensor.detach().contiguous()
        ops = [dist.P2POp(dist.isend, tensor, group=self.group, group_peer=dst, tag=tag)]
        keep = [tensor]
        if self.latency > 0:
            stamp = torch.tensor([time.time()], dtype=torch.float64)
            ops.append(
                dist.P2POp(dist.isend, stamp, group=self.group, group_peer=dst, tag=self.stamp_offset + tag)
            )
            keep.append(stamp)
        for work, t in zip(dist.batch_isend_irecv(ops), keep):
            self._sends.append((work, t))

    def finish(self) -> None:
        """End of step: every send delivered, no receive left over."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        if self._recvs:
            raise RuntimeError(f"P2P: receives posted but never used: tags {sorted(self._recvs)}")


def exchange_sum(
    tensors: list[torch.Tensor], holders: list[int], group: ProcessGroup | None, tag: int
) -> None:
    """In place: each tensor becomes its sum over the ranks `holders` (ranks in `group`, this one
    included), where every holder calls this with tensors of the same shapes in the same order.

    Tensor by tensor (no flattening copy). Every holder ends with the same bits: with two holders
    a + b == b + a exactly; with more, every rank adds the originals in rank order."""
    me = dist.get_rank(group)
    peers = [r for r in holders if r != me]
    if not peers or not tensors:
        return
    received = {r: [torch.empty_like(t) for t in tensors] for r in peers}
    ops = []
    for peer in peers:
        for t, buf in zip(tensors, received[peer]):
            ops.append(dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=peer, tag=tag))
            ops.append(dist.P2POp(dist.irecv, buf, group=group, group_peer=peer, tag=tag))
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    if len(peers) == 1:
        for t, other in zip(tensors, received[peers[0]]):
            t.add_(other)
        return
    received[me] = [t.clone() for t in tensors]
    for i, t in enumerate(tensors):
        t.copy_(received[min(received)][i])
        for r in sorted(received)[1:]:
            t.add_(received[r][i])
