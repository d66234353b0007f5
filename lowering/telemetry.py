"""Opt-in runtime telemetry: distinct experts per call, exact vs the chosen policy.

Recording reads routing ids back to the host (a sync per call), so it is off unless a
compile asks for it with options={"telemetry": True}.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

_lock = threading.Lock()


@dataclass
class SiteTally:
    """Running sums for one router site."""

    calls: int = 0
    tokens: int = 0
    experts_exact: int = 0
    experts_chosen: int = 0

    def summary(self) -> dict:
        """Mean distinct experts per call, exact and chosen, and their ratio."""
        calls = max(self.calls, 1)
        exact = self.experts_exact / calls
        chosen = self.experts_chosen / calls
        return {
            "calls": self.calls,
            "tokens": self.tokens,
            "mean_experts_exact": exact,
            "mean_experts_chosen": chosen,
            "experts_ratio": chosen / exact if exact else 1.0,
        }


_tallies: dict[int, SiteTally] = {}


def record_route(site: int, logits: torch.Tensor, top_k: int, ids: torch.Tensor) -> None:
    """Add one call of router site `site`: logits [N, E], chosen ids [N, k]."""
    if logits.shape[0] == 0:
        return
    exact_ids = torch.topk(logits, top_k, dim=-1).indices  # softmax is monotone per row
    with _lock:
        tally = _tallies.setdefault(site, SiteTally())
        tally.calls += 1
        tally.tokens += int(logits.shape[0])
        tally.experts_exact += int(torch.unique(exact_ids).numel())
        tally.experts_chosen += int(torch.unique(ids).numel())


def site_summary(site: int) -> dict | None:
    """Telemetry summary of a site, or None when it recorded nothing."""
    with _lock:
        tally = _tallies.get(site)
        return None if tally is None else tally.summary()


def clear() -> None:
    """Forget every tally."""
    with _lock:
        _tallies.clear()
