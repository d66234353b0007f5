"""What the lynx passes matched, rewrote and left alone, across every compiled graph.

Each site is a dict with at least: kind ("router" | "dispatch"), status ("rewritten" |
"skipped"), reason (the pattern name when rewritten, why not when skipped), num_experts,
top_k. Router sites also carry the policy applied, whether the graph is a decode step,
and (with telemetry on) the runtime distinct-expert counts.

Every site recorded also bumps `torch._dynamo.utils.counters["lynx"]`, as Inductor's
passes count into counters["inductor"]: `<kind>_<status>` (e.g. "router_rewritten") and
`<kind>_<status>:<what>`, where <what> is the pattern rewritten ("softmax_topk_renorm",
"sparse_experts(gated silu)") or the skip reason up to its first detail (the part before
a ":", ";" or "(").
"""

from __future__ import annotations

import copy
import itertools
import re
import threading

from lynx_compile.lowering import telemetry
from torch._dynamo.utils import counters

_lock = threading.Lock()
_sites: list[dict] = []
_graphs = itertools.count()
_site_ids = itertools.count()


def new_graph_id() -> int:
    """A fresh id for one graph handed to the backend."""
    return next(_graphs)


def add_site(**fields) -> dict:
    """Record one site; returns the stored dict (with its `site` id) for later updates."""
    site = {"site": next(_site_ids), **fields}
    for key in ("kind", "status", "reason", "num_experts", "top_k"):
        site.setdefault(key, None)
    with _lock:
        _sites.append(site)
    count_site(site["kind"], site["status"], site["reason"])
    return site


def discard_graph(graph_id: int) -> None:
    """Forget one graph's sites and their counts (a graph the backend refused, whose frame
    Dynamo traces again)."""
    with _lock:
        dropped = [s for s in _sites if s.get("graph") == graph_id]
        _sites[:] = [s for s in _sites if s.get("graph") != graph_id]
    for site in dropped:
        counters["lynx"][f"{site['kind']}_{site['status']}"] -= 1
        counters["lynx"][counter_key(site["kind"], site["status"], site["reason"])] -= 1


def counter_key(kind: str, status: str, reason: str | None) -> str:
    """counters["lynx"] key of one site: `<kind>_<status>:<pattern or skip reason>`."""
    what = (
        re.split(r"[:;(]", reason or "", maxsplit=1)[0].strip() if status == "skipped" else reason
    )
    return f"{kind}_{status}:{what}"


def count_site(kind: str, status: str, reason: str | None) -> None:
    """Bump counters["lynx"] for one recorded site."""
    counters["lynx"][f"{kind}_{status}"] += 1
    counters["lynx"][counter_key(kind, status, reason)] += 1


def report() -> dict:
    """Every site compiled since the last clear_report(), telemetry merged in."""
    with _lock:
        sites = copy.deepcopy(_sites)
    for site in sites:
        if site.get("telemetry_on"):
            site["telemetry"] = telemetry.site_summary(site["site"])
    return {"sites": sites}


def clear_report() -> None:
    """Forget recorded sites and telemetry (compiled graphs keep working)."""
    with _lock:
        _sites.clear()
    telemetry.clear()
