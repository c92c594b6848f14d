"""The three building blocks of the EPLB planner, vectorised over a batch of independent rows.

A row is one (layer, node) sub-problem; all rows advance together, one item per step, so planning
58 layers costs one Python loop over the items of a single row, not over layers.

- `replicate`: start with one replica per expert; each extra replica goes to the expert with the
  largest load per replica (DESIGN §8 step 2). Optionally capped at `max_per_expert` replicas (the
  number of GPUs that can hold them): a replica beyond that would share a GPU with a sibling and
  lower no GPU's load while costing a slot another expert could use.
- `greedy_pack`: items sorted by load, heaviest first, each to the lightest pack that still has a
  free slot (DESIGN §8 steps 1 and 3). With keys, a pack that already holds an item of the same key
  (a replica of the same expert) is skipped while another pack with room exists.
- `refine_swaps`: local search after the greedy: swap one item of the heaviest pack with one item
  of another pack when that lowers the larger of the two loads, never creating a same-key pair;
  repeat until no swap helps. Each accepted swap strictly lowers the sorted load vector, so it ends.
- `repair_duplicates`: greedy packing can corner itself (the last free slots sit on packs that
  already hold the key); swap such an item with one elsewhere, the swap that keeps loads lowest.

Shapes: B rows, n experts (or groups) per row, M items per row, m packs, c = M/m slots per pack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

INF = float("inf")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small-tensor loops on one thread: their ops take microseconds, and intra-op thread
    hand-offs cost more than that (10-100x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def replicate(
    weight: torch.Tensor, num_slots: int, max_per_expert: int | None = None, min_per_expert: int = 1
) -> torch.Tensor:
    """weight [B, n] -> replica counts [B, n] (>= min_per_expert, each row sums to num_slots)."""
    B, n = weight.shape
    if num_slots < n * min_per_expert:
        raise ValueError(f"num_slots: {num_slots} slots cannot hold {min_per_expert} replicas of {n} experts")
    counts = torch.full((B, n), min_per_expert, dtype=torch.long)
    rows = torch.arange(B)
    for _ in range(num_slots - n * min_per_expert):
        per_replica = weight / counts
        if max_per_expert is not None:
            capped = counts >= max_per_expert
            everyone_capped = capped.all(1, keepdim=True)  # more slots than useful replicas: lift the cap
            per_replica = per_replica.masked_fill(capped & ~everyone_capped, -INF)
        counts[rows, per_replica.argmax(1)] += 1  # argmax: first of equals, like the plain greedy
    return counts


def greedy_pack(
    load: torch.Tensor, num_packs: int, key: torch.Tensor | None = None, num_keys: int = 0
) -> torch.Tensor:
    """load [B, M] (and key [B, M] in [0, num_keys)) -> slot_item [B, m, c]: the items of each pack."""
    B, M = load.shape
    if M % num_packs:
        raise ValueError(f"num_packs: {num_packs} does not divide the {M} items")
    cap = M // num_packs
    rows = torch.arange(B)
    order = load.argsort(dim=1, descending=True, stable=True)
    pack_load = torch.zeros(B, num_packs, dtype=load.dtype)
    fill = torch.zeros(B, num_packs, dtype=torch.long)
    has = torch.zeros(B, num_packs, max(num_keys, 1), dtype=torch.bool)
    slot_item = torch.empty(B, num_packs * cap, dtype=torch.long)
    for t in range(M):
        item = order[:, t]
        cost = pack_load.masked_fill(fill >= cap, INF)
        if key is not None:
            k = key[rows, item]
            spread = cost.masked_fill(has[rows, :, k], INF)  # (B, m): skip packs holding the key
            cost = torch.where(torch.isfinite(spread).any(1, keepdim=True), spread, cost)
        pack = cost.argmin(1)  # lightest pack with room; first of equals
        if key is not None:
            has[rows, pack, k] = True
        slot_item[rows, pack * cap + fill[rows, pack]] = item
        fill[rows, pack] += 1
        pack_load[rows, pack] += load[rows, item]
    return slot_item.view(B, num_packs, cap)


def _key_counts(slot_key: torch.Tensor, num_keys: int) -> torch.Tensor:
    """slot_key [B, m, c] -> [B, m, num_keys] items of each key in each pack."""
    B, m, c = slot_key.shape
    counts = torch.zeros(B, m, num_keys, dtype=torch.long)
    return counts.scatter_add_(2, slot_key, torch.ones_like(slot_key))


def refine_swaps(
    slot_item: torch.Tensor,
    load: torch.Tensor,
    key: torch.Tensor | None = None,
    num_keys: int = 0,
    max_iters: int | None = None,
) -> torch.Tensor:
    """Swap local search on slot_item [B, m, c] (item ids; load/key [B, M]) -> improved slot_item."""
    B, m, c = slot_item.shape
    slot_item = slot_item.clone()
    counts = (
        _key_counts(key.gather(1, slot_item.view(B, -1)).view(B, m, c), num_keys) if key is not None else None
    )
    active = torch.arange(B)  # rows that may still improve: converged rows drop out
    for _ in range(max_iters if max_iters is not None else 4 * m * c):
        n = active.numel()
        rows = torch.arange(n)
        items = slot_item[active]  # (n, m, c)
        w = load[active].gather(1, items.view(n, -1)).view(n, m, c)
        total = w.sum(2)  # (n, m)
        p = total.argmax(1)
        top = total[rows, p]
        d = w[rows, p][:, :, None, None] - w[:, None, :, :]  # (n, c_i, m_q, c_j): load that moves p -> q
        cand = torch.maximum(top[:, None, None, None] - d, total[:, None, :, None] + d)
        tol = 1e-12 * (1.0 + top)
        bad = (d <= tol[:, None, None, None]) | (torch.arange(m) == p[:, None])[:, None, :, None]
        if counts is not None:
            k = key[active].gather(1, items.view(n, -1)).view(n, m, c)
            kp = k[rows, p]  # (n, c) keys on the heaviest pack
            cnt = counts[active]
            q_has_i = cnt.gather(2, kp[:, None, :].expand(n, m, c)).transpose(1, 2) > 0  # (n, c_i, m)
            p_has_j = cnt[rows, p].gather(1, k.view(n, -1)).view(n, m, c) > 0  # (n, m, c_j)
            bad |= q_has_i[..., None] | p_has_j[:, None]
        best, arg = cand.masked_fill(bad, INF).view(n, -1).min(1)
        better = (best < top - tol).nonzero().flatten()
        if better.numel() == 0:
            break
        i, q, j = arg[better] // (m * c), arg[better] // c % m, arg[better] % c
        pb, rb = p[better], active[better]
        a, b = slot_item[rb, pb, i].clone(), slot_item[rb, q, j].clone()
        slot_item[rb, pb, i], slot_item[rb, q, j] = b, a
        if counts is not None:
            ka, kb = key[rb, a], key[rb, b]
            counts[rb, pb, ka] -= 1
            counts[rb, pb, kb] += 1
            counts[rb, q, kb] -= 1
            counts[rb, q, ka] += 1
        active = rb
    return slot_item


def repair_duplicates(
    slot_item: torch.Tensor, load: torch.Tensor, key: torch.Tensor, num_keys: int
) -> torch.Tensor:
    """Remove same-key pairs within a pack by swaps where a partner exists -> slot_item [B, m, c]."""
    B, m, c = slot_item.shape
    slot_item = slot_item.clone()
    counts = _key_counts(key.gather(1, slot_item.view(B, -1)).view(B, m, c), num_keys)
    for b in (counts > 1).any(2).any(1).nonzero().flatten().tolist():
        for _ in range(m * c):
            k = key[b][slot_item[b]]  # (m, c)
            w = load[b][slot_item[b]]
            dup = counts[b].gather(1, k) > 1  # (m, c) item shares its pack with a same-key item
            if not dup.any():
                break
            p, i = dup.nonzero()[0].tolist()
            ki = k[p, i]
            # partner (q, j): q lacks key ki, p lacks key k[q, j]
            ok = (counts[b][:, ki] == 0)[:, None] & (counts[b][p].gather(0, k.flatten()).view(m, c) == 0)
            if not ok.any():
                break  # unavoidable with single swaps (e.g. more replicas than packs)
            total = w.sum(1)
            d = w[p, i] - w  # (m, c)
            cost = torch.maximum(total[p] - d, total[:, None] + d).masked_fill(~ok, INF)
            q, j = divmod(int(cost.flatten().argmin()), c)
            kj = k[q, j]
            slot_item[b, p, i], slot_item[b, q, j] = slot_item[b, q, j].clone(), slot_item[b, p, i].clone()
            counts[b, p, ki] -= 1
            counts[b, p, kj] += 1
            counts[b, q, kj] -= 1
            counts[b, q, ki] += 1
    return slot_item
