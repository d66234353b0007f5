"""A generator of plain-PyTorch MoE layers for property tests.

One `GeneratedMoE` per `MoESpec`: a router kind x a dispatch style x an activation (gated
or not) x a dtype. The router kinds cover the weight conventions transformers' families
use; the dispatch styles are the ways people write the expert computation by hand.

    router        softmax_renorm   softmax -> top-k -> divide by the top-k sum (Mixtral)
                  softmax_mass     softmax -> top-k, raw probabilities (OLMoE)
                  sigmoid_bias     sigmoid + expert bias -> top-k, unbiased scores
                                   gathered, renormalised, scaled (DeepSeek-V3, no groups)
                  logits_softmax   top-k on the logits -> softmax over the k (Granite)
    dispatch      where_loop       per expert: torch.where(ids == e), index_add_
                  mask_loop        per expert: boolean token mask, out[rows] += y
                  sorted_split     argsort by expert, split by histc counts, index_add
                  gather_bmm       the k experts' weights gathered per token, bmm
                  dense_einsum     every expert on every token, a scatter-built gate
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ROUTERS = ("softmax_renorm", "softmax_mass", "sigmoid_bias", "logits_softmax")
DISPATCHES = ("where_loop", "mask_loop", "sorted_split", "gather_bmm", "dense_einsum")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclasses.dataclass(frozen=True)
class MoESpec:
    router: str
    dispatch: str
    activation: str
    gated: bool
    dtype: torch.dtype
    num_experts: int
    top_k: int
    dim: int = 16
    hidden: int = 24
    seed: int = 0


class GeneratedMoE(nn.Module):
    """x [B, T, dim] -> [B, T, dim], written as the spec says."""

    def __init__(self, spec: MoESpec):
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        e, d, h = spec.num_experts, spec.dim, spec.hidden
        self.gate = nn.Parameter(torch.randn(e, d, generator=gen) / d**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(e, generator=gen))
        rows = 2 * h if spec.gated else h
        self.w_in = nn.Parameter(torch.randn(e, rows, d, generator=gen) / d**0.5)  # [E, 2h, d]
        self.w_out = nn.Parameter(torch.randn(e, d, h, generator=gen) / h**0.5)  # [E, d, h]

    # ------------------------------------------------------------------ routing
    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, d] -> (weights [N, k] in tokens' dtype, ids [N, k])."""
        k = self.spec.top_k
        logits = F.linear(tokens, self.gate).float()  # [N, E]
        kind = self.spec.router
        if kind == "softmax_renorm":
            w, ids = torch.topk(logits.softmax(dim=-1), k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
        elif kind == "softmax_mass":
            w, ids = torch.topk(logits.softmax(dim=-1), k, dim=-1)
        elif kind == "sigmoid_bias":
            scores = logits.sigmoid()
            ids = torch.topk(scores + self.bias, k, dim=-1).indices
            w = scores.gather(1, ids)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
        else:
            top, ids = torch.topk(logits, k, dim=-1)
            w = top.softmax(dim=-1)
        return w.to(tokens.dtype), ids

    # ------------------------------------------------------------------ experts
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.spec.activation]
        if not self.spec.gated:
            return act(h)
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e on h [n, d] -> [n, d]."""
        return self._act(h @ self.w_in[e].T) @ self.w_out[e].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        w, ids = self.route(tokens)
        out = getattr(self, "_" + self.spec.dispatch)(tokens, w, ids)
        return out.reshape(b, t, d)

    def _where_loop(self, tokens, w, ids):
        out = torch.zeros_like(tokens)
        for e in range(self.spec.num_experts):
            token_idx, slot = torch.where(ids == e)
            y = self.expert(e, tokens[token_idx]) * w[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out

    def _mask_loop(self, tokens, w, ids):
        out = torch.zeros_like(tokens)
        for e in range(self.spec.num_experts):
            chosen = ids == e
            rows = chosen.any(dim=-1)
            out[rows] += self.expert(e, tokens[rows]) * (w * chosen).sum(dim=-1)[rows, None]
        return out

    def _sorted_split(self, tokens, w, ids):
        e, k = self.spec.num_experts, self.spec.top_k
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        counts = torch.histc(flat.float(), bins=e, min=0, max=e - 1).int().tolist()
        parts = torch.split(tokens[token_of], counts)
        y = torch.cat([self.expert(i, p) for i, p in enumerate(parts)])
        y = y * w.reshape(-1)[order, None]
        return torch.zeros_like(tokens).index_add(0, token_of, y)

    def _gather_bmm(self, tokens, w, ids):
        k = self.spec.top_k
        flat = ids.reshape(-1)
        xs = tokens.repeat_interleave(k, dim=0)  # [N*k, d]
        h = torch.bmm(self.w_in[flat], xs.unsqueeze(-1)).squeeze(-1)
        y = torch.bmm(self.w_out[flat], self._act(h).unsqueeze(-1)).squeeze(-1)
        y = y * w.reshape(-1, 1)
        return y.view(-1, k, tokens.shape[-1]).sum(dim=1)

    def _dense_einsum(self, tokens, w, ids):
        gate = torch.zeros(
            tokens.shape[0], self.spec.num_experts, dtype=w.dtype, device=w.device
        ).scatter(1, ids, w)  # [N, E]
        h = self._act(torch.einsum("nd,erd->ner", tokens, self.w_in))
        y = torch.einsum("neh,edh->ned", h, self.w_out)
        return torch.einsum("ned,ne->nd", y, gate)


def specs() -> st.SearchStrategy[MoESpec]:
    """Every combination, with small shapes (compiles dominate the test's time)."""
    return st.builds(
        MoESpec,
        router=st.sampled_from(ROUTERS),
        dispatch=st.sampled_from(DISPATCHES),
        activation=st.sampled_from(tuple(ACTIVATIONS)),
        gated=st.booleans(),
        dtype=st.sampled_from((torch.float32, torch.bfloat16)),
        num_experts=st.sampled_from((4, 6, 8)),
        top_k=st.sampled_from((1, 2, 3)),
        seed=st.integers(0, 2**16),
    )
