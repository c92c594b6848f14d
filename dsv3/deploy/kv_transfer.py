"""Latent-cache blocks of a prefilled request sent from a prefill rank to a decode rank (DESIGN §8,
paper §3.4: prefill and decode run on separate units; the decode unit continues from the prefill's
KV cache instead of recomputing it).

What travels: the blocks holding the request's first n computed tokens, every cached layer of them
(the MTP layer too when the engine caches it: all layers share one block table, dsv3.infer.paged_cache),
as one contiguous tensor [L, nb, block_size, W], nb = ceil(n / block_size). Bytes per request:
`kv_transfer_bytes` = nb * block_size * L * (kv_lora_rank + qk_rope_head_dim) * element size.

How (torch.distributed point-to-point, gloo here, NCCL on GPUs): a small int64 header first
(magic, transfer id, attempt, L, nb, block_size, W, CRC-32 of the payload), then the payload, each
with its own tag derived from (transfer id, attempt) so that a late message of an abandoned attempt
can never be taken for a later one. The header tells the receiver the payload's shape before it
posts the receive, and lets it check that what came is the transfer it expects and intact.

Failures: gloo closes a pair for good when a point-to-point wait times out, so no wait here has a
short timeout: the sender and the receiver block in their own threads (the process group's long
timeout is only a backstop) and the decode worker applies the transfer timeout itself (it stops
waiting and recomputes the prefill; a late payload is then discarded). A header that does not match
or a CRC that fails raises `KVTransferError`; the decode worker asks for a resend (a new attempt)
up to its retry limit, then recomputes. Nothing is lost silently: every transfer ends as received,
resent, or recomputed, and each is counted in `TransferStats`.

Shapes: L cached layers, nb blocks, W = R + P cache width, n computed tokens.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv3.infer.paged_cache import PagedLatentCache

MAGIC = 0x4B5642  # "KVB"
HEADER_LEN = 8
MAX_ATTEMPTS = 64  # tags: (transfer id * MAX_ATTEMPTS + attempt) * 2 + part


class KVTransferError(RuntimeError):
    """A received header or payload is not the transfer expected (names what differs)."""


def kv_transfer_bytes(n_tokens: int, block_size: int, n_layers: int, width: int, element_size: int) -> int:
    """Bytes of one request's KV on the wire: whole blocks, every cached layer (the formula)."""
    return -(-n_tokens // block_size) * block_size * n_layers * width * element_size


def gather_blocks(cache: PagedLatentCache, block_table: list[int], n_tokens: int) -> torch.Tensor:
    """A copy of the blocks holding tokens 0..n_tokens-1 of a sequence: [L, nb, block_size, W]."""
    bs = cache.block_size
    nb = -(-n_tokens // bs)
    if nb > len(block_table):
        raise ValueError(f"n_tokens: {n_tokens} tokens need {nb} blocks, the table has {len(block_table)}")
    blocks = torch.tensor(block_table[:nb], dtype=torch.long, device=cache.data.device)
    rows = (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).flatten()  # (nb * bs,)
    L, _, W = cache.data.shape
    return cache.data[:, rows].reshape(L, nb, bs, W).contiguous()


def crc(payload: torch.Tensor) -> int:
    return zlib.crc32(payload.detach().cpu().contiguous().view(torch.uint8).numpy())


def _tag(xfer: int, attempt: int, part: int) -> int:
    if not 0 <= attempt < MAX_ATTEMPTS:
        raise ValueError(f"attempt: must be in [0, {MAX_ATTEMPTS}), got {attempt}")
    return (xfer * MAX_ATTEMPTS + attempt) * 2 + part


def header(payload: torch.Tensor, xfer: int, attempt: int) -> torch.Tensor:
    L, nb, bs, W = payload.shape
    return torch.tensor(
        [MAGIC, xfer, attempt, L, nb, bs, W, crc(payload)], dtype=torch.int64, device=payload.device
    )


def send_kv(payload: torch.Tensor, dst: int, xfer: int, attempt: int, corrupt: bool = False) -> None:
    """Header, then payload, to rank dst (blocks until both are taken). corrupt: send a header with
    a wrong CRC (fault injection for the tests)."""
    head = header(payload, xfer, attempt)
    if corrupt:
        head[7] ^= 1
    dist.isend(head, dst, tag=_tag(xfer, attempt, 0)).wait()
    dist.isend(payload, dst, tag=_tag(xfer, attempt, 1)).wait()


def recv_kv(
    src: int, xfer: int, attempt: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The payload of (xfer, attempt) from rank src, checked against its header (tensors on
    `device`: CPU for gloo, the GPU for NCCL)."""
    head = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    dist.irecv(head, src, tag=_tag(xfer, attempt, 0)).wait()
    magic, x, a, L, nb, bs, W, check = head.tolist()
    if magic != MAGIC:  # not a header at all: the payload's size is unknown, it cannot be drained
        raise KVTransferError(f"header: magic {magic:#x}, expected {MAGIC:#x} (transfer {xfer})")
    payload = torch.empty(L, nb, bs, W, dtype=dtype, device=device)
    dist.irecv(
        payload, src, tag=_tag(xfer, attempt, 1)
    ).wait()  # taken even if refused: the sender is not left blocked
    if (x, a) != (xfer, attempt):
        raise KVTransferError(f"header: transfer {x} attempt {a}, expected transfer {xfer} attempt {attempt}")
    if crc(payload) != check:
        raise KVTransferError(f"payload: CRC-32 mismatch in transfer {xfer} attempt {attempt}")
    return payload


@dataclass
class TransferStats:
    """Counters of one rank's KV traffic (exported on /metrics through the router)."""

    sent: int = 0  # transfers sent (attempts)
    bytes_sent: int = 0
    send_seconds: float = 0.0
    received: int = 0  # transfers received intact
    bytes_received: int = 0
    recv_seconds: float = 0.0  # from posting the header receive to the checked payload
    retries: int = 0  # resends asked for (a bad header or CRC)
    timeouts: int = 0  # transfers not received within the timeout
    fallbacks: int = 0  # requests whose prefill the decode rank recomputed
    failed: int = 0  # send or receive errors (a dead peer, a bad message)
    per_request: list[tuple[int, float]] = field(default_factory=list)  # received: (bytes, seconds)


class KVSender:
    """Sends payloads from their own threads, one per destination rank, in the order given; keeps
    each payload until `release` (the receiver acknowledged it or gave up) so it can be resent."""

    def __init__(self, stats: TransferStats, faults: dict | None = None) -> None:
        self.stats, self.faults = stats, faults or {}
        self.held: dict[int, tuple[torch.Tensor, str]] = {}  # transfer id -> payload, request id
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()

    def hold(self, xfer: int, payload: torch.Tensor, request_id: str) -> None:
        self.held[xfer] = (payload, request_id)

    def send(self, xfer: int, dst: int, attempt: int) -> bool:
        """Queue attempt `attempt` of a held transfer to dst; False if it is not held (released)."""
        item = self.held.get(xfer)
        if item is None:
            return False
        with self._lock:
            q = self._queues.get(dst)
            if q is None:
                q = self._queues[dst] = queue.Queue()
                threading.Thread(target=self._run, args=(dst, q), name=f"kv-send-{dst}", daemon=True).start()
        q.put((xfer, attempt, *item))  # the job keeps its payload: a queued attempt is always sent
        return True

    def release(self, xfer: int) -> None:
        self.held.pop(xfer, None)

    def _fault(self, request_id: str, attempt: int) -> tuple[float, bool]:
        """(delay seconds, corrupt) for this attempt of a request whose id starts with a fault's prefix."""
        delay = self.faults.get("delay", {})
        corrupt = self.faults.get("corrupt", {})
        d = next((s for p, s in delay.items() if request_id.startswith(p)), 0.0) if attempt == 0 else 0.0
        c = next((n for p, n in corrupt.items() if request_id.startswith(p)), 0)
        return d, attempt < c

    def _run(self, dst: int, q: queue.Queue) -> None:
        while True:
            xfer, attempt, payload, rid = (
                q.get()
            )  # sent even if released meanwhile: the receiver waits for it
            delay, corrupt = self._fault(rid, attempt)
            if delay:
                time.sleep(delay)
            t0 = time.perf_counter()
            try:
                send_kv(payload, dst, xfer, attempt, corrupt)
            except (
                Exception
            ):  # the peer died or the pair broke: the receiver recomputes or the router fails it
                self.stats.failed += 1
                self.release(xfer)
                continue
            self.stats.sent += 1
            self.stats.bytes_sent += payload.numel() * payload.element_size()
            self.stats.send_seconds += time.perf_counter() - t0


class KVReceiver:
    """Receives expected transfers in order in one thread; results come from `poll()` as
    (src, xfer, attempt, payload or None, error or None, seconds)."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        self.dtype, self.device = dtype, device
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="kv-recv", daemon=True).start()

    def expect(self, src: int, xfer: int, attempt: int) -> None:
        self._todo.put((src, xfer, attempt))

    def poll(self) -> list[tuple[int, int, int, torch.Tensor | None, BaseException | None, float]]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while True:
            src, xfer, attempt = self._todo.get()
            t0 = time.perf_counter()
            try:
                payload = recv_kv(src, xfer, attempt, self.dtype, self.device)
                self._done.put((src, xfer, attempt, payload, None, time.perf_counter() - t0))
            except Exception as e:
                self._done.put((src, xfer, attempt, None, e, time.perf_counter() - t0))
