"""ZeRO-1: optimizer state sharded over the data-parallel ranks (DESIGN §5, paper §3.1).

Every data-parallel rank keeps full parameters (for forward and backward) but only 1/n of the
optimizer state. Per step:
  1. gradients are reduce-scattered: rank r receives the sum over the group of chunk r of every
     gradient, scaled by 1/(ranks that saw different tokens) so the result is the gradient of the
     global-batch mean loss;
  2. the gradient norm for clipping is global: each element of a shard is counted once;
  3. each rank's inner optimizer (any torch optimizer, built by the trainer's `make`) updates its
     chunk of every parameter (an elementwise optimizer like AdamW gives the unsharded result);
  4. the updated chunks are all-gathered back into the full parameters.
Chunking: each parameter is flattened, zero-padded to a multiple of n and cut in n equal chunks
(rank r owns chunk r of every parameter), so the parameter groups (weight decay or not) and their
order are unchanged and the state of parameter i is still the state of parameter i. A rank's
chunks live in one flat buffer per dtype (the shard parameters are views of it), which is what
the reduce-scatter fills and the all-gather reads: one collective each per parameter set.

Parameter sets: replicated weights are reduced over every data-parallel rank of the stage;
routed-expert weights, sharded by expert parallelism, only over the ranks holding the same experts
(`ParamSet.ep` says how to gather their expert dimension back). With `shard=False` the same code
is plain data parallelism: gradients all-reduced, every rank updates everything.

Checkpoints: `full_state_dict()` is the state a single-process torch optimizer over the full model
would have (ids in parameter-group order, tensors of full shape), so any world size -- or the
plain single-process `Strategy` -- loads it; `load_full_state_dict` re-shards it.

Shapes: n ranks in a set's group, c = ceil(numel / n) elements per chunk, C = sum of chunks.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.comm import Link
from dsv3.parallel.expert.moe import gather_rows


@dataclass
class ParamSet:
    """Parameters reduced over one group the same way."""

    name: str
    params: list[nn.Parameter]
    link: Link  # the data-parallel group of these parameters
    scale: float  # applied to the summed gradient: 1 / ranks that saw different tokens
    ep: Link | None = None  # expert-sharded: the full tensor is the concatenation over this group


class _Bucket:
    """Parameters of one set and dtype; with `shard`, this rank's chunk of each in one flat buffer."""

    def __init__(self, params: list[nn.Parameter], pset: ParamSet, shard: bool) -> None:
        self.params, self.set, self.shard = params, pset, shard
        self.n = pset.link.size if shard else 1
        self.chunks = [math.ceil(p.numel() / self.n) for p in params]
        self.offsets = [0, *torch.tensor(self.chunks).cumsum(0).tolist()]
        if not shard:
            self.shards = list(params)
            return
        r = pset.link.index
        self.flat = torch.cat([self._rows(p.detach())[r] for p in params])  # (C,)
        self.shards = [nn.Parameter(self.flat[a:b]) for a, b in zip(self.offsets, self.offsets[1:])]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """t (any shape, numel of a parameter) -> [n, c]: row r is chunk r, zero-padded."""
        c = math.ceil(t.numel() / self.n)
        return torch.nn.functional.pad(t.reshape(-1), (0, self.n * c - t.numel())).view(self.n, c)

    def reduce(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        full = torch.cat([self._rows(g) for g in grads], dim=1)  # (n, C)
        link, has_grad = self.set.link, [p.grad is not None for p in self.params]
        if self.shard:
            out = full.new_empty(full.shape[1])
            link.run(
                "gradient reduce-scatter",
                lambda: dist.reduce_scatter_single(out, full.view(-1), group=link.group),
            )
            out.mul_(self.set.scale)
            for s, a, b, has in zip(self.shards, self.offsets, self.offsets[1:], has_grad):
                s.grad = out[a:b] if has else None
        else:
            link.run("gradient all-reduce", lambda: dist.all_reduce(full, group=link.group))
            full.mul_(self.set.scale)
            for p, a, b, has in zip(self.params, self.offsets, self.offsets[1:], has_grad):
                p.grad = full[0, a:b].view_as(p) if has else None

    def gather_params(self) -> None:
        if not self.shard:
            return
        link = self.set.link
        out = self.flat.new_empty(self.n * self.flat.numel())
        link.run("parameter all-gather", lambda: dist.all_gather_single(out, self.flat, group=link.group))
        rows = out.view(self.n, -1)
        with torch.no_grad():
            for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
                p.copy_(rows[:, a:b].reshape(-1)[: p.numel()].view_as(p))

    # ---- rank-independent state ----------------------------------------------------------------------
    def full_tensors(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One state tensor per parameter, shaped like its shard -> shaped like the full parameter.
        Two collectives for the whole bucket: the ZeRO chunks, then the expert blocks."""
        if self.shard:
            flat = torch.cat([v.reshape(-1) for v in vs])  # (C,) laid out like self.flat
            out = flat.new_empty(self.n * flat.numel())
            link = self.set.link
            link.run("state all-gather", lambda: dist.all_gather_single(out, flat, group=link.group))
            rows = out.view(self.n, -1)
            local = [rows[:, a:b].reshape(-1)[: p.numel()].view_as(p) for p, a, b in
                     zip(self.params, self.offsets, self.offsets[1:])]  # fmt: skip
        else:
            local = [v.detach() for v in vs]
        ep = self.set.ep
        if ep is None:
            return [t.clone() for t in local]
        blocks = gather_rows(torch.cat([t.reshape(-1) for t in local]), ep).view(ep.size, -1)  # (R, sum)
        ends = torch.tensor([t.numel() for t in local]).cumsum(0).tolist()
        return [blocks[:, a:b].reshape(ep.size * t.shape[0], *t.shape[1:])
                for t, a, b in zip(local, [0, *ends], ends)]  # fmt: skip

    def local_tensor(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """The inverse: a full state tensor -> this rank's part of it."""
        ep = self.set.ep
        if ep is not None:
            rows = v.shape[0] // ep.size
            v = v[ep.index * rows : (ep.index + 1) * rows]
        return self._rows(v)[self.set.link.index].clone() if self.shard else v.clone()

    def full_shape(self, i: int) -> tuple[int, ...]:
        shape = tuple(self.params[i].shape)
        return (shape[0] * self.set.ep.size, *shape[1:]) if self.set.ep is not None else shape


class ZeroOptimizer:
    """ZeRO-1 around any torch optimizer: `make(groups)` builds it over this rank's shards."""

    def __init__(
        self,
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        groups: list[dict[str, Any]],
        sets: list[ParamSet],
        norm_link: Link,
        shard: bool = True,
    ) -> None:
        self.norm_link, self.shard = norm_link, shard
        # param id -> ranks outside norm_link's data-parallel copies holding the same weight (a
        # pipeline's shared embedding, DualPipe's two copies of a stage): counted 1/k in the norm
        self.copies: dict[int, int] = {}
        self.buckets: list[_Bucket] = []
        where: dict[int, tuple[_Bucket, int]] = {}
        for pset in sets:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = defaultdict(list)
            for p in pset.params:
                by_dtype[p.dtype].append(p)
            for params in by_dtype.values():
                bucket = _Bucket(params, pset, shard)
                self.buckets.append(bucket)
                where.update({id(p): (bucket, i) for i, p in enumerate(params)})
        missing = [i for g in groups for i, p in enumerate(g["params"]) if id(p) not in where]
        if missing:
            raise ValueError(f"optimizer groups: {len(missing)} parameters belong to no parameter set")
        self.slots = [where[id(p)] for g in groups for p in g["params"]]  # optimizer order -> (bucket, i)
        self.inner = make([{**g, "params": [b.shards[i] for b, i in map(where.get, map(id, g["params"]))]}
                           for g in groups])  # fmt: skip

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    # ---- the step ---------------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        for b in self.buckets:
            b.reduce()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm, each element counted once; clips like `clip_grad_norm_`."""
        local = torch.zeros((), dtype=torch.float64)
        for b in self.buckets:
            copies = 1 if self.shard else b.set.link.size  # identical copies across the stage
            for p, s in zip(b.params, b.shards):
                if s.grad is not None:
                    local += s.grad.detach().double().square().sum() / (copies * self.copies.get(id(p), 1))
        link = self.norm_link
        link.run("gradient norm all-reduce", lambda: dist.all_reduce(local, group=link.group))
        total = float(local.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for b in self.buckets:
                for s in b.shards:
                    if s.grad is not None:
                        s.grad.mul_(coef)
        return total

    def step(self) -> None:
        self.inner.step()
        for b in self.buckets:
            b.gather_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    # ---- checkpoints ------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Any]:
        """The single-process optimizer's state dict: full tensors, ids in group order (collective)."""
        sd = self.inner.state_dict()
        state = {i: dict(v) for i, v in sd["state"].items()}  # shallow copies: never touch the live state
        ids = {id(b): [-1] * len(b.params) for b in self.buckets}  # optimizer id of each bucket param
        for i, (bucket, j) in enumerate(self.slots):
            ids[id(bucket)][j] = i
        for bucket in self.buckets:
            mine = ids[id(bucket)]
            shapes = [s.shape for s in bucket.shards]
            keys = sorted({k for i, shape in zip(mine, shapes) for k, v in state.get(i, {}).items()
                           if torch.is_tensor(v) and v.shape == shape})  # fmt: skip
            for k in keys:
                present = [i in state and k in state[i] for i in mine]
                like = next(state[i][k] for i, ok in zip(mine, present) if ok)
                vs = [
                    state[i][k] if ok else like.new_zeros(shape)
                    for i, ok, shape in zip(mine, present, shapes)
                ]
                for i, ok, full in zip(mine, present, bucket.full_tensors(vs)):
                    if ok:
                        state[i][k] = full
        for v in state.values():
            for k, x in v.items():
                if torch.is_tensor(x) and x.dim() == 0:
                    v[k] = x.clone()  # e.g. AdamW's step: detach from the live optimizer too
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}

    def load_full_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a `full_state_dict()` (or a single-process optimizer's state dict) of any world size."""
        ours = [len(g["params"]) for g in self.inner.param_groups]
        theirs = [len(g["params"]) for g in sd["param_groups"]]
        if ours != theirs:
            raise ValueError(f"optimizer state: parameter groups of sizes {theirs}, the model has {ours}")
        state = {}
        for i, (bucket, j) in enumerate(self.slots):
            saved = sd["state"].get(i)
            if saved is None:
                continue
            full = bucket.full_shape(j)
            state[i] = {
                k: bucket.local_tensor(j, v) if torch.is_tensor(v) and tuple(v.shape) == full else v
                for k, v in saved.items()
            }
        self.inner.load_state_dict({"state": state, "param_groups": copy.deepcopy(sd["param_groups"])})
