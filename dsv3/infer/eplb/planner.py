"""Expert-parallel load balancer: where to put redundant experts (DESIGN §8; V3 report §3.4).

The problem. A MoE layer has E logical experts whose loads (tokens routed to them over a recent
window) are skewed. The deployment has P GPUs in N nodes, each GPU with the same number S of expert
slots, R = P*S >= E slots in all. Choose how many replicas each expert gets and which slot holds
each replica so that every GPU processes about the same number of tokens, an expert's tokens being
split evenly among its replicas.

The published algorithm, as DESIGN §8 states it. Hierarchical policy, used when the expert groups
divide evenly over the nodes:
  (1) pack expert groups onto nodes, balancing group loads;
  (2) within each node, replicate experts - each extra replica goes to the expert with the largest
      load per replica;
  (3) pack replicas onto the node's GPUs, balancing load per replica.
Global policy otherwise: the same with one group and one node. Output: physical->logical map,
logical->physical replicas, replica counts. "Packing" is the greedy that takes items heaviest first
and gives each to the lightest pack that still has a free slot (every pack gets the same count).
Keeping a group on one node keeps node-limited routing (§2.1.2) cheap: a token that reaches a group
reaches all its replicas without extra cross-node traffic. Known weakness: two replicas of one
expert can land on the same GPU.

What this implementation changes, and why:
  - Replica cap: an expert gets at most as many replicas as there are GPUs to hold them (P/N). A
    replica beyond that must share a GPU with a sibling, so no GPU gets lighter, and the slot is
    lost to another expert. The cap is lifted only when every expert has reached it.
  - No same-GPU duplicates where avoidable: step (3) skips a GPU that already holds the expert while
    another GPU has room; a final repair swaps away any pair the greedy cornered itself into. With
    the cap, a duplicate-free placement always exists (deal the replicas, sorted by expert, round-
    robin over the GPUs), so the repair's single swaps find one in practice; the tests check it.
  - Swap refinement after each greedy packing (steps 1 and 3): swap an item of the heaviest pack
    with an item of another when that lowers the larger of the two loads. Greedy LPT packing with
    equal pack sizes is a few percent off the optimum when items are coarse (9 per GPU in
    prefill); the swaps close most of it for the cost of a few vectorised iterations.
  - Group search (step 1): packing groups by their summed load ignores that a node's GPUs can
    only be as even as its hottest experts allow. When the partitions of groups into nodes are few
    (V3: 8 groups on 4 nodes -> 105), every possible node is planned with steps (2)-(3) and each
    layer takes the partition whose worst node has the lightest max GPU.
  - Replica-count search: step (2) minimises the largest replica, not the largest GPU; with coarse
    items they differ. A few rounds try moving one replica from a multi-replica expert on the
    heaviest GPU to one of the next experts the greedy would replicate, re-pack, keep improvements.
  - Policy "auto" falls back to global when groups do not divide over nodes (as DESIGN §8 says);
    asking for "hierarchical" explicitly then fails with a message instead.
  - Everything is vectorised over layers (and nodes): planning 58 layers x 256 experts x 320 slots
    takes a fraction of a second. Loads are FP64 so that ties and sums are exact enough to compare
    with a plain reference.
With `cap_replicas=avoid_duplicates=refine=False` this is the published greedy exactly (the
benchmark's loop-based baseline gives identical GPU loads; a test holds them together).

Further modes live beside this file: `incremental.py` (bounded number of moved experts from a
current placement) and `dynamic.py` (more hosted than active experts, active set chosen per step).

Shapes: L layers, E logical experts, R physical slots, P GPUs, N nodes, Gr groups,
S = R/P slots per GPU; per node: Gn = Gr/N groups, En = E/N experts, Rn = R/N slots, Pn = P/N GPUs.
"""

from __future__ import annotations

import itertools
import math

import torch

from dsv3.infer.eplb.packing import greedy_pack, refine_swaps, repair_duplicates, replicate, single_thread
from dsv3.infer.eplb.placement import Placement

POLICIES = ("auto", "hierarchical", "global")
MAX_PARTITIONS = 1000  # group->node search is exhaustive up to this many partitions (V3: 8 groups -> <= 105)


def check_args(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "auto",
) -> str:
    """Validate the planner's arguments; return the policy that applies ("hierarchical"/"global")."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [layers, experts], got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("weight: loads must be finite and >= 0")
    E = weight.shape[1]
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus: must be >= 1, got {num_gpus}")
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
    if num_replicas < E:
        raise ValueError(f"num_replicas: {num_replicas} slots cannot hold the {E} logical experts")
    if num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas: {num_replicas} is not divisible by num_gpus ({num_gpus}); "
            "every GPU must hold the same number of expert slots"
        )
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus: {num_gpus} is not divisible by num_nodes ({num_nodes})")
    if E % num_groups:
        raise ValueError(f"num_groups: {num_groups} does not divide the {E} logical experts")
    if num_groups % num_nodes:
        if policy == "hierarchical":
            raise ValueError(
                f"num_groups: {num_groups} is not divisible by num_nodes ({num_nodes}); the hierarchical "
                "policy puts whole groups on nodes (use policy='global' or 'auto')"
            )
        return "global"
    return "global" if policy == "global" else "hierarchical"


@torch.no_grad()
def plan(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    cap_replicas: bool = True,
    avoid_duplicates: bool = True,
    refine: bool = True,
    search_groups: bool = True,
    recount_rounds: int = 4,
    min_replicas: int = 1,
) -> Placement:
    """weight [L, E] expert loads -> Placement (phy2log [L, R], log2phy, logcnt).

    min_replicas > 1 gives every expert that many replicas first (dynamic redundancy's hosting)."""
    with single_thread():
        opts = (cap_replicas, avoid_duplicates, refine, min_replicas)
        return _plan(
            weight, num_replicas, num_groups, num_nodes, num_gpus, policy, opts, search_groups, recount_rounds
        )


def _plan(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str,
    opts: tuple[bool, bool, bool, int],
    search_groups: bool,
    recount_rounds: int,
) -> Placement:
    refine = opts[2]
    if check_args(weight, num_replicas, num_groups, num_nodes, num_gpus, policy) == "global":
        num_groups, num_nodes = 1, 1
    min_replicas = opts[3]
    if min_replicas < 1 or (min_replicas * weight.shape[1]) > num_replicas:
        raise ValueError(
            f"min_replicas: {min_replicas} replicas of every expert do not fit in {num_replicas} slots"
        )
    w = weight.detach().to(torch.float64).cpu()
    L, E = w.shape
    N, P, R = num_nodes, num_gpus, num_replicas
    group_size, En, Rn, Pn = E // num_groups, E // N, R // N, P // N

    # (1) groups -> nodes, Gn groups each
    group_load = w.view(L, num_groups, group_size).sum(-1)  # (L, Gr)
    partitions = _partitions(num_groups, N) if refine and search_groups and N > 1 else None
    if partitions is not None and len(partitions) <= MAX_PARTITIONS:
        node_groups, local = _search_groups(w, group_size, partitions, Rn, Pn, opts)
    else:
        node_groups = greedy_pack(group_load, N)  # (L, N, Gn) group ids
        if refine:
            node_groups = refine_swaps(node_groups, group_load)
        local = None
    local2log = (node_groups[..., None] * group_size + torch.arange(group_size)).view(L * N, En)
    if local is None:
        # (2) + (3) within each node
        local = _plan_nodes(w.gather(1, local2log.view(L, E)).view(L * N, En), Rn, Pn, *opts)
    if refine and recount_rounds > 0 and R > P:
        local = _recount(w.gather(1, local2log.view(L, E)).view(L * N, En), local, Pn, opts, recount_rounds)

    phy2log = local2log.gather(1, local).view(L, P, R // P)
    phy2log = phy2log.sort(-1).values.reshape(L, R)  # a GPU's slots in logical order: deterministic
    return Placement.from_phy2log(phy2log, E, P)


def _plan_nodes(
    w_local: torch.Tensor,
    Rn: int,
    Pn: int,
    cap: bool,
    avoid: bool,
    refine: bool,
    min_replicas: int = 1,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps (2) and (3) for independent nodes: w_local [B, En] -> node-local expert of each slot
    [B, Rn], GPU-major (Pn GPUs of Rn/Pn slots). `counts` [B, En] skips step (2)."""
    B, En = w_local.shape
    if counts is None:
        counts = replicate(w_local, Rn, Pn if cap else None, min_replicas)  # (B, En)
    item_expert = torch.searchsorted(
        counts.cumsum(1), torch.arange(Rn).expand(B, Rn).contiguous(), right=True
    )
    item_load = w_local.gather(1, item_expert) / counts.gather(1, item_expert)  # (B, Rn) load per replica
    key = item_expert if avoid else None
    slots = greedy_pack(item_load, Pn, key, En)  # (B, Pn, S) replica ids
    if refine:
        slots = refine_swaps(slots, item_load, key, En)
    if avoid:
        slots = repair_duplicates(slots, item_load, item_expert, En)
    return item_expert.gather(1, slots.view(B, Rn))


def _node_max(w_local: torch.Tensor, local: torch.Tensor, Pn: int) -> torch.Tensor:
    """Max GPU load of each node: w_local [B, En], local [B, Rn] -> [B]."""
    counts = torch.zeros_like(w_local).scatter_add_(1, local, torch.ones_like(local, dtype=w_local.dtype))
    return (w_local / counts).gather(1, local).view(local.shape[0], Pn, -1).sum(-1).max(-1).values


def _recount(w_local: torch.Tensor, local: torch.Tensor, Pn: int, opts: tuple, rounds: int, top: int = 4):
    """Replica-count search after packing: the greedy of step (2) minimises the largest replica, not
    the largest GPU, and with coarse items the two differ. Try moving one replica from an expert
    that has several to one of the `top` experts the greedy would replicate next, re-pack, keep the
    best if it lowers the node's max GPU load. -> local [B, Rn]."""
    B, En = w_local.shape
    Rn = local.shape[1]
    cap = Pn if opts[0] else Rn
    for _ in range(rounds):
        counts = torch.zeros(B, En, dtype=torch.long).scatter_add_(1, local, torch.ones_like(local))
        # donors: multi-replica experts on each node's heaviest GPU (only they can lower it)
        gpu_load = (w_local / counts).gather(1, local).view(B, Pn, -1).sum(-1)  # (B, Pn)
        heavy = local.view(B, Pn, -1)[torch.arange(B), gpu_load.argmax(1)]  # (B, S)
        on_heavy = torch.zeros(B, En, dtype=torch.bool).scatter_(1, heavy, True)
        donors = ((counts > opts[3]) & on_heavy).nonzero()  # (D, 2) rows and experts that can give a replica
        if donors.numel() == 0:
            break
        after = (w_local / (counts + 1)).masked_fill(counts >= cap, -1.0)  # per-replica load if one more
        takers = after.topk(min(top, En), dim=1).indices  # (B, top)
        row = donors[:, 0].repeat_interleave(takers.shape[1])
        give = donors[:, 1].repeat_interleave(takers.shape[1])
        take = takers[donors[:, 0]].flatten()
        ok = (give != take) & (after[row, take] >= 0)
        row, give, take = row[ok], give[ok], take[ok]
        if row.numel() == 0:
            break
        cand = counts[row].clone()
        cand[torch.arange(row.numel()), give] -= 1
        cand[torch.arange(row.numel()), take] += 1
        cand_local = _plan_nodes(w_local[row], Rn, Pn, *opts, counts=cand)
        cand_max = _node_max(w_local[row], cand_local, Pn)
        now = _node_max(w_local, local, Pn)
        best = torch.full((B,), float("inf"), dtype=w_local.dtype).scatter_reduce(0, row, cand_max, "amin")
        better = best < now * (1 - 1e-12)
        if not better.any():
            break
        pick = (cand_max == best[row]) & better[row]
        first = torch.full((B,), -1, dtype=torch.long).scatter_reduce(
            0, row[pick], torch.arange(row.numel())[pick], "amax"
        )
        rows_done = (first >= 0).nonzero().flatten()
        local = local.clone()
        local[rows_done] = cand_local[first[rows_done]]
    return local


def _partitions(num_groups: int, num_nodes: int) -> list[list[tuple[int, ...]]] | None:
    """Every way to split the groups into num_nodes unordered sets of equal size (None if too many)."""
    size = num_groups // num_nodes
    count = math.factorial(num_groups) // (math.factorial(size) ** num_nodes * math.factorial(num_nodes))
    if count > MAX_PARTITIONS:
        return None

    def split(rest: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
        if not rest:
            return [[]]
        first, others = rest[0], rest[1:]
        out = []
        for mates in itertools.combinations(others, size - 1):
            block = (first, *mates)
            out += [[block, *tail] for tail in split(tuple(g for g in others if g not in mates))]
        return out

    return split(tuple(range(num_groups)))


def _search_groups(
    w: torch.Tensor, group_size: int, partitions: list[list[tuple[int, ...]]], Rn: int, Pn: int, opts: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (1) by search: plan every possible node (set of groups) with steps (2)-(3), then pick per
    layer the partition whose worst node has the lightest max GPU. -> node_groups [L, N, Gn], local."""
    L, E = w.shape
    subsets = sorted({block for part in partitions for block in part})
    index = {block: i for i, block in enumerate(subsets)}
    C, N, Gn = len(subsets), len(partitions[0]), len(subsets[0])
    En = Gn * group_size
    members = torch.tensor(subsets)  # (C, Gn)
    experts = (members[..., None] * group_size + torch.arange(group_size)).view(C, En)  # (C, En)
    w_sub = w[:, experts].view(L * C, En)
    local = _plan_nodes(w_sub, Rn, Pn, *opts)  # (L*C, Rn)
    per_replica = w_sub / torch.zeros_like(w_sub).scatter_add_(
        1, local, torch.ones_like(local, dtype=w.dtype)
    )
    gpu_max = per_replica.gather(1, local).view(L, C, Pn, -1).sum(-1).max(-1).values  # (L, C)
    part = torch.tensor([[index[b] for b in p] for p in partitions])  # (Q, N) subset ids
    cost = gpu_max[:, part]  # (L, Q, N)
    worst = cost.max(-1).values
    # among partitions with the best worst node, prefer the lightest nodes overall
    ties = worst <= worst.min(1, keepdim=True).values * (1 + 1e-12)
    best = (cost.pow(2).sum(-1)).masked_fill(~ties, float("inf")).argmin(1)  # (L,)
    chosen = part[best]  # (L, N)
    node_groups = members[chosen]  # (L, N, Gn)
    local = local.view(L, C, Rn).gather(1, chosen[..., None].expand(L, N, Rn)).view(L * N, Rn)
    return node_groups, local


def rebalance(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] -> (phy2log [L, R], log2phy [L, E, max_replicas] padded with -1, logcnt [L, E]).

    The interface of DESIGN §8; `options` are `plan`'s keyword arguments (policy, cap_replicas,
    avoid_duplicates, refine)."""
    p = plan(weight, num_replicas, num_groups, num_nodes, num_gpus, **options)  # type: ignore[arg-type]
    return p.phy2log, p.log2phy, p.logcnt
