"""Incremental re-planning: improve a running placement while copying at most `max_moves` experts.

Re-planning from scratch (DESIGN §8, every ~10 minutes) can move most experts, and each move copies
an expert's weights (44 MB in FP8 for V3) to another GPU while serving continues. Here a move is
one replica a GPU holds after re-planning that it did not hold before (`placement.moved_experts`),
and each layer may use at most `max_moves` of them. Two candidates per layer, the better kept:

  A. The full plan (`planner.plan`) with its nodes and GPUs relabelled to overlap the current
     placement most (greedy matching of nodes, then of GPUs inside matched nodes; relabelling is
     free because every GPU and node is alike). Taken only if it fits the budget.
  B. Local search from the current placement, one action at a time, each the one that most lowers
     (max GPU load, then sum of squared GPU loads) within the remaining budget:
       - re-purpose a slot: a replica of x (x keeps >= 1 replica) becomes a replica of y — on the
         heaviest GPU (it sheds x), or on any GPU when y is an expert of the heaviest GPU (a new
         replica of y lightens every GPU holding y);
       - swap two slots between the heaviest GPU and another (replica counts unchanged).
     Actions never put two replicas of one expert on a GPU and, under the hierarchical policy,
     never put an expert on a node that does not hold its group (so cross-node traffic stays as
     planned). Its moves are counted exactly, so an action that undoes an earlier one is free.

Shapes: P GPUs, E logical experts, R slots, C candidate actions.
"""

from __future__ import annotations

import torch

from dsv3.infer.eplb.packing import single_thread
from dsv3.infer.eplb.placement import Placement, moved_experts
from dsv3.infer.eplb.planner import check_args, plan

_EPS = 1e-12


def rebalance_incremental(
    weight: torch.Tensor,
    current: Placement,
    max_moves: int,
    num_groups: int,
    num_nodes: int,
    *,
    policy: str = "auto",
) -> Placement:
    """weight [L, E], current placement -> a placement within `max_moves` moved experts per layer."""
    if max_moves < 0:
        raise ValueError(f"max_moves: must be >= 0, got {max_moves}")
    P, R = current.num_gpus, current.num_replicas
    if weight.shape != (current.num_layers, current.num_experts):
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match the current placement")
    resolved = check_args(weight, R, num_groups, num_nodes, P, policy)
    full = plan(weight, R, num_groups, num_nodes, P, policy=policy)
    w = weight.double()
    N = num_nodes if resolved == "hierarchical" else 1
    E, S = current.num_experts, current.slots_per_gpu
    n0_all, full_all = current.gpu_counts(), full.gpu_counts()
    rows = []
    with single_thread():
        for layer in range(current.num_layers):
            n0 = n0_all[layer]
            best = _local_search(w[layer], n0, max_moves, _allowed(n0, E // num_groups, N) if N > 1 else None)
            target = _relabel(full_all[layer], n0, N)
            if _moves(n0, target) <= max_moves and _better(w[layer], target, best):
                best = target
            rows.append(_to_phy2log(best, S))
    out = Placement.from_phy2log(torch.stack(rows), E, P)
    assert (moved_experts(n0_all, out.gpu_counts()) <= max_moves).all()
    return out


def _moves(n0: torch.Tensor, n: torch.Tensor) -> int:
    return int((n - n0).clamp(min=0).sum())


def _score(w: torch.Tensor, n: torch.Tensor) -> tuple[float, float]:
    loads = n.double() @ (w / n.sum(0).clamp(min=1))
    return float(loads.max()), float(loads.pow(2).sum())


def _better(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    (ma, sa), (mb, sb) = _score(w, a), _score(w, b)
    return ma < mb * (1 - _EPS) or (ma <= mb * (1 + _EPS) and sa < sb * (1 - _EPS))


def _allowed(n0: torch.Tensor, group_size: int, N: int) -> torch.Tensor:
    """[P, E] may GPU g hold expert e: its node already holds e's group."""
    P, E = n0.shape
    node_group = n0.view(N, P // N, E // group_size, group_size).sum((1, 3)) > 0  # (N, groups)
    return node_group.repeat_interleave(P // N, 0).repeat_interleave(group_size, 1)


def _relabel(target: torch.Tensor, n0: torch.Tensor, N: int) -> torch.Tensor:
    """Permute the target's nodes, then GPUs within nodes, to overlap n0 [P, E] most (greedy)."""
    P, E = n0.shape
    Pn = P // N
    node_perm = _match(n0.view(N, Pn, E).sum(1), target.view(N, Pn, E).sum(1))
    target = target.view(N, Pn, E)[node_perm]
    out = [target[i][_match(n0.view(N, Pn, E)[i], target[i])] for i in range(N)]
    return torch.cat(out)


def _match(cur: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Greedy max-overlap assignment of rows of tgt to rows of cur -> perm with tgt[perm] ~ cur."""
    # multiset overlap; with at most one replica per expert and GPU it is a plain product
    if cur.shape[0] <= 64:
        overlap = torch.minimum(cur[:, None, :], tgt[None, :, :]).sum(-1)
    else:
        overlap = (cur.double() @ tgt.double().T).long()
    M = cur.shape[0]
    perm, used = [-1] * M, [False] * M
    flat = overlap.flatten()
    pairs = flat.argsort(descending=True, stable=True)
    for k in pairs[flat[pairs] > 0].tolist():
        i, j = divmod(k, M)
        if perm[i] < 0 and not used[j]:
            perm[i], used[j] = j, True
    free = iter(j for j in range(M) if not used[j])
    return torch.tensor([p if p >= 0 else next(free) for p in perm])


def _to_phy2log(n: torch.Tensor, S: int) -> torch.Tensor:
    """[P, E] replica counts per GPU -> phy2log [R], GPU-major, logical order within a GPU."""
    P, E = n.shape
    return torch.arange(E).repeat(P).repeat_interleave(n.flatten()).view(P, S).flatten()


def _local_search(
    w: torch.Tensor, n0: torch.Tensor, budget: int, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Greedy actions from n0 [P, E] (see module docstring) -> n [P, E]."""
    n = n0.clone()
    P, E = n.shape
    ok_on = allowed if allowed is not None else torch.ones(P, E, dtype=torch.bool)
    for _ in range(4 * budget + 4):
        c = n.sum(0)
        u = w / c.clamp(min=1)  # (E,) load per replica
        loads = n.double() @ u
        g = int(loads.argmax())
        cur_max, cur_ss = float(loads.max()), float(loads.pow(2).sum())
        used = _moves(n0, n)
        here = n[g].nonzero().flatten()  # experts on the heaviest GPU

        # re-purpose: (gpu, x -> y) for x on g (any y), and for y on g (any slot elsewhere)
        gx = [(torch.full((E,), g), torch.full((E,), int(x)), torch.arange(E)) for x in here]
        slots = n.nonzero()  # (occupied gpu, expert)
        gy = [(slots[:, 0], slots[:, 1], torch.full((len(slots),), int(y))) for y in here]
        gpu, x, y = (torch.cat(t) for t in zip(*(gx + gy)))
        valid = (c[x] >= 2) & (x != y) & (n[gpu, y] == 0) & ok_on[gpu, y]
        gain_x = w[x] / (c[x] - 1).clamp(min=1) - u[x]  # every remaining replica of x gets heavier
        gain_y = w[y] / (c[y] + 1) - u[y]  # every replica of y gets lighter
        new = loads + n[:, x].T * gain_x[:, None] + n[:, y].T * gain_y[:, None]  # (C, P)
        new[torch.arange(len(gpu)), gpu] += -w[x] / (c[x] - 1).clamp(min=1) + w[y] / (c[y] + 1)
        cost = (n[gpu, y] + 1 > n0[gpu, y]).long() - (n[gpu, x] > n0[gpu, x]).long()

        # swaps between g (expert a) and another GPU h (expert b)
        a = here.repeat_interleave(len(slots))
        h, b = slots[:, 0].repeat(len(here)), slots[:, 1].repeat(len(here))
        s_valid = (h != g) & (a != b) & (n[h, a] == 0) & (n[g, b] == 0) & ok_on[h, a] & ok_on[g, b]
        s_new = loads.expand(len(a), P).clone()
        s_new[:, g] += u[b] - u[a]
        s_new[torch.arange(len(a)), h] += u[a] - u[b]
        s_cost = ((n[g, b] + 1 > n0[g, b]).long() - (n[g, a] > n0[g, a]).long()) + (
            (n[h, a] + 1 > n0[h, a]).long() - (n[h, b] > n0[h, b]).long()
        )

        all_new = torch.cat([new, s_new])
        all_ok = torch.cat([valid, s_valid]) & (torch.cat([cost, s_cost]) + used <= budget)
        mx = all_new.max(1).values.masked_fill(~all_ok, float("inf"))
        ss = all_new.pow(2).sum(1)
        if not torch.isfinite(mx).any():
            break
        near = mx <= mx.min() * (1 + _EPS)
        pick = int(ss.masked_fill(~near, float("inf")).argmin())
        if not (
            mx[pick] < cur_max * (1 - _EPS)
            or (mx[pick] <= cur_max * (1 + _EPS) and ss[pick] < cur_ss * (1 - _EPS))
        ):
            break
        if pick < len(gpu):
            n[gpu[pick], x[pick]] -= 1
            n[gpu[pick], y[pick]] += 1
        else:
            k = pick - len(gpu)
            n[g, a[k]] -= 1
            n[g, b[k]] += 1
            n[h[k], b[k]] -= 1
            n[h[k], a[k]] += 1
    return n
