"""The lynx passes, in order, each a named rewrite run through Inductor's GraphTransformObserver.

    lynx_softmax_routers   softmax -> top-k (-> renorm) routers      -> lynx::route
    lynx_scored_routers    every other top-k router (sigmoid, bias,  -> lynx::route_scored
                           group limit, top-k on logits, ...)
    lynx_expert_dispatch   the expert computation consuming a        -> lynx::experts
                           rewritten router (or routing the graph    (option fuse_experts)
                           takes as inputs), where shown equivalent

Each pass runs through `GraphTransformObserver(gm, name, subsystem="lynx")`, as Inductor's
own passes do: provenance tracking (`from_node`) sees lynx's rewrites, the pass is timed in
dynamo_timed, `torch._inductor.config.disabled_passes` can turn it off by name, and with
INDUCTOR_LOG_URL_FOR_GRAPH_XFORM set it draws the graph before and after. Beside that, every
pass leaves the graph before and after it:
- as tlparse artifacts (`<pass>_graph<n>_before` / `_after`, with TORCH_TRACE set);
- with TORCH_COMPILE_DEBUG=1, as readable FX code in the debug folder:
  `<debug dir>/lynx/graph_<graph>/<i>_<pass>.before.py` and `.after.py`.
Every match and skip is counted in `torch._dynamo.utils.counters["lynx"]` (passes/report.py).

Router passes claim the top-k nodes they match, so a later pass never takes them again; a
graph that needs gradients has its routers reported (skipped) and left as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
from lynx_compile.passes.dispatch import _hint, rewrite_dispatch
from lynx_compile.passes.router import find_router_sites, report_skipped_router, rewrite_router
from lynx_compile.passes.router_families import find_scored_router_sites, rewrite_scored_router
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from lynx_compile.config import LynxConfig

log = logging.getLogger("lynx_compile")

GRAD_SKIP_REASON = (
    "autograd is on: lynx rewrites inference graphs; run under torch.no_grad() or "
    "torch.inference_mode()"
)


@dataclasses.dataclass
class PassContext:
    """What the passes over one Dynamo graph share."""

    gm: fx.GraphModule
    example_inputs: list
    config: LynxConfig
    graph_id: int
    grad_needed: bool
    claimed: set[fx.Node] = dataclasses.field(default_factory=set)  # top-k nodes taken
    routed: list[Routed] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Routed:
    """One rewritten router, as the dispatch pass needs it."""

    route: fx.Node  # the lynx routing op
    weights: fx.Node  # its weights output: final (lynx::route) or the top-k values
    ids: fx.Node  # [*tokens, k] expert ids
    entry: dict  # the router's report entry
    logits: fx.Node | None  # the router's linear output (its input has the hidden size);
    # None for routing the graph takes as inputs (see input_routings)
    hidden_dim: int | None = None  # the hidden size, where no router shows it


def input_routings(ctx: PassContext) -> list[Routed]:
    """Routing the graph receives as inputs, one Routed per candidate expert count: an
    integer [*tokens, k] placeholder (the ids) beside a float one of the same rank and k (the
    weights), the hidden states a float placeholder of that rank with the ids' token dims,
    and 3-D float placeholders (stacked expert weights) giving the candidate expert counts.

    This is the experts module compiled in a graph of its own: a graph break between the
    router and the experts (transformers' expert-parallel all_to_all, which reads its split
    sizes back to the host under a context manager, runs its experts in a later graph), or
    a user who compiles the experts alone. The dispatch pass then fuses them as it fuses a
    rewritten router's, with the same numerical checks; nothing is reported where no
    expert computation reads the pair."""
    holders = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"]
    values = {n: n.meta.get("example_value") for n in holders}
    tensors = {n: v for n, v in values.items() if isinstance(v, torch.Tensor)}
    taken = {r.ids for r in ctx.routed}
    counts = sorted(
        {
            e
            for v in tensors.values()
            if v.dim() == 3
            and v.dtype.is_floating_point
            and (e := _hint(v.shape[0])) is not None
            and e > 1
        }
    )
    found = []
    for ids, iv in tensors.items():
        if ids in taken or iv.dtype not in (torch.int64, torch.int32) or iv.dim() < 2:
            continue
        k = _hint(iv.shape[-1])
        if k is None or not 1 <= k <= 64 or not ids.users:
            continue
        tokens = [str(s) for s in iv.shape[:-1]]
        weights = [
            n
            for n, v in tensors.items()
            if v.dtype.is_floating_point
            and v.dim() == iv.dim()
            and _hint(v.shape[-1]) == k
            and n.users
        ]
        hidden = [
            _hint(v.shape[-1])
            for n, v in tensors.items()
            if v.dtype.is_floating_point
            and v.dim() == iv.dim()
            and [str(s) for s in v.shape[:-1]] == tokens
            and n not in weights
        ]
        hidden = [d for d in hidden if d]
        if len(weights) != 1 or len(hidden) != 1:
            continue  # not one reading of the inputs: leave them
        for e in counts:
            entry = {"num_experts": e, "top_k": k, "weights": "input", "site": None}
            found.append(Routed(ids, weights[0], ids, entry, None, hidden[0]))
    return found


@dataclasses.dataclass(frozen=True)
class LynxPass:
    """One named pass: `run(ctx)` rewrites ctx.gm in place and returns its rewrite count."""

    name: str
    run: Callable[[PassContext], int]
    enabled: Callable[[LynxConfig], bool] = lambda config: True


def _rewrite_routers(ctx: PassContext, sites: list, rewrite) -> int:
    """Claim the matched sites' top-k nodes, then rewrite each (or, when the graph needs
    gradients, report each as skipped); returns the rewrite count."""
    ctx.claimed |= {site.topk for site in sites}
    if ctx.grad_needed:
        for site in sites:
            report_skipped_router(
                site.topk, GRAD_SKIP_REASON, ctx.graph_id, site.num_experts, site.top_k
            )
        return 0
    for site in sites:
        route, weights, ids, entry = rewrite(ctx.gm, site, ctx.config, ctx.graph_id)
        ctx.routed.append(Routed(route, weights, ids, entry, site.logits))
    return len(sites)


def softmax_routers(ctx: PassContext) -> int:
    """Rewrite every softmax -> top-k router into lynx::route."""
    return _rewrite_routers(ctx, find_router_sites(ctx.gm, ctx.graph_id), rewrite_router)


def scored_routers(ctx: PassContext) -> int:
    """Rewrite every other top-k router (ranked by a score) into lynx::route_scored."""
    sites = find_scored_router_sites(ctx.gm, ctx.graph_id, claimed=ctx.claimed)
    return _rewrite_routers(ctx, sites, rewrite_scored_router)


def expert_dispatch(ctx: PassContext) -> int:
    """Fuse the expert computation behind each rewritten router into lynx::experts."""
    fused = 0
    for routed in ctx.routed:
        fused += rewrite_dispatch(ctx.gm, routed, ctx.example_inputs, ctx.graph_id)
    if ctx.grad_needed:
        return fused
    done = set()  # one fused dispatch per ids input, whichever expert count fits
    for routed in input_routings(ctx):
        if routed.ids in done:  # (a rewrite leaves the graph's placeholders in place)
            continue
        if rewrite_dispatch(ctx.gm, routed, ctx.example_inputs, ctx.graph_id):
            done.add(routed.ids)
            fused += 1
    return fused


LYNX_PASSES: tuple[LynxPass, ...] = (
    LynxPass("lynx_softmax_routers", softmax_routers),
    LynxPass("lynx_scored_routers", scored_routers),
    LynxPass("lynx_expert_dispatch", expert_dispatch, lambda config: config.fuse_experts),
)


def _grad_needed(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )


def _debug_dir() -> Path | None:
    """Where TORCH_COMPILE_DEBUG=1 puts lynx's per-pass graphs, None when it is off."""
    if not torch._inductor.config.trace.enabled:
        return None
    from torch._dynamo.utils import get_debug_dir

    return Path(get_debug_dir()) / "lynx"


def _readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


def _leave_graph(ctx: PassContext, code: str, index: int, name: str, when: str) -> None:
    """The graph (its readable code) before/after one pass, for tlparse and
    TORCH_COMPILE_DEBUG."""
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {
            "name": f"{name}_graph{ctx.graph_id}_{when}",
            "encoding": "string",
        },
        payload_fn=lambda: code,
    )
    folder = _debug_dir()
    if folder is not None:
        folder = folder / f"graph_{ctx.graph_id}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}_{name}.{when}.py").write_text(code)


def _observed() -> bool:
    """Whether anyone looks at per-pass graphs (printing a graph costs a few ms)."""
    from torch._logging._internal import trace_log

    return _debug_dir() is not None or bool(trace_log.handlers)


def run_passes(gm: fx.GraphModule, example_inputs, config: LynxConfig, graph_id: int) -> bool:
    """Run LYNX_PASSES over one Dynamo graph in place; whether any pass rewrote it."""
    ctx = PassContext(gm, list(example_inputs), config, graph_id, _grad_needed(example_inputs))
    code = _readable(gm) if _observed() else None  # the graph as the next pass finds it
    changed = False
    for index, lynx_pass in enumerate(LYNX_PASSES):
        if not lynx_pass.enabled(config):
            continue
        if code is not None:
            _leave_graph(ctx, code, index, lynx_pass.name, "before")
        observer = GraphTransformObserver(gm, lynx_pass.name, subsystem="lynx")
        count = observer.apply_gm_pass(lambda _gm, p=lynx_pass: p.run(ctx))
        if count is None:  # disabled through torch._inductor.config.disabled_passes
            log.info("lynx: pass %s disabled by Inductor's disabled_passes", lynx_pass.name)
        changed |= bool(count)
        if code is not None:
            code = _readable(gm)
            _leave_graph(ctx, code, index, lynx_pass.name, "after")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
