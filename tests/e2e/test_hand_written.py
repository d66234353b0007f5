"""Hand-written MoE styles under backend="lynx": expert loops with data-dependent indexing.

Each style in examples/moe_modules.py (where-loop with and without an empty-expert
`continue`, boolean-mask loop, argsort + split + index_add, dense einsum, [B, T, E] router,
nn.ModuleList experts with and without biases)
must have its router and its dispatch rewritten, compute what eager computes under policy
"exact" (fp32 and bf16, 1 / 3 / 13 / 33 tokens), and touch fewer experts under the default
policy at batch 16. Loop capture is scoped to lynx-compiled calls: Dynamo's global config
and transformers' experts table are as they were after each call, and other backends still
see the loop graph-break.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from lynx_compile.examples import moe_modules

import lynx_compile
from tests.helpers import sites_of

STYLES = (
    "LoopMoE",
    "WhereLoopMoE",
    "MaskLoopMoE",
    "SortedMoE",
    "DenseMoE",
    "BatchedRouterMoE",
    "ModuleListMoE",
    "BiasedModuleListMoE",
)
TOKENS = (1, 3, 13, 33)
FP32_TOL = dict(rtol=1e-4, atol=1e-5)  # reordered fp32 sums only
# bf16 (eps 7.8e-3): the fused op rounds once per expert output, the loop once per step.
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def _module(style: str, dtype=torch.float32) -> torch.nn.Module:
    """The style with 32 experts, top-4 (at batch 16 exact routing touches ~28 of them)."""
    torch.manual_seed(0)
    return getattr(moe_modules, style)(num_experts=32, top_k=4).eval().to(dtype)


def _inputs(tokens: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(tokens, 1, 32, generator=torch.Generator().manual_seed(tokens)).to(dtype)


@pytest.fixture(scope="module", params=STYLES)
def compiled(request):
    """(style, eager module, exact-compiled, default-compiled with telemetry)."""
    torch._dynamo.reset()
    module = _module(request.param)
    exact = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    default = torch.compile(module, backend="lynx", options={"telemetry": True}, dynamic=True)
    return request.param, module, exact, default


@torch.no_grad()
def test_exact_equals_eager_and_router_and_dispatch_are_rewritten(compiled):
    style, module, exact, _ = compiled
    lynx_compile.clear_report()
    for tokens in TOKENS:
        x = _inputs(tokens)
        torch.testing.assert_close(exact(x), module(x), **FP32_TOL)
    report = lynx_compile.report()
    routers, dispatches = sites_of(report), sites_of(report, kind="dispatch")
    assert routers and all(s["status"] == "rewritten" for s in routers), routers
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches
    assert all(s["reason"].startswith("sparse_experts(") for s in dispatches), dispatches


@torch.no_grad()
def test_default_policy_touches_fewer_experts_at_batch_16(compiled):
    style, module, _, default = compiled
    lynx_compile.clear_report()
    out = default(_inputs(16))
    assert torch.isfinite(out).all()
    sites = [s for s in sites_of(lynx_compile.report()) if s["telemetry"]]
    assert sites, "the default-policy model recorded no routing call"
    for site in sites:
        summary = site["telemetry"]
        assert summary["mean_experts_chosen"] < summary["mean_experts_exact"], (style, summary)


@pytest.mark.parametrize("style", ("WhereLoopMoE", "SortedMoE", "ModuleListMoE"))
@torch.no_grad()
def test_bf16_loop_styles_match_eager(style):
    torch._dynamo.reset()
    lynx_compile.clear_report()
    module = _module(style, torch.bfloat16)
    model = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    for tokens in (3, 13):
        x = _inputs(tokens, torch.bfloat16)
        torch.testing.assert_close(model(x), module(x), **BF16_TOL)
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches


@torch.no_grad()
def test_untraceable_counts_fall_back_to_stock_tracing():
    """bincount(...).tolist() cannot be traced even with capture: the frame is traced again
    without it (a graph break there, as under any backend); it compiles, equals eager, and
    the router is still rewritten and its dispatch reported."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    module = _module("BincountSortedMoE")
    model = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    for tokens in (3, 13):
        x = _inputs(tokens)
        torch.testing.assert_close(model(x), module(x), **FP32_TOL)
    report = lynx_compile.report()
    assert sites_of(report) and all(s["status"] == "rewritten" for s in sites_of(report))
    dispatches = sites_of(report, kind="dispatch")
    assert dispatches and all(s["status"] == "skipped" for s in dispatches), dispatches


class _RunIfNonEmpty(moe_modules.LoopMoE):
    """Must match: the expert runs under `if idx.shape[0] > 0` (its empty path: continue)."""

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.shape[0] > 0:
                y = expert(tokens[token_idx]) * weights[token_idx, slot, None]
                out.index_add_(0, token_idx, y)
        return out.reshape(x.shape)


class _SkipThenCount(moe_modules.LoopMoE):
    """Must not match: past its skip it also counts the experts it ran (a tensor op that the
    experts op does not compute), and scales the output by that count."""

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out, hits = torch.zeros_like(tokens), torch.zeros((), dtype=x.dtype)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.numel() == 0:
                continue
            hits = hits + 1
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return (out * hits).reshape(x.shape)


class _SkipThenPythonCount(moe_modules.LoopMoE):
    """Must not match: past its skip it counts the experts it ran in a Python int and
    divides by it. Traced as non-empty the count would be every expert's, folded into the
    graph as a constant that no check on tensors sees, so the skip is never assumed (the
    bytecode shows a value carried between iterations)."""

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out, ran = torch.zeros_like(tokens), 0
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.numel() == 0:
                continue
            ran += 1
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return (out / ran).reshape(x.shape)


class _SkipThenNormalise(moe_modules.LoopMoE):
    """Must not match: past its skip each expert's output is divided by its max, which an
    empty expert has not got."""

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.numel() == 0:
                continue
            y = expert(tokens[token_idx])
            out.index_add_(0, token_idx, y / y.abs().amax() * weights[token_idx, slot, None])
        return out.reshape(x.shape)


class _WorkBeforeSkip(moe_modules.LoopMoE):
    """Must not match: its empty path adds 1 before it continues (not a plain skip)."""

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.numel() == 0:
                out = out + 1
                continue
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return out.reshape(x.shape)


@pytest.mark.parametrize(
    "style, fused, retried",
    [
        (_RunIfNonEmpty, True, False),
        (_SkipThenCount, False, False),  # carries `hits` between iterations: never assumed
        (_SkipThenPythonCount, False, False),  # the same with a Python int
        (_SkipThenNormalise, False, True),
        (_WorkBeforeSkip, False, False),  # not a plain `continue`: never assumed
    ],
    ids=lambda v: v.__name__.strip("_") if isinstance(v, type) else str(v),
)
@torch.no_grad()
def test_empty_expert_skips_are_fused_only_where_the_skip_is_all_they_do(
    style, fused, retried, caplog
):
    """An empty-expert `continue` is traced as not taken and the loop fused only where the
    fused op then equals the loop; otherwise the frame is traced again as written (its graph
    break), and at 1 token (28 of 32 experts empty) it still computes what eager does."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    torch.manual_seed(0)
    module = style(num_experts=32, top_k=4).eval()
    model = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    with caplog.at_level(logging.INFO, logger="lynx_compile"):
        for tokens in (1, 13):
            x = _inputs(tokens)
            torch.testing.assert_close(model(x), module(x), **FP32_TOL)
    report = lynx_compile.report()
    assert sites_of(report) and all(s["status"] == "rewritten" for s in sites_of(report))
    dispatches = sites_of(report, kind="dispatch")
    expected = "rewritten" if fused else "skipped"
    assert dispatches and all(s["status"] == expected for s in dispatches), dispatches
    assert ("assumed non-empty" in caplog.text) == retried, caplog.text


@torch.no_grad()
def test_capture_is_scoped_to_lynx_calls():
    torch._dynamo.reset()
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    module = _module("WhereLoopMoE")
    lynx_model = torch.compile(module, backend="lynx", dynamic=True)
    lynx_model(_inputs(3))
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    assert not torch._dynamo.config.capture_scalar_outputs

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    other = torch.compile(_module("WhereLoopMoE"), backend=counting_backend, dynamic=True)
    torch.testing.assert_close(other(_inputs(3)), module(_inputs(3)), **FP32_TOL)
    # Under another backend the loop graph-breaks: no graph holds the router and an
    # index_add together (lynx's one graph does).
    assert not any("topk" in str(gm.code) and "index_add" in str(gm.code) for gm in graphs), [
        gm.code for gm in graphs
    ]


@torch.no_grad()
def test_transformers_eager_experts_table_is_restored():
    from lynx_compile.tools import hf_tiny
    from transformers.integrations import moe

    torch._dynamo.reset()
    before = dict(moe.ExpertsInterface._global_mapping)
    block = hf_tiny.build_block("qwen3_moe", "eager")
    model = torch.compile(block, backend="lynx", options={"policy": "exact"}, dynamic=True)
    lynx_compile.clear_report()
    x = _inputs(3)
    torch.testing.assert_close(model(x), block(x), **FP32_TOL)
    assert moe.ExpertsInterface._global_mapping == before
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches


class _RankShare(moe_modules.ExpertParallelMoE):
    """One rank's share of ExpertParallelMoE (its expert range, slots routed elsewhere
    weighing 0), without the all_reduce: an expert-parallel dispatch in one process."""

    def dispatch(self, tokens, weights, ids):
        return self.local_share(tokens, weights, ids)


@pytest.mark.parametrize(
    "rank, world, first, last",
    [(2, 4, 8, 11), (2, 8, 4, 5)],  # 4 experts of 16 per rank; 2, fewer than top_k = 4
)
@torch.no_grad()
def test_an_expert_parallel_slice_is_fused_at_its_own_offset(rank, world, first, last):
    """The slice's offset is found numerically, each candidate on ids in its own range: a
    check on ids from the first range only saw an all-zero region at every other offset and
    took rank 2 of 4 as experts 4..7 (a wrong answer in exact mode). A slice of fewer
    experts than top-k compiles too (the check draws ids with repeats)."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    module = _RankShare(rank, world, num_experts=16, top_k=4).eval()
    exact = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    for tokens in (3, 13):
        x = _inputs(tokens)
        torch.testing.assert_close(exact(x), module(x), **FP32_TOL)
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches
    assert all(f"experts {first}..{last}" in s["reason"] for s in dispatches), dispatches
