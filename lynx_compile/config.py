"""Backend options -> LynxConfig, validated with errors that name the valid keys and ranges."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from lynx_compile.lowering.constants import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BUDGET,
    DEFAULT_K0,
    DEFAULT_POLICY,
    POLICIES,
)
from lynx_compile.lowering.reference import RoutingPolicy

_OPTION_HELP = {
    "policy": f"one of {', '.join(POLICIES)} (default {DEFAULT_POLICY})",
    "alpha": f"bin width parameter of affinity, a float > 0 (default {DEFAULT_ALPHA})",
    "beta": f"floor of affinity bins, a number > 0 or None for no floor (default {DEFAULT_BETA})",
    "k0": f"experts each token keeps under oea, an int >= 1 (default {DEFAULT_K0})",
    "budget": f"experts a batch keeps under static, an int >= 1 (default {DEFAULT_BUDGET})",
    "decode_only": "apply approximate policies only to decode steps, a bool (default True)",
    "telemetry": "record distinct experts per call per site, a bool (default False)",
    "fuse_experts": "rewrite the expert dispatch into lynx::experts where found (default True)",
    "mode": "Inductor mode, as torch.compile's mode= (default None)",
    "inductor": "a dict of Inductor config patches (default {})",
}
VALID_KEYS = tuple(_OPTION_HELP)


@dataclasses.dataclass(frozen=True)
class LynxConfig:
    """Everything the backend needs to know about one torch.compile call."""

    policy: str = DEFAULT_POLICY
    alpha: float = DEFAULT_ALPHA
    beta: float | None = DEFAULT_BETA
    k0: int = DEFAULT_K0
    budget: int = DEFAULT_BUDGET
    decode_only: bool = True
    telemetry: bool = False
    fuse_experts: bool = True
    mode: str | None = None
    inductor: dict = dataclasses.field(default_factory=dict)

    def routing_policy(self, decode: bool) -> RoutingPolicy:
        """The policy a router site gets: approximate only for decode (unless decode_only off)."""
        name = self.policy if (decode or not self.decode_only) else "exact"
        return RoutingPolicy(name, self.alpha, self.beta, self.k0, self.budget)

    def cache_key(self) -> str:
        """Stable hash of the options, so Inductor's FX graph cache tells configs apart."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bad(key: str, value: Any) -> ValueError:
    return ValueError(f"lynx option {key}={value!r} is invalid: expected {_OPTION_HELP[key]}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_options(options: dict | None, mode: str | None = None) -> LynxConfig:
    """Validate torch.compile(..., options=...) for the lynx backend into a LynxConfig."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(VALID_KEYS))
    if unknown:
        raise ValueError(
            f"unknown lynx option(s) {unknown}; valid keys: {', '.join(VALID_KEYS)}. "
            "Put Inductor settings under options={'inductor': {...}}."
        )
    if mode is not None:
        options.setdefault("mode", mode)
    checks = {
        "policy": lambda v: v in POLICIES,
        "alpha": lambda v: _is_number(v) and v > 0,
        "beta": lambda v: v is None or (_is_number(v) and v > 0),
        "k0": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "budget": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "decode_only": lambda v: isinstance(v, bool),
        "telemetry": lambda v: isinstance(v, bool),
        "fuse_experts": lambda v: isinstance(v, bool),
        "mode": lambda v: v is None or isinstance(v, str),
        "inductor": lambda v: isinstance(v, dict),
    }
    for key, value in options.items():
        if not checks[key](value):
            raise _bad(key, value)
    if "alpha" in options:
        options["alpha"] = float(options["alpha"])
    if options.get("beta") is not None:
        options["beta"] = float(options["beta"])
    return LynxConfig(**options)
