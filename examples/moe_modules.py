"""Two small MoE layers written the way people write them in plain PyTorch.

`LoopMoE`   an nn.ModuleList of expert MLPs and a Python loop over experts.
`DenseMoE`  every expert computed for every token with einsum, then weighted by a
            top-k-masked routing matrix (the "dense all-experts" formulation).

Both take x [B, T, d] and return [B, T, d]; lynx_compile must rewrite their routers
(and, where the dispatch is in one graph, the dispatch) without any change to this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """A router module + a loop over an nn.ModuleList of experts (Dynamo graph-breaks in the
    loop, so the router and each expert are compiled as graphs of their own)."""

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


class DenseMoE(nn.Module):
    """Top-k softmax router + all experts as one einsum over stacked 3-D weights."""

    def __init__(self, dim: int = 32, hidden: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w_up = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden**0.5)

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
