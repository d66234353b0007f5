"""lynx_compile.export and to_onnx: lynx ops in the ExportedProgram, save/load, numerics vs
eager, and ONNX run by onnxruntime against PyTorch (exact and affinity, ties included)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from lynx_compile.examples.moe_modules import DenseMoE, LoopMoE
from lynx_compile.lowering import reference
from lynx_compile.lowering.reference import (
    ACTIVATIONS,
    RoutingPolicy,
    experts_reference,
    route_reference,
)

import lynx_compile
from lynx_compile.export import ExportError
from lynx_compile.onnx_export import (
    DECOMPOSITIONS,
    DEVICE_NEUTRAL,
    experts_decomposed,
    onnxruntime_error,
)

# ONNX Runtime vs PyTorch, relative to the output's largest magnitude (the bound).
ONNX_RTOL = 1e-3


@pytest.fixture(scope="module")
def dense():
    """A DenseMoE (16 experts, top-2) and one decode step x [8, 1, 32] whose routing the
    affinity policy changes (checked in test_affinity_changes_routing)."""
    torch.manual_seed(0)
    model = DenseMoE(dim=32, hidden=48, num_experts=16, top_k=2).eval()
    x = torch.randn(8, 1, 32, generator=torch.Generator().manual_seed(1))
    return model, x


def dense_with_routing(model: DenseMoE, x: torch.Tensor, policy: str) -> torch.Tensor:
    """DenseMoE's forward with its router replaced by route_reference: [B, T, d]."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, ids = route_reference(model.gate(tokens), model.top_k, RoutingPolicy(policy))
    routing = torch.zeros(tokens.shape[0], model.num_experts).scatter(1, ids, weights)
    h = F.silu(torch.einsum("nd,ehd->neh", tokens, model.w_gate))
    h = h * torch.einsum("nd,ehd->neh", tokens, model.w_up)
    y = torch.einsum("neh,edh->ned", h, model.w_down)
    return torch.einsum("ned,ne->nd", y, routing).view_as(x)


@pytest.fixture(scope="module")
def programs(dense):
    """lynx_compile.export of the DenseMoE under the exact and affinity policies."""
    model, x = dense
    return {p: lynx_compile.export(model, (x,), {"policy": p}) for p in ("exact", "affinity")}


def lynx_targets(program) -> list[str]:
    return [
        str(n.target) for n in program.graph_module.graph.nodes if str(n.target).startswith("lynx.")
    ]


def test_program_holds_lynx_route(programs):
    for policy, program in programs.items():
        assert isinstance(program, torch.export.ExportedProgram)
        assert "lynx.route.default" in lynx_targets(program), policy
        route = next(n for n in program.graph_module.graph.nodes if "lynx" in str(n.target))
        assert route.args[2] == policy  # decode step (T == 1): the policy applies


def test_affinity_changes_routing(dense):
    model, x = dense
    logits = model.gate(x.reshape(-1, 32))
    _, exact_ids = route_reference(logits, 2, RoutingPolicy("exact"))
    _, affinity_ids = route_reference(logits, 2, RoutingPolicy("affinity"))
    assert not torch.equal(exact_ids.sort(1).values, affinity_ids.sort(1).values)


@torch.no_grad()
def test_program_matches_eager(dense, programs):
    model, x = dense
    torch.testing.assert_close(programs["exact"].module()(x), model(x))
    for policy, program in programs.items():
        torch.testing.assert_close(program.module()(x), dense_with_routing(model, x, policy))


@torch.no_grad()
def test_save_load_round_trip_in_a_fresh_process(dense, programs, tmp_path):
    model, x = dense
    path = tmp_path / "affinity.pt2"
    torch.export.save(programs["affinity"], path)
    torch.save(x, tmp_path / "x.pt")
    want = programs["affinity"].module()(x)
    torch.save(want, tmp_path / "want.pt")
    script = (
        "import sys, torch, lynx_compile\n"
        f"ep = torch.export.load({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "assert any(str(n.target) == 'lynx.route.default' for n in ep.graph.nodes)\n"
        "torch.testing.assert_close(ep.module()(x), want)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_export_names_graph_breaks():
    model = LoopMoE().eval()
    with pytest.raises(ExportError, match="single graph"):
        lynx_compile.export(model, (torch.randn(2, 1, 32),))


@pytest.fixture(scope="module")
def onnx_exports(dense, tmp_path_factory):
    """to_onnx of the DenseMoE for exact and affinity: {policy: OnnxExport}."""
    model, x = dense
    root = tmp_path_factory.mktemp("onnx")
    return {
        p: lynx_compile.to_onnx(model, (x,), root / p / "model.onnx", {"policy": p})
        for p in ("exact", "affinity")
    }


def test_onnx_is_standard_ops_and_matches_pytorch(onnx_exports):
    for policy, written in onnx_exports.items():
        proto = onnx.load(written.path)
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, policy
        assert written.lynx_ops >= 1
        with np.load(written.inputs_path) as inputs, np.load(written.expected_path) as expected:
            assert sorted(inputs.files) == sorted(written.input_names)
            assert sorted(expected.files) == sorted(written.output_names)
        assert onnxruntime_error(written) < ONNX_RTOL, policy


def test_onnx_expected_differs_between_policies(onnx_exports):
    outs = []
    for written in onnx_exports.values():
        with np.load(written.expected_path) as expected:
            outs.append(expected[written.output_names[0]])
    assert not np.allclose(*outs)


class RouteOnly(torch.nn.Module):
    """Calls a lynx routing op directly: scores [N, E] -> (weights or scores [N, k], ids)."""

    def __init__(self, op: str, policy: str, mode: str):
        super().__init__()
        self.op, self.policy, self.mode = op, policy, mode

    def forward(self, scores):
        if self.op == "route":
            return torch.ops.lynx.route(scores, 4, self.policy, 3.0, 2.0, 2, 6, self.mode, -1)
        return torch.ops.lynx.route_scored(scores, 4, self.mode, self.policy, 3.0, 2.0, 2, 6, -1)


def reference_routing(op: str, scores, policy: str, mode: str):
    pol = RoutingPolicy(policy, k0=2, budget=6)  # RouteOnly's k0 and budget
    if op == "route":
        return route_reference(scores, 4, pol, mode)
    return reference.route_scored_reference(scores, 4, mode, pol)


@pytest.mark.parametrize(
    "op,policy,mode",
    [
        ("route", "affinity", "renorm"),
        ("route", "affinity", "mass"),
        ("route", "static", "renorm"),
        ("route_scored", "affinity", "logit"),
        ("route_scored", "affinity", "score"),
    ],
)
def test_onnx_routing_matches_pytorch_exactly(op, policy, mode, tmp_path):
    """Affinity bins and popularity keys tie all the time: ONNX TopK (the stable sort's
    translation) must order ties exactly as torch's stable sort does. Scores are distinct,
    because torch.topk itself leaves the order of tied scores unspecified."""
    scores = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    if mode == "score":
        scores = torch.sigmoid(scores * 4)  # spread so the score bins differ
    written = lynx_compile.to_onnx(RouteOnly(op, policy, mode), (scores,), tmp_path / "m.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(written.path), providers=["CPUExecutionProvider"])
    got_w, got_ids = session.run(None, {written.input_names[0]: scores.numpy()})
    want_w, want_ids = reference_routing(op, scores, policy, mode)
    _, exact_ids = reference_routing(op, scores, "exact", mode)
    assert not torch.equal(want_ids, exact_ids)  # the policy moved some tokens
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_allclose(got_w, want_w.numpy(), rtol=1e-6, atol=1e-7)


def test_onnx_lynx_domain_variant(dense, tmp_path):
    model, x = dense
    written = lynx_compile.to_onnx(
        model, (x,), tmp_path / "model.onnx", {"policy": "affinity"}, lynx_domain=True
    )
    proto = onnx.load(written.path)
    routes = [n for n in proto.graph.node if n.domain == "lynx" and n.op_type == "Route"]
    assert len(routes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in routes[0].attribute}
    assert attrs["policy"] == b"affinity" and attrs["top_k"] == 2
    assert any(o.domain == "lynx" for o in proto.opset_import)


def test_every_lynx_op_has_an_onnx_decomposition():
    names = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("lynx::")
    }
    assert names and names <= set(DECOMPOSITIONS), names - set(DECOMPOSITIONS)


@pytest.mark.parametrize("space", ["logit", "prob", "score"])
def test_the_native_scored_route_converts_to_what_it_computes(space):
    """A graph holding the CPU lowering's lynx::route_scored_affinity_cpu (captured after
    lowering, or written by hand) exports as the reference with the kernel's tie order."""
    from lynx_compile.lowering import cpu_native

    assert cpu_native.available()
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(13, 16, generator=gen)
    scores = torch.softmax(scores, -1) if space == "prob" else scores
    decomposed = DECOMPOSITIONS["route_scored_affinity_cpu"](scores, 4, space, 3.0, 2.0, 1)
    native = torch.ops.lynx.route_scored_affinity_cpu(scores, 4, space, 3.0, 2.0, 1)
    assert torch.equal(decomposed[1], native[1]) and torch.equal(decomposed[0], native[0])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("split,gated", [(False, True), (False, False), (True, True)])
def test_dense_experts_match_the_reference(activation, split, gated):
    gen = torch.Generator().manual_seed(0)
    n, d, inner, e, k = 13, 8, 6, 5, 2
    x = torch.randn(n, d, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=gen)
    w_down = torch.randn(e, d, inner, generator=gen)
    if split:
        w_gate, w_up = torch.randn(2, e, inner, d, generator=gen)
        want = reference.experts_split_reference(x, ids, weights, w_gate, w_up, w_down, activation)
    else:
        w_gate, w_up = None, torch.randn(e, 2 * inner if gated else inner, d, generator=gen)
        want = experts_reference(x, ids, weights, w_up, w_down, activation, gated)
    got = experts_decomposed(x, ids, weights, w_up, w_gate, w_down, activation, gated)
    # Same fp32 math, different summation order: a few ulps apart.
    torch.testing.assert_close(got, want)


class PlainRelu2MoE(torch.nn.Module):
    """NemotronH-style plain experts, relu(h) ** 2, each slot's weights gathered by id (the
    batched_mm form): x [B, T, d] -> [B, T, d]."""

    def __init__(self, dim=16, inter=24, experts=8, top_k=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.top_k = top_k
        self.router = torch.nn.Parameter(torch.randn(experts, dim, generator=gen))
        self.w_up = torch.nn.Parameter(torch.randn(experts, inter, dim, generator=gen) / dim**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(experts, dim, inter, generator=gen) / inter)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        w, ids = torch.topk(F.softmax(tokens @ self.router.T, dim=-1), self.top_k, dim=-1)
        flat_ids, flat_w = ids.reshape(-1), (w / w.sum(-1, keepdim=True)).reshape(-1, 1)
        xs = tokens.repeat_interleave(self.top_k, dim=0)  # [N*k, d]
        h = torch.square(F.relu(torch.bmm(self.w_up[flat_ids], xs[..., None]).squeeze(-1)))
        y = torch.bmm(self.w_down[flat_ids], h[..., None]).squeeze(-1) * flat_w
        return y.view(-1, self.top_k, x.shape[-1]).sum(dim=1).view_as(x)


def test_onnx_relu2_experts_match_pytorch(tmp_path):
    """NemotronH's activation through the whole path: the dispatch fused into lynx::experts
    with relu2, decomposed to standard ONNX ops, run by onnxruntime."""
    torch._dynamo.reset()
    model = PlainRelu2MoE().eval()
    x = torch.randn(13, 1, 16, generator=torch.Generator().manual_seed(1))
    written = lynx_compile.to_onnx(model, (x,), tmp_path / "relu2.onnx", {"policy": "exact"})
    assert written.lynx_ops == 2  # lynx::route and lynx::experts
    assert onnxruntime_error(written) < ONNX_RTOL
    with np.load(written.expected_path) as expected:
        got = torch.from_numpy(expected[written.output_names[0]])
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)


def test_ops_sharing_a_schema_export_as_one_op():
    assert DEVICE_NEUTRAL
    for fast, neutral in DEVICE_NEUTRAL.items():
        fast_args = getattr(torch.ops.lynx, fast).default._schema.arguments
        neutral_args = getattr(torch.ops.lynx, neutral).default._schema.arguments
        assert [(a.name, str(a.type)) for a in fast_args] == [
            (a.name, str(a.type)) for a in neutral_args
        ]
        assert DECOMPOSITIONS[fast] is DECOMPOSITIONS[neutral]


def test_onnx_lynx_domain_experts_with_and_without_a_split_gate(dense, tmp_path):
    """lynx.Experts keeps w_gate as an optional input: present for a split-gate model
    (DenseMoE), left out ("") for fused gate/up weights (a transformers grouped_mm block)."""
    from lynx_compile.tools import hf_tiny

    fused = hf_tiny.build_block("qwen3_moe", "grouped_mm")
    for model, x, gate_given in ((dense[0], dense[1], True), (fused, torch.randn(3, 1, 32), False)):
        torch._dynamo.reset()
        written = lynx_compile.to_onnx(
            model,
            (x,),
            tmp_path / f"m{int(gate_given)}.onnx",
            {"policy": "exact"},
            lynx_domain=True,
        )
        proto = onnx.load(written.path)
        experts = [n for n in proto.graph.node if n.domain == "lynx" and n.op_type == "Experts"]
        assert len(experts) == 1, [n.op_type for n in proto.graph.node]
        # inputs: x, ids, weights, w_up, w_gate, w_down
        assert len(experts[0].input) == 6 and (experts[0].input[4] != "") == gate_given


def test_onnx_per_expert_modules_match_pytorch(tmp_path):
    """nn.ModuleList experts fused into lynx::experts_list export as standard ops (each
    expert's own weights, never stacked) that onnxruntime runs as PyTorch does; the
    lynx-domain form refuses the op's tensor lists and says what to do."""
    from lynx_compile.examples.moe_modules import ModuleListMoE

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ModuleListMoE().eval()
    x = torch.randn(13, 1, 32, generator=torch.Generator().manual_seed(1))
    written = lynx_compile.to_onnx(model, (x,), tmp_path / "list.onnx", {"policy": "exact"})
    assert written.lynx_ops == 2  # lynx::route and lynx::experts_list
    assert onnxruntime_error(written) < ONNX_RTOL
    with np.load(written.expected_path) as expected:
        got = torch.from_numpy(expected[written.output_names[0]])
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(ExportError, match="takes tensor lists .* export with lynx_domain=False"):
        lynx_compile.to_onnx(
            model, (x,), tmp_path / "d.onnx", {"policy": "exact"}, lynx_domain=True
        )
