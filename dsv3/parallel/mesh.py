"""The process mesh: which ranks form the pipeline, data- and expert-parallel groups (DESIGN §5).

V3 trained on 2048 GPUs as 16 pipeline stages x (64-way expert parallelism x ZeRO-1 data
parallelism), with no tensor parallelism (§3.1). Every rank of a pipeline stage reads its own
tokens: for attention, dense layers, shared experts and the gate the stage's ranks are plain
data-parallel replicas; only the routed experts are sharded, over an expert-parallel (EP) group.

Layout (EP innermost, so that an EP group is a run of consecutive ranks and spans whole nodes):

    rank = (stage * dp + replica) * ep + ep_index        node = rank // ranks_per_node

    stage group      the dp*ep ranks of one pipeline stage: they see different tokens, so this is
                     the data-parallel group of every replicated weight and the data shard index
    ep group         the ep ranks sharing one copy of the routed experts (all-to-all dispatch)
    expert-dp group  the dp ranks holding the same experts (their gradients are summed)
    pp group         the pp ranks of one pipeline (one per stage)
    intra / inter    inside an EP group: the ranks of one node / the ranks with the same local
                     index on every node: the two hops of node-limited dispatch (§3.2.2)

`ranks_per_node` makes "nodes" exist on one machine (default: torchrun's LOCAL_WORLD_SIZE), so
node-limited routing and two-hop dispatch run and are tested on a single CPU box. Backend and
device come from the environment: NCCL and cuda:LOCAL_RANK when CUDA is there, gloo and CPU
otherwise; nothing here names a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MeshLayout:
    """Pure rank arithmetic of the mesh (no processes needed): world = pp * dp * ep."""

    world: int
    pp: int = 1
    dp: int = 1
    ep: int = 1
    ranks_per_node: int = 1

    def __post_init__(self) -> None:
        for name in ("world", "pp", "dp", "ep", "ranks_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.pp * self.dp * self.ep != self.world:
            raise ValueError(
                f"parallel: pp={self.pp} x dp={self.dp} x ep={self.ep} = {self.pp * self.dp * self.ep} "
                f"ranks, but {self.world} processes were launched"
            )
        if self.world % self.ranks_per_node:
            raise ValueError(
                f"parallel.ranks_per_node={self.ranks_per_node} does not divide the {self.world} ranks"
            )
        if self.ep % self.node_ranks_in_ep:
            raise ValueError(
                f"parallel.ranks_per_node={self.ranks_per_node}: an expert-parallel group of ep={self.ep} "
                "ranks must span whole nodes (ep a multiple of ranks_per_node) or fit in one node"
            )

    # ---- coordinates ------------------------------------------------------------------------------
    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (stage, replica, ep_index)."""
        return rank // (self.dp * self.ep), rank // self.ep % self.dp, rank % self.ep

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def node_ranks_in_ep(self) -> int:
        """L: ranks of one EP group that share a node."""
        return min(self.ranks_per_node, self.ep)

    @property
    def nodes_per_ep(self) -> int:
        """Nodes one EP group spans."""
        return self.ep // self.node_ranks_in_ep

    # ---- groups (lists of global ranks; every rank builds every group in this order) ---------------
    def stage_groups(self) -> list[list[int]]:
        n = self.dp * self.ep
        return [list(range(s * n, (s + 1) * n)) for s in range(self.pp)]

    def ep_groups(self) -> list[list[int]]:
        return [list(range(g * self.ep, (g + 1) * self.ep)) for g in range(self.pp * self.dp)]

    def expert_dp_groups(self) -> list[list[int]]:
        n = self.dp * self.ep
        return [
            [s * n + r * self.ep + i for r in range(self.dp)] for s in range(self.pp) for i in range(self.ep)
        ]

    def pp_groups(self) -> list[list[int]]:
        n = self.dp * self.ep
        return [[s * n + j for s in range(self.pp)] for j in range(n)]

    def intra_node_groups(self) -> list[list[int]]:
        """Per EP group, per node: its ranks on that node (ordered by local index)."""
        L = self.node_ranks_in_ep
        return [g[b * L : (b + 1) * L] for g in self.ep_groups() for b in range(self.nodes_per_ep)]

    def inter_node_groups(self) -> list[list[int]]:
        """Per EP group, per local index i: the rank with index i on each node (ordered by node)."""
        L = self.node_ranks_in_ep
        return [g[i::L] for g in self.ep_groups() for i in range(L)]


def device_for_backend(backend: str) -> torch.device:
    """cuda:LOCAL_RANK for NCCL, CPU otherwise."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class Mesh:
    """This rank's place in the layout and its process groups."""

    layout: MeshLayout
    rank: int
    backend: str
    device: torch.device
    timeout: float  # seconds a collective waits for a silent peer
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict)
    members: dict[str, list[int]] = field(default_factory=dict)  # global ranks of each of my groups

    @property
    def stage(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def replica(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def ep_index(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def node(self) -> int:
        return self.layout.node_of(self.rank)

    @property
    def data_rank(self) -> int:
        """Index among the ranks that read different tokens (the stage group)."""
        return self.members["stage"].index(self.rank)

    @property
    def data_world(self) -> int:
        return len(self.members["stage"])

    def group(self, name: str) -> dist.ProcessGroup | None:
        return self.groups[name]


def build_mesh(
    ep: int = 1,
    dp: int | None = None,
    pp: int = 1,
    ranks_per_node: int | None = None,
    timeout: float | None = None,
) -> Mesh:
    """The mesh of the initialised default process group (torchrun: `init_process_group()` first).

    dp defaults to world / (pp * ep); ranks_per_node to LOCAL_WORLD_SIZE, else the whole world.
    `timeout` (seconds; default DSV3_DIST_TIMEOUT, else 600) bounds every collective of the new
    groups: a dead or stuck peer then raises instead of hanging."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_mesh: torch.distributed is not initialised (launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp is None:
        if world % (pp * ep):
            raise ValueError(f"parallel.ep={ep} x parallel.pp={pp} does not divide the {world} ranks")
        dp = world // (pp * ep)
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if timeout is None:
        timeout = float(os.environ.get("DSV3_DIST_TIMEOUT", "600"))
    layout = MeshLayout(world, pp, dp, ep, ranks_per_node)
    backend = dist.get_backend()
    mesh = Mesh(layout, rank, backend, device_for_backend(backend), timeout)
    for name, lists in (
        ("stage", layout.stage_groups()),
        ("ep", layout.ep_groups()),
        ("expert_dp", layout.expert_dp_groups()),
        ("pp", layout.pp_groups()),
        ("intra", layout.intra_node_groups()),
        ("inter", layout.inter_node_groups()),
    ):
        for ranks in lists:  # every rank creates every group, in the same order (a collective call)
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
            if rank in ranks:
                mesh.groups[name], mesh.members[name] = group, ranks
    return mesh
