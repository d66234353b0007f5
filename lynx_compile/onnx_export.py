"""lynx_compile.to_onnx: the rewritten model as ONNX that onnxruntime runs without custom kernels.

The lynx ops have no ONNX counterpart, so before export each routing op node (lynx::route,
lynx::route_scored) is swapped for the routing reference itself (plain PyTorch: softmax,
top-k, stable sorts, gathers, integer keys) and each experts op node (lynx::experts) for
a dense all-experts equivalent (the reference loops over the
experts a batch touches, a data-dependent shape ONNX cannot express). The exporter then
emits standard operators, except for one gap filled here: stable sort, which becomes ONNX
TopK over the whole axis (TopK breaks ties by lower index, exactly what a stable sort keeps).

With lynx_domain=True the lynx ops are instead written as custom-domain nodes (domain
"lynx", version 1: lynx::route -> lynx.Route, lynx::route_scored -> lynx.RouteScored),
tensor arguments as inputs and the others as attributes, for runtimes that implement them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from lynx_compile._extras import require
from lynx_compile.export import ExportError, capture_rewritten, describe_error, export_graph
from lynx_compile.lowering import distributed_route, reference
from lynx_compile.lowering.reference import RoutingPolicy, route_reference

# The ONNX stack is the [onnx] extra; torch.onnx.export(dynamo=True) runs on onnxscript.
np = require("numpy", "onnx", "lynx_compile.to_onnx")
onnx = require("onnx", "onnx", "lynx_compile.to_onnx")
require("onnxscript", "onnx", "lynx_compile.to_onnx")

ONNX_OPSET = 18


def route_decomposed(logits, top_k, policy, alpha, beta, k0, budget, weights, telemetry_site):
    """lynx::route as plain PyTorch ops: logits [N, E] -> (weights [N, k], ids int64 [N, k]).

    The routing reference itself; telemetry is dropped (an exported graph has no host)."""
    return route_reference(logits, top_k, RoutingPolicy(policy, alpha, beta, k0, budget), weights)


def route_scored_decomposed(scores, top_k, space, policy, alpha, beta, k0, budget, telemetry_site):
    """lynx::route_scored as plain PyTorch ops: scores [N, E] -> (scores at ids [N, k], ids).

    The routing reference itself; telemetry is dropped."""
    pol = RoutingPolicy(policy, alpha, beta, k0, budget)
    return reference.route_scored_reference(scores, top_k, space, pol)


def route_affinity_cpu_decomposed(logits, probs, top_k, alpha, beta, renorm, k0=0):
    """lynx::route_affinity_cpu: lynx::route with the affinity policy (probs are the
    logits' softmax), its top-k ties to the lower index as the kernel orders them."""
    policy = RoutingPolicy("affinity", alpha, beta, k0)
    weights = "renorm" if renorm else "mass"
    return route_reference(logits, top_k, policy, weights, ties="lower_index", probs=probs)


def route_scored_affinity_cpu_decomposed(scores, top_k, space, alpha, beta, k0):
    """lynx::route_scored_affinity_cpu: lynx::route_scored with the affinity policy, its
    top-k ties to the lower index as the kernel orders them."""
    pol = RoutingPolicy("affinity", alpha, beta, k0)
    return reference.route_scored_reference(scores, top_k, space, pol, ties="lower_index")


def route_remap_decomposed(logits, votes, kept, top_k, policy, beta, weights, telemetry_site):
    """lynx::route_remap (routing across ranks, step 3): its reference; telemetry dropped."""
    return reference.route_group_remap_reference(logits, top_k, votes, kept, weights)


def route_scored_remap_decomposed(scores, votes, kept, top_k, policy, beta, telemetry_site):
    """lynx::route_scored_remap: its reference; telemetry dropped."""
    return reference.scored_group_remap_reference(scores, top_k, votes, kept)


def _dense_experts(x, ids, weights, w_gate, w_up, w_down, activation, gated, **extras):
    """Every expert on every token, combined by routing weight: x [N, d], ids/weights [N, k],
    w_up [E, U, d] (U = 2I when gated without w_gate), w_gate [E, I, d] or None,
    w_down [E, d, I], optional biases b_up [E, U] / b_gate [E, I] / b_down [E, d], alpha and
    limit for swiglu_clamped -> [N, d] in x's dtype, the weighted sum in fp32 like the
    reference."""

    def project(spec, rows, w, bias):  # [N, E, out], each expert's bias on its column
        y = torch.einsum(spec, rows, w.to(x.dtype))
        return y if bias is None else y + bias.to(x.dtype)

    h = project("nd,eud->neu", x, w_up, extras["b_up"])  # [N, E, U]
    gate = None if w_gate is None else project("nd,eid->nei", x, w_gate, extras["b_gate"])
    h = reference.expert_activation(
        h, gate, activation, gated, extras["alpha"], extras["limit"]
    )  # [N, E, I]
    y = project("nei,edi->ned", h, w_down, extras["b_down"])  # [N, E, d]
    combine = torch.zeros(x.shape[0], w_down.shape[0], dtype=torch.float32, device=x.device)
    combine = combine.scatter_add(1, ids, weights.to(torch.float32))  # [N, E]
    return torch.einsum("ned,ne->nd", y.to(torch.float32), combine).to(x.dtype)


def experts_decomposed(
    x,
    ids,
    weights,
    w_up,
    w_gate,
    w_down,
    activation,
    gated,
    b_up=None,
    b_gate=None,
    b_down=None,
    act_alpha=None,
    act_limit=None,
):
    """lynx::experts without data-dependent shapes: x [N, d], ids/weights [N, k],
    w_up [E, U, d], w_gate [E, I, d] or None, w_down [E, d, I], biases as the op's -> [N, d].
    Equals experts_general_reference up to summation order (the reference loops over the
    experts the batch touches)."""
    return _dense_experts(
        x, ids, weights, w_gate, w_up, w_down, activation, gated,
        b_up=b_up, b_gate=b_gate, b_down=b_down, alpha=act_alpha, limit=act_limit,
    )  # fmt: skip


def experts_list_decomposed(
    x,
    ids,
    weights,
    w_up,
    w_gate,
    w_down,
    b_up,
    b_gate,
    b_down,
    activation,
    gated,
    act_alpha=None,
    act_limit=None,
):
    """lynx::experts_list without data-dependent shapes: each expert (its own tensors, never
    stacked) on every token, weighted by its column of the routing; the weighted sum in
    fp32 like the reference."""
    combine = torch.zeros(x.shape[0], len(w_up), dtype=torch.float32, device=x.device)
    combine = combine.scatter_add(1, ids, weights.to(torch.float32))  # [N, E]

    def project(rows, ws, bs, e):
        y = rows @ ws[e].to(x.dtype).t()
        return y + bs[e].to(x.dtype) if bs else y

    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(len(w_up)):
        gate = project(x, w_gate, b_gate, e) if w_gate else None
        h = reference.expert_activation(
            project(x, w_up, b_up, e), gate, activation, gated, act_alpha, act_limit
        )
        y = project(h, w_down, b_down, e)
        out = out + y.to(torch.float32) * combine[:, e : e + 1]
    return out.to(x.dtype)


# Ops with another op's schema and results, so an export writes that one.
DEVICE_NEUTRAL = {"route_recorded": "route"}

# Keyed by op name (torch.ops.lynx.<name>): a new lynx op needs an entry here to export.
DECOMPOSITIONS = {
    "route": route_decomposed,
    "route_scored": route_scored_decomposed,
    "experts": experts_decomposed,
    "experts_list": experts_list_decomposed,
    # Emitted by the CPU lowering inside Inductor, so never seen by export; here so that
    # graphs captured after lowering (or written by hand) still convert.
    "route_affinity_cpu": route_affinity_cpu_decomposed,
    "route_scored_affinity_cpu": route_scored_affinity_cpu_decomposed,
    # The steps of routing across ranks (options routing_group): each converts; the
    # collectives between them are torch.distributed's, which ONNX has no operator for.
    "route_votes": distributed_route.route_votes_traced,
    "route_kept": distributed_route.route_kept_traced,
    "route_remap": route_remap_decomposed,
    "route_scored_votes": distributed_route.route_scored_votes_traced,
    "route_scored_kept": distributed_route.route_scored_kept_traced,
    "route_scored_remap": route_scored_remap_decomposed,
}
DECOMPOSITIONS.update({fast: DECOMPOSITIONS[neutral] for fast, neutral in DEVICE_NEUTRAL.items()})


def lynx_op_name(target) -> str | None:
    """'route' for torch.ops.lynx.route or .default (user code calling the op directly
    leaves the packet in Dynamo's graph, the pass inserts overloads); None for other ops."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        namespace, _, rest = str(target).partition(".")
        if namespace == "lynx":
            return rest.split(".")[0]
    return None


def decompose_lynx_ops(gm: fx.GraphModule) -> int:
    """Swap every lynx op node of `gm` for its plain-PyTorch decomposition; returns how many."""
    swapped = 0
    for node in gm.graph.nodes:
        name = lynx_op_name(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        if name not in DECOMPOSITIONS:
            raise ExportError(
                f"lynx::{name} has no plain-PyTorch decomposition for ONNX yet; add one to "
                "lynx_compile.onnx_export.DECOMPOSITIONS, or export with lynx_domain=True"
            )
        node.target = DECOMPOSITIONS[name]
        swapped += 1
    gm.recompile()
    return swapped


def _sort_stable_as_topk(self, stable=None, dim=-1, descending=False):
    """aten::sort.stable in ONNX: TopK over the whole axis (ties keep the lower index first)."""
    from onnxscript import opset18 as op

    k = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
    return op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)


LYNX_DOMAIN = "lynx"
_TENSOR_TYPES = [
    f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "bool")
]


def _onnx_op_type(name: str) -> str:
    """ONNX op type of a lynx op: route_scored -> RouteScored."""
    return "".join(part.capitalize() for part in name.split("_"))


def _attribute_kind(arg_type: torch._C.JitType):
    """(ONNX attribute type, required) of a non-tensor op argument; bools travel as INT."""
    from onnx.defs import OpSchema

    optional = isinstance(arg_type, torch._C.OptionalType)
    base = arg_type.getElementType() if optional else arg_type
    kinds = {
        torch._C.IntType: OpSchema.AttrType.INT,
        torch._C.BoolType: OpSchema.AttrType.INT,
        torch._C.FloatType: OpSchema.AttrType.FLOAT,
        torch._C.StringType: OpSchema.AttrType.STRING,
    }
    return kinds[type(base)], not optional


def _is_tensor(arg_type: torch._C.JitType) -> bool:
    """Whether an op argument is a tensor (Tensor or Tensor?)."""
    if isinstance(arg_type, torch._C.OptionalType):
        arg_type = arg_type.getElementType()
    return isinstance(arg_type, torch._C.TensorType)


def _register_domain_schema(op: torch._ops.OpOverload) -> None:
    """Declare lynx op `op` to onnx as <LYNX_DOMAIN>.<OpType> version 1 (the exporter checks
    every node against a schema): tensor arguments are inputs (optional ones, like
    lynx::experts' w_gate, optional inputs), the others attributes."""
    from onnx.defs import OpSchema

    op_type = _onnx_op_type(lynx_op_name(op))
    if onnx.defs.has(op_type, LYNX_DOMAIN):
        return
    inputs, attributes, constraints = [], [], []
    for arg in op._schema.arguments:
        if _is_tensor(arg.type):
            option = OpSchema.FormalParameterOption
            optional = option.Optional if isinstance(arg.type, torch._C.OptionalType) else None
            extra = {} if optional is None else {"param_option": optional}
            inputs.append(OpSchema.FormalParameter(arg.name, f"T_{arg.name}", "", **extra))
            constraints.append((f"T_{arg.name}", _TENSOR_TYPES, ""))
        else:
            kind, required = _attribute_kind(arg.type)
            attributes.append(OpSchema.Attribute(arg.name, kind, "", required=required))
    outputs = [OpSchema.FormalParameter(f"out{i}", f"R{i}") for i in range(len(op._schema.returns))]
    constraints += [(f"R{i}", _TENSOR_TYPES, "") for i in range(len(outputs))]
    doc = f"{op._schema}" + " (a lynx_compile op; see lynx_compile/lowering/ops.py)"
    schema = OpSchema(
        op_type,
        LYNX_DOMAIN,
        1,
        doc,
        inputs=inputs,
        outputs=outputs,
        type_constraints=constraints,
        attributes=attributes,
    )
    onnx.defs.register_schema(schema)


def _domain_translation(op: torch._ops.OpOverload):
    """A translation writing `op` as one lynx-domain node; None-valued attributes are left
    out (their absence means None, as beta=None does for route)."""
    from onnxscript import values

    _register_domain_schema(op)
    arguments = op._schema.arguments
    node_op = values.Opset(LYNX_DOMAIN, 1)[_onnx_op_type(lynx_op_name(op))]

    def translate(*args):
        inputs, attrs = [], {}
        for arg, value in zip(arguments, args, strict=False):
            if _is_tensor(arg.type):
                inputs.append(value)  # None: an optional input left out
            elif value is not None:
                attrs[arg.name] = int(value) if isinstance(value, bool) else value
        return node_op(*inputs, **attrs)

    return translate


def _domain_translations(gm: fx.GraphModule) -> dict:
    """{lynx op overload: translation to a lynx-domain node} for the lynx ops in `gm`."""
    table = {}
    for node in gm.graph.nodes:
        name = lynx_op_name(node.target) if node.op == "call_function" else None
        if name is not None:
            overload = getattr(torch.ops.lynx, DEVICE_NEUTRAL.get(name, name)).default
            arguments = overload._schema.arguments
            lists = [a.name for a in arguments if isinstance(a.type, torch._C.ListType)]
            if lists:
                raise ExportError(
                    f"lynx::{name} takes tensor lists ({', '.join(lists)}: per-expert weights), "
                    "which a lynx-domain ONNX node cannot hold (one variadic input at most); "
                    "export with lynx_domain=False, which writes it as standard operators"
                )
            node.target = overload  # one neutral spelling: one table entry serves every node
            table[overload] = _domain_translation(overload)
    gm.recompile()
    return table


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
    table = {torch.ops.aten.sort.stable: _sort_stable_as_topk}
    if lynx_domain:
        table.update(_domain_translations(gm))
        lynx_ops = sum(1 for n in gm.graph.nodes if n.target in table)
    else:
        lynx_ops = decompose_lynx_ops(gm)
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
    ort = require("onnxruntime", "onnx", "lynx_compile.onnx_export.onnxruntime_error")

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
