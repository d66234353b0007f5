"""The named lynx passes on small Dynamo graphs: what each matches and skips, through
counters["lynx"], beside the graph it leaves; and what TORCH_COMPILE_DEBUG=1 writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lynx_compile.examples.moe_modules import DenseMoE, LoopMoE
from lynx_compile.passes.pipeline import LYNX_PASSES, run_passes
from torch import nn
from torch._dynamo.utils import counters

from lynx_compile.config import parse_options
from tests.helpers import REPO_ROOT, dynamo_graph, lynx_passes_only

PASS_NAMES = [p.name for p in LYNX_PASSES]


def lynx_targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("lynx.")]


# The weights come from the model's own ops (sigmoid, gather, renormalisation), compiled by
# Inductor: its generated sigmoid may round the last bit unlike ATen's, depending on the
# vector ISA it picks (1 ulp, 1.03e-7 relative, measured on an AVX-512/AMX host). So up to
# ~4 ulps relative; the routing (ids) is compared exactly.
MODEL_OPS_TOL = dict(rtol=5e-7, atol=0.0)


def run(module, x, **options):
    """Run the lynx passes on module's graph with fresh counters: (gm, counters, changed)."""
    gm, inputs = dynamo_graph(module, x)
    counters["lynx"].clear()
    changed = run_passes(gm, inputs, parse_options(options), graph_id=0)
    return gm, dict(counters["lynx"]), changed


class SigmoidTopK(nn.Module):
    """A sigmoid router without a bias (scored: ranked by the sigmoid), dense experts."""

    def __init__(self, dim=16, experts=6):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x.reshape(-1, x.shape[-1])))
        values, ids = torch.topk(scores, 2, dim=-1)
        return values, ids


class BiasedSigmoid3D(nn.Module):
    """A sigmoid + expert-bias router applied to [B, T, d] (scores [B, T, E]), weights
    gathered from the unbiased scores and renormalised (the LFM2 / DeepSeek form, no groups)."""

    def __init__(self, dim=16, experts=8):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, experts))

    def forward(self, x):
        scores = torch.sigmoid(self.gate(x))
        _, ids = torch.topk(scores + self.bias, 3, dim=-1)
        weights = scores.gather(-1, ids)
        return weights / weights.sum(-1, keepdim=True), ids


class ScaledSigmoid(nn.Module):
    """A sigmoid + bias router whose logits are scaled by a float attribute (MuseSpark's
    output_multiplier): under dynamic=True the float is a graph input, not a constant.
    token_scale: must not match, the logits are scaled by a token-dependent tensor."""

    def __init__(self, dim=16, experts=8, token_scale=False):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, experts))
        self.multiplier = 1.7
        self.token_scale = token_scale

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])
        logits = self.gate(x) * (x[:, :1].abs() if self.token_scale else self.multiplier)
        scores = torch.sigmoid(logits)
        _, ids = torch.topk(scores + self.bias, 3, dim=-1)
        return scores.gather(-1, ids), ids


class ProductKeys(nn.Module):
    """Must not match: product-key routing (Doge): a top-k per half of the router output
    picks sub-keys, a second top-k over their sums picks the experts."""

    def __init__(self, dim=16, keys=4):
        super().__init__()
        self.gate = nn.Linear(dim, 2 * keys, bias=False)
        self.keys = keys

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate(tokens).view(2, tokens.shape[0], self.keys)  # as Doge views it
        (sx, sy), (ix, iy) = logits.topk(2, dim=-1)
        scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(1)
        experts = (ix.unsqueeze(-1) * self.keys + iy.unsqueeze(-2)).flatten(1)
        values, pos = scores.topk(2, dim=-1)
        return torch.softmax(values, dim=-1), experts.gather(-1, pos)


class OuterProductKeys(nn.Module):
    """Must not match: product keys whose sub-key scores combine multiplicatively, by an
    outer product (an einsum, or a [N, i, 1] @ [N, 1, j] matmul: contractions that sum over
    nothing), then a top-k over the products picks the experts."""

    def __init__(self, dim=16, keys=4, combine="einsum"):
        super().__init__()
        self.gate = nn.Linear(dim, 2 * keys, bias=False)
        self.keys, self.combine = keys, combine

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(self.gate(tokens)).view(2, tokens.shape[0], self.keys)
        (sx, sy), (ix, iy) = scores.topk(2, dim=-1)
        if self.combine == "einsum":
            products = torch.einsum("ni,nj->nij", sx, sy).flatten(1)
        else:
            products = (sx.unsqueeze(-1) @ sy.unsqueeze(-2)).flatten(1)
        experts = (ix.unsqueeze(-1) * self.keys + iy.unsqueeze(-2)).flatten(1)
        values, pos = products.topk(2, dim=-1)
        return values, experts.gather(-1, pos)


class ModuleListExperts(LoopMoE):
    """Must match (the dispatch): experts as an nn.ModuleList of nn.Linear MLPs, looped
    over without a data-dependent branch (so the loop traces into one graph under lynx):
    24 separate 2-D weights, read in place by lynx::experts_list."""

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return out.reshape(b, t, d)


class UnequalModuleListExperts(ModuleListExperts):
    """Must not match (the dispatch): as ModuleListExperts, but expert 3 is wider than the
    others (one set of strides cannot read them all)."""

    def __init__(self):
        super().__init__()
        self.experts[3] = type(self.experts[0])(32, 64)


class ReorderedModuleListExperts(ModuleListExperts):
    """Same function as ModuleListExperts, its loop visiting the experts evens first: the
    order the region first uses the matrices in is not the experts' order. Must match only
    as that function (a fused call reading expert 2's weights for id 1 would be wrong)."""

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        weights, selected = self.router(x)
        out = torch.zeros_like(tokens)
        for i in (0, 2, 4, 6, 1, 3, 5, 7):
            token_idx, slot = torch.where(selected == i)
            out.index_add_(
                0, token_idx, self.experts[i](tokens[token_idx]) * weights[token_idx, slot, None]
            )
        return out.reshape(b, t, d)


class GeluExpert(nn.Module):
    def __init__(self, expert):
        super().__init__()
        self.gate, self.up, self.down = expert.gate, expert.up, expert.down

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.gate(x)) * self.up(x))


class MixedActivationModuleListExperts(ModuleListExperts):
    """Must not match as SiLU experts: expert 3 of the 8 (same shapes) computes a GELU GLU."""

    def __init__(self):
        super().__init__()
        self.experts[3] = GeluExpert(self.experts[3])


class StackedScoredLayers(nn.Module):
    """Must match twice: two layers, each a sigmoid top-k router over gathered-bmm experts.
    The second layer's top-k reads the first's output through its experts' matmuls: that
    is the next layer's router, not a product-key combination of the first's picks."""

    def __init__(self, dim=16, experts=6, layers=2):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(dim, experts, bias=False) for _ in range(layers))
        self.w = nn.Parameter(torch.randn(layers, experts, dim, dim) / dim**0.5)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        for gate, w in zip(self.gates, self.w, strict=True):
            values, ids = torch.topk(torch.sigmoid(gate(tokens)), 2, dim=-1)
            xs = tokens.repeat_interleave(2, dim=0).unsqueeze(-1)  # [N*2, d, 1]
            y = torch.bmm(w[ids.reshape(-1)], xs).view(tokens.shape[0], 2, -1)
            tokens = tokens + (y * values.unsqueeze(-1)).sum(dim=1)
        return tokens


class SoftmaxOverTokens(nn.Module):
    """Must not match: the softmax normalises over tokens, not experts."""

    def __init__(self, dim=16, experts=6):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)

    def forward(self, x):
        probs = F.softmax(self.gate(x.reshape(-1, x.shape[-1])), dim=0)
        return torch.topk(probs, 2, dim=-1)


class AttentionTopK(nn.Module):
    """Must not match: softmax over attention scores [B, T, S] (q @ k^T, no router linear),
    then a top-k of the keys: leading dims, but not a router."""

    def forward(self, x):
        probs = F.softmax(x @ x.transpose(1, 2), dim=-1)  # [B, T, T]
        return torch.topk(probs, 2, dim=-1)


class NoMoE(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.relu(self.proj(x))


X = torch.randn(3, 1, 32)  # a decode step of 3 sequences


@torch.no_grad()
def test_softmax_router_and_dense_dispatch_are_counted_and_rewritten():
    gm, got, changed = run(DenseMoE().eval(), X, policy="exact")
    assert changed
    assert got == {
        "router_rewritten": 1,
        "router_rewritten:softmax_topk_renorm": 1,
        "dispatch_rewritten": 1,
        "dispatch_rewritten:sparse_experts(split-gate silu)": 1,
    }
    assert lynx_targets(gm).count("lynx.route.default") == 1
    assert lynx_targets(gm).count("lynx.experts.default") == 1


@torch.no_grad()
def test_a_loop_dispatch_outside_the_graph_is_a_counted_skip():
    gm, got, _ = run(LoopMoE().eval(), X)
    assert got["router_rewritten:softmax_topk_renorm"] == 1
    assert got["dispatch_skipped"] == 1
    # the graph breaks in the loop: the router's graph ends with its (weights, ids)
    reason = "dispatch_skipped:routing leaves the graph"
    assert any(key.startswith(reason) for key in got), got
    assert "lynx.experts.default" not in lynx_targets(gm)


@torch.no_grad()
def test_scored_router_goes_to_its_own_pass():
    gm, got, _ = run(SigmoidTopK().eval(), torch.randn(5, 1, 16))
    assert got["router_rewritten"] == 1
    assert [k for k in got if k.startswith("router_rewritten:")] == [
        "router_rewritten:sigmoid_topk"
    ]
    assert lynx_targets(gm) == ["lynx.route_scored.default"]


@torch.no_grad()
def test_scored_router_with_leading_dims_is_routed_flattened():
    torch.manual_seed(0)
    module = BiasedSigmoid3D().eval()
    gm, got, _ = run(module, torch.randn(5, 1, 16))
    routers = {k: v for k, v in got.items() if k.startswith("router")}
    assert routers == {"router_rewritten": 1, "router_rewritten:sigmoid_bias_topk": 1}, got
    assert lynx_targets(gm) == ["lynx.route_scored.default"]
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
    for shape in ((1, 1, 16), (13, 1, 16), (2, 3, 16)):
        x = torch.randn(*shape)
        (got_w, got_ids), (want_w, want_ids) = compiled(x), module(x)
        assert got_ids.shape == (*shape[:-1], 3) and torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, **MODEL_OPS_TOL)  # the model's own ops


@torch.no_grad()
def test_a_router_with_a_logit_multiplier_is_rewritten_under_dynamic_shapes():
    import lynx_compile

    torch.manual_seed(0)
    for token_scale in (False, True):
        module = ScaledSigmoid(token_scale=token_scale).eval()
        torch._dynamo.reset()
        lynx_compile.clear_report()
        opts = {"policy": "exact"}
        compiled = torch.compile(module, backend="lynx", options=opts, dynamic=True)
        for tokens in (1, 3, 13):
            x = torch.randn(tokens, 1, 16)
            (got_w, got_ids), (want_w, want_ids) = compiled(x), module(x)
            assert torch.equal(got_ids, want_ids)
            torch.testing.assert_close(got_w, want_w, **MODEL_OPS_TOL)  # the model's own ops
        sites = [s for s in lynx_compile.report()["sites"] if s["kind"] == "router"]
        if token_scale:  # must not match: the scale is token data
            assert sites and all(s["status"] == "skipped" for s in sites), sites
        else:
            assert sites and all(s["status"] == "rewritten" for s in sites), sites
            assert all(s["reason"] == "sigmoid_bias_topk" for s in sites), sites


@torch.no_grad()
def test_must_not_match_product_key_routing():
    gm, got, changed = run(ProductKeys().eval(), torch.randn(5, 1, 16))
    assert not changed and lynx_targets(gm) == []
    assert got.get("router_rewritten", 0) == 0, got
    assert any(k.startswith("router_skipped:product-key routing") for k in got), got


@pytest.mark.parametrize("combine", ["einsum", "matmul"])
@torch.no_grad()
def test_must_not_match_product_keys_combined_by_an_outer_product(combine):
    gm, got, changed = run(OuterProductKeys(combine=combine).eval(), torch.randn(5, 1, 16))
    assert not changed and lynx_targets(gm) == [], got
    assert got.get("router_rewritten", 0) == 0, got
    assert any(k.startswith("router_skipped:product-key routing") for k in got), got


def _passes_only_sites(module, x):
    """Compile `module` with lynx's passes only (policy exact), run x; (output, sites, the
    lynx ops each rewritten graph calls)."""
    import lynx_compile

    torch._dynamo.reset()
    lynx_compile.clear_report()
    graphs = []
    compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
    with lynx_passes_only(graphs):
        out = compiled(x)
    return out, lynx_compile.report()["sites"], [t for gm in graphs for t in lynx_targets(gm)]


@torch.no_grad()
def test_per_expert_linear_modules_are_fused_reading_each_expert_in_place():
    torch.manual_seed(0)
    module = ModuleListExperts().eval()
    x = torch.randn(13, 1, 32)
    out, sites, targets = _passes_only_sites(module, x)
    # lynx::experts_list on lynx's exact routing: fp32 sums in another order (a few ulps)
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-6)
    assert [s["status"] for s in sites if s["kind"] == "router"] == ["rewritten"], sites
    dispatch = [s for s in sites if s["kind"] == "dispatch"]
    assert [s["status"] for s in dispatch] == ["rewritten"], dispatch
    assert dispatch[0]["reason"] == "sparse_experts(split-gate silu, per-expert tensors)"
    assert targets.count("lynx.experts_list.default") == 1, targets


@torch.no_grad()
def test_per_expert_modules_of_unequal_sizes_keep_their_loop_and_the_report_says_why():
    torch.manual_seed(0)
    module = UnequalModuleListExperts().eval()
    x = torch.randn(13, 1, 32)
    out, sites, targets = _passes_only_sites(module, x)
    # the model's own loop on lynx's exact routing (weights renormalised by the routing op,
    # not the model's division: a few ulps in fp32)
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-6)
    assert [s["status"] for s in sites if s["kind"] == "router"] == ["rewritten"], sites
    dispatch = [s for s in sites if s["kind"] == "dispatch"]
    assert [s["status"] for s in dispatch] == ["skipped"], dispatch
    assert "24 separate 2-D weights differ in shape" in dispatch[0]["reason"], dispatch
    assert not [t for t in targets if t.startswith("lynx.experts")], targets


@torch.no_grad()
def test_must_match_each_of_two_stacked_scored_routers():
    gm, got, changed = run(StackedScoredLayers().eval(), torch.randn(5, 1, 16))
    assert changed and got.get("router_rewritten") == 2, got
    assert not any(k.startswith("router_skipped") for k in got), got


@torch.no_grad()
def test_must_not_match_softmax_over_tokens_is_a_counted_skip_and_graph_untouched():
    gm, inputs = dynamo_graph(SoftmaxOverTokens().eval(), torch.randn(5, 1, 16))
    before = gm.print_readable(print_output=False)
    counters["lynx"].clear()
    assert not run_passes(gm, inputs, parse_options({}), graph_id=0)
    got = dict(counters["lynx"])
    assert got.get("router_skipped:softmax is not over the expert dim") == 1, got
    assert "router_rewritten" not in got
    assert gm.print_readable(print_output=False) == before


@torch.no_grad()
def test_must_not_match_3d_softmax_top_k_without_a_router_linear():
    gm, got, changed = run(AttentionTopK().eval(), torch.randn(2, 5, 16))
    assert not changed and lynx_targets(gm) == []
    key = "router_skipped:3-D softmax scores not computed by a linear layer"
    assert got == {"router_skipped": 1, key: 1}, got


@torch.no_grad()
def test_a_model_without_moe_counts_nothing():
    gm, got, changed = run(NoMoE().eval(), torch.randn(4, 16))
    assert (got, changed, lynx_targets(gm)) == ({}, False, [])


def test_graphs_needing_gradients_count_a_skip_per_router():
    module = DenseMoE()  # parameters require grad; grad mode on
    gm, got, changed = run(module, X)
    assert not changed and lynx_targets(gm) == []
    assert got == {"router_skipped": 1, "router_skipped:autograd is on": 1}


@torch.no_grad()
def test_inductors_disabled_passes_turn_a_lynx_pass_off():
    with torch._inductor.config.patch(disabled_passes="lynx_expert_dispatch"):
        gm, got, _ = run(DenseMoE().eval(), X)
    assert got["router_rewritten"] == 1 and "dispatch_rewritten" not in got
    assert "lynx.experts.default" not in lynx_targets(gm)


@torch.no_grad()
def test_fuse_experts_off_leaves_the_dispatch_pass_out():
    _, got, _ = run(DenseMoE().eval(), X, fuse_experts=False)
    assert not any(k.startswith("dispatch") for k in got)


DEBUG_RUN = """
import torch, lynx_compile
from lynx_compile.tools.tiny_moe import load_default_model
model = load_default_model()
tokens = torch.randint(0, 256, (2, 1))
with torch.no_grad():
    torch.compile(model, backend="lynx")(tokens)
"""


def test_torch_compile_debug_writes_each_pass_before_and_after(tmp_path):
    """TORCH_COMPILE_DEBUG=1 on the embedded model: for each graph with MoE, one before and
    one after file per lynx pass, and the after file of the router pass shows its op; with
    TORCH_TRACE the same graphs are tlparse artifacts, one pair per pass and graph."""
    env = {**os.environ, "TORCH_COMPILE_DEBUG": "1", "TORCH_COMPILE_DEBUG_DIR": str(tmp_path)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor_cache")
    env["TORCH_TRACE"] = str(tmp_path / "trace")
    proc = subprocess.run(
        [sys.executable, "-c", DEBUG_RUN], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphs = sorted(tmp_path.rglob("lynx/graph_*"))
    assert graphs, sorted(str(p) for p in tmp_path.rglob("*"))[:20]
    for folder in graphs:
        names = sorted(p.name for p in folder.iterdir())
        want = sorted(
            f"{i}_{name}.{when}.py"
            for i, name in enumerate(PASS_NAMES)
            for when in ("before", "after")
        )
        assert names == want, (folder, names)
    routed = [g for g in graphs if "lynx.route" in (g / f"0_{PASS_NAMES[0]}.after.py").read_text()]
    assert routed, "the softmax router pass rewrote no graph of the embedded model"
    assert all("lynx.route" not in (g / f"0_{PASS_NAMES[0]}.before.py").read_text() for g in graphs)
    trace = "".join(f.read_text() for f in (tmp_path / "trace").iterdir())
    artifacts = set(re.findall(r'"name": "(lynx_[a-z_]+_graph\d+_(?:before|after))"', trace))
    assert len(artifacts) == 2 * len(PASS_NAMES) * len(graphs), sorted(artifacts)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 13])
def test_per_expert_roles_are_checked_on_every_expert(tokens):
    """The matrices' expert order and each expert's computation are inferred, so the check
    routes to all 8 experts, even when the graph is compiled at one decode token (one random
    routing there reaches 2 of them). A loop visiting the experts out of order still
    computes the model's function; an expert that differs in its activation keeps the loop."""
    torch.manual_seed(0)
    reordered, mixed = ReorderedModuleListExperts().eval(), MixedActivationModuleListExperts()
    mixed.eval()
    probes = [torch.randn(tokens, 1, 32) for _ in range(8)]  # first: the compiled shape
    for module in (reordered, mixed):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
        with lynx_passes_only():
            for x in probes:
                torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
    _, sites, _ = _passes_only_sites(mixed, probes[0])
    dispatch = [s for s in sites if s["kind"] == "dispatch"]
    assert [s["status"] for s in dispatch] == ["skipped"], dispatch
