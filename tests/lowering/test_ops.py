"""The op registry: torch.library.opcheck over every lynx:: op, and the fakes' input checks.

opcheck runs each op's schema check (no hidden mutation or aliasing), its autograd
registration, its fake kernel against the real one, and AOTDispatcher with dynamic shapes.
Every op the dispatcher knows in the lynx namespace must have samples here, so a new op
cannot land without its opcheck.
"""

from __future__ import annotations

import pytest
import torch
from lynx_compile.lowering import cpu_native, ops
from torch._subclasses import FakeTensorMode

from tests.helpers import experts_case


def _logits(n: int, e: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return (2 * torch.randn(n, e, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _route_samples():
    for policy in ("exact", "affinity", "oea", "static"):
        for n in (1, 13):
            yield (_logits(n, 8), 2, policy, 3.0, 2.0, 1, 3, "renorm", -1)
    yield (_logits(5, 8, torch.bfloat16), 3, "affinity", 1.0, None, 2, 4, "mass", -1)


def _route_scored_samples():
    for space in ("logit", "prob", "score"):
        scores = torch.sigmoid(_logits(13, 8)) if space != "logit" else _logits(13, 8)
        yield (scores, 2, space, "affinity", 3.0, 2.0, 2, 4, -1)
    yield (torch.sigmoid(_logits(3, 8)), 4, "score", "static", 3.0, None, 2, 4, -1)


def _route_affinity_samples():
    for dtype in (torch.float32, torch.bfloat16):
        logits = _logits(13, 8, dtype)
        yield (logits, torch.softmax(logits, -1), 2, 3.0, 2.0, True)
    logits = _logits(3, 8)
    yield (logits, torch.softmax(logits, -1), 4, 1.0, None, False)


def _route_scored_affinity_samples():
    for space in ("logit", "prob", "score"):
        for dtype in (torch.float32, torch.bfloat16):
            scores = _logits(13, 8, dtype)
            scores = torch.sigmoid(scores) if space != "logit" else scores
            yield (scores, 2, space, 3.0, 2.0, 1)
    yield (torch.sigmoid(_logits(3, 8)), 4, "score", 1.0, None, 0)


def _group_step_samples(kind: str, scored: bool):
    """The three steps of routing across ranks (votes, kept, remap), on a part of a batch
    whose votes and kept set come from that part and one more (as two ranks sum them)."""
    ops = torch.ops.lynx
    for policy, beta, n in (("affinity", 2.0, 13), ("affinity", None, 1), ("oea", 2.0, 5)):
        parts = [_logits(n, 8, seed=1), _logits(3, 8, seed=2)]
        if scored:
            parts = [torch.sigmoid(p) for p in parts]
            votes = sum(ops.route_scored_votes(p, "score", policy, 3.0, beta) for p in parts)
            kept = sum(
                ops.route_scored_kept(p, votes, 2, "score", policy, 3.0, beta, 1, 4) for p in parts
            )
            yield {
                "votes": (parts[0], "score", policy, 3.0, beta),
                "kept": (parts[0], votes, 2, "score", policy, 3.0, beta, 1, 4),
                "remap": (parts[0], votes, kept, 2, policy, beta, -1),
            }[kind]
        else:
            votes = sum(ops.route_votes(p, policy, 3.0, beta) for p in parts)
            kept = sum(ops.route_kept(p, votes, 2, policy, 3.0, beta, 1, 4) for p in parts)
            yield {
                "votes": (parts[0], policy, 3.0, beta),
                "kept": (parts[0], votes, 2, policy, 3.0, beta, 1, 4),
                "remap": (parts[0], votes, kept, 2, policy, beta, "renorm", -1),
            }[kind]


def _experts_samples():
    for form in ("gated", "plain", "split"):
        for dtype in (torch.float32, torch.bfloat16):
            x, ids, w, w_up, w_down, w_gate = experts_case(13, 6, 2, 16, 8, form, dtype)
            yield (x, ids, w, w_up, w_gate, w_down, "silu", form != "plain")
    x, ids, w, w_up, w_down, w_gate = experts_case(3, 6, 2, 16, 8, "gated", torch.float16)
    yield (x, ids, w, w_up, None, w_down, "gelu_tanh", True)  # the native op's ATen path
    x, ids, w, w_up, w_down, _ = experts_case(13, 6, 2, 16, 8, "plain", torch.bfloat16)
    yield (x, ids, w, w_up, None, w_down, "relu2", False)  # NemotronH's experts
    for dtype in (torch.float32, torch.bfloat16):  # GPT-OSS: biases, interleaved views
        x, ids, w, w_up, w_down, _ = experts_case(13, 6, 2, 16, 8, "gated", dtype)
        b_up, b_down = torch.randn(6, 16).to(dtype), torch.randn(6, 16).to(dtype)
        gate_up = (w_up[:, 0::2], w_up[:, 1::2], b_up[:, 0::2], b_up[:, 1::2])
        yield (x, ids, w, gate_up[1], gate_up[0], w_down, "swiglu_clamped", True,
               gate_up[3], gate_up[2], b_down, 1.702, 7.0)  # fmt: skip
        yield (x, ids, w, w_up, None, w_down, "silu", True, b_up, None, b_down)


SAMPLES = {
    "route": _route_samples,
    "route_recorded": _route_samples,
    "route_scored": _route_scored_samples,
    "route_affinity_cpu": _route_affinity_samples,
    "route_scored_affinity_cpu": _route_scored_affinity_samples,
    "route_votes": lambda: _group_step_samples("votes", scored=False),
    "route_kept": lambda: _group_step_samples("kept", scored=False),
    "route_remap": lambda: _group_step_samples("remap", scored=False),
    "route_scored_votes": lambda: _group_step_samples("votes", scored=True),
    "route_scored_kept": lambda: _group_step_samples("kept", scored=True),
    "route_scored_remap": lambda: _group_step_samples("remap", scored=True),
    "experts": _experts_samples,
    "experts_list": lambda: _experts_list_samples(),
}


def _experts_list_samples():
    """lynx::experts' samples with each stacked weight and bias as its experts' tensors
    (what an nn.ModuleList of nn.Linear experts holds); strided views stay views."""

    def per_expert(t):
        return [] if t is None else list(t.unbind(0))

    for sample in _experts_samples():
        x, ids, w, w_up, w_gate, w_down, activation, gated, *extras = sample
        biases = [per_expert(b) for b in (extras[:3] + [None] * 3)[:3]]
        yield (x, ids, w, per_expert(w_up), per_expert(w_gate), per_expert(w_down), *biases,
               activation, gated, *extras[3:])  # fmt: skip


def test_every_lynx_op_is_declared_in_the_registry_and_has_samples():
    names = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("lynx::")
    }
    declared = {op._name for op in ops.ALL_OPS if op._namespace == "lynx"}
    assert names == declared == set(SAMPLES), (names, declared)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    """On CPU with the native library loaded: lynx_ops.cpp's kernels for experts and
    route_affinity_cpu, the registry's reference bodies for the routing ops."""
    assert cpu_native.available()
    op = getattr(torch.ops.lynx, name).default
    for args in SAMPLES[name]():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda f: ops.route(f(13), 2, "greedy", 3.0, 2.0, 2, 4, "renorm", -1),
         ValueError, "unknown routing policy 'greedy'"),
        (lambda f: ops.route(f(13), 9, "exact", 3.0, 2.0, 2, 4, "renorm", -1),
         ValueError, r"top_k must be in \[1, 8\]"),
        (lambda f: ops.route(f(13)[None], 2, "exact", 3.0, 2.0, 2, 4, "renorm", -1),
         ValueError, "must be 2-D"),
        (lambda f: ops.route(f(13), 2, "exact", 3.0, 2.0, 2, 4, "softmax", -1),
         ValueError, "unknown weight convention"),
        (lambda f: ops.route_scored(f(13), 2, "logits", "exact", 3.0, 2.0, 2, 4, -1),
         ValueError, "unknown score space 'logits'"),
        (lambda f: ops.route_affinity_cpu(f(13), f(3), 2, 3.0, 2.0, True),
         ValueError, "must have the logits' shape"),
        (lambda f: ops.route_kept(f(13), f(3).int()[0], 2, "affinity", 3.0, 2.0, 1, 4),
         ValueError, r"votes must be int32 \[25\]"),
        (lambda f: ops.route_remap(f(13), f(1).int()[0, :1], f(1).int()[0, :5], 2, "oea", 2.0,
                                   "renorm", -1),
         ValueError, r"kept must be int32 \[8\]"),
        (lambda f: ops.route_votes(f(13), "exact", 3.0, 2.0),
         ValueError, "unknown batch-aware routing policy 'exact'"),
    ],
)  # fmt: skip
def test_route_fakes_say_what_is_wrong(call, error, message):
    with FakeTensorMode(), pytest.raises(error, match=message):
        call(lambda n: torch.empty(n, 8))


def test_experts_fake_says_what_is_wrong():
    with FakeTensorMode():
        x, ids, w = torch.empty(5, 16), torch.zeros(5, 2, dtype=torch.int64), torch.empty(5, 2)
        w_up, w_down = torch.empty(6, 16, 16), torch.empty(6, 16, 8)
        assert ops.experts(x, ids, w, w_up, None, w_down, "silu", True).shape == (5, 16)
        with pytest.raises(ValueError, match="unknown activation 'swish'"):
            ops.experts(x, ids, w, w_up, None, w_down, "swish", True)
        with pytest.raises(TypeError, match="ids must be int64"):
            ops.experts(x, ids.int(), w, w_up, None, w_down, "silu", True)
        with pytest.raises(RuntimeError, match=r"want w_up \[E, 2I, d=16\]"):
            ops.experts(x, ids, w, w_up[:, :12], None, w_down, "silu", True)
        with pytest.raises(RuntimeError, match=r"w_gate must be \[E=6, I=8, d=16\]"):
            gate, up = torch.empty(6, 8, 16), torch.empty(6, 8, 16)
            ops.experts(x, ids, w, up, gate[:, :4], w_down, "silu", True)
        with pytest.raises(ValueError, match="split gate .* needs gated=True"):
            ops.experts(x, ids, w, up, gate, w_down, "silu", False)
        with pytest.raises(RuntimeError, match=r"must both be \[N=5, k\]"):
            ops.experts(x, ids[:3], w, w_up, None, w_down, "silu", True)
        with pytest.raises(ValueError, match="swiglu_clamped' needs gated=True and act_alpha"):
            ops.experts(x, ids, w, w_up, None, w_down, "swiglu_clamped", True)
        with pytest.raises(ValueError, match="silu' takes neither"):
            ops.experts(x, ids, w, w_up, None, w_down, "silu", True, act_limit=7.0)
        with pytest.raises(RuntimeError, match=r"b_down must be \[E=6, 16\]"):
            ops.experts(x, ids, w, w_up, None, w_down, "silu", True, b_down=torch.empty(6, 8))


def test_experts_list_fake_says_what_is_wrong():
    with FakeTensorMode():
        x, ids, w = torch.empty(5, 16), torch.zeros(5, 2, dtype=torch.int64), torch.empty(5, 2)
        up, down = [torch.empty(16, 16)] * 6, [torch.empty(16, 8)] * 6
        assert ops.experts_list(x, ids, w, up, [], down, [], [], [], "silu", True).shape == (5, 16)
        with pytest.raises(ValueError, match=r"w_up and w_down need one tensor per expert"):
            ops.experts_list(x, ids, w, up, [], down[:5], [], [], [], "silu", True)
        with pytest.raises(ValueError, match=r"b_down holds 2 tensors; want one per expert \(6\)"):
            ops.experts_list(x, ids, w, up, [], down, [], [], [torch.empty(16)] * 2, "silu", True)
        with pytest.raises(RuntimeError, match=r"every tensor of w_up must have the first one's"):
            odd = [*up[:5], torch.empty(16, 16).t()]
            ops.experts_list(x, ids, w, odd, [], down, [], [], [], "silu", True)
        with pytest.raises(RuntimeError, match=r"want w_up \[E, 2I, d=16\]"):
            ops.experts_list(x, ids, w, [torch.empty(12, 16)] * 6, [], down, [], [], [], "silu",
                             True)  # fmt: skip
        with pytest.raises(ValueError, match="unknown activation 'swish'"):
            ops.experts_list(x, ids, w, up, [], down, [], [], [], "swish", True)


def test_experts_list_refuses_ids_past_its_experts():
    """A list would take a negative id from its end: the composite and the native kernel
    both refuse ids outside [0, E)."""
    x, ids, w = torch.randn(3, 16), torch.tensor([[0, -1], [1, 2], [3, 4]]), torch.rand(3, 2)
    up, down = [torch.randn(16, 16)] * 6, [torch.randn(16, 8)] * 6
    with pytest.raises(IndexError, match=r"expert ids must be in \[0, 6\)"):
        ops.experts_list_composite(x, ids, w, up, [], down, [], [], [], "silu", True)
    with pytest.raises(IndexError, match=r"expert ids must be in \[0, 6\)"):
        torch.ops.lynx.experts_list(x, ids, w, up, [], down, [], [], [], "silu", True)
