"""Backend options -> LynxConfig, validated with errors that name the valid keys and ranges."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from lynx_compile.lowering.constants import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_BUDGET,
    DEFAULT_K0,
    DEFAULT_POLICY,
    DEFAULT_PROTECTED_K0,
    POLICIES,
    default_k0,
)
from lynx_compile.lowering.reference import RoutingPolicy

_OPTION_HELP = {
    "policy": f"one of {', '.join(POLICIES)} (default {DEFAULT_POLICY})",
    "alpha": f"bin width parameter of affinity, a float > 0 (default {DEFAULT_ALPHA})",
    "beta": f"floor of affinity bins, a number > 0 or None for no floor (default {DEFAULT_BETA})",
    "k0": (
        "each token's own top-k0 experts, always kept: oea's kept set is their union (an int "
        f">= 1, default {DEFAULT_K0}); affinity and static decide the rest (an int >= 0, "
        f"default {DEFAULT_PROTECTED_K0} for affinity, 0 for static; 0 = no protection); "
        "None = the policy's default"
    ),
    "budget": f"experts a batch keeps under static, an int >= 1 (default {DEFAULT_BUDGET})",
    "calibration": (
        "a calibration file written by `lynx-compile calibrate` (a path), or its loaded dict: "
        "sets policy, alpha, beta, k0 and budget (give none of those with it)"
    ),
    "calibration_batch": (
        "with calibration: take its choice for this decode batch size (an int it was "
        "calibrated at), not the one that fits every calibrated batch (default None)"
    ),
    "decode_only": "apply approximate policies only to decode steps, a bool (default True)",
    "telemetry": "record distinct experts per call per site, a bool (default False)",
    "fuse_experts": "rewrite the expert dispatch into lynx::experts where found (default True)",
    "routing_group": (
        "route each rank's tokens as one batch with the other ranks of this torch.distributed "
        "process group (a ProcessGroup such as dist.group.WORLD, or its group name), for "
        "layouts where each rank holds its own tokens; two small all_reduces per MoE layer. "
        "Policies affinity and oea (exact needs none); default None: each rank routes its "
        "own batch"
    ),
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
    k0: int | None = None
    budget: int = DEFAULT_BUDGET
    calibration: dict | None = None
    calibration_batch: int | None = None
    decode_only: bool = True
    telemetry: bool = False
    fuse_experts: bool = True
    routing_group: str | None = None  # a process group's name (routing_group_name)
    mode: str | None = None
    inductor: dict = dataclasses.field(default_factory=dict)

    def routing_policy(self, decode: bool, layer: str | None = None) -> RoutingPolicy:
        """The policy a router site gets: approximate only for decode (unless decode_only
        off); with a calibration, its choice for the router at module path `layer`
        (CalibrationMismatchError for a router the file was not made for)."""
        chosen = self
        if self.calibration is not None:
            from lynx_compile import calibration

            options = calibration.layer_policy(self.calibration, self.calibration_batch, layer)
            chosen = dataclasses.replace(self, **options)
        name = chosen.policy if (decode or not self.decode_only) else "exact"
        k0 = default_k0(chosen.policy) if chosen.k0 is None else chosen.k0
        return RoutingPolicy(name, chosen.alpha, chosen.beta, k0, chosen.budget)

    def cache_key(self) -> str:
        """Stable hash of the options, so Inductor's FX graph cache tells configs apart."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bad(key: str, value: Any) -> ValueError:
    return ValueError(f"lynx option {key}={value!r} is invalid: expected {_OPTION_HELP[key]}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_POLICY_KEYS = ("policy", "alpha", "beta", "k0", "budget")


def _apply_calibration(options: dict) -> dict:
    """options with `calibration` (a path or a loaded dict) replaced by the loaded file and
    its chosen policy's settings."""
    from lynx_compile import calibration  # torch-only runtime part of the calibration

    clash = sorted(k for k in _POLICY_KEYS if k in options)
    if clash:
        raise ValueError(
            f"lynx options {clash} conflict with option calibration: the calibration file "
            "sets the policy and its parameters; give one or the other"
        )
    loaded = calibration.load(options["calibration"])
    batch = options.get("calibration_batch")
    if batch is not None and not (_is_int(batch) and batch >= 1):
        raise _bad("calibration_batch", batch)
    chosen = calibration.policy_options(loaded, batch)
    calibration.layer_choices(loaded, batch)  # a batch the per-layer choices lack: now
    return {**options, "calibration": loaded, **chosen}


def routing_group_name(group: Any, policy: str) -> str:
    """The name of the process group option routing_group gives (a ProcessGroup or a group
    name), checked: torch.distributed initialised, the group known, the policy supported."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"lynx option routing_group={group!r} needs torch.distributed initialised: call "
            "torch.distributed.init_process_group (torchrun sets its environment) before "
            "torch.compile, or leave routing_group out on one process"
        )
    if isinstance(group, dist.ProcessGroup):
        name = group.group_name
    elif isinstance(group, str):
        name = group
    else:
        raise _bad("routing_group", group)
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        _resolve_process_group(name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"lynx option routing_group={group!r}: no process group named {name!r} in this "
            "process; pass the ProcessGroup itself (e.g. dist.group.WORLD or dist.new_group(...))"
        ) from err
    if policy == "static":
        raise ValueError(
            "lynx option routing_group does not take policy 'static' yet: its kept set ranks "
            "float sums of probabilities, whose sum over ranks is not the single-process sum "
            "bit for bit; use policy 'affinity' (default) or 'oea', or leave routing_group out"
        )
    return name


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
    if options.get("calibration") is not None:
        if not isinstance(options["calibration"], (str, Path, dict)):
            raise _bad("calibration", options["calibration"])
        options = _apply_calibration(options)
    least_k0 = 1 if options.get("policy", DEFAULT_POLICY) == "oea" else 0
    checks = {
        "policy": lambda v: v in POLICIES,
        "alpha": lambda v: _is_number(v) and v > 0,
        "beta": lambda v: v is None or (_is_number(v) and v > 0),
        "k0": lambda v: v is None or (_is_int(v) and v >= least_k0),
        "calibration": lambda v: v is None or isinstance(v, dict),
        "calibration_batch": lambda v: v is None or (_is_int(v) and "calibration" in options),
        "budget": lambda v: _is_int(v) and v >= 1,
        "decode_only": lambda v: isinstance(v, bool),
        "telemetry": lambda v: isinstance(v, bool),
        "fuse_experts": lambda v: isinstance(v, bool),
        "routing_group": lambda v: True,  # checked by routing_group_name below
        "mode": lambda v: v is None or isinstance(v, str),
        "inductor": lambda v: isinstance(v, dict),
    }
    for key, value in options.items():
        if not checks[key](value):
            if key == "k0" and _is_int(value) and value >= 0:
                raise ValueError(
                    f"lynx option k0={value} is invalid with policy "
                    f"{options.get('policy', DEFAULT_POLICY)!r}: oea keeps the union of each "
                    "token's own top-k0 and needs k0 >= 1 (k0 = 0 is for affinity and static)"
                )
            raise _bad(key, value)
    if options.get("routing_group") is not None:
        policy = options.get("policy", DEFAULT_POLICY)
        options["routing_group"] = routing_group_name(options["routing_group"], policy)
    if options.get("k0") is None:
        options["k0"] = default_k0(options.get("policy", DEFAULT_POLICY))
    if "alpha" in options:
        options["alpha"] = float(options["alpha"])
    if options.get("beta") is not None:
        options["beta"] = float(options["beta"])
    return LynxConfig(**options)
