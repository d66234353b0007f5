"""backend="lynx" on transformers' own parallel plans: 2 processes, gloo on loopback, CPU.

What a transformers user runs under torchrun: a causal LM (2 layers, 8 experts, top-2;
seeded random weights saved to a local directory, never a hub) loaded with
`from_pretrained(path, tp_plan="auto")` (the model's base_model_tp_plan: every expert's
gate_up_proj "packed_colwise" and down_proj "rowwise" as DTensors over a 1-D mesh, the
experts module "moe_tp_experts", which runs them on the local shards and all_reduces) or
with `distributed_config=DistributedConfig(tp_size=2, ep_size=2)` (the base_model_ep_plan:
each rank holds 4 of the 8 experts; ep_implementation "all_reduce", what "auto" picks when
the ranks share one batch, or "all_to_all", which exchanges the routed tokens). Two
models: Qwen3-MoE (softmax router, all three layouts) and GPT-OSS (top-k on biased logits,
interleaved clamped SwiGLU experts with per-expert biases, which the EP plan slices like
the weights; tp and ep all_reduce).

Checked per model, rank and layout, on 3 and 13 decode tokens (one new token per sequence):
- policy "exact" equals the single-process eager model;
- the routers are rewritten; the dispatch is fused on the rank's shard (tp) or its expert
  range (ep all_reduce, "experts 0..3" / "4..7" in the report); with all_to_all the token
  exchange breaks the graph (the router's graph reports the experts as run elsewhere), and
  the later graph that runs the rank's 4 experts on the received tokens has them fused on
  the routing it takes as inputs;
- the default policy routes identically on both ranks (the ids the routing op returned
  are equal, the logits agree bit for bit) and equals single-process lynx on the model.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import (
    DECODE_TOKENS,
    GLOO_WORLD,
    INPUT_ROUTING,
    SHARDED_FP32_TOL,
    assert_exact_equals_eager,
    assert_ranks_route_alike,
    join_gloo,
    rank_sites,
    record_route_ids,
    spawn_ranks,
    store_rank_result,
)

MODEL_ENV = "LYNX_TEST_HF_PARALLEL_MODEL"  # the saved model's directory, for the ranks
LAYOUTS_ENV = "LYNX_TEST_HF_PARALLEL_LAYOUTS"


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[],
            max_position_embeddings=64,
        )
    )  # fmt: skip


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(
        GptOssConfig(
            vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=64,
            layer_types=["full_attention"] * 2,
        )
    )  # fmt: skip
    with torch.no_grad():  # its init leaves the biases at 0: give them values to check
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                p.normal_(0.0, 0.5)
    return model


# model -> (builder, layouts)
MODELS = {
    "qwen3_moe": (_qwen3_moe, ("tp", "ep_all_reduce", "ep_all_to_all")),
    "gpt_oss": (_gpt_oss, ("tp", "ep_all_reduce")),
}
CASES = [(m, layout) for m, (_, layouts) in MODELS.items() for layout in layouts]


def _load(path: str, layout: str):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if layout == "whole":
        kwargs = {}
    elif layout == "tp":
        kwargs = dict(tp_plan="auto")
    else:
        impl = layout.removeprefix("ep_")
        config = DistributedConfig(tp_size=GLOO_WORLD, ep_size=GLOO_WORLD, ep_implementation=impl)
        kwargs = dict(distributed_config=config)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _rank_main(rank: int, port: int, results) -> None:
    join_gloo(rank, port, GLOO_WORLD)
    try:
        import lynx_compile

        ids_seen = record_route_ids()  # the ids the default-policy routing op returned
        path = os.environ[MODEL_ENV]
        # seed 1: at 13 tokens the default policy remaps some second choices (checked below)
        inputs = {
            n: torch.randint(0, 128, (n, 1), generator=torch.Generator().manual_seed(1))
            for n in DECODE_TOKENS
        }
        whole = _load(path, "whole")
        torch._dynamo.reset()
        single = torch.compile(whole, backend="lynx", dynamic=True)
        with torch.no_grad():
            eager = {n: whole(x).logits for n, x in inputs.items()}
            single_out = {n: single(x).logits for n, x in inputs.items()}
        for layout in os.environ[LAYOUTS_ENV].split(","):
            torch._dynamo.reset()
            lynx_compile.clear_report()
            model = _load(path, layout)
            exact = torch.compile(model, backend="lynx", options={"policy": "exact"}, dynamic=True)
            # telemetry keeps the routing op an opaque call (its reference records ids)
            default = torch.compile(
                model, backend="lynx", options={"telemetry": True}, dynamic=True
            )
            out, ids = {}, {}
            with torch.no_grad():
                for n, x in inputs.items():
                    ids_seen.clear()
                    default_out = default(x).logits
                    ids[n] = [i for i in ids_seen if i.shape[0] == n]
                    out[n] = (exact(x).logits, eager[n], default_out, single_out[n])
            store_rank_result(results, layout, rank, out, ids)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_of(tmp_path_factory):
    """model -> every rank's results for it, by (layout, rank); each model's ranks are
    spawned once, when a test first asks for them."""
    done = {}

    def ranks(model: str) -> dict:
        if model not in done:
            build, layouts = MODELS[model]
            path = tmp_path_factory.mktemp("hf_parallel") / model
            torch.manual_seed(0)
            build().save_pretrained(path)
            os.environ[MODEL_ENV] = str(path)  # the spawned ranks inherit them
            os.environ[LAYOUTS_ENV] = ",".join(layouts)
            try:
                done[model] = spawn_ranks(_rank_main, GLOO_WORLD)
            finally:
                del os.environ[MODEL_ENV], os.environ[LAYOUTS_ENV]
        return done[model]

    return ranks


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_exact_equals_single_process_eager_on_every_rank(ranks_of, model, layout):
    ranks = ranks_of(model)
    assert_exact_equals_eager(ranks, layout, GLOO_WORLD, SHARDED_FP32_TOL)


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_each_rank_fuses_its_experts_where_they_sit_in_the_graph(ranks_of, model, layout):
    ranks = ranks_of(model)
    for rank in range(GLOO_WORLD):
        routers, dispatch = rank_sites(ranks, layout, rank)
        assert len(routers) >= 2 and all(s["status"] == "rewritten" for s in routers), routers
        assert dispatch, (rank, routers)
        if layout == "ep_all_to_all":  # the token exchange graph-breaks before the experts:
            # the router's graph reports them elsewhere, and the graph that runs them on the
            # received tokens (its inputs: tokens, local ids, unit weights) has them fused
            in_router_graph = [s for s in dispatch if s["router_site"] is not None]
            on_inputs = [s for s in dispatch if s["router_site"] is None]
            assert in_router_graph and all(
                s["status"] == "skipped" and "another graph" in s["reason"] for s in in_router_graph
            ), dispatch
            assert on_inputs and all(
                s["status"] == "rewritten" and INPUT_ROUTING in s["reason"] for s in on_inputs
            ), dispatch
            assert all(s["num_experts"] == 4 for s in on_inputs), dispatch  # the rank's own
            continue
        # both layers, in each compiled graph (exact, default, and a recompile for dynamic N)
        assert len(dispatch) >= 2 and all(s["status"] == "rewritten" for s in dispatch), dispatch
        if model == "gpt_oss":  # its per-expert biases fused too (sliced with the experts)
            assert all("biased gate_up+down" in s["reason"] for s in dispatch), dispatch
        if layout == "ep_all_reduce":  # the rank's own 4 experts, found numerically
            first = rank * 4
            assert all(f"experts {first}..{first + 3}" in s["reason"] for s in dispatch), dispatch
        else:  # every expert, on this rank's shard of the intermediate dim
            assert all("experts " not in s["reason"] for s in dispatch), dispatch


@pytest.mark.parametrize(("model", "layout"), CASES)
def test_default_policy_routes_identically_on_both_ranks(ranks_of, model, layout):
    """Replicated tokens: the ranks chose the same ids, their logits are identical and equal
    single-process lynx (same policy) on the whole model."""
    assert_ranks_route_alike(ranks_of(model), layout, GLOO_WORLD, DECODE_TOKENS, SHARDED_FP32_TOL)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_default_policy_changes_routing_here(ranks_of, model):
    """The check above could pass with a policy that never remaps: on 13 tokens the default
    moves some choices (its logits differ from exact's beyond the fp32 tolerance)."""
    exact, _, default, _ = ranks_of(model)[("tp", 0)]["outputs"][13]
    assert (exact - default).abs().max() > 1e-3
