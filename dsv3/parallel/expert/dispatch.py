"""Expert-parallel dispatch and combine: one hop, two hops, and the naive all-gather (DESIGN §5).

Placement. The E routed experts are split into contiguous blocks over the R ranks of an EP group
(rank r hosts experts [r*El, (r+1)*El)), and the group's ranks into nodes of L consecutive ranks.
Expert groups (the gate's `n_expert_groups`) are contiguous too, so when every group lies inside
one node, group-limited routing with `n_limited_groups = M` is node-limited routing: each token
reaches at most M nodes (§2.1.2, "node-limited routing"; V3: 8 groups on 8 nodes, M = 4).

One hop (the reference): each (token, expert) copy goes straight to the expert's rank.
  1. sort the N*K copies by expert (= by rank, then local expert), exchange the per-expert counts;
  2. all-to-all the rows (uneven splits), group the received rows by local expert, one grouped GEMM;
  3. all-to-all the outputs back; the source weights them by the gate values and sums per token.

Two hops (§3.2.2): IB traffic is what limits V3, and a token needs each node only once.
  1. hop 1, across nodes: one copy per (token, target node) goes to the rank with the SAME local
     index on that node, carrying the token's expert ids and gate values for that node;
  2. hop 2, inside the node: that rank forwards one copy per (token, expert) to the expert's rank;
  3. the outputs come back over hop 2, are weighted and summed per token at the forwarding rank,
     and only this per-node partial sum crosses nodes on the way back; the source adds the nodes.
So with node-limited routing each token crosses the network at most M times each way, whatever K.

Asynchronous one hop (what DualPipe's F&B overlaps, paper §3.2.1): `one_hop_start_dispatch`
starts the rows' all-to-all (`comm.start_all_to_all`) and returns the plan with the exchange in
flight (`plan["pending"]`, its autograd token `plan["token"]`); `one_hop_finish_dispatch` waits and
groups the rows by local expert. `one_hop_start_combine` / `one_hop_finish_combine` do the same for
the way back. Values and gradients equal the synchronous functions'. (Two hops stay synchronous.)

Each scheme is two halves, `*_dispatch` (up to the rows this rank's experts receive, grouped by
local expert: what the grouped GEMM reads) and `*_combine` (from the experts' outputs back to the
routed output at the source), so that the MoE's `dispatch` and `combine` (`ExpertParallelMoE`) are
separate steps a pipeline schedule can interleave with another micro-batch's computation.

Every step is a differentiable op (gather, index_add, the all-to-all of `comm.py`), so autograd
gives the exact gradients of the single-device MoE; ranks with no tokens still take part in every
collective, so the exchanges of all ranks line up in forward and backward.

Shapes: N tokens, K experts per token, D dim, E experts, R EP ranks, El = E/R experts per rank,
L ranks per node, Nn nodes, C token copies, S received rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3.model.moe import combine
from dsv3.parallel.comm import (
    Link,
    all_gather_rows,
    all_to_all,
    exchange_counts,
    exchange_rows,
    reduce_scatter_rows,
    start_all_to_all,
)


@dataclass(frozen=True)
class Placement:
    """Where experts live: E experts over R ranks of an EP group, L of them per node."""

    n_experts: int
    ranks: int
    ranks_per_node: int  # L (ranks of the EP group sharing a node)
    n_groups: int = 1  # the gate's expert groups
    n_limited_groups: int = 1  # M: groups kept per token

    def __post_init__(self) -> None:
        if self.n_experts % self.ranks:
            raise ValueError(
                f"model.n_routed_experts={self.n_experts} is not divisible by parallel.ep={self.ranks}"
            )
        if self.ranks % self.ranks_per_node:
            raise ValueError(f"parallel.ranks_per_node={self.ranks_per_node} does not divide ep={self.ranks}")

    @property
    def local_experts(self) -> int:
        return self.n_experts // self.ranks

    @property
    def n_nodes(self) -> int:
        return self.ranks // self.ranks_per_node

    @property
    def experts_per_node(self) -> int:
        return self.local_experts * self.ranks_per_node

    def rank_of(self, experts: torch.Tensor) -> torch.Tensor:
        return experts // self.local_experts

    def node_of(self, experts: torch.Tensor) -> torch.Tensor:
        return experts // self.experts_per_node

    @property
    def groups_on_nodes(self) -> bool:
        """Every expert group lies inside one node (so group-limited routing is node-limited)."""
        size = self.n_experts // self.n_groups
        return self.n_groups > 1 and all(
            (g * size) // self.experts_per_node == ((g + 1) * size - 1) // self.experts_per_node
            for g in range(self.n_groups)
        )

    @property
    def max_nodes(self) -> int:
        """The guaranteed bound on nodes per token (M when groups sit on nodes, else every node)."""
        return min(self.n_limited_groups, self.n_nodes) if self.groups_on_nodes else self.n_nodes


def nodes_per_token(indices: torch.Tensor, placement: Placement) -> torch.Tensor:
    """indices [N, K] -> [N] distinct nodes each token's experts live on (the dispatch plan's fan-out)."""
    nodes = placement.node_of(indices)
    hit = torch.zeros(indices.shape[0], placement.n_nodes, dtype=torch.bool, device=indices.device)
    return hit.scatter_(1, nodes, True).sum(dim=1)


def by_local_expert(counts: torch.Tensor) -> torch.Tensor:
    """counts [P, El] received rows per (source, local expert), rows ordered by source then expert
    -> the permutation [S] that groups them by local expert (stable: by source within an expert)."""
    P, El = counts.shape
    expert_of_row = torch.arange(El, device=counts.device).repeat(P).repeat_interleave(counts.flatten())
    return expert_of_row.argsort(stable=True)


def one_hop_dispatch(
    x: torch.Tensor,
    indices: torch.Tensor,
    placement: Placement,
    link: Link,
    dispatch_wire: str = "same",
    combine_wire: str = "same",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x [N, D], indices [N, K] -> (rows [S, D] received for my experts, grouped by local expert;
    rows per local expert [El]; the plan `one_hop_combine` needs)."""
    K = indices.shape[1]
    R, El = placement.ranks, placement.local_experts
    flat = indices.flatten()  # (N*K,)
    order = flat.argsort(stable=True)  # copies by expert, hence by destination rank
    send_counts = torch.bincount(flat, minlength=placement.n_experts).view(R, El)
    recv_counts = exchange_counts(send_counts, link)  # (R, El): from source p for my expert j
    send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    x_recv = all_to_all(x[order // K], send, recv, link, dispatch_wire, combine_wire, "dispatch")
    perm = by_local_expert(recv_counts)  # received order -> grouped by expert
    plan = {"order": order, "perm": perm, "send": send, "recv": recv}
    return x_recv[perm], recv_counts.sum(dim=0), plan


def one_hop_combine(
    out: torch.Tensor, weights: torch.Tensor, plan: dict, link: Link, combine_wire: str = "same"
) -> torch.Tensor:
    """Expert outputs out [S, D] (in the dispatched rows' order), weights [N, K] -> routed [N, D]."""
    N, K = weights.shape
    y_recv = torch.empty_like(out).index_copy(0, plan["perm"], out)  # back to received order
    y_back = all_to_all(y_recv, plan["recv"], plan["send"], link, combine_wire, combine_wire, "combine")
    y = torch.empty_like(y_back).index_copy(0, plan["order"], y_back)  # token order
    y = y.view(N, K, y_back.shape[-1])  # no -1: N may be 0 (a rank with no tokens)
    return combine(weights, y)  # weighted and summed at the source


def one_hop_start_dispatch(
    x: torch.Tensor,
    indices: torch.Tensor,
    placement: Placement,
    link: Link,
    dispatch_wire: str = "same",
    combine_wire: str = "same",
) -> dict:
    """`one_hop_dispatch` up to the rows' all-to-all, which is left in flight: x [N, D], indices
    [N, K] -> the plan, with "pending" (the exchange) and "token" (its autograd link: a phase
    boundary cuts it like any tensor of the plan). The counts exchange before it is synchronous."""
    K = indices.shape[1]
    R, El = placement.ranks, placement.local_experts
    flat = indices.flatten()  # (N*K,)
    order = flat.argsort(stable=True)
    send_counts = torch.bincount(flat, minlength=placement.n_experts).view(R, El)
    recv_counts = exchange_counts(send_counts, link)  # (R, El)
    send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    pending = start_all_to_all(x[order // K], send, recv, link, dispatch_wire, combine_wire, "dispatch")
    perm = by_local_expert(recv_counts)
    return {
        "order": order, "perm": perm, "send": send, "recv": recv, "row_counts": recv_counts.sum(dim=0),
        "pending": pending, "token": pending.token,
    }  # fmt: skip


def one_hop_finish_dispatch(plan: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Wait for the dispatch of `plan` (through its possibly cut "token") -> (rows [S, D] grouped by
    local expert, rows per local expert [El])."""
    x_recv = plan["pending"].wait(plan["token"])
    return x_recv[plan["perm"]], plan["row_counts"]


def one_hop_start_combine(out: torch.Tensor, plan: dict, link: Link, combine_wire: str = "same"):
    """Expert outputs out [S, D] -> the exchange back in flight (a `comm.Pending`)."""
    y_recv = torch.empty_like(out).index_copy(0, plan["perm"], out)  # back to received order
    return start_all_to_all(y_recv, plan["recv"], plan["send"], link, combine_wire, combine_wire, "combine")


def one_hop_finish_combine(
    pending, token: torch.Tensor, weights: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """Wait for the combine exchange (through `token`), weights [N, K] -> routed [N, D]."""
    N, K = weights.shape
    y_back = pending.wait(token)
    y = torch.empty_like(y_back).index_copy(0, order, y_back).view(N, K, y_back.shape[-1])  # tokens
    return combine(weights, y)


def two_hop_dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    placement: Placement,
    inter: Link,
    intra: Link,
    dispatch_wire: str = "same",
    combine_wire: str = "same",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x [N, D], weights/indices [N, K] -> (rows [S, D] for my experts grouped by local expert, rows
    per local expert [El], the plan): across nodes once per (token, node), then inside the node per
    (token, expert). The gate values travel with the copies (the node sums its partial output)."""
    N, K = indices.shape
    Nn, L, El = placement.n_nodes, placement.ranks_per_node, placement.local_experts
    # hop 1: one copy per (token, node), to my local index on that node
    node_k = placement.node_of(indices)  # (N, K)
    needed = torch.zeros(N, Nn, dtype=torch.bool, device=x.device).scatter_(1, node_k, True)
    node_c, tok_c = needed.T.nonzero(as_tuple=True)  # (C,) copies grouped by node
    on_node = node_k[tok_c] == node_c[:, None]  # (C, K): which of the token's experts are there
    slots = torch.where(on_node, indices[tok_c], -1).to(torch.int32)  # expert ids, -1 elsewhere
    w_c = weights[tok_c] * on_node  # (C, K) gate values travel with the copy
    send1 = torch.bincount(node_c, minlength=Nn)
    recv1 = exchange_counts(send1[:, None], inter)[:, 0]
    send1, recv1 = send1.tolist(), recv1.tolist()
    x1 = all_to_all(x[tok_c], send1, recv1, inter, dispatch_wire, combine_wire, "dispatch")  # (C1, D)
    w1 = all_to_all(w_c, send1, recv1, inter, "same", "same", "dispatch")  # (C1, K)
    slots1 = exchange_rows(slots, send1, recv1, inter)  # (C1, K)
    # hop 2: inside my node, one copy per (token, expert)
    c_idx, k_idx = (slots1 >= 0).nonzero(as_tuple=True)
    e_node = slots1[c_idx, k_idx].long() - inter.index * placement.experts_per_node  # expert within node
    order = e_node.argsort(stable=True)
    c_sorted, w_sorted = c_idx[order], w1[c_idx[order], k_idx[order]]
    send_counts = torch.bincount(e_node, minlength=L * El).view(L, El)
    recv_counts = exchange_counts(send_counts, intra)
    send2, recv2 = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    x2 = all_to_all(x1[c_sorted], send2, recv2, intra, dispatch_wire, combine_wire, "dispatch")
    perm = by_local_expert(recv_counts)
    plan = {
        "tok_c": tok_c, "c_sorted": c_sorted, "w_sorted": w_sorted, "perm": perm, "copies": x1.shape[0],
        "send1": send1, "recv1": recv1, "send2": send2, "recv2": recv2,
    }  # fmt: skip
    return x2[perm], recv_counts.sum(dim=0), plan


def two_hop_combine(
    out: torch.Tensor, n_tokens: int, plan: dict, inter: Link, intra: Link, combine_wire: str = "same"
) -> torch.Tensor:
    """Expert outputs out [S, D] (dispatched rows' order) -> routed [N, D]: back over hop 2, the
    node's gate-weighted partial sum per token copy, then back across nodes once."""
    y2 = torch.empty_like(out).index_copy(0, plan["perm"], out)  # back to received order
    y2_back = all_to_all(y2, plan["recv2"], plan["send2"], intra, combine_wire, combine_wire, "combine")
    w_sorted, c_sorted = plan["w_sorted"], plan["c_sorted"]
    y1 = y2_back.new_zeros(plan["copies"], out.shape[1])
    y1 = y1.index_add(0, c_sorted, y2_back * w_sorted[:, None].to(y2_back.dtype))
    y_back = all_to_all(
        y1, plan["recv1"], plan["send1"], inter, combine_wire, combine_wire, "combine"
    )  # (C, D)
    return y_back.new_zeros(n_tokens, out.shape[1]).index_add(0, plan["tok_c"], y_back)


def all_gather_routed(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: nn.Module,
    placement: Placement,
    link: Link,
) -> torch.Tensor:
    """The naive alternative: every rank gathers every token of the group (equal N per rank), runs
    its experts on the copies routed to them, and the partial outputs are reduce-scattered back."""
    N, K = indices.shape
    x_all, w_all = all_gather_rows(x, link), all_gather_rows(weights, link)  # (R*N, D), (R*N, K)
    i_all = exchange_rows(indices.repeat(link.size, 1), [N] * link.size, [N] * link.size, link)  # (R*N, K)
    first = link.index * placement.local_experts
    mine = (i_all >= first) & (i_all < first + placement.local_experts)
    t_idx, k_idx = mine.nonzero(as_tuple=True)
    local = i_all[t_idx, k_idx] - first
    order = local.argsort(stable=True)
    t_sorted, k_sorted = t_idx[order], k_idx[order]
    counts = torch.bincount(local, minlength=placement.local_experts)
    y = experts(x_all[t_sorted], counts) * w_all[t_sorted, k_sorted][:, None].to(x.dtype)
    partial = y.new_zeros(x_all.shape).index_add(0, t_sorted, y)
    return reduce_scatter_rows(partial, link)
