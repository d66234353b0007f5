"""Dispatch rewrite: fused only where shown equivalent; must-not-match cases stay untouched.

Each module here is a plain gather + bmm MoE (transformers' batched_mm shape) with one
twist; eager PyTorch is the reference for every output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lynx_compile.examples.moe_modules import BatchedRouterMoE
from lynx_compile.tools import hf_tiny
from torch import nn

import lynx_compile
from lynx_compile.backend import apply_lynx_passes
from lynx_compile.config import parse_options
from tests.helpers import INPUT_ROUTING, dynamo_graph, sites_of

FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # reordered fp32 sums only
# bf16 has 8 mantissa bits (eps 7.8e-3); fused and unfused paths round intermediates
# (gate/up products, per-expert outputs) at different points, so allow a few ulps.
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


# The plain variants' activations: NemotronH's relu(h) ** 2 in the spellings models use,
# and relu-based ones that are not relu2 (cubed; relu2 plus relu).
PLAIN_ACTIVATIONS = {
    "plain_gelu": F.gelu,
    "plain_relu2": lambda h: torch.square(F.relu(h)),  # transformers' ReLUSquaredActivation
    "plain_relu_pow2": lambda h: torch.relu(h) ** 2,
    "plain_relu_cubed": lambda h: F.relu(h) * F.relu(h) * F.relu(h),
    "plain_relu_pow3": lambda h: F.relu(h).pow(3),
    "plain_relu2_plus_relu": lambda h: F.relu(h) ** 2 + F.relu(h),
}


def _exact_compiled(module: nn.Module):
    """module compiled with lynx's exact policy, on an empty Dynamo cache and report."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    return torch.compile(module, backend="lynx", options={"policy": "exact"})


def softmax_top_k(router: nn.Module, tokens: torch.Tensor, top_k: int):
    """The router of this file's modules: softmax (fp32) over router(tokens), top-k,
    renormalised: (weights [N, k], ids [N, k])."""
    probs = F.softmax(router(tokens).float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


class GatherBmmMoE(nn.Module):
    """softmax top-k router + gather the 3-D expert weights by id + bmm, with a variant."""

    def __init__(self, variant: str, dim=16, inter=24, experts=8, top_k=2):
        super().__init__()
        self.variant, self.top_k = variant, top_k
        self.router = nn.Linear(dim, experts, bias=False)
        gated = 1 if variant in PLAIN_ACTIVATIONS else 2
        self.w_up = nn.Parameter(torch.randn(experts, gated * inter, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, dim, inter) / inter**0.5)
        self.bias = nn.Parameter(torch.randn(experts, dim))

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        w, ids = softmax_top_k(self.router, tokens, self.top_k)
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1, 1)
        xs = tokens.repeat_interleave(self.top_k, dim=0)  # [N*k, d]
        if self.variant == "weight_before_experts":  # Llama-4 style: scale the input
            xs = xs * flat_w
        h = torch.bmm(self.w_up[flat_ids], xs.unsqueeze(-1)).squeeze(-1)
        if self.variant == "weight_inside_activation":
            h = h * flat_w
        if self.variant in PLAIN_ACTIVATIONS:
            h = PLAIN_ACTIVATIONS[self.variant](h)
        else:
            gate, up = h.chunk(2, dim=-1)
            if self.variant == "clamped_silu":  # HY-V4: clamped at 10, never at scale 1
                gate, up = gate.clamp(max=10.0), up.clamp(-10.0, 10.0)
            if self.variant == "gated_relu2":
                h = F.relu(gate) * F.relu(gate) * up
            else:
                h = F.silu(gate) * up
        y = torch.bmm(self.w_down[flat_ids], h.unsqueeze(-1)).squeeze(-1)
        if self.variant == "per_expert_bias":
            y = y + self.bias[flat_ids]
        if self.variant not in ("weight_before_experts", "weight_inside_activation"):
            y = y * flat_w
        out = y.view(-1, self.top_k, d).sum(dim=1).view(b, t, d)
        if self.variant == "returns_ids":  # routing also leaves the module (auxiliary loss)
            return out, ids
        if self.variant == "returns_hidden":  # a dispatch intermediate leaves the module
            return out, h
        return out


def _run(module, batches=(1, 3, 13)):
    compiled = _exact_compiled(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 1, 16, generator=gen)
            torch.testing.assert_close(compiled(x), module(x), **FP32_TOL)
    return sites_of(lynx_compile.report(), kind="dispatch")


@pytest.mark.parametrize(
    "variant,pattern",
    [
        ("swiglu", "gated silu"),
        ("plain_gelu", "plain gelu"),
        ("plain_relu2", "plain relu2"),  # NemotronH
        ("plain_relu_pow2", "plain relu2"),
        ("gated_relu2", "gated relu2"),
        ("returns_ids", "gated silu"),
        ("per_expert_bias", "gated silu, biased down"),  # an [E, d] bias after the down proj
    ],
)
def test_gather_bmm_dispatch_is_fused(variant, pattern):
    torch.manual_seed(0)
    sites = _run(GatherBmmMoE(variant).eval())
    assert sites and all(s["status"] == "rewritten" and pattern in s["reason"] for s in sites)


@pytest.mark.parametrize(
    "variant,reason",
    [
        ("weight_before_experts", "reproduces"),  # same inputs, different math
        ("weight_inside_activation", "reproduces"),
        ("returns_hidden", "no closed"),  # fusing would drop a value the caller reads
        # no lynx::experts form clamps a SiLU GLU; plain "gated silu" agrees at scale 1
        # (nothing reaches the clamp) and must be refused where activations reach it
        ("clamped_silu", "reproduces"),
        # relu-based but not relu2: the relu and relu2 plans are both checked and refused
        ("plain_relu_cubed", "reproduces"),
        ("plain_relu_pow3", "reproduces"),
        ("plain_relu2_plus_relu", "reproduces"),
    ],
)
def test_dispatch_that_is_not_lynx_experts_is_kept_and_reported(variant, reason):
    torch.manual_seed(0)
    sites = _run(GatherBmmMoE(variant).eval())
    assert sites and all(s["status"] == "skipped" and reason in s["reason"] for s in sites), sites


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_bf16_fused_dispatch_matches_eager(impl):
    torch._dynamo.reset()
    block = hf_tiny.build_block("mixtral", impl).to(torch.bfloat16)
    lynx_compile.clear_report()
    compiled = torch.compile(block, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (1, 13):
            x = torch.randn(batch, 1, 32, generator=gen).to(torch.bfloat16)
            torch.testing.assert_close(compiled(x), block(x), **BF16_TOL)
    sites = sites_of(lynx_compile.report(), kind="dispatch")
    assert sites and all(s["status"] == "rewritten" for s in sites), sites


def test_bf16_relu2_dispatch_is_fused_and_matches_eager():
    """NemotronH's plain relu(h) ** 2 experts in bf16: the relu plan differs by far more than
    bf16's tolerance, so only relu2 is taken."""
    torch.manual_seed(0)
    module = GatherBmmMoE("plain_relu2").eval().to(torch.bfloat16)
    compiled = _exact_compiled(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (1, 13, 33):
            x = torch.randn(batch, 1, 16, generator=gen).to(torch.bfloat16)
            torch.testing.assert_close(compiled(x), module(x), **BF16_TOL)
    sites = sites_of(lynx_compile.report(), kind="dispatch")
    assert sites and all(s["reason"] == "sparse_experts(plain relu2)" for s in sites), sites


# ------------------------------- experts on a projection of the hidden states (MuseSpark)


class ProjectedExpertsMoE(nn.Module):
    """Router on the hidden states [N, d]; the experts on the model's own projection and
    norm of them, [N, d'] -> [N, d'], then projected back to d (MuseSpark's pre/post expert
    projections, NemotronH's latent experts), gather + bmm, with a variant."""

    def __init__(self, variant: str, dim=16, width=24, inter=20, experts=8, top_k=2):
        super().__init__()
        self.variant, self.top_k, self.width = variant, top_k, width
        self.router = nn.Linear(dim, experts, bias=False)
        self.pre = nn.Linear(dim, width, bias=False)
        self.norm = nn.RMSNorm(width)
        self.post = nn.Linear(width, dim, bias=False)
        self.shared = nn.Linear(dim, dim, bias=False)
        self.w_up = nn.Parameter(torch.randn(experts, 2 * inter, width) / width**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, width, inter) / inter**0.5)
        self.out_scale = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        w, ids = softmax_top_k(self.router, tokens, self.top_k)
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1, 1)
        h = self.norm(self.pre(tokens))  # [N, d']
        xs = h.repeat_interleave(self.top_k, dim=0)  # [N*k, d']
        gate, up = torch.bmm(self.w_up[flat_ids], xs.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.w_down[flat_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        if self.variant == "expert_output_norm":  # MuseSpark: a norm of each expert's output
            y = F.rms_norm(y * (1 + self.out_scale), (self.width,))
        out = (y * flat_w).view(-1, self.top_k, self.width).sum(dim=1)  # [N, d']
        if self.variant == "residual":  # at the experts' width: the model's, not the experts'
            out = out + h
        out = self.post(out).view(b, t, d)
        if self.variant == "shared_and_residual":  # at the router's width
            out = out + x + self.shared(x)
        return out


@pytest.mark.parametrize("variant", ["plain", "residual", "shared_and_residual"])
def test_experts_on_a_projected_width_are_fused(variant):
    """The region of width d holds the projections (refused: it reads them as hidden
    states); the experts' own region, [N, d'] -> [N, d'], is fused, and the projections,
    the norm, residuals and the shared expert stay the model's."""
    torch.manual_seed(0)
    module = ProjectedExpertsMoE(variant).eval()
    sites = _run(module, batches=(1, 3, 13, 33))
    assert sites and all(s["reason"] == "sparse_experts(gated silu)" for s in sites), sites
    with torch.no_grad():  # lynx rewrites inference graphs
        gm, example_inputs = dynamo_graph(module, torch.randn(13, 1, 16))
        rewritten = apply_lynx_passes(gm, example_inputs, parse_options({"policy": "exact"}))
    targets = [str(n.target) for n in rewritten.graph.nodes]
    assert "lynx.experts.default" in targets and "bmm" not in " ".join(targets), targets
    kept = ["linear", "rms_norm"] + (["add"] if variant != "plain" else [])
    assert all(any(k in t for t in targets) for k in kept), targets


def test_experts_that_norm_each_output_on_a_projected_width_are_kept():
    torch.manual_seed(0)
    sites = _run(ProjectedExpertsMoE("expert_output_norm").eval())
    assert sites and all(s["status"] == "skipped" for s in sites), sites
    why = "at the experts' width 24: dispatch reads 1 1-D tensor"
    assert all(why in s["reason"] for s in sites), sites


# ------------------------------------------ router scores with leading dims ([B, T, E])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_router_scores_and_dense_dispatch_are_fused(dtype):
    """A router applied to [B, T, d] without flattening (scores [B, T, E]) and a dense einsum
    dispatch through a scatter-built gate matrix: router and dispatch rewritten, exact ==
    eager at odd shapes, decode steps and prefill alike."""
    torch.manual_seed(0)
    module = BatchedRouterMoE(num_experts=16, top_k=4).eval().to(dtype)
    compiled = _exact_compiled(module)
    gen = torch.Generator().manual_seed(0)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    with torch.no_grad():
        for batch, seq in ((1, 1), (3, 1), (13, 1), (33, 1), (2, 5)):
            x = torch.randn(batch, seq, 32, generator=gen).to(dtype)
            torch.testing.assert_close(compiled(x), module(x), **tol)
    report = lynx_compile.report()
    routers, dispatches = sites_of(report), sites_of(report, kind="dispatch")
    assert routers and all(s["status"] == "rewritten" for s in routers), routers
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches


def test_batched_router_default_policy_touches_fewer_experts_at_batch_16():
    torch.manual_seed(0)
    module = BatchedRouterMoE(num_experts=16, top_k=4).eval()
    x = torch.randn(16, 1, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(module, backend="lynx", options={"telemetry": True})
    with torch.no_grad():
        out = compiled(x)
    assert torch.isfinite(out).all()
    (site,) = sites_of(lynx_compile.report())
    tally = site["telemetry"]
    assert site["decode"] and site["policy"] == "affinity"
    assert tally["mean_experts_chosen"] < tally["mean_experts_exact"], tally


# ------------------------------------------- GPT-OSS style: biased, interleaved, clamped GLU


class GptOssStyleMoE(nn.Module):
    """GPT-OSS's MLP written by hand (gather + bmm): a biased router, top-k on its logits,
    softmax over the k; experts gate_up [E, d, 2I] (x @ W) with gate/up interleaved, per-
    expert biases, gate = min(gate, limit), up = clamp(up, +-limit), (up + 1) * gate *
    sigmoid(alpha * gate). `variant` changes one thing."""

    def __init__(self, variant="model", dim=16, inter=24, experts=8, top_k=2, alpha=1.702):
        super().__init__()
        self.variant, self.top_k, self.alpha, self.limit = variant, top_k, alpha, 7.0
        self.router = nn.Linear(dim, experts)
        # x 4: pre-activations of a few units, so that random inputs reach the limit
        self.gate_up = nn.Parameter(torch.randn(experts, dim, 2 * inter) * 4 / dim**0.5)
        self.gate_up_bias = nn.Parameter(torch.randn(experts, 2 * inter))
        self.down = nn.Parameter(torch.randn(experts, inter, dim) / inter**0.5)
        self.down_bias = nn.Parameter(torch.randn(experts, dim))

    def forward(self, x):
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        values, ids = torch.topk(self.router(tokens), self.top_k, dim=-1)
        w = torch.softmax(values, dim=-1)
        flat = ids.reshape(-1)
        xs = tokens.repeat_interleave(self.top_k, dim=0).unsqueeze(1)  # [N*k, 1, d]
        h = torch.bmm(xs, self.gate_up[flat]).squeeze(1) + self.gate_up_bias[flat]
        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up_limit = 5.0 if self.variant == "two_limits" else self.limit
        up = up.clamp(min=-up_limit, max=up_limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        h = (up + (2 if self.variant == "up_plus_2" else 1)) * glu
        y = torch.bmm(h.unsqueeze(1), self.down[flat]).squeeze(1) + self.down_bias[flat]
        y = y * w.reshape(-1, 1)
        return y.view(-1, self.top_k, d).sum(dim=1).view(b, t, d)


def _run_gpt_oss(module, dtype, batches=(1, 3, 13, 33)):
    torch._dynamo.reset()
    lynx_compile.clear_report()
    module = module.eval().to(dtype)
    compiled = torch.compile(module, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 1, 16, generator=gen).to(dtype)
            want = module(x)
            scale = want.float().abs().max().item()
            # relative to the output's scale (bf16: gate * alpha amplifies a rounding)
            torch.testing.assert_close(
                compiled(x), want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0)
            )
    return sites_of(lynx_compile.report(), kind="dispatch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.702, 1.5])
def test_gpt_oss_style_dispatch_is_fused_with_the_models_constants(dtype, alpha):
    """Biases found as [E, 2I] / [E, d] inputs indexed by expert, gate/up read as
    interleaved views, alpha and limit read from the region's constants (alpha 1.5: not
    GPT-OSS's, still the model's), exact == eager at odd batches."""
    torch.manual_seed(0)
    sites = _run_gpt_oss(GptOssStyleMoE(alpha=alpha), dtype)
    pattern = (
        f"sparse_experts(interleaved swiglu_clamped(alpha={alpha:g}, limit=7), biased gate_up+down)"
    )
    assert sites and all(s["status"] == "rewritten" for s in sites), sites
    assert all(s["reason"] == pattern for s in sites), sites


@pytest.mark.parametrize(
    "variant,reason",
    [
        ("up_plus_2", "reproduces"),  # (up + 2) * glu: same inputs, other math
        ("two_limits", "several bounds"),  # one limit would be a guess for the other clamp
    ],
)
def test_gpt_oss_style_dispatch_that_is_not_swiglu_clamped_is_kept(variant, reason):
    torch.manual_seed(0)
    sites = _run_gpt_oss(GptOssStyleMoE(variant), torch.float32)
    assert sites and all(s["status"] == "skipped" and reason in s["reason"] for s in sites), sites


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_bf16_gpt_oss_block_is_fused_and_matches_eager(impl):
    """transformers' GptOssMLP in bf16: fused on both implementations, exact == eager
    within bf16 rounding, relative to the output's scale (gate * alpha amplifies a
    rounding of the gate)."""
    torch._dynamo.reset()
    block = hf_tiny.build_block("gpt_oss", impl).to(torch.bfloat16)
    lynx_compile.clear_report()
    compiled = torch.compile(block, backend="lynx", options={"policy": "exact"})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (1, 13):
            x = torch.randn(batch, 1, 32, generator=gen).to(torch.bfloat16)
            want = block(x)[0]
            scale = want.float().abs().max().item()
            torch.testing.assert_close(
                compiled(x)[0], want, rtol=BF16_TOL["rtol"], atol=BF16_TOL["atol"] * scale
            )
    sites = sites_of(lynx_compile.report(), kind="dispatch")
    assert sites and all(s["status"] == "rewritten" for s in sites), sites


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_compiled_gpt_oss_block_reads_its_expert_weights_in_place(impl):
    """Memory rule: the compiled graph calls lynx::experts on views of the parameters
    (reinterpret_tensor of the graph's inputs) and allocates no buffer of a fixed shape as
    large as one expert weight tensor: no copy, stack or re-layout of the weights."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lynx_compile.clear_report()
    block = hf_tiny.build_block("gpt_oss", impl)
    compiled = torch.compile(block, backend="lynx", options={"policy": "exact"}, dynamic=True)
    x = torch.randn(13, 1, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        torch.testing.assert_close(out[0], block(x)[0], **FP32_TOL)
    code = "\n".join(codes)
    calls = [line for line in code.splitlines() if "torch.ops.lynx.experts.default(" in line]
    assert calls, "the compiled graph does not call lynx::experts"
    assert all(line.count("reinterpret_tensor(") >= 4 for line in calls), calls  # the views
    smallest = min(p.numel() for n, p in block.experts.named_parameters() if p.dim() == 3)
    for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code):
        dims = [s.strip() for s in shape.split(",") if s.strip()]
        if all(d.isdigit() for d in dims):  # a fixed shape: not sized by the tokens
            numel = 1
            for d in dims:
                numel *= int(d)
            assert numel < smallest, f"a buffer of {numel} elements: a copy of the weights?"


def test_expert_parallel_slots_routed_elsewhere_read_no_extra_expert():
    """An expert-parallel rank holding experts [4, 8): slots routed to other ranks weigh 0
    and point at an expert the rank reads anyway, so the experts it touches are exactly the
    local ones its tokens chose (the old mapping to local expert 0 read one more); outputs
    are unchanged (the reference with the model's own mapping to expert 0)."""
    from lynx_compile.lowering import reference
    from lynx_compile.passes.dispatch import local_routing

    from tests.helpers import experts_case

    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 13):
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
        ids[0] = torch.tensor([0, 6])  # one token with one local and one remote slot
        w = torch.rand(tokens, 2, generator=gen)
        local_ids, local_w = local_routing(ids, w, 4, 4)
        here = (ids >= 4) & (ids < 8)
        assert torch.equal(local_w, torch.where(here, w, 0))
        assert set(local_ids.unique().tolist()) == set((ids[here] - 4).tolist())
        x, _, _, w_up, w_down, _ = experts_case(tokens, 4, 2, 16, 8, "gated", torch.float32)
        model_ids = torch.where(here, ids - 4, 0)  # what ExpertParallelMoE itself computes
        want = reference.experts_general_reference(
            x, model_ids, local_w, None, w_up, w_down, "silu", True
        )
        got = reference.experts_general_reference(
            x, local_ids, local_w, None, w_up, w_down, "silu", True
        )
        # fp32: the same nonzero terms; a GEMM over another set of rows may round each
        # row's products differently (a few ulps)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_received_slots_of_weight_zero_read_no_extra_expert():
    """Routing received from other ranks (ids into this rank's 4 experts, slots routed
    elsewhere sent as weight 0 and local id 0): idle_routing points those slots at an expert
    read anyway, so the experts read are those of the weighted slots; the weights and the
    output are unchanged (the reference on the routing as received)."""
    from lynx_compile.lowering import reference
    from lynx_compile.passes.dispatch import idle_routing

    from tests.helpers import experts_case

    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 3, 13):
        ids = torch.randint(1, 4, (tokens, 2), generator=gen)
        w = torch.rand(tokens, 2, generator=gen)
        idle = torch.rand(tokens, 2, generator=gen) < 0.5
        idle[0] = torch.tensor([True, False])  # one token with one idle, one weighted slot
        if tokens > 1:
            idle[1] = True  # a token with no weighted slot
        ids, w = torch.where(idle, 0, ids), torch.where(idle, 0.0, w)  # as the sender wrote
        got_ids, got_w = idle_routing(ids, w, 4)
        assert torch.equal(got_w, w)
        assert set(got_ids.unique().tolist()) == set(ids[w != 0].tolist())  # expert 0 not read
        assert torch.equal(got_ids[w != 0], ids[w != 0])
        x, _, _, w_up, w_down, _ = experts_case(tokens, 4, 2, 16, 8, "gated", torch.float32)
        want = reference.experts_general_reference(x, ids, w, None, w_up, w_down, "silu", True)
        got = reference.experts_general_reference(x, got_ids, w, None, w_up, w_down, "silu", True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # as in the test above


def test_received_ids_outside_the_ranks_experts_weigh_zero():
    """Received global ids that the model masks out itself (ids of another rank's range,
    weight kept): idle_routing gives them weight 0 and an expert read anyway, never an id
    out of range for the kernel."""
    from lynx_compile.passes.dispatch import idle_routing

    ids = torch.tensor([[1, 9], [12, 14], [-1, 3]])
    w = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]])
    got_ids, got_w = idle_routing(ids, w, 4)
    assert torch.equal(got_w, torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.8]]))
    assert torch.equal(got_ids, torch.tensor([[1, 1], [1, 1], [3, 3]]))  # own, else batch's


def _exchange_graph(
    weights_group: str, ids_group: str, ids_kind=torch.int64, k: int = 2, behind=False
):
    """placeholders weights [4, 2], ids [4, 2]; each, masked to a rank, sent by a functional
    all_to_all over its group (2 ranks) and waited; the ids' result of dtype ids_kind (a
    float or bool: not routing ids) and width k; `behind`: the ids reach their all_to_all
    only through an all_reduce (as the next layer's exchange would)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = torch.fx.Graph()
    c10d = torch.ops._c10d_functional
    with FakeTensorMode():
        vals = {"weights": torch.rand(4, 2), "ids": torch.zeros(4, 2, dtype=torch.int64)}
        sent = {"weights": torch.rand(4, 2), "ids": torch.zeros(4, k, dtype=ids_kind)}
    waits = []
    for name, group in (("weights", weights_group), ("ids", ids_group)):
        node = graph.placeholder(name)
        node.meta["example_value"] = vals[name]
        masked = graph.call_function(torch.mul, (node, 1))
        masked.meta["example_value"] = sent[name]
        if behind and name == "ids":
            reduced = graph.call_function(c10d.all_reduce.default, (masked, "sum", group))
            masked = graph.call_function(c10d.wait_tensor.default, (reduced,))
            masked.meta["example_value"] = sent[name]
        a2a = graph.call_function(c10d.all_to_all_single.default, (masked, [2, 2], [2, 2], group))
        a2a.meta["example_value"] = sent[name]
        waits.append(graph.call_function(c10d.wait_tensor.default, (a2a,)))
        waits[-1].meta["example_value"] = sent[name]
    graph.output(tuple(waits))
    weights, ids = (n for n in graph.nodes if n.op == "placeholder")
    return weights, ids, waits


def _found_only_in_the_first(find, graphs) -> None:
    """find(weights, ids) on graphs[0] returns its waits and group size 2; on the others
    (each with one thing wrong) None."""
    weights, ids, waits = graphs[0]
    assert find(weights, ids) == (waits[0], waits[1], 2)
    for weights, ids, _ in graphs[1:]:
        assert find(weights, ids) is None


def test_exchanged_routing_needs_float_weights_and_integer_ids_of_one_shape_and_group():
    from lynx_compile.passes.dispatch import exchanged_routing

    _found_only_in_the_first(exchanged_routing, [
        _exchange_graph("0", "0"),
        _exchange_graph("0", "1"),  # sent over different groups
        _exchange_graph("0", "0", ids_kind=torch.float32),  # no integer ids sent
        _exchange_graph("0", "0", ids_kind=torch.bool),  # a mask, not ids
        _exchange_graph("0", "0", behind=True),  # only past another collective
        _exchange_graph("0", "0", k=3),  # [4, 2] weights beside [4, 3] ids
    ])  # fmt: skip


def _gather_graph(weights_group: str, ids_group: str, extra_use: bool = False):
    """placeholders weights, ids; each all_gathered (functional) over its group, waited."""
    graph = torch.fx.Graph()
    weights, ids = graph.placeholder("weights"), graph.placeholder("ids")
    c10d = torch.ops._c10d_functional
    waits = []
    for node, group in ((weights, weights_group), (ids, ids_group)):
        gathered = graph.call_function(c10d.all_gather_into_tensor.default, (node, 2, group))
        waits.append(graph.call_function(c10d.wait_tensor.default, (gathered,)))
    if extra_use:  # the ids also read before the gather
        waits.append(graph.call_function(torch.add, (ids, 1)))
    graph.output(tuple(waits))
    return weights, ids, waits


def test_gathered_routing_needs_both_gathered_over_one_group_and_read_only_gathered():
    from lynx_compile.passes.dispatch import gathered_routing

    _found_only_in_the_first(gathered_routing, [
        _gather_graph("0", "0"),
        _gather_graph("0", "1"),  # gathered over different groups
        _gather_graph("0", "0", extra_use=True),  # the ids also read ungathered
    ])  # fmt: skip


@pytest.mark.parametrize("after", ["scale", "tanh", "bias", "relu"])
def test_a_dispatchs_partial_sums_are_checked_as_sums_over_the_ranks(after):
    """The numerical check's stand-in for the marked all_reduces of per-expert
    tensor-parallel linears (passes/parallel_linears.py): the sum over `ranks` ranks that
    hold the same partial product, computed on this process alone (no process group here:
    running the collective would fail). Only where the region is linear in the sums does
    every factor dispatch checks (sum_factors) scale its output by that factor, which is
    what tells the one fused sum apart from a region that is not; relu scales with the
    group's size, so a factor alone would pass it."""
    from lynx_compile.passes.dispatch import _extract, sum_factors
    from lynx_compile.passes.parallel_linears import PARTIAL_SUM

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    c10d = torch.ops._c10d_functional
    reduced = graph.call_function(c10d.all_reduce.default, (x, "sum", "0"))
    waited = graph.call_function(c10d.wait_tensor.default, (reduced,))
    reduced.meta[PARTIAL_SUM] = waited.meta[PARTIAL_SUM] = "0"
    then = {
        "scale": (torch.mul, 3.0),
        "tanh": (torch.tanh,),
        "bias": (torch.add, 1.0),
        "relu": (torch.relu,),
    }[after]
    out = graph.call_function(then[0], (waited, *then[1:]))
    graph.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    region = {reduced, waited, out}
    p = torch.randn(13, 8, generator=torch.Generator().manual_seed(0))
    once, twice = (_extract(gm, region, [x], out, ranks=r)(p) for r in (1, 2))
    torch.testing.assert_close(once, then[0](p, *then[1:]), rtol=0, atol=0)
    torch.testing.assert_close(twice, then[0](2 * p, *then[1:]), rtol=0, atol=0)
    assert torch.equal(twice, 2 * once) == (after in ("scale", "relu"))
    scaled = [
        torch.allclose(_extract(gm, region, [x], out, ranks=c)(p), c * once) for c in sum_factors(2)
    ]
    assert all(scaled) == (after == "scale"), scaled


# ------------------------------ experts compiled in a graph of their own (routing as inputs)


def _qwen3_experts(impl: str, dtype: torch.dtype, experts=8):
    """transformers' Qwen3-MoE experts module alone: forward(x [N, d], ids [N, k], w [N, k])."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=24, num_experts=experts, num_experts_per_tok=2
    )
    config._experts_implementation = impl
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module.to(dtype)


def _routing(n: int, experts: int, k: int, gen: torch.Generator):
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(n)])
    return ids, torch.rand(n, k, generator=gen) * 0.9 + 0.1


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [("grouped_mm", torch.float32), ("grouped_mm", torch.bfloat16), ("batched_mm", torch.float32)],
)
def test_experts_compiled_alone_are_fused_on_their_input_routing(impl, dtype):
    """What runs after a graph break between router and experts (transformers' expert-
    parallel all_to_all): the experts' graph takes (x, ids, weights) as inputs, and the
    dispatch is fused on them; exact == eager at odd token counts."""
    module = _qwen3_experts(impl, dtype)
    compiled, gen = _exact_compiled(module), torch.Generator().manual_seed(0)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    with torch.no_grad():
        for n in (1, 3, 13, 33):
            x = torch.randn(n, 32, generator=gen).to(dtype)
            ids, w = _routing(n, 8, 2, gen)
            w = w.to(dtype)
            torch.testing.assert_close(compiled(x, ids, w), module(x, ids, w), **tol)
    report = lynx_compile.report()
    assert not sites_of(report), report  # no router in these graphs
    dispatches = sites_of(report, kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches
    assert all(INPUT_ROUTING in s["reason"] for s in dispatches), dispatches
    assert all(s["num_experts"] == 8 and s["top_k"] == 2 for s in dispatches), dispatches


def test_input_routing_graph_runs_lynx_experts_on_the_parameters_in_place():
    module = _qwen3_experts("grouped_mm", torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids, w = _routing(13, 8, 2, gen)
    with torch.no_grad():
        gm, example_inputs = dynamo_graph(module, torch.randn(13, 32, generator=gen), ids, w)
        rewritten = apply_lynx_passes(gm, example_inputs, parse_options({"policy": "exact"}))
    calls = [n for n in rewritten.graph.nodes if str(n.target) == "lynx.experts.default"]
    assert len(calls) == 1, rewritten.graph
    assert "_grouped_mm" not in " ".join(str(n.target) for n in rewritten.graph.nodes)
    # the weights it reads are the graph's parameter inputs themselves (no copy, no stack)
    holders = {n for n in rewritten.graph.nodes if n.op == "placeholder"}
    reads = [a for a in calls[0].args if isinstance(a, torch.fx.Node) and a not in holders]
    assert all(a.op != "get_attr" for a in reads), reads
    assert calls[0].args[3] in holders and calls[0].args[5] in holders, calls[0].args


class TanhExperts(nn.Module):
    """Experts whose outputs pass a tanh before the routing weight: no lynx::experts form."""

    def __init__(self, experts=8, dim=32, inter=24):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(experts, inter, dim) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, dim, inter) / inter**0.5)

    def forward(self, x, ids, w):
        h = F.silu(torch.einsum("nd,nkid->nki", x, self.w_up[ids]))
        y = torch.tanh(torch.einsum("nki,nkdi->nkd", h, self.w_down[ids]))
        return (y * w.unsqueeze(-1)).sum(1)


class NotExperts(nn.Module):
    """An integer [N, k] and a float [N, k] input beside a 3-D parameter, and no experts."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, 4, 32))

    def forward(self, x, ids, w):
        return x * w.sum(-1, keepdim=True) + self.table.sum(1)[ids].mean(1)


@pytest.mark.parametrize("module_cls", [TanhExperts, NotExperts])
def test_input_routing_that_is_not_lynx_experts_is_left_alone_and_unreported(module_cls):
    torch.manual_seed(0)
    module = module_cls().eval()
    compiled = _exact_compiled(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (1, 3, 13):
            x = torch.randn(n, 32, generator=gen)
            ids, w = _routing(n, 8, 2, gen)
            torch.testing.assert_close(compiled(x, ids, w), module(x, ids, w), **FP32_TOL)
    assert lynx_compile.report()["sites"] == []
