"""Per-layer calibration files in the backend: each router gets the policy its module path
names (checked against the reference routing per layer), a file made for other routers is
refused with a clear error, and files without per-layer choices keep working."""

from __future__ import annotations

import json

import pytest
import torch
from lynx_compile.lowering.reference import RoutingPolicy, route_reference
from lynx_compile.tools.tiny_moe import TinyMoE, TinyMoEConfig, TopKRouter

import lynx_compile
from lynx_compile import calibration
from tests.helpers import sites_of

FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # Inductor reorders fp32 reductions
LAYERS = ["layers.0.moe.router.proj", "layers.1.moe.router.proj"]  # TinyMoE's router paths
OEA = {"policy": "oea", "alpha": 3.0, "beta": 2.0, "k0": 1, "budget": 16}
AFFINITY = {"policy": "affinity", "alpha": 1.0, "beta": 1.0, "k0": 0, "budget": 16}
PER_LAYER = {LAYERS[0]: OEA, LAYERS[1]: AFFINITY}


def _model() -> TinyMoE:
    torch.manual_seed(0)
    config = TinyMoEConfig(
        dim=32, num_layers=2, num_heads=2, num_experts=8, top_k=2, expert_hidden=16,
        max_seq_len=64,
    )  # fmt: skip
    return TinyMoE(config).eval()


def _calibration(**fields) -> dict:
    return {
        "format": calibration.FORMAT,
        "name": "per-layer",
        "model": {"name": "m", "num_layers": 2, "num_experts": 8, "top_k": 2},
        "choice": {**AFFINITY, "alpha": 3.0, "beta": 2.0, "k0": 1},
        **fields,
    }


def _reference_router(router: TopKRouter, policy: RoutingPolicy):
    """TinyMoE's router forward with its top-k replaced by the reference routing."""

    def forward(tokens):
        logits = router.proj(tokens).float()  # the model's softmax runs in fp32
        weights, ids = route_reference(logits, router.top_k, policy, "renorm")
        return weights.to(tokens.dtype), ids, torch.softmax(logits, -1)

    return forward


def _decode(model, fn, prompts):
    """Prefill eagerly (exact routing: policies apply to decode steps), then one decode
    step through fn: logits [B, 1, V]."""
    cache = model.new_cache(prompts.shape[0], max_len=8)
    model(prompts[:, :4], cache, torch.tensor(0))
    return fn(prompts[:, 4:5], cache, torch.tensor(4))


def _reference_logits(model, policies, prompts):
    """The decode step with each layer's router routing by its policy (the reference)."""
    routers = [layer.moe.router for layer in model.layers]
    cache = model.new_cache(prompts.shape[0], max_len=8)
    model(prompts[:, :4], cache, torch.tensor(0))
    for router, policy in zip(routers, policies, strict=True):
        router.forward = _reference_router(router, policy)
    try:
        return model(prompts[:, 4:5], cache, torch.tensor(4))
    finally:
        for router in routers:
            del router.forward


@torch.no_grad()
def test_each_router_routes_by_its_layers_policy():
    model = _model()
    prompts = torch.randint(0, 256, (8, 5), generator=torch.Generator().manual_seed(1))
    cal = _calibration(layers=LAYERS, choice_by_layer=PER_LAYER)
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(model, backend="lynx", options={"calibration": cal})
    got = _decode(model, compiled, prompts)

    decode = [s for s in sites_of(lynx_compile.report()) if s["decode"]]
    assert {s["layer"]: (s["policy"], s["policy_params"]["k0"]) for s in decode} == {
        LAYERS[0]: ("oea", 1),
        LAYERS[1]: ("affinity", 0),
    }
    (used,) = lynx_compile.report()["calibration"]
    assert used["name"] == "per-layer" and used["choice_by_layer"] == PER_LAYER

    oea, affinity = RoutingPolicy("oea", k0=1), RoutingPolicy("affinity", 1.0, 1.0, 0)
    torch.testing.assert_close(got, _reference_logits(model, [oea, affinity], prompts), **FP32_TOL)
    # the test can tell layers apart: the swapped assignment and exact routing differ
    swapped = _reference_logits(model, [affinity, oea], prompts)
    exact = _reference_logits(model, [RoutingPolicy("exact")] * 2, prompts)
    assert (got - swapped).abs().max() > 1e-3 and (got - exact).abs().max() > 1e-3


@torch.no_grad()
def test_a_file_for_other_routers_names_them_and_what_to_do():
    model = _model()
    prompts = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    other = ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    cal = _calibration(layers=other, choice_by_layer=dict.fromkeys(other, OEA))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lynx", options={"calibration": cal})
    with pytest.raises(Exception, match=r"made for the routers \['blocks.0.mlp.gate'") as err:
        _decode(model, compiled, prompts)
    assert "'layers.0.moe.router.proj', which is not one of them" in str(err.value)
    assert "lynx-compile calibrate" in str(err.value)
    inner = getattr(err.value, "inner_exception", err.value)
    assert isinstance(inner, calibration.CalibrationMismatchError)


def test_malformed_per_layer_fields_are_refused_on_load():
    with pytest.raises(ValueError, match=r"missing \['layers.1.moe.router.proj'\]"):
        calibration.load(_calibration(layers=LAYERS, choice_by_layer={LAYERS[0]: OEA}))
    with pytest.raises(ValueError, match="has choice_by_layer but no 'layers'"):
        calibration.load(_calibration(choice_by_layer={LAYERS[0]: OEA}))
    short = {k: v for k, v in OEA.items() if k != "k0"}
    with pytest.raises(ValueError, match=r"incomplete \['layers.1.moe.router.proj'\]"):
        calibration.load(
            _calibration(layers=LAYERS, choice_by_layer={LAYERS[0]: OEA, LAYERS[1]: short})
        )


@torch.no_grad()
def test_a_file_without_per_layer_fields_gives_every_router_its_choice(tmp_path):
    model = _model()
    prompts = torch.randint(0, 256, (8, 5), generator=torch.Generator().manual_seed(3))
    path = tmp_path / "old.json"
    old = _calibration(choice=OEA, choice_by_batch={"8": AFFINITY})
    path.write_text(json.dumps(old))  # the fields a lynx-calibration/1 file had before
    choices = {None: RoutingPolicy("oea", k0=1), 8: RoutingPolicy("affinity", 1.0, 1.0, 0)}
    for batch, policy in choices.items():
        torch._dynamo.reset()
        lynx_compile.clear_report()
        options = {"calibration": str(path), "calibration_batch": batch}
        got = _decode(model, torch.compile(model, backend="lynx", options=options), prompts)
        decode = [s for s in sites_of(lynx_compile.report()) if s["decode"]]
        assert sorted(s["layer"] for s in decode) == LAYERS
        assert {s["policy"] for s in decode} == {policy.name}
        (used,) = lynx_compile.report()["calibration"]
        assert used["choice_by_layer"] is None
        torch.testing.assert_close(got, _reference_logits(model, [policy] * 2, prompts), **FP32_TOL)
