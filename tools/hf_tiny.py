"""Tiny random transformers MoE blocks and models (no hub access: configs built in code).

Used by the tests, `lynx-compile dump hf:<family>` and the benchmarks. Each family entry
names the config class, the sparse-MoE block class and the config fields that make it
tiny; weights are random (seeded) and scaled so routing is not degenerate.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from lynx_compile._extras import require

FEATURE = "the tiny transformers MoE blocks (lynx_compile.tools.hf_tiny)"
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
    require("transformers", "bench", FEATURE)
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


# Config fields that make the whole model build at toy size with every decoder layer an
# MoE layer (the block configs above leave the families' dense first layers, layer
# periods and attention kinds at their defaults; a block does not read them).
_WHOLE_MODEL: dict[str, dict] = {
    "deepseek_v2": dict(num_key_value_heads=4),  # MLA: as many KV heads as query heads
    "deepseek_v3": dict(num_key_value_heads=4, first_k_dense_replace=0),
    "longcat_flash": dict(num_key_value_heads=4, num_hidden_layers=4),  # 2 layers of 2 halves
    "glm4_moe": dict(first_k_dense_replace=0),
    "exaone_moe": dict(first_k_dense_replace=0),
    "ernie4_5_moe": dict(moe_layer_start_index=0),
    "flex_olmo": dict(pad_token_id=0, eos_token_id=1, bos_token_id=None),
    "olmoe": dict(eos_token_id=1),
    "jamba": dict(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1,
                  expert_layer_offset=0),
    "qwen3_next": dict(layer_types=["full_attention"] * 2),
    "hunyuan_v1_moe": dict(head_dim=8),
    "lfm2_moe": dict(layer_types=["full_attention"] * 2, num_dense_layers=0),
    # transformers 5.24's DBRX attention reads rope_theta and clip_qkv from attn_config
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    "switch_transformers": dict(num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                                num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
}  # fmt: skip


def build_causal_lm(family: str, implementation: str = "grouped_mm", seed: int = 0, **overrides):
    """A tiny random *ForCausalLM of `family` (eval mode, fp32), two decoder layers, each
    an MoE layer (Switch Transformers: its encoder-decoder, every layer sparse)."""
    transformers = require("transformers", "bench", FEATURE)
    config = tiny_config(family, implementation, **{**_WHOLE_MODEL.get(family, {}), **overrides})
    auto = transformers.AutoModelForCausalLM
    if family == "switch_transformers":  # no causal-LM head: the seq2seq model
        auto = transformers.AutoModelForSeq2SeqLM
    model = auto.from_config(config).eval()
    _randomize(model, seed)
    return model


def moe_blocks(model: torch.nn.Module, family: str) -> list[str]:
    """Module paths of the family's sparse-MoE blocks in `model`, in order."""
    _, _, block_cls = _classes(family)
    return [name for name, m in model.named_modules() if isinstance(m, block_cls)]


# Every other router kind of transformers' MoE families (sigmoid + bias + groups, top-k on
# logits, softmax + bias, shared experts, top-1), at one toy size where the config allows
# it (16 experts, top-4, expert width 24): compiled kernels then repeat across families,
# which keeps the family test matrix affordable on CPU.
_DEEPSEEK = dict(
    n_routed_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=24,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
)
_TOP4_OF_16 = dict(num_experts_per_tok=4, intermediate_size=24)

FAMILIES.update(
    {
        "deepseek_v2": Family(
            "deepseek_v2",
            "DeepseekV2Config",
            "DeepseekV2Moe",
            dict(_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
        ),
        "deepseek_v3": Family(
            "deepseek_v3",
            "DeepseekV3Config",
            "DeepseekV3MoE",
            dict(_DEEPSEEK, norm_topk_prob=True, routed_scaling_factor=2.5),
        ),
        "glm4_moe": Family(
            "glm4_moe",
            "Glm4MoeConfig",
            "Glm4MoeMoE",
            dict(_DEEPSEEK, n_group=2, topk_group=1, norm_topk_prob=False),
        ),
        "dots1": Family(
            "dots1",
            "Dots1Config",
            "Dots1MoE",
            dict(_DEEPSEEK, n_group=1, topk_group=1, norm_topk_prob=True),
        ),
        "exaone_moe": Family(
            "exaone_moe",
            "ExaoneMoeConfig",
            "ExaoneMoeSparseMoEBlock",
            dict(
                num_experts=16,
                num_experts_per_tok=4,
                moe_intermediate_size=24,
                num_shared_experts=1,
            ),
        ),
        "lfm2_moe": Family(
            "lfm2_moe",
            "Lfm2MoeConfig",
            "Lfm2MoeSparseMoeBlock",
            dict(
                num_experts=16,
                num_experts_per_tok=4,
                moe_intermediate_size=24,
                use_expert_bias=True,
                norm_topk_prob=True,
            ),
        ),
        "gpt_oss": Family(
            "gpt_oss", "GptOssConfig", "GptOssMLP", dict(_TOP4_OF_16, num_local_experts=16)
        ),
        "llama4": Family(
            "llama4",
            "Llama4TextConfig",
            "Llama4TextMoe",
            dict(num_local_experts=16, num_experts_per_tok=1, intermediate_size=24),
            implementations=("eager",),  # dense experts over all 16, no switch
        ),
        "granitemoe": Family(
            "granitemoe",
            "GraniteMoeConfig",
            "GraniteMoeMoE",
            dict(_TOP4_OF_16, num_local_experts=16),
        ),
        "granitemoeshared": Family(
            "granitemoeshared",
            "GraniteMoeSharedConfig",
            "GraniteMoeSharedMoE",
            dict(_TOP4_OF_16, num_local_experts=16, shared_intermediate_size=32),
        ),
        "jetmoe": Family(
            "jetmoe",
            "JetMoeConfig",
            "JetMoeMoE",
            dict(_TOP4_OF_16, num_local_experts=16),
            implementations=("eager",),  # its own parallel-experts kernels, no switch
        ),
        "aria": Family(
            "aria",
            "AriaTextConfig",
            "AriaTextMoELayer",
            dict(moe_num_experts=16, moe_topk=4, intermediate_size=24, moe_num_shared_experts=1),
        ),
        "ernie4_5_moe": Family(
            "ernie4_5_moe",
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeSparseMoeBlock",
            dict(moe_num_experts=16, moe_k=4, moe_intermediate_size=24, moe_num_shared_experts=1),
        ),
        "longcat_flash": Family(
            "longcat_flash",
            "LongcatFlashConfig",
            "LongcatFlashMoE",
            dict(n_routed_experts=16, moe_topk=4, expert_ffn_hidden_size=24, zero_expert_num=0),
            implementations=("eager",),  # its own expert loop, no switch
        ),
        "qwen2_moe": Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "Qwen2MoeSparseMoeBlock",
            dict(
                num_experts=16,
                num_experts_per_tok=4,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=32,
                norm_topk_prob=False,
            ),
        ),
        "qwen3_next": Family(
            "qwen3_next",
            "Qwen3NextConfig",
            "Qwen3NextSparseMoeBlock",
            dict(
                num_experts=16,
                num_experts_per_tok=4,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=32,
                norm_topk_prob=True,
            ),
        ),
        "hunyuan_v1_moe": Family(
            "hunyuan_v1_moe",
            "HunYuanMoEV1Config",
            "HunYuanMoEV1Moe",
            dict(num_experts=16, moe_topk=4, intermediate_size=24),
        ),
        "minimax": Family(
            "minimax",
            "MiniMaxConfig",
            "MiniMaxSparseMoeBlock",
            dict(_TOP4_OF_16, num_local_experts=16),
        ),
        "jamba": Family(
            "jamba", "JambaConfig", "JambaSparseMoeBlock", dict(_TOP4_OF_16, num_experts=16)
        ),
        "flex_olmo": Family(
            "flex_olmo",
            "FlexOlmoConfig",
            "FlexOlmoSparseMoeBlock",
            dict(_TOP4_OF_16, num_experts=16, norm_topk_prob=False),
        ),
        "dbrx": Family(
            "dbrx",
            "DbrxConfig",
            "DbrxFFN",
            dict(
                d_model=32,
                n_heads=4,
                ffn_config=dict(ffn_hidden_size=24, moe_num_experts=16, moe_top_k=4),
            ),
            implementations=("eager",),  # its own expert loop, no switch
        ),
        # Built but not rewritten (max/argmax top-1 and top-2 with masks): they must compile
        # to eager's output and be reported as skipped.
        "phimoe": Family(
            "phimoe",
            "PhimoeConfig",
            "PhimoeSparseMoeBlock",
            dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=24),
        ),
        "switch_transformers": Family(
            "switch_transformers",
            "SwitchTransformersConfig",
            "SwitchTransformersSparseMLP",
            dict(d_model=32, d_ff=24, num_experts=16, expert_capacity=64),
            implementations=("eager",),  # its own expert loop, no switch
        ),
    }
)
