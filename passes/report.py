"""What the lynx passes matched, rewrote and left alone, across every compiled graph.

Each site is a dict with at least: kind ("router" | "dispatch"), status ("rewritten" |
"skipped"), reason (the pattern name when rewritten, why not when skipped), num_experts,
top_k. Router sites also carry the policy applied, whether the graph is a decode step,
and (with telemetry on) the runtime distinct-expert counts.
"""

from __future__ import annotations

import copy
import itertools
import threading

from lynx_compile.lowering import telemetry

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
    return site


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
