"""Tiny random transformers MoE blocks and models (no hub access: configs built in code).

Used by the tests, `lynx-compile dump hf:<family>` and the benchmarks. Each family entry
names the config class, the sparse-MoE block class and the config fields that make it
tiny; weights are random (seeded) and scaled so routing is not degenerate.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


@dataclass(frozen=True)
class Family:
    """How to build one transformers MoE family at toy size."""

    module: str  # transformers.models.<module>.modeling_<module>
    config_cls: str
    block_cls: str
    config: dict = field(default_factory=dict)
    implementations: tuple[str, ...] = EXPERTS_IMPLEMENTATIONS


_COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "mixtral",
        "MixtralConfig",
        "MixtralSparseMoeBlock",
        dict(num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        "Qwen3MoeConfig",
        "Qwen3MoeSparseMoeBlock",
        dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=24, norm_topk_prob=True),
    ),
    "olmoe": Family(
        "olmoe",
        "OlmoeConfig",
        "OlmoeSparseMoeBlock",
        dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
    ),
}


def _classes(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    spec = FAMILIES[family]
    mod = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    cfg_mod = importlib.import_module(
        f"transformers.models.{spec.module}.configuration_{spec.module}"
    )
    return spec, getattr(cfg_mod, spec.config_cls), getattr(mod, spec.block_cls)


def tiny_config(family: str, implementation: str = "grouped_mm", **overrides):
    """A tiny config of `family` using the given experts implementation."""
    spec, config_cls, _ = _classes(family)
    if implementation not in spec.implementations:
        raise ValueError(
            f"{family} supports experts implementations {spec.implementations}, "
            f"not {implementation!r}"
        )
    config = config_cls(**{**_COMMON, **spec.config, **overrides})
    config._experts_implementation = implementation
    return config


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def build_block(family: str, implementation: str = "grouped_mm", seed: int = 0, **overrides):
    """A tiny random sparse-MoE block of `family` (eval mode, fp32)."""
    _, _, block_cls = _classes(family)
    block = block_cls(tiny_config(family, implementation, **overrides)).eval()
    _randomize(block, seed)
    return block


def build_causal_lm(family: str, implementation: str = "grouped_mm", seed: int = 0, **overrides):
    """A tiny random *ForCausalLM of `family` (eval mode, fp32)."""
    import transformers

    config = tiny_config(family, implementation, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomize(model, seed)
    return model
