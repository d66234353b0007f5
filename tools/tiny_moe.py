"""A tiny decoder-only byte-level MoE language model, written plainly, and its checkpoint loader.

The model lynx_compile ships as its embedded default (trained on the Python standard library's
own sources by lynx_compile.tools.train). It is written the way a server-side MoE model is:

- byte tokens (vocab 256), RMSNorm, multi-head attention with rotary position embeddings;
- every layer's feed-forward is a mixture of gated (SwiGLU) experts stored as 3-D weights laid
  out like transformers' (gate_up_proj [E, 2I, d] with [gate; up] halves, down_proj [E, d, I]);
- the router is linear -> softmax in fp32 -> top-k -> divide by the sum of the top-k
  (the renormalised softmax router the lynx router pass rewrites);
- the expert dispatch is one graph with static shapes: each (token, slot) gathers its
  expert's weights and runs a bmm (transformers' "batched_mm" form);
- a KV-cache decode path: a preallocated cache tensor is updated in place at a position given
  as a tensor, so decode steps [B, 1] compile once for a dynamic batch and are not recompiled
  per step.

Training uses `forward_train`, which computes the same function with a dropless sort-by-expert
dispatch (data-dependent splits, eager only) and returns the Switch-style load-balancing loss.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lynx_compile._extras import require

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CHECKPOINT = DATA_DIR / "tiny_moe.safetensors"


def add_checkpoint_argument(parser, default: Path = DEFAULT_CHECKPOINT) -> None:
    """The `--checkpoint` flag every TinyMoE tool takes (argparse parser)."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=default,
        help="TinyMoE safetensors checkpoint (default: the embedded one)",
    )


NOLB_CHECKPOINT = DATA_DIR / "tiny_moe_nolb.safetensors"
# Mixtral-like: 8 experts, top-2, expert_hidden 256 (about the default's parameter count).
E8K2_CHECKPOINT = DATA_DIR / "tiny_moe_e8k2.safetensors"


@dataclasses.dataclass(frozen=True)
class TinyMoEConfig:
    """Shape of the model; saved next to the checkpoint as JSON."""

    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 32
    top_k: int = 4
    expert_hidden: int = 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        """Per-head width d / H."""
        return self.dim // self.num_heads


class RMSNorm(nn.Module):
    """x [..., d] -> x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)


def rope_tables(config: TinyMoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim / 2] of the rotary embedding."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x [B, H, T, hd] by cos/sin [T, hd / 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and an optional in-place KV cache."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d].

        Without a cache, x is a whole sequence (causal mask). With one, kv = (keys, values),
        each [B, H, S, hd], is this layer's cache, written in place at `positions` [T] (the
        absolute positions of x's tokens); queries attend to every cached key at a position
        <= their own.
        """
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = kv
            # In place on the layer's own tensors (not views of one big cache), so the
            # compiled graph writes B*H*T*hd values instead of copying the whole cache.
            keys.index_copy_(2, positions, k)
            values.index_copy_(2, positions, v)
            key_pos = torch.arange(keys.shape[2], device=x.device)
            mask = key_pos[None, :] <= positions[:, None]  # [T, S]: causal over the cache
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class TopKRouter(nn.Module):
    """tokens [N, d] -> (weights [N, k], expert ids [N, k], probs [N, E]): renormalised top-k."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.proj = nn.Linear(config.dim, config.num_experts, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.proj(tokens), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(tokens.dtype), ids, probs


class Experts(nn.Module):
    """E SwiGLU experts: gate_up_proj [E, 2I, d] ([gate; up] halves), down_proj [E, d, I]."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        e, d, i = config.num_experts, config.dim, config.expert_hidden
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, d) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(e, d, i) / i**0.5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, d], ids/weights [N, k] -> [N, d]: gather each slot's expert weights, bmm.

        Static shapes only (N*k gathered matrices), so the whole dispatch is one graph.
        """
        n, k = ids.shape
        flat = ids.reshape(-1)  # [N*k]
        xs = x.repeat_interleave(k, dim=0)  # [N*k, d], token-major like `flat`
        h = torch.bmm(self.gate_up_proj[flat], xs[:, :, None]).squeeze(-1)  # [N*k, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up  # [N*k, I]
        y = torch.bmm(self.down_proj[flat], h[:, :, None]).squeeze(-1)  # [N*k, d]
        return (y.view(n, k, -1) * weights[:, :, None]).sum(dim=1)

    def forward_sorted(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The same function as `forward`, dropless and grouped per expert, for training.

        Gathering one weight matrix per (token, slot) costs N*k*3*I*d memory, too much for
        training batches; sorting slots by expert and running one matmul per expert does not.
        The per-expert split sizes are read to the host, so this path is eager-only.
        """
        n, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k  # token of each sorted slot
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        outs = []
        for e, rows in enumerate(torch.split(x[token], counts)):
            if rows.shape[0] == 0:
                continue
            gate, up = (rows @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ self.down_proj[e].t())
        y = torch.cat(outs) * weights.reshape(-1)[order, None]  # [N*k, d] in sorted order
        return x.new_zeros(n, x.shape[1]).index_add(0, token, y)


class MoEFeedForward(nn.Module):
    """Router + experts: x [B, T, d] -> (y [B, T, d], probs [B*T, E], ids [B*T, k])."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.router = TopKRouter(config)
        self.experts = Experts(config)

    def forward(
        self, x: torch.Tensor, sorted_dispatch: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, ids, probs = self.router(tokens)
        dispatch = self.experts.forward_sorted if sorted_dispatch else self.experts
        return dispatch(tokens, ids, weights).view(b, t, d), probs, ids


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + moe(norm(x))."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.moe_norm = RMSNorm(config.dim, config.norm_eps)
        self.moe = MoEFeedForward(config)

    def forward(self, x, cos, sin, kv=None, positions=None, sorted_dispatch=False):
        """x [B, T, d] -> (x [B, T, d], router probs [B*T, E], ids [B*T, k])."""
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, positions)
        y, probs, ids = self.moe(self.moe_norm(x), sorted_dispatch)
        return x + y, probs, ids


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch-style auxiliary loss of one layer: E * sum_e f_e * P_e (1.0 when balanced).

    probs [N, E] router probabilities, ids [N, k] chosen experts; f_e is the fraction of the
    N*k assignments that went to expert e, P_e the mean probability of e.
    """
    num_experts = probs.shape[1]
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    return num_experts * (counts / ids.numel() * probs.mean(dim=0)).sum()


class TinyMoE(nn.Module):
    """Byte-level decoder-only MoE LM: tokens [B, T] (int64 bytes) -> logits [B, T, 256]."""

    def __init__(self, config: TinyMoEConfig | None = None):
        super().__init__()
        self.config = config or TinyMoEConfig()
        cfg = self.config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """An empty KV cache for `batch` sequences of up to `max_len` (default max_seq_len)
        positions: per layer (keys, values), each [B, H, max_len, hd]."""
        cfg = self.config
        max_len = max_len or cfg.max_seq_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_len must be in [1, {cfg.max_seq_len}] (the RoPE table size), got {max_len}"
            )
        weight = self.lm_head.weight
        shape = (batch, cfg.num_heads, max_len, cfg.head_dim)
        return [
            tuple(
                torch.zeros(shape, dtype=dtype or weight.dtype, device=weight.device) for _ in "kv"
            )
            for _ in range(cfg.num_layers)
        ]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        start: torch.Tensor | int = 0,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab].

        Without a cache: the whole sequence from position 0. With `cache` (from new_cache,
        updated in place): tokens sit at positions start .. start+T-1 and attend to the cache.
        Pass `start` as a 0-d int64 tensor in decode loops so every step reuses one compiled
        graph (a Python int would be specialised into the graph).
        """
        t = tokens.shape[1]
        if cache is None:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
            positions = None
        else:
            positions = torch.as_tensor(start, device=tokens.device) + torch.arange(
                t, device=tokens.device
            )
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x, _, _ = layer(x, cos, sin, None if cache is None else cache[i], positions)
        return self.lm_head(self.norm(x))

    def forward_train(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> (logits [B, T, vocab], mean load-balancing loss over layers)."""
        t = tokens.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(tokens)
        lb = x.new_zeros(())
        for layer in self.layers:
            x, probs, ids = layer(x, cos, sin, sorted_dispatch=True)
            lb = lb + load_balancing_loss(probs, ids)
        return self.lm_head(self.norm(x)), lb / len(self.layers)


def config_path(checkpoint: Path) -> Path:
    """The JSON config stored next to a checkpoint (same stem, .json)."""
    return checkpoint.with_suffix(".json")


def save_checkpoint(model: TinyMoE, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the weights (cast to `dtype` for size) as safetensors and the config as JSON."""
    save_file = require("safetensors.torch", "demo", "saving a TinyMoE checkpoint").save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    config_path(path).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> TinyMoE:
    """Load a TinyMoE checkpoint (safetensors + JSON config) from local files, in eval mode."""
    load_file = require("safetensors.torch", "demo", "loading a TinyMoE checkpoint").load_file
    path = Path(path)
    if not path.is_file() or not config_path(path).is_file():
        raise FileNotFoundError(
            f"TinyMoE checkpoint {path} or its config {config_path(path)} is missing; "
            "train one with `python -m lynx_compile.tools.train --out <path>`"
        )
    config = TinyMoEConfig(**json.loads(config_path(path).read_text()))
    model = TinyMoE(config)
    state = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(dtype).eval()


def load_default_model(dtype: torch.dtype = torch.float32) -> TinyMoE:
    """The committed checkpoint trained with the load-balancing loss (no network needed)."""
    return load_model(DEFAULT_CHECKPOINT, dtype)
