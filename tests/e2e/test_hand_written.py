"""Hand-written MoE styles under backend="lynx": expert loops with data-dependent indexing.

Each style in examples/moe_modules.py (where-loop with and without an empty-expert
`continue`, a loop over the experts a batch hits, boolean-mask loop, argsort + split +
index_add, dense einsum, [B, T, E] router, nn.ModuleList experts with and without biases,
looped over all experts or only those hit)
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
import torch.nn.functional as F
from lynx_compile.examples import moe_modules

import lynx_compile
from tests.helpers import sites_of

STYLES = (
    "LoopMoE",
    "WhereLoopMoE",
    "HitLoopMoE",
    "MaskLoopMoE",
    "SortedMoE",
    "DenseMoE",
    "BatchedRouterMoE",
    "ModuleListMoE",
    "HitModuleListMoE",
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


class _HitLoopThenCount(moe_modules.HitLoopMoE):
    """Must not match: its loop over the hit experts also counts them (a tensor op the
    experts op does not compute: unrolled over every expert it would count them all)."""

    def dispatch(self, tokens, weights, ids):
        out, hits = torch.zeros_like(tokens), torch.zeros((), dtype=tokens.dtype)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for row in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            e = int(row.item())
            slot, token_idx = torch.where(mask[e])
            hits = hits + 1
            y = self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out * hits


class _HitEnumerateThenCount(moe_modules.HitLoopMoE):
    """Must not match: _HitLoopThenCount's loop written over enumerate(hit)."""

    def dispatch(self, tokens, weights, ids):
        out, hits = torch.zeros_like(tokens), torch.zeros((), dtype=tokens.dtype)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for _, row in enumerate(torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()):
            e = int(row.item())
            slot, token_idx = torch.where(mask[e])
            y = self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
            hits = hits + 1
        return out * hits


class _HitLoop(moe_modules.HitLoopMoE):
    """HitLoopMoE's loop, one expert's step as a method, for the must-not-match cases
    below, which differ only in the Python state their loops keep."""

    def hit(self, ids):
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        return mask, torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()

    def step(self, out, tokens, weights, mask, e):
        slot, token_idx = torch.where(mask[e])
        out.index_add_(
            0, token_idx, self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
        )


class _HitMoreThanTwo(_HitLoop):
    """Must not match: it loops over the experts with more than 2 tokens, not every expert
    with one (unrolled over every expert it would run the others too)."""

    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        for row in torch.greater(mask.sum(dim=(-1, -2)), 2).nonzero():
            self.step(out, tokens, weights, mask, int(row.item()))
        return out


class _HitThenCountInPlace(_HitLoop):
    """Must not match: it counts the hit experts in place (`hits.add_(1)`, whose result
    nothing reads: live for what it writes)."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out = self.hit(ids), torch.zeros_like(tokens)
        hits = torch.zeros((), dtype=tokens.dtype)
        for row in hit:
            hits.add_(1)
            self.step(out, tokens, weights, mask, int(row.item()))
        return out * hits


class _HitTopOneOnly(_HitLoop):
    """Must not match: it loops over the experts some token ranks first, so an expert
    chosen only in a lower slot is skipped (its hit tensor counts other ids than the
    ones its selections read)."""

    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        first = F.one_hot(ids[:, :1], num_classes=self.num_experts).permute(2, 1, 0)
        for row in torch.greater(first.sum(dim=(-1, -2)), 0).nonzero():
            self.step(out, tokens, weights, mask, int(row.item()))
        return out


class _HitThenPythonCount(_HitLoop):
    """Must not match: a Python counter of the hit experts (unrolled: every expert's)."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out, ran = self.hit(ids), torch.zeros_like(tokens), 0
        for row in hit:
            self.step(out, tokens, weights, mask, int(row.item()))
            ran += 1
        return out / ran


class _HitThenLastExpert(_HitLoop):
    """Must not match: the last hit expert, read after the loop (unrolled: the last one)."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out, last = self.hit(ids), torch.zeros_like(tokens), 0
        for row in hit:
            last = int(row.item())
            self.step(out, tokens, weights, mask, last)
        return out * (1 + last)


class _HitThenList(_HitLoop):
    """Must not match: a list of the hit experts."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out, seen = self.hit(ids), torch.zeros_like(tokens), []
        for row in hit:
            seen.append(int(row.item()))
            self.step(out, tokens, weights, mask, seen[-1])
        return out * len(seen)


class _HitThenNoteInHelper(_HitLoop):
    """Must not match: a helper the loop calls appends each hit expert to a list (the
    loop's own bytecode shows no state; Dynamo's side effects do)."""

    def note(self, seen, e):
        seen.append(e)

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out, seen = self.hit(ids), torch.zeros_like(tokens), []
        for row in hit:
            self.note(seen, int(row.item()))
            self.step(out, tokens, weights, mask, seen[-1])
        return out * len(seen)


class _HitThenCountInBuffer(_HitLoop):
    """Must not match: it counts the hit experts in a registered buffer (an in-place op
    whose inputs are all the module's own: not a parameter read)."""

    def dispatch(self, tokens, weights, ids):
        if not hasattr(self, "hits"):
            self.register_buffer("hits", torch.zeros(()))
        (mask, hit), out = self.hit(ids), torch.zeros_like(tokens)
        self.hits.zero_()
        for row in hit:
            self.step(out, tokens, weights, mask, int(row.item()))
            self.hits.add_(1)
        return out / self.hits


class _HitPrunedCount(_HitLoop):
    """Must not match: it zeroes expert 3's count in place before the loop (a disabled
    expert), so eager skips expert 3 where a loop over every expert would run it."""

    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)
        counts = mask.sum(dim=(-1, -2))
        counts[3] = 0
        for row in torch.greater(counts, 0).nonzero():
            self.step(out, tokens, weights, mask, int(row.item()))
        return out


class _HitThenDictAfter(_HitLoop):
    """Must match: a dict is filled after the loop (Dynamo records the mutation, which
    concerns no loop: the loop is closed by then)."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out = self.hit(ids), torch.zeros_like(tokens)
        for row in hit:
            self.step(out, tokens, weights, mask, int(row.item()))
        scale = {"a": 1.0}
        scale["b"] = 2.0
        return out * scale["b"]


class _HitThenBreak(_HitLoop):
    """Must not match: it stops at the first hit expert past the middle."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out = self.hit(ids), torch.zeros_like(tokens)
        for row in hit:
            e = int(row.item())
            if e > self.num_experts // 2:
                break
            self.step(out, tokens, weights, mask, e)
        return out


class _HitCountedByGenerator(_HitLoop):
    """Must not match: it counts the hit experts with a generator over the hit tensor."""

    def dispatch(self, tokens, weights, ids):
        (mask, hit), out = self.hit(ids), torch.zeros_like(tokens)
        for row in hit:
            self.step(out, tokens, weights, mask, int(row.item()))
        return out / sum(1 for _ in hit)


class _SkipThenNoteInHelper(moe_modules.LoopMoE):
    """Must not match: past its skip a helper appends the expert to a list (Python state
    the loop's own bytecode does not show; Dynamo's side effects do)."""

    def note(self, seen, i):
        seen.append(i)

    def forward(self, x):
        tokens, (weights, selected) = x.reshape(-1, x.shape[-1]), self.router(x)
        out, seen = torch.zeros_like(tokens), []
        for i, expert in enumerate(self.experts):
            token_idx, slot = torch.where(selected == i)
            if token_idx.numel() == 0:
                continue
            self.note(seen, i)
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * weights[token_idx, slot, None])
        return (out / len(seen)).reshape(x.shape)


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


# Why lynx refused to unroll a loop over the hit experts, as its INFO log says
REFUSED_BECAUSE = {
    "_HitLoopThenCount": "writes ['hits']",
    "_HitMoreThanTwo": "not `count > 0`",
    "_HitTopOneOnly": "selects tokens by something other than the routing ids",
    "_HitThenCountInPlace": "did not fuse all of it",
    "_HitThenPythonCount": "writes ['ran']",
    "_HitThenLastExpert": "writes ['last']",
    "_HitThenList": ".append()",
    "_HitThenBreak": "(break)",
    "_HitThenNoteInHelper": "mutates a Python object",
    "_HitThenCountInBuffer": "did not fuse all of it",
    "_HitPrunedCount": "writes counts in place",
    "_SkipThenNoteInHelper": "code past the skip mutates a Python object",
}


@pytest.mark.parametrize(
    "style, fused, retried",
    [
        (_RunIfNonEmpty, True, False),
        (_SkipThenCount, False, False),  # carries `hits` between iterations: never assumed
        (_SkipThenPythonCount, False, False),  # the same with a Python int
        (_SkipThenNormalise, False, True),
        (_WorkBeforeSkip, False, False),  # not a plain `continue`: never assumed
        (_HitLoopThenCount, False, False),  # `hits = hits + 1` carried: never unrolled
        (_HitEnumerateThenCount, False, False),  # enumerate(hit): never unrolled
        (_HitMoreThanTwo, False, False),  # not "experts with a token": never unrolled
        (_HitThenCountInPlace, False, True),
        (_HitTopOneOnly, False, True),  # its selections read other ids than it counts
        (_HitThenPythonCount, False, False),  # Python state in the loop: never unrolled
        (_HitThenLastExpert, False, False),
        (_HitThenList, False, False),
        (_HitThenNoteInHelper, False, True),  # refused when the loop is traced
        (_HitThenBreak, False, False),
        (_HitThenDictAfter, True, False),
        (_HitThenCountInBuffer, False, True),
        (_HitPrunedCount, False, False),  # its count is written in place: never unrolled
        (_SkipThenNoteInHelper, False, True),  # refused when the helper is traced
        (_HitCountedByGenerator, False, True),  # the loop is, its graph break is not fused
    ],
    ids=lambda v: v.__name__.strip("_") if isinstance(v, type) else str(v),
)
@torch.no_grad()
def test_empty_expert_skips_are_fused_only_where_the_skip_is_all_they_do(
    style, fused, retried, caplog
):
    """An empty-expert `continue` is traced as not taken, and a loop over the experts a batch
    hits unrolled over every expert, and the loop fused, only where the fused op then equals
    the loop; otherwise the frame is traced as written (its graph break), and at 1 token
    (28 of 32 experts empty) it still computes what eager does. Where lynx refuses a hit
    loop, its log gives the reason (REFUSED_BECAUSE)."""
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
    assert REFUSED_BECAUSE.get(style.__name__, "") in caplog.text, caplog.text


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


def _exact_and_fused(module: torch.nn.Module, token_counts) -> tuple:
    """module compiled under the exact policy, from a fresh Dynamo and report: equal to
    eager at each token count, every dispatch rewritten; (compiled module, dispatch sites)."""
    torch._dynamo.reset()
    lynx_compile.clear_report()
    module.eval()
    exact = torch.compile(module, backend="lynx", options={"policy": "exact"}, dynamic=True)
    for tokens in token_counts:
        x = _inputs(tokens)
        torch.testing.assert_close(exact(x), module(x), **FP32_TOL)
    dispatches = sites_of(lynx_compile.report(), kind="dispatch")
    assert dispatches and all(s["status"] == "rewritten" for s in dispatches), dispatches
    return exact, dispatches


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
    _, dispatches = _exact_and_fused(_RankShare(rank, world, num_experts=16, top_k=4), (3, 13))
    assert all(f"experts {first}..{last}" in s["reason"] for s in dispatches), dispatches


class _HitPastItsExperts(moe_modules.HitLoopMoE):
    """A loop over the hit experts of a 16-expert router whose weights hold 8 (a model
    bug): eager raises IndexError once a token routes to expert 8 or above. lynx traces the
    loop over rows 0..7 (its row limit), which alone would drop such a token."""

    def __init__(self, cast: bool):
        super().__init__(num_experts=8, top_k=2)
        self.cast = cast  # one_hot of ids.long(): the check reads a node inside the dispatch
        self.gate = torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.gate.bias[8:] = -1e4  # route below 8 until a test moves the bias

    def dispatch(self, tokens, weights, ids):
        out = torch.zeros_like(tokens)
        mask = F.one_hot(ids.long() if self.cast else ids, num_classes=16).permute(2, 1, 0)
        for row in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            e = row[0]
            slot, token_idx = torch.where(mask[e])
            y = self.expert(e, tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out


@pytest.mark.parametrize("cast", [False, True], ids=["ids", "ids.long()"])
@torch.no_grad()
def test_a_token_routed_past_a_row_limit_raises_as_eager_does(cast):
    """Where the unrolled hit loop is cut at the rows its weights hold, the graph asserts
    every routing id is below them: a token routed past them raises (eager's IndexError),
    never a result without that token; routed below them, it is fused and equals eager."""
    torch.manual_seed(0)
    module = _HitPastItsExperts(cast)
    model, _ = _exact_and_fused(module, (1, 13))
    module.gate.bias[11] = 1e4  # every token's first choice: expert 11, past the weights
    for tokens in (1, 13):
        x = _inputs(tokens)
        with pytest.raises(IndexError):
            module(x)
        with pytest.raises(RuntimeError, match="routed to expert 8 or above"):
            model(x)
