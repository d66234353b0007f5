"""lynx_compile.to_onnx: the rewritten model as ONNX that onnxruntime runs without custom kernels.

The lynx ops have no ONNX counterpart, so before export each lynx::route node is swapped
for the routing reference itself (plain PyTorch: softmax, top-k, stable sorts, gathers,
integer keys) and each lynx::experts node for a dense all-experts equivalent (the
reference loops over the experts a batch touches, a data-dependent shape ONNX cannot
express). The exporter then emits standard operators, except for one gap filled here:
stable sort, which becomes ONNX TopK over the whole axis (TopK breaks ties by lower
index, which is exactly what a stable sort keeps).

With lynx_domain=True the lynx ops are instead written as custom-domain nodes
(lynx.Route / lynx.Experts, opset "lynx" version 1) for runtimes that implement them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from lynx_compile.export import ExportError, capture_rewritten, describe_error, export_graph
from lynx_compile.lowering.reference import ACTIVATIONS, RoutingPolicy, route_reference

ONNX_OPSET = 18


def route_decomposed(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """lynx::route as plain PyTorch ops: logits [N, E] -> (weights [N, k], ids int64 [N, k]).

    The routing reference itself; telemetry is dropped (an exported graph has no host)."""
    return route_reference(logits, top_k, RoutingPolicy(policy, alpha, beta, k0, budget), weights)


def experts_decomposed(x, ids, weights, w_up, w_down, activation, gated):
    """lynx::experts with every expert computed for every token, then combined by routing
    weight: x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] -> [N, d].

    Matches experts_reference up to summation order (fp32 accumulation in both)."""
    act = ACTIVATIONS[activation]
    h = torch.einsum("nd,eud->neu", x, w_up.to(x.dtype))  # [N, E, U]
    if gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up  # [N, E, I]
    else:
        h = act(h)
    y = torch.einsum("nei,edi->ned", h, w_down.to(x.dtype))  # [N, E, d]
    combine = torch.zeros(x.shape[0], w_up.shape[0], dtype=torch.float32, device=x.device)
    combine = combine.scatter_add(1, ids, weights.to(torch.float32))  # [N, E]
    return torch.einsum("ned,ne->nd", y.to(torch.float32), combine).to(x.dtype)


_DECOMPOSITIONS = {
    torch.ops.lynx.route.default: route_decomposed,
    torch.ops.lynx.experts.default: experts_decomposed,
}


def decompose_lynx_ops(gm: fx.GraphModule) -> int:
    """Swap every lynx op node of `gm` for its plain-PyTorch decomposition; returns how many."""
    swapped = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _DECOMPOSITIONS:
            node.target = _DECOMPOSITIONS[node.target]
            swapped += 1
    gm.recompile()
    return swapped


def _sort_stable_as_topk(self, stable=None, dim=-1, descending=False):
    """aten::sort.stable in ONNX: TopK over the whole axis (ties keep the lower index first)."""
    from onnxscript import opset18 as op

    k = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
    return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)


def _register_lynx_schemas() -> None:
    """Declare lynx.Route / lynx.Experts (domain "lynx", version 1) to onnx once, so the
    exporter can build nodes of them (it validates every node against a schema)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("Route", "lynx"):
        return
    param, attr, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    onnx.defs.register_schema(
        OpSchema(
            "Route",
            "lynx",
            1,
            "lynx::route: logits [N, E] -> (weights [N, k], ids int64 [N, k])",
            inputs=[param("logits", "T")],
            outputs=[param("weights", "T"), param("ids", "tensor(int64)")],
            type_constraints=[("T", floats, "router logits and weights")],
            attributes=[
                attr("top_k", kind.INT),
                attr("policy", kind.STRING),
                attr("alpha", kind.FLOAT),
                attr("beta", kind.FLOAT, "absent: no floor", required=False),
                attr("k0", kind.INT),
                attr("budget", kind.INT),
                attr("weights", kind.STRING),
            ],
        )
    )
    onnx.defs.register_schema(
        OpSchema(
            "Experts",
            "lynx",
            1,
            "lynx::experts: x [N, d], ids/weights [N, k], w_up [E, U, d], w_down [E, d, I] "
            "-> [N, d]",
            inputs=[
                param("x", "T"),
                param("ids", "tensor(int64)"),
                param("weights", "W"),
                param("w_up", "T"),
                param("w_down", "T"),
            ],
            outputs=[param("y", "T")],
            type_constraints=[("T", floats, "activations"), ("W", floats, "routing weights")],
            attributes=[attr("activation", kind.STRING), attr("gated", kind.INT)],
        )
    )


def _lynx_route_node(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """lynx::route as one custom-domain node lynx.Route (attributes: the op's arguments)."""
    from onnxscript import values

    attrs = dict(top_k=top_k, policy=policy, alpha=alpha, k0=k0, budget=budget, weights=weights)
    if beta is not None:  # an absent beta means no floor, as beta=None does
        attrs["beta"] = beta
    return values.Opset("lynx", 1).Route(logits, **attrs)


def _lynx_experts_node(x, ids, weights, w_up, w_down, activation, gated):
    """lynx::experts as one custom-domain node lynx.Experts."""
    from onnxscript import values

    lynx = values.Opset("lynx", 1)
    return lynx.Experts(x, ids, weights, w_up, w_down, activation=activation, gated=int(gated))


@dataclass
class OnnxExport:
    """What to_onnx wrote: the model, its inputs and PyTorch's outputs, named as in ONNX."""

    path: Path
    inputs_path: Path
    expected_path: Path
    input_names: list[str]
    output_names: list[str]
    lynx_ops: int  # lynx op nodes in the rewritten graph


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_onnx(
    model,
    example_inputs,
    path,
    options: dict | None = None,
    lynx_domain: bool = False,
) -> OnnxExport:
    """Write `model` with the lynx passes applied as ONNX to `path`, plus inputs.npz (the
    example inputs) and expected.npz (PyTorch's outputs of the rewritten model) beside it,
    each keyed by the ONNX input / output names. lynx_domain=True keeps the lynx ops as
    custom-domain nodes instead of standard operators."""
    path = Path(path)
    args = tuple(example_inputs)
    gm = capture_rewritten(model, args, options)
    with torch.no_grad():
        expected = pytree.tree_leaves(gm(*args))
    lynx_ops = sum(1 for n in gm.graph.nodes if n.target in _DECOMPOSITIONS)
    table = {torch.ops.aten.sort.stable: _sort_stable_as_topk}
    if lynx_domain:
        _register_lynx_schemas()
        table[torch.ops.lynx.route.default] = _lynx_route_node
        table[torch.ops.lynx.experts.default] = _lynx_experts_node
    else:
        decompose_lynx_ops(gm)
    program = export_graph(gm, args)
    try:
        onnx_program = torch.onnx.export(
            program,
            args,
            dynamo=True,
            opset_version=ONNX_OPSET,
            custom_translation_table=table,
            optimize=True,
            verbose=False,
        )
    except Exception as err:
        raise ExportError(
            f"ONNX export failed: {describe_error(err)}; an op without an ONNX translation "
            "needs another implementation (transformers MoE: experts_implementation="
            "'batched_mm')"
        ) from err
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    input_names = [v.name for v in onnx_program.model.graph.inputs]
    output_names = [v.name for v in onnx_program.model.graph.outputs]
    tensors = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    if len(tensors) != len(input_names) or len(expected) != len(output_names):
        raise ExportError(
            f"ONNX graph has {len(input_names)} inputs / {len(output_names)} outputs but the "
            f"model takes {len(tensors)} tensors and returns {len(expected)}; pass tensors "
            "only (no None or Python scalars) as example inputs"
        )
    result = OnnxExport(
        path=path,
        inputs_path=path.parent / "inputs.npz",
        expected_path=path.parent / "expected.npz",
        input_names=input_names,
        output_names=output_names,
        lynx_ops=lynx_ops,
    )
    np.savez(
        result.inputs_path, **{n: _numpy(t) for n, t in zip(input_names, tensors, strict=True)}
    )
    np.savez(
        result.expected_path, **{n: _numpy(t) for n, t in zip(output_names, expected, strict=True)}
    )
    return result


def onnxruntime_error(export: OnnxExport) -> float:
    """Run the exported model in onnxruntime on inputs.npz; the largest relative error
    against expected.npz over all outputs: max |ort - torch| / max(max |torch|, tiny)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    with np.load(export.inputs_path) as inputs, np.load(export.expected_path) as expected:
        feeds = {name: inputs[name] for name in export.input_names}
        got = session.run(export.output_names, feeds)
        worst = 0.0
        for name, value in zip(export.output_names, got, strict=True):
            want = expected[name].astype(np.float64)
            scale = max(float(np.abs(want).max(initial=0.0)), np.finfo(np.float32).tiny)
            diff = float(np.abs(value.astype(np.float64) - want).max(initial=0.0))
            worst = max(worst, diff / scale)
    return worst
