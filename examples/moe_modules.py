"""Small MoE layers written the way people write them in plain PyTorch.

`LoopMoE`          an nn.ModuleList of expert MLPs and a Python loop over experts that
                   skips empty experts (a data-dependent branch: Dynamo splits the graph).
`DenseMoE`         every expert computed for every token with einsum, then weighted by a
                   top-k-masked routing matrix (the "dense all-experts" formulation).
`BatchedRouterMoE` DenseMoE on [B, T, d] without flattening (router scores [B, T, E]).
`WhereLoopMoE`     stacked expert weights, a loop over experts picking tokens with
                   `torch.where(ids == e)` and accumulating with index_add_ (the tutorial
                   style, and transformers' Mixtral before its experts interface).
`MaskLoopMoE`      the loop with a boolean token mask: `out[rows] += expert(x[rows]) * w`.
`SortedMoE`        tokens sorted by expert (argsort), split by per-expert counts, the
                   results scattered back with index_add (the "permute" style).
`ModuleListMoE`    an nn.ModuleList of SwiGLU experts (w1, w3, w2 nn.Linear) looped over
                   with a one-hot expert mask and no branch, as transformers' Mixtral was
                   written before its experts interface (and much code copied from it).
`BiasedModuleListMoE` an nn.ModuleList of GELU MLP experts (nn.Sequential of nn.Linear
                   with their biases), looped over with `torch.where(ids == e)`.

`TensorParallelMoE` every expert's intermediate dim sharded over torch.distributed ranks,
                   the rank's partial outputs summed by a functional all_reduce.
`DTensorParallelMoE` TensorParallelMoE with torch.distributed.tensor: every expert weight a
                   DTensor sharded along the intermediate dim on a 1-D device mesh; the
                   dispatch reads each rank's local shards (to_local).
`ExpertParallelMoE` each rank holds a contiguous range of the experts; slots routed to
                   other ranks' experts weigh 0 here; a functional all_reduce sums.
`DataParallelExpertsMoE` each rank holds its own tokens (data-parallel attention) and a
                   range of the experts: it routes its tokens, all_gathers every rank's
                   tokens and routing, computes its experts' share, and an all_reduce
                   hands each rank back its tokens' sums.
`AllToAllExpertsMoE` per-rank tokens and expert ranges, the tokens exchanged: one
                   functional all_to_all (equal splits, static shapes) sends each rank
                   every token with its routing into that rank's experts, a second one
                   returns the experts' shares to the tokens' ranks.

All take x [B, T, d] and return [B, T, d]; lynx_compile must rewrite their routers
(and, where the dispatch is in one graph, the dispatch) without any change to this file.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor import DTensor


class ExpertMLP(nn.Module):
    """A SwiGLU expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TopKRouter(nn.Module):
    """x [B, T, d] -> (weights [B*T, k], expert ids [B*T, k]), renormalised top-k softmax."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.proj(tokens), dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), selected


class LoopMoE(nn.Module):
    """A router module + a loop over an nn.ModuleList of experts that skips the empty ones
    (`if numel() == 0: continue`): Dynamo graph-breaks on that branch under other backends;
    lynx traces it as not taken and fuses the loop (lynx_compile/capture.py)."""

    def __init__(self, dim: int = 32, hidden: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(ExpertMLP(dim, hidden) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)  # tokens routed to expert i
            if token_idx.numel() == 0:
                continue
            y = expert(tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.reshape(b, t, d)


class _MixtralExpert(nn.Module):
    """transformers 4.x's MixtralBlockSparseTop2MLP: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListMoE(nn.Module):
    """An nn.ModuleList of experts and a loop over all of them, tokens picked from a one-hot
    expert mask (transformers 4.x's MixtralSparseMoeBlock): no data-dependent branch."""

    def __init__(self, dim: int = 32, hidden: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(_MixtralExpert(dim, hidden) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)  # [E, k, N]
        for e in range(len(self.experts)):
            slot, token = torch.where(mask[e])
            y = self.experts[e](tokens[None, token].reshape(-1, d)) * weights[token, slot, None]
            out.index_add_(0, token, y.to(tokens.dtype))
        return out.reshape(b, t, d)


class HitModuleListMoE(ModuleListMoE):
    """ModuleListMoE looping over only the experts the batch hits, each picked from the
    module list by its hit row (transformers 4.5x's MixtralSparseMoeBlock)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)  # [E, k, N]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in hit:
            expert = self.experts[expert_idx]
            slot, token = torch.where(mask[expert_idx].squeeze(0))
            y = expert(tokens[None, token].reshape(-1, d)) * weights[token, slot, None]
            out.index_add_(0, token, y.to(tokens.dtype))
        return out.reshape(b, t, d)


class BiasedModuleListMoE(nn.Module):
    """An nn.ModuleList of GELU MLP experts with nn.Linear's default biases, looped over with
    `torch.where(ids == e)` and index_add_."""

    def __init__(self, dim: int = 32, hidden: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(selected == e)
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.reshape(b, t, d)


class StackedExperts(nn.Module):
    """Top-k softmax router + SwiGLU experts stored as 3-D weights, for the loop styles."""

    def __init__(self, dim: int = 32, hidden: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden**0.5)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, d] -> (weights [N, k] in the tokens' dtype, ids [N, k])."""
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(tokens.dtype), ids

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e on h [n, d] -> [n, d]."""
        return (F.silu(h @ self.w_gate[e].T) * (h @ self.w_up[e].T)) @ self.w_down[e].T

    def dispatch(self, tokens, weights, ids) -> torch.Tensor:
        """tokens [N, d], weights/ids [N, k] -> [N, d]: each style writes its own."""
        raise NotImplementedError(f"{type(self).__name__} has no dispatch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.view(-1, d)
        weights, ids = self.route(tokens)
        return self.dispatch(tokens, weights, ids).view(b, t, d)


class DenseMoE(StackedExperts):
    """Top-k softmax router + all experts as one einsum over stacked 3-D weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.view(-1, d)
        logits = self.gate(tokens)
        probs = logits.softmax(dim=-1)
        topv, topi = probs.topk(self.top_k, dim=-1)
        topv = topv / topv.sum(-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(1, topi, topv)  # [N, E]
        h = F.silu(torch.einsum("nd,ehd->neh", tokens, self.w_gate))
        h = h * torch.einsum("nd,ehd->neh", tokens, self.w_up)
        y = torch.einsum("neh,edh->ned", h, self.w_down)  # [N, E, d]
        return torch.einsum("ned,ne->nd", y, routing).view(b, t, d)


class BatchedRouterMoE(DenseMoE):
    """DenseMoE without flattening: the router scores [B, T, E] (top-k over the last dim),
    a scatter-built [B, T, E] gate matrix and einsums over [B, T, ...]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [B, T, E]
        topv, topi = torch.topk(probs, self.top_k, dim=-1)  # [B, T, k]
        topv = topv / topv.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter(-1, topi, topv).to(x.dtype)  # [B, T, E]
        h = F.silu(torch.einsum("btd,ehd->bteh", x, self.w_gate))
        h = h * torch.einsum("btd,ehd->bteh", x, self.w_up)
        y = torch.einsum("bteh,edh->bted", h, self.w_down)  # [B, T, E, d]
        return torch.einsum("bted,bte->btd", y, routing)


class WhereLoopMoE(StackedExperts):
    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(ids == e)  # data-dependent count
            y = self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out


class HitLoopMoE(StackedExperts):
    """A loop over only the experts the batch hits, picked from a one-hot expert mask
    (transformers 4.5x's Mixtral / Qwen MoE blocks, DBRX, LongCat): the loop's length is
    data-dependent, so Dynamo breaks the graph under other backends; lynx unrolls it over
    every expert (lynx_compile/capture.py)."""

    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, N]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()  # [experts hit, 1]
        for row in hit:
            e = int(row.item())
            slot, token_idx = torch.where(mask[e])
            y = self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out


class MaskLoopMoE(StackedExperts):
    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):
            chosen = ids == e  # [N, k]
            rows = chosen.any(dim=-1)  # [N] bool
            w = (weights * chosen).sum(dim=-1)  # [N]
            out[rows] += self.expert(e, tokens[rows]) * w[rows, None]
        return out


class SortedMoE(StackedExperts):
    def counts(self, flat_ids: torch.Tensor) -> list[int]:
        """Slots per expert, [E], as Python ints (torch.split takes them)."""
        e = self.num_experts
        return torch.histc(flat_ids.float(), bins=e, min=0, max=e - 1).int().tolist()

    def dispatch(self, tokens, weights, ids):
        flat_ids = ids.reshape(-1)  # [N*k]
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // self.top_k  # the token of each sorted slot
        chunks = torch.split(tokens[token_of], self.counts(flat_ids))
        y = torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)])
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(tokens).index_add(0, token_of, y)


class BincountSortedMoE(SortedMoE):
    """SortedMoE counting with bincount, whose output length depends on the data: Dynamo
    cannot trace its `.tolist()` even with dynamic-shape capture (the graph breaks there)."""

    def counts(self, flat_ids: torch.Tensor) -> list[int]:
        return torch.bincount(flat_ids, minlength=self.num_experts).tolist()


class _ShardedMoE(StackedExperts):
    """Gathered-bmm experts on this rank's shard; a functional all_reduce sums the ranks'
    shares (tokens and router replicated; same seed on every rank)."""

    def __init__(self, world: int, seed: int, **kwargs):
        torch.manual_seed(seed)
        super().__init__(**kwargs)
        self.world = world

    def shard(self, **parts) -> None:
        with torch.no_grad():
            for name, part in parts.items():
                setattr(self, name, nn.Parameter(getattr(self, name)[part].clone()))

    def local_routing(self, weights, ids):
        """(weights, ids) over this rank's experts."""
        return weights, ids

    def local_weights(self):
        """(w_gate, w_up, w_down) as this rank holds them."""
        return self.w_gate, self.w_up, self.w_down

    def local_share(self, tokens, weights, ids):
        """tokens [N, d], weights/ids [N, k] -> [N, d]: this rank's experts' share."""
        return self.held_experts(tokens, *self.local_routing(weights, ids))

    def held_experts(self, tokens, weights, ids):
        """tokens [N, d], weights [N, k] and ids [N, k] into this rank's experts -> [N, d]."""
        w_gate, w_up, w_down = self.local_weights()
        flat = ids.reshape(-1)
        xs = tokens.repeat_interleave(self.top_k, dim=0).unsqueeze(-1)  # [N*k, d, 1]
        h = F.silu(torch.bmm(w_gate[flat], xs)) * torch.bmm(w_up[flat], xs)
        y = torch.bmm(w_down[flat], h).squeeze(-1) * weights.reshape(-1, 1)
        return y.view(-1, self.top_k, tokens.shape[-1]).sum(dim=1)

    def dispatch(self, tokens, weights, ids):
        y = self.local_share(tokens, weights, ids)
        if self.world > 1:
            y = funcol.all_reduce(y, "sum", dist.group.WORLD)
        return y


class TensorParallelMoE(_ShardedMoE):
    """Each rank holds its slice of every expert's intermediate dim."""

    def __init__(self, rank: int, world: int, seed: int = 0, **kwargs):
        super().__init__(world, seed, **kwargs)
        hidden = self.w_gate.shape[1]
        if hidden % world:
            raise ValueError(f"hidden {hidden} does not split over {world} ranks")
        part = slice(rank * hidden // world, (rank + 1) * hidden // world)
        self.shard(w_gate=(slice(None), part), w_up=(slice(None), part))
        self.shard(w_down=(slice(None), slice(None), part))


class DTensorParallelMoE(_ShardedMoE):
    """Tensor parallel with torch.distributed.tensor, as `distribute_tensor` (or a
    parallelize_module plan) lays it out: w_gate and w_up DTensors sharded along the
    intermediate dim (Shard(1)), w_down along its last dim (Shard(2)), on a 1-D device mesh
    over the ranks. The dispatch reads each rank's local shards (`to_local()`, no copy) and
    a functional all_reduce sums the ranks' shares. world 1: plain parameters."""

    def __init__(self, rank: int, world: int, seed: int = 0, **kwargs):
        super().__init__(world, seed, **kwargs)
        if world > 1:
            from torch.distributed.device_mesh import DeviceMesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = DeviceMesh("cpu", list(range(world)))
            with torch.no_grad():
                for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
                    full = getattr(self, name).data
                    setattr(self, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(dim)])))

    def local_weights(self):
        def local(w):
            return w.to_local() if isinstance(w, DTensor) else w

        return local(self.w_gate), local(self.w_up), local(self.w_down)


class ExpertParallelMoE(_ShardedMoE):
    """Each rank holds experts [rank * E / world, (rank + 1) * E / world); slots routed to
    the other ranks' experts weigh 0 here."""

    def __init__(self, rank: int, world: int, seed: int = 0, **kwargs):
        super().__init__(world, seed, **kwargs)
        if self.num_experts % world:
            raise ValueError(f"{self.num_experts} experts do not split over {world} ranks")
        self.local = self.num_experts // world
        self.first = rank * self.local
        part = slice(self.first, self.first + self.local)
        self.shard(w_gate=part, w_up=part, w_down=part)

    def local_routing(self, weights, ids):
        here = (ids >= self.first) & (ids < self.first + self.local)  # [N, k]
        local_ids = torch.where(here, ids - self.first, torch.zeros_like(ids))
        return torch.where(here, weights, torch.zeros_like(weights)), local_ids


class DataParallelExpertsMoE(ExpertParallelMoE):
    """Expert parallel with per-rank tokens: each rank routes only its own tokens x [B, T, d]
    (B*T the same on every rank), then every rank's tokens, weights and ids are gathered
    (functional all_gather), each rank computes its experts' share of the whole batch, a
    functional all_reduce sums the shares and each rank keeps its own rows. Batch-aware
    routing sees the batch of every rank only with options={"routing_group": group}."""

    def __init__(self, rank: int, world: int, seed: int = 0, **kwargs):
        super().__init__(rank, world, seed, **kwargs)
        self.rank = rank

    def dispatch(self, tokens, weights, ids):
        if self.world == 1:
            return self.local_share(tokens, weights, ids)
        group = dist.group.WORLD
        gathered = [funcol.all_gather_tensor(t, 0, group) for t in (tokens, weights, ids)]
        y = funcol.all_reduce(self.local_share(*gathered), "sum", group)  # [world * N, d]
        n = tokens.shape[0]
        return y[self.rank * n : (self.rank + 1) * n]  # this rank's tokens


class AllToAllExpertsMoE(ExpertParallelMoE):
    """Expert parallel with per-rank tokens and a token exchange, in static shapes (no host
    sync: capturable in a CUDA graph; at an all_gather's volume, every token to every rank):
    each rank routes its own tokens x [B, T, d] (B*T the same on every rank), sends every
    rank all of them with their routing into that rank's experts (local ids; slots held
    elsewhere weigh 0) in one functional all_to_all of equal splits, runs its experts on
    what it received, and a second all_to_all returns each share to the token's rank, which
    sums them. Batch-aware routing sees every rank's batch only with
    options={"routing_group": group}."""

    def dispatch(self, tokens, weights, ids):
        if self.world == 1:
            return self.local_share(tokens, weights, ids)
        group, world, n = dist.group.WORLD, self.world, tokens.shape[0]
        received = (  # [world * N, ...]: every rank's rows for this one
            funcol.all_to_all_single(t.reshape(world * n, -1), None, None, group)
            for t in self.outgoing(tokens, weights, ids)
        )
        shares = funcol.all_to_all_single(self.received_share(*received), None, None, group)
        return shares.view(world, n, -1).sum(dim=0)  # this rank's tokens, every rank's share

    def outgoing(self, tokens, weights, ids):
        """(tokens, weights, ids) for each rank, [world, N, ...]: every token, its routing
        into that rank's experts (local ids, weight 0 for slots held elsewhere)."""
        world, n = self.world, tokens.shape[0]
        rank_of = torch.arange(world, device=ids.device).view(world, 1, 1)
        held = (ids // self.local).unsqueeze(0) == rank_of  # [world, N, k]: slot -> rank
        send_w = torch.where(held, weights.unsqueeze(0), torch.zeros_like(weights))
        send_ids = torch.where(held, ids.unsqueeze(0) - rank_of * self.local, 0)
        return tokens.unsqueeze(0).expand(world, n, tokens.shape[-1]), send_w, send_ids

    def received_share(self, tokens, weights, ids):
        """This rank's experts on the rows it received -> [world * N, d]."""
        return self.held_experts(tokens, weights, ids)
