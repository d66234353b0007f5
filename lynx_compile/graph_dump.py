"""Graph dumps: every graph the backend sees, before and after the lynx passes, and why.

For graph `i` a dump folder holds before{i}.py and after{i}.py (readable FX code),
region{i}.dot (the rewritten region as a networkx graph; region{i}.svg / .png too when
Graphviz's `dot` is on PATH), and, for all graphs dumped there so far, report.json
(the sites as lynx_compile.report() gives them) and report.txt (one paragraph per graph).

Dumping is on when LYNX_DUMP=DIR is set, or inside `dump_to(DIR)` (used by
`lynx-compile dump`, which must not leak its folder into other compiles through the
environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from lynx_compile.passes import report as report_mod

if TYPE_CHECKING:
    import networkx as nx

# Hops kept around each focus node in the picture: enough to show the router's linear and
# the dispatch that consumes the routing, small enough to stay readable.
REGION_HOPS = 2

_lock = threading.Lock()
_override: Path | None = None
# Per dump folder, the graphs this process wrote there: {folder: {graph id: summary}}.
_written: dict[Path, dict[int, dict]] = {}


def active_dump_dir() -> Path | None:
    """The folder graphs are dumped to (dump_to's, else LYNX_DUMP's), or None when off."""
    if _override is not None:
        return _override
    value = os.environ.get("LYNX_DUMP")
    return Path(value) if value else None


@contextlib.contextmanager
def dump_to(out_dir: Path) -> Iterator[Path]:
    """Dump every graph compiled inside the block to `out_dir` (overrides LYNX_DUMP)."""
    global _override
    previous, _override = _override, Path(out_dir)
    with _lock:
        _written.pop(Path(out_dir), None)
    try:
        yield Path(out_dir)
    finally:
        _override = previous


def graphs_written(out_dir: Path) -> list[dict]:
    """Summaries of the graphs this process dumped to `out_dir`, in graph order."""
    with _lock:
        return [dict(g) for _, g in sorted(_written.get(Path(out_dir), {}).items())]


def sites_of(graph_ids) -> list[dict]:
    """The report sites (lynx_compile.report() dicts) recorded for the given graph ids."""
    wanted = set(graph_ids)
    return [s for s in report_mod.report()["sites"] if s.get("graph") in wanted]


def write_graph_dump(out_dir: Path, graph_id: int, before: str, gm: fx.GraphModule) -> None:
    """Write graph `graph_id` (before{id}.py, after{id}.py, region picture), then refresh
    report.json and report.txt with every graph dumped to `out_dir` so far."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f"before{graph_id}.py", f"after{graph_id}.py"]
    (out_dir / files[0]).write_text(before)
    (out_dir / files[1]).write_text(gm.print_readable(print_output=False))
    sites = sites_of([graph_id])
    region = region_graph(gm, sites)
    if region.number_of_nodes():
        files += write_picture(region, out_dir / f"region{graph_id}")
    summary = {
        "graph": graph_id,
        "nodes": len(gm.graph.nodes),
        "lynx_ops": sum(1 for n in gm.graph.nodes if _is_lynx_op(n)),
        "files": files,
    }
    with _lock:
        _written.setdefault(out_dir, {})[graph_id] = summary
    write_report(out_dir)


def write_report(out_dir: Path, extra: dict | None = None) -> dict:
    """(Re)write report.json and report.txt for the graphs dumped to `out_dir`; returns the
    report dict: {"graphs": [...], "sites": [...], **extra}."""
    graphs = graphs_written(out_dir)
    report = {
        **(extra or {}),
        "graphs": graphs,
        "sites": sites_of(g["graph"] for g in graphs),
    }
    _write_atomic(Path(out_dir) / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(Path(out_dir) / "report.txt", format_report(report))
    return report


def _write_atomic(path: Path, text: str) -> None:
    """Readers (and a crash mid-write) see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    """report.txt: each graph, then each candidate site in it, rewritten or skipped and why."""
    sites = report["sites"]
    rewritten = sum(s["status"] == "rewritten" for s in sites)
    lines = [
        f"lynx dump: {len(report['graphs'])} graph(s), {len(sites)} candidate site(s): "
        f"{rewritten} rewritten, {len(sites) - rewritten} skipped",
    ]
    for key in ("target", "policy"):
        if key in report:
            lines.append(f"{key}: {report[key]}")
    for graph in report["graphs"]:
        gid = graph["graph"]
        lines += [
            "",
            f"graph {gid}: {graph['nodes']} nodes after the pass, {graph['lynx_ops']} lynx "
            f"op(s); files: {', '.join(graph['files'])}",
        ]
        in_graph = [s for s in sites if s.get("graph") == gid]
        if not in_graph:
            lines.append("  no candidate site (no top-k router in this graph)")
        for site in in_graph:
            lines.append("  " + _site_line(site))
    return "\n".join(lines) + "\n"


def _site_line(site: dict) -> str:
    head = (
        f"site {site['site']} [{site['kind']}] node {site.get('node')}: {site['status']}, "
        f"experts={site['num_experts']} top_k={site['top_k']}"
    )
    if site["status"] == "rewritten":
        return (
            f"{head}, pattern {site['reason']}, policy {site.get('policy')} "
            f"(decode step: {site.get('decode')}), weights {site.get('weights')}"
        )
    return f"{head}, because {site['reason']}"


def _is_lynx_op(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "lynx"


def _label(node: fx.Node) -> str:
    """What a node computes and its shape, e.g. 'route_default\\nlynx.route.default\\n[6, 8]'."""
    if node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):
            what = str(node.target)
    elif node.op == "call_method":
        what = f".{node.target}()"
    else:
        what = node.op
    val = node.meta.get("example_value", node.meta.get("val"))
    shape = f"\n{list(val.shape)}" if isinstance(val, torch.Tensor) else ""
    return f"{node.name}\n{what}{shape}"


def region_graph(gm: fx.GraphModule, sites: list[dict]) -> nx.DiGraph:
    """The rewritten region of `gm` as a networkx DiGraph: lynx op nodes and skipped sites'
    nodes (kind "lynx" / "skipped"), plus REGION_HOPS producers and consumers around them.
    Empty when the graph has neither."""
    # networkx is a dependency of torch (torch.compile's partitioner imports it), so it
    # needs no extra; imported here so that `import lynx_compile` does not load it.
    import networkx as nx

    full = nx.DiGraph()
    for node in gm.graph.nodes:
        full.add_node(node.name, label=_label(node), kind="context")
        for src in node.all_input_nodes:
            full.add_edge(src.name, node.name)
    focus = {n.name: "lynx" for n in gm.graph.nodes if _is_lynx_op(n)}
    for site in sites:
        if site["status"] == "skipped" and site.get("node") in full:
            focus.setdefault(site["node"], "skipped")
    keep = set(focus)
    for name in focus:
        keep |= set(nx.single_source_shortest_path_length(full, name, REGION_HOPS))
        keep |= set(nx.single_source_shortest_path_length(full.reverse(), name, REGION_HOPS))
    region = full.subgraph(keep).copy()
    for name, kind in focus.items():
        region.nodes[name]["kind"] = kind
    return region


_FILL = {"lynx": "palegreen", "skipped": "lightsalmon", "context": "white"}


def to_dot(graph: nx.DiGraph, name: str = "region") -> str:
    """DOT text for a region graph (lynx ops green, skipped sites salmon)."""

    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [f"digraph {quote(name)} {{", "  node [shape=box, style=filled, fontname=monospace];"]
    for node, data in graph.nodes(data=True):
        fill = _FILL[data.get("kind", "context")]
        lines.append(f"  {quote(node)} [label={quote(data['label'])}, fillcolor={fill}];")
    lines += [f"  {quote(a)} -> {quote(b)};" for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def write_picture(graph: nx.DiGraph, stem: Path) -> list[str]:
    """Write stem.dot, and stem.svg / stem.png when Graphviz's `dot` is on PATH; returns the
    file names written. A Graphviz failure leaves the DOT file (the picture is optional)."""
    dot_path = stem.with_suffix(".dot")
    dot_path.write_text(to_dot(graph, stem.name))
    written = [dot_path.name]
    dot = shutil.which("dot")
    if dot is None:
        return written
    for fmt in ("svg", "png"):
        out = stem.with_suffix(f".{fmt}")
        done = subprocess.run(
            [dot, f"-T{fmt}", str(dot_path), "-o", str(out)], capture_output=True, timeout=60
        )
        if done.returncode == 0:
            written.append(out.name)
    return written
