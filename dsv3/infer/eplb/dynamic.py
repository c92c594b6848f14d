"""Dynamic redundancy: each GPU hosts H experts, only A of them run per step (V3 report §3.4.1).

"Each GPU hosts more experts (e.g., 16 experts), but only 9 will be activated during each
inference step. Before the all-to-all operation at each layer begins, we compute the globally
optimal routing scheme on the fly." (DESIGN §8). Three steps:

  1. Hosting (slow, from the window's statistics, like static EPLB): `plan_hosting` puts the static
     plan with A slots per GPU in the first A slots and further replicas of heavy experts in the
     other H - A, never two replicas of an expert on one GPU.
  2. Activation (per step and layer, from the step's own loads): `select_active` first gives every
     expert with tokens one active replica (heaviest expert first, on the least loaded of its host
     GPUs that has an active slot left), then hands the remaining active slots one by one to the
     expert with the largest load per active replica, on its least loaded host GPU with room.
     The static default (first A slots) is also split, and the step keeps whichever is better.
  3. Token split (per step and layer): `split_tokens` divides each expert's tokens among its active
     replicas to minimise the largest GPU load. Loads reachable by splitting form a polymatroid
     base, on which the least sum of squares is also min-max optimal, so block coordinate descent
     does it: for each expert in turn, pour its tokens into its GPUs like water into vessels with
     floors at the GPUs' other loads. Tokens are integers in the end (largest remainders).
The result (`quota`) is what `routing.ReplicatedMoE.quota` takes; the per-step work is O(E + P*A)
plus a few sweeps over the multi-replica experts, done on the CPU here as a reference (numpy).

Shapes: E logical experts, P GPUs, H hosted and A active slots per GPU, R = P*H hosted slots.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from dsv3.infer.eplb.placement import Placement
from dsv3.infer.eplb.planner import plan


def plan_hosting(
    weight: torch.Tensor,
    num_gpus: int,
    hosted_per_gpu: int,
    active_per_gpu: int,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> Placement:
    """weight [L, E] window loads -> hosting placement, H = hosted_per_gpu slots per GPU.

    The first A slots of each GPU are the static plan with A slots per GPU (so "these A active" is
    always a valid choice, and dynamic can only do better than static); the other H - A slots take
    further replicas, each to the expert with the largest load per replica, on the GPU with the
    lightest static load that lacks the expert (within the expert's node under the hierarchical
    policy)."""
    if not 1 <= active_per_gpu <= hosted_per_gpu:
        raise ValueError(f"active_per_gpu: {active_per_gpu} must be in [1, hosted_per_gpu={hosted_per_gpu}]")
    static = plan(weight, num_gpus * active_per_gpu, num_groups, num_nodes, num_gpus)
    L, E = weight.shape
    w = weight.double().numpy()
    loads = static.gpu_loads(weight).numpy()
    node_gpus = num_gpus // num_nodes if num_groups % num_nodes == 0 else num_gpus
    extra = hosted_per_gpu - active_per_gpu
    rows = []
    for layer in range(L):
        n = static.gpu_counts()[layer].numpy().copy()  # (P, E)
        node_has = n.reshape(-1, node_gpus, E).sum(1) > 0  # (nodes, E) where each expert may go
        room = np.full(num_gpus, extra)
        slots: list[list[int]] = [[] for _ in range(num_gpus)]
        heap = [(-w[layer, e] / n[:, e].sum(), e) for e in range(E)]
        heapq.heapify(heap)
        while heap and room.sum() > 0:
            _, e = heapq.heappop(heap)
            ok = (room > 0) & (n[:, e] == 0) & np.repeat(node_has[:, e], node_gpus)
            if not ok.any():
                continue  # no GPU can take another replica of e
            g = int(np.flatnonzero(ok)[np.argmin(loads[layer][ok])])
            n[g, e] += 1
            room[g] -= 1
            slots[g].append(e)
            heapq.heappush(heap, (-w[layer, e] / n[:, e].sum(), e))
        for g in range(num_gpus):  # fewer candidates than slots: repeat a local expert (never active)
            slots[g] += [int(static.phy2log[layer, g * active_per_gpu])] * int(room[g])
        base = static.phy2log[layer].view(num_gpus, active_per_gpu)
        rows.append(
            torch.cat([base, torch.tensor(slots, dtype=torch.long).view(num_gpus, extra)], 1).flatten()
        )
    return Placement.from_phy2log(torch.stack(rows), E, num_gpus)


def select_active(
    phy2log: torch.Tensor, num_gpus: int, load: torch.Tensor, active_per_gpu: int
) -> torch.Tensor:
    """One layer: hosting phy2log [R], the step's loads [E] -> active [R] bool (<= A per GPU where
    possible; an expert with tokens and no free host overfills its least loaded host)."""
    slot_expert = phy2log.tolist()
    R, E = len(slot_expert), load.shape[0]
    H = R // num_gpus
    w = load.double().numpy()
    hosts: list[list[int]] = [[] for _ in range(E)]
    for s, e in enumerate(slot_expert):
        hosts[e].append(s)
    room = np.full(num_gpus, active_per_gpu)
    gpu_load = np.zeros(num_gpus)
    active = np.zeros(R, dtype=bool)
    n_active = np.zeros(E, dtype=np.int64)

    def activate(e: int, s: int) -> None:
        g = s // H
        for t in hosts[e]:  # the expert's load is spread evenly over its active replicas meanwhile
            if active[t]:
                gpu_load[t // H] += w[e] / (n_active[e] + 1) - w[e] / n_active[e]
        active[s], room[g] = True, room[g] - 1
        n_active[e] += 1
        gpu_load[g] += w[e] / n_active[e]

    # coverage: one active replica per expert with tokens; greedy, then augmenting paths (a
    # bipartite b-matching) for an expert whose hosts are all full
    cover: dict[int, int] = {}  # expert -> its first active slot
    on_gpu: list[set[int]] = [set() for _ in range(num_gpus)]  # experts covered on each GPU

    def assign(e: int, s: int) -> None:
        if e in cover:  # re-covered elsewhere by an augmenting path
            old = cover[e] // H
            on_gpu[old].discard(e)
            room[old] += 1
        cover[e] = s
        on_gpu[s // H].add(e)
        room[s // H] -= 1

    def augment(e: int, seen: set[int]) -> bool:
        for s in hosts[e]:
            g = s // H
            if g in seen:
                continue
            seen.add(g)
            if room[g] > 0 or any(augment(f, seen) for f in sorted(on_gpu[g])):
                assign(e, s)
                return True
        return False

    for e in sorted(range(E), key=lambda e: (-w[e], e)):
        if w[e] <= 0:
            break
        free = [s for s in hosts[e] if room[s // H] > 0]
        if free:
            assign(e, min(free, key=lambda s: gpu_load[s // H]))
            gpu_load[cover[e] // H] += w[e]
        elif not augment(e, set()):
            assign(e, min(hosts[e], key=lambda s: gpu_load[s // H]))  # infeasible: overfill
    room[:] = active_per_gpu
    gpu_load[:] = 0.0
    for e, s in cover.items():
        active[s], room[s // H] = True, room[s // H] - 1
        n_active[e] = 1
        gpu_load[s // H] += w[e]
    heap = [(-w[e] / n_active[e], e) for e in range(E) if n_active[e] > 0]
    heapq.heapify(heap)
    while heap and room.sum() > 0:
        _, e = heapq.heappop(heap)
        busy = {t // H for t in hosts[e] if active[t]}  # never two active replicas on one GPU
        free = [s for s in hosts[e] if not active[s] and room[s // H] > 0 and s // H not in busy]
        if free:
            activate(e, min(free, key=lambda s: gpu_load[s // H]))
            heapq.heappush(heap, (-w[e] / n_active[e], e))
    return torch.from_numpy(active)


def _water_fill(floors: np.ndarray, amount: float) -> np.ndarray:
    """Shares x >= 0 with sum(x) = amount that make floors + x as level as possible."""
    order = np.argsort(floors)
    f = floors[order]
    csum = np.cumsum(f)
    k = np.arange(1, len(f) + 1)
    level = (amount + csum) / k
    m = int(np.nonzero(level > f)[0].max()) if amount > 0 else 0  # last vessel the water reaches
    x = np.zeros_like(floors)
    x[order[: m + 1]] = np.maximum(level[m] - f[: m + 1], 0.0)
    return x


def split_tokens(
    phy2log: torch.Tensor, active: torch.Tensor, num_gpus: int, load: torch.Tensor, sweeps: int = 50
) -> torch.Tensor:
    """One layer: tokens per active slot [R] (long; inactive slots 0), each expert's sum = load[e],
    minimising the largest GPU load (see the module docstring)."""
    slots = active.nonzero().flatten().numpy()
    expert = phy2log.numpy()[slots]
    gpu = slots // (phy2log.shape[0] // num_gpus)
    w = load.double().numpy()
    # two active slots of one expert on one GPU act as one: the second gets no tokens
    _, first = np.unique(expert * num_gpus + gpu, return_index=True)
    lead = np.zeros(len(slots), dtype=bool)
    lead[first] = True
    counts = np.bincount(expert[lead], minlength=w.shape[0])
    share = np.where(lead, w[expert] / np.maximum(counts[expert], 1), 0.0)  # start from the even split
    gpu_load = np.bincount(gpu, weights=share, minlength=num_gpus)
    multi = [np.nonzero((expert == e) & lead)[0] for e in np.nonzero(counts > 1)[0]]
    for _ in range(sweeps if multi else 0):
        moved = 0.0
        for idx in multi:
            g = gpu[idx]
            floors = gpu_load[g] - share[idx]
            new = _water_fill(floors, float(share[idx].sum()))
            moved = max(moved, float(np.abs(new - share[idx]).max()))
            gpu_load[g] = floors + new
            share[idx] = new
        if moved < 1e-9 * (1.0 + w.max()):
            break
    quota = np.floor(share).astype(np.int64)
    # largest remainders: each expert gets back exactly its tokens
    short = w.astype(np.int64) - np.bincount(expert, weights=quota, minlength=w.shape[0]).astype(np.int64)
    for e in np.nonzero(short > 0)[0]:
        idx = np.nonzero((expert == e) & lead)[0]
        top = idx[np.argsort(-(share[idx] - quota[idx]), kind="stable")[: short[e]]]
        quota[top] += 1
    out = torch.zeros(phy2log.shape[0], dtype=torch.long)
    out[torch.from_numpy(slots)] = torch.from_numpy(quota)
    return out


def dynamic_step(
    hosting: Placement, load: torch.Tensor, active_per_gpu: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers of one step: load [L, E] integer tokens -> (active [L, R] bool, quota [L, R] long).

    Two activations are split and the better kept: the greedy of `select_active` and the static
    default (the first A slots of each GPU, see `plan_hosting`)."""
    act, quota = [], []
    for layer in range(hosting.num_layers):
        a, q = dynamic_layer(hosting.phy2log[layer], hosting.num_gpus, load[layer], active_per_gpu)
        act.append(a)
        quota.append(q)
    return torch.stack(act), torch.stack(quota)


def dynamic_layer(
    phy2log: torch.Tensor, num_gpus: int, load: torch.Tensor, active_per_gpu: int, sweeps: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of `dynamic_step`: hosting phy2log [R] (GPU-major), load [E] -> (active [R] bool,
    quota [R] long), the better of the greedy activation and the static default. `sweeps` caps
    `split_tokens`' descent (a serving engine runs this per layer and step: a few sweeps)."""
    P, H = num_gpus, phy2log.shape[0] // num_gpus
    default = (torch.arange(phy2log.shape[0]) % H) < active_per_gpu
    greedy = select_active(phy2log, P, load, active_per_gpu)
    best = None
    floor = -(-int(load.sum()) // P)  # no split has a lighter busiest GPU
    for a in (greedy, default):
        if (a.view(P, H).sum(1) > active_per_gpu).any():
            continue
        q = split_tokens(phy2log, a, P, load, sweeps)
        peak = int(q.view(P, H).sum(1).max())
        if best is None or peak < best[0]:
            best = (peak, a, q)
        if peak <= floor:  # optimal: the default cannot be strictly better
            break
    assert best is not None  # the default is always within A per GPU
    return best[1], best[2]
