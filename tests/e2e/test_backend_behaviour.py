"""Backend behaviour beyond numerics: options, must-not-match graphs, recompiles, telemetry,
entry-point resolution and bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lynx_compile.tools import hf_tiny
from torch import nn

import lynx_compile
from lynx_compile.backend import _inductor_patches
from lynx_compile.config import VALID_KEYS, parse_options
from tests.helpers import sites_of

FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # Inductor reorders fp32 reductions


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options,match",
    [
        ({"polcy": "exact"}, "unknown lynx option"),
        ({"policy": "fastest"}, "policy='fastest' is invalid"),
        ({"alpha": 0}, "alpha=0 is invalid"),
        ({"alpha": "3"}, "alpha='3' is invalid"),
        ({"beta": -1}, "beta=-1 is invalid"),
        ({"k0": -1}, "k0=-1 is invalid"),
        ({"policy": "oea", "k0": 0}, "k0=0 is invalid with policy 'oea'"),
        ({"calibration": 3}, "calibration=3 is invalid"),
        ({"budget": 2.5}, "budget=2.5 is invalid"),
        ({"decode_only": "yes"}, "decode_only='yes' is invalid"),
    ],
)
def test_bad_options_raise_value_error_naming_the_valid_range(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options(options)


def test_unknown_option_error_lists_every_valid_key():
    with pytest.raises(ValueError) as err:
        parse_options({"polcy": "exact"})
    assert all(key in str(err.value) for key in VALID_KEYS)


def test_bad_option_through_torch_compile_names_the_problem():
    # Dynamo wraps backend errors in BackendCompilerFailed; the ValueError text survives.
    model = torch.compile(nn.Linear(4, 4), backend="lynx", options={"polcy": "exact"})
    with pytest.raises(Exception, match="unknown lynx option.*valid keys: policy") as err:
        model(torch.randn(2, 4))
    assert isinstance(getattr(err.value, "inner_exception", err.value), ValueError)


def test_valid_options_and_mode_reach_the_config_and_inductor():
    config = parse_options({"policy": "oea", "k0": 3, "beta": None}, mode="max-autotune")
    assert (config.policy, config.k0, config.beta, config.mode) == ("oea", 3, None, "max-autotune")
    patches = _inductor_patches(config, native_cpu=True)
    for key, value in torch._inductor.list_mode_options("max-autotune").items():
        assert patches[key] == value
    # The cache salt: a changed option is a different FX-graph-cache entry.
    salt = patches["post_grad_custom_post_pass"].uuid()
    other = _inductor_patches(parse_options({"policy": "oea", "k0": 2}), native_cpu=True)
    assert salt != other["post_grad_custom_post_pass"].uuid()
    # ... and so is a graph lowered without the native CPU kernels
    traced = _inductor_patches(config, native_cpu=False)
    assert salt != traced["post_grad_custom_post_pass"].uuid()
    assert parse_options(None).policy == "affinity"


# ---------------------------------------------------------------- must-not-match
class NoMoE(nn.Module):
    """An attention + MLP block with a softmax but no top-k: nothing to rewrite."""

    def __init__(self, dim=16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        return x + self.mlp(attn)


class TopkOverTokens(nn.Module):
    """softmax -> top-k over the TOKEN dim (a capacity-style choice): not a router."""

    def __init__(self, dim=16, experts=4):
        super().__init__()
        self.proj = nn.Linear(dim, experts, bias=False)

    def forward(self, x):
        scores = self.proj(x.reshape(-1, x.shape[-1])).softmax(dim=0)
        vals, idx = torch.topk(scores, 2, dim=0)
        return vals.sum() + idx.sum()


class SmallestK(nn.Module):
    """softmax -> top-k with largest=False: not a router."""

    def __init__(self, dim=16, experts=4):
        super().__init__()
        self.proj = nn.Linear(dim, experts, bias=False)

    def forward(self, x):
        probs = F.softmax(self.proj(x.reshape(-1, x.shape[-1])), dim=-1)
        vals, idx = probs.topk(2, dim=-1, largest=False)
        return vals * idx


@torch.no_grad()
def test_model_without_moe_compiles_to_eager_output_with_no_site():
    torch.manual_seed(0)
    model = NoMoE().eval()
    x = torch.randn(2, 5, 16)
    lynx_compile.clear_report()
    torch.testing.assert_close(torch.compile(model, backend="lynx")(x), model(x), **FP32_TOL)
    assert lynx_compile.report()["sites"] == []


@pytest.mark.parametrize("cls,reason", [(TopkOverTokens, "top-k is not"), (SmallestK, "top-k")])
@torch.no_grad()
def test_topk_that_is_not_a_router_is_left_alone_and_reported(cls, reason):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(3, 1, 16)
    lynx_compile.clear_report()
    torch.testing.assert_close(torch.compile(model, backend="lynx")(x), model(x), **FP32_TOL)
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "skipped" and reason in s["reason"] for s in sites)


# ---------------------------------------------------------------- dynamic batch, telemetry
@torch.no_grad()
def test_decode_batches_1_to_64_recompile_at_most_twice():
    torch._dynamo.reset()
    block = hf_tiny.build_block("qwen3_moe", "grouped_mm")
    model = torch.compile(block, backend="lynx")
    lynx_compile.clear_report()
    for batch in range(1, 65):
        model(torch.randn(batch, 1, 32))
    graphs = {s["graph"] for s in sites_of(lynx_compile.report())}
    assert 1 <= len(graphs) <= 3, f"{len(graphs) - 1} recompiles"


@torch.no_grad()
def test_telemetry_shows_affinity_touches_fewer_experts_than_exact():
    torch._dynamo.reset()
    block = hf_tiny.build_block("qwen3_moe", "grouped_mm", num_experts=32, num_experts_per_tok=4)
    options = {"policy": "affinity", "alpha": 3.0, "beta": 2.0, "telemetry": True}
    model = torch.compile(block, backend="lynx", options=options)
    lynx_compile.clear_report()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        model(torch.randn(16, 1, 32, generator=gen))
    (site,) = [s for s in sites_of(lynx_compile.report()) if s["telemetry"]]
    tel = site["telemetry"]
    assert tel["calls"] == 20 and tel["tokens"] == 320
    print(f"32 experts top-4 batch 16: {tel}")
    assert tel["mean_experts_chosen"] < tel["mean_experts_exact"]
    assert tel["experts_ratio"] == pytest.approx(
        tel["mean_experts_chosen"] / tel["mean_experts_exact"]
    )


# ---------------------------------------------------------------- autograd, entry point
def test_graphs_that_need_gradients_are_left_alone_and_reported():
    torch._dynamo.reset()
    block = hf_tiny.build_block("mixtral", "batched_mm")
    x = torch.randn(3, 1, 32)
    lynx_compile.clear_report()
    out = torch.compile(block, backend="lynx")(x)
    out.sum().backward()  # still trainable: the exact graph was compiled untouched
    sites = sites_of(lynx_compile.report())
    assert sites and all(s["status"] == "skipped" and "autograd" in s["reason"] for s in sites)


def test_backend_name_resolves_in_a_fresh_process_without_import():
    code = (
        "import torch, sys\n"
        "m = torch.compile(torch.nn.Linear(4, 4), backend='lynx')\n"
        "m(torch.randn(2, 4))\n"
        "assert 'lynx_compile' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_cli_help_works():
    out = subprocess.run(
        [sys.executable, "-m", "lynx_compile.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "demo" in out.stdout and "dump" in out.stdout
