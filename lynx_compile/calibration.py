"""Calibration files: the routing policy `lynx-compile calibrate` chose for one model.

The runtime part (torch-only): load and check a file, turn it into backend options, check
it against the router sites the backend compiles, and remember which calibration is in use
so that `lynx_compile.report()` names it. Measuring and choosing lives in
lynx_compile.tools.calibrate.

A file is JSON:

    {"format": "lynx-calibration/1",
     "model": {"name": str, "num_layers": int, "num_experts": int, "top_k": int},
     "choice": {"policy": str, "alpha": float, "beta": float | null, "k0": int, "budget": int},
     "choice_by_batch": {"8": {... as choice}, ...},
     "budget": {...}, "batches": [int, ...], "candidates": [...], ...}

Only "format", "model", "choice" and "choice_by_batch" (option calibration_batch) are read
by the backend; the rest records how the
choice was made (the distortion of every candidate at every decode batch size).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

FORMAT = "lynx-calibration/1"
_POLICY_FIELDS = ("policy", "alpha", "beta", "k0", "budget")
_MODEL_FIELDS = ("num_layers", "num_experts", "top_k")

_lock = threading.Lock()
_in_use: dict[str, dict] = {}  # summary per calibration name, since clear_in_use()


class CalibrationMismatchError(ValueError):
    """A calibration file that does not describe the model it is applied to."""


def load(source: str | Path | dict) -> dict:
    """A calibration (a path to its JSON file, or the loaded dict), checked: dict."""
    if isinstance(source, dict):
        cal, where = source, "the calibration dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"lynx calibration file {path} does not exist; write one with "
                "`lynx-compile calibrate --out <file>`"
            )
        try:
            cal = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"lynx calibration file {path} is not valid JSON: {err}") from None
        where = str(path)
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        found = cal.get("format") if isinstance(cal, dict) else type(cal).__name__
        raise ValueError(
            f"{where} is not a lynx calibration (format {found!r}, want {FORMAT!r}); "
            "write one with `lynx-compile calibrate`"
        )
    model, choice = cal.get("model") or {}, cal.get("choice") or {}
    missing = [f"model.{k}" for k in _MODEL_FIELDS if k not in model]
    missing += [f"choice.{k}" for k in _POLICY_FIELDS if k not in choice]
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)}; rewrite it with `lynx-compile calibrate`"
        )
    cal = dict(cal)
    cal.setdefault("name", model.get("name", "calibration") if where != str(source) else where)
    return cal


def policy_options(cal: dict, batch: int | None = None) -> dict:
    """The backend options a calibration sets: policy, alpha, beta, k0, budget; its choice
    for every calibrated batch, or for one decode batch size."""
    if batch is None:
        return {k: cal["choice"][k] for k in _POLICY_FIELDS}
    by_batch = cal.get("choice_by_batch") or {}
    if str(batch) not in by_batch:
        raise ValueError(
            f"lynx calibration {cal['name']} holds no choice for decode batch {batch}; it was "
            f"calibrated at {sorted(int(b) for b in by_batch) or 'no single batch'} "
            "(calibrate with --batch to add one)"
        )
    return {k: by_batch[str(batch)][k] for k in _POLICY_FIELDS}


def describe(cal: dict, batch: int | None = None) -> dict:
    """What report() shows of a calibration in use (its choice for `batch`, or overall)."""
    return {
        "name": cal["name"],
        "model": dict(cal["model"]),
        "choice": policy_options(cal, batch),
        "calibration_batch": batch,
        "budget": cal.get("budget"),
        "batches": cal.get("batches"),
    }


def check_model(cal: dict, num_layers: int, num_experts: int, top_k: int) -> None:
    """CalibrationMismatchError unless the calibration was made for this model shape."""
    want = cal["model"]
    got = {"num_layers": num_layers, "num_experts": num_experts, "top_k": top_k}
    wrong = [f"{k} {want[k]} (the model has {got[k]})" for k in _MODEL_FIELDS if want[k] != got[k]]
    if wrong:
        raise CalibrationMismatchError(
            f"lynx calibration {cal['name']} does not match the model: it was made for "
            f"{', '.join(wrong)}; calibrate this model with `lynx-compile calibrate`"
        )


def check_sites(cal: dict, sites: list[dict]) -> None:
    """CalibrationMismatchError when the router sites one graph holds cannot belong to the
    calibrated model: another expert count or top-k, or more routers than it has layers."""
    routers = [s for s in sites if s.get("kind") == "router" and s.get("status") == "rewritten"]
    want = cal["model"]
    for site in routers:
        if (site.get("num_experts"), site.get("top_k")) != (want["num_experts"], want["top_k"]):
            raise CalibrationMismatchError(
                f"lynx calibration {cal['name']} was made for {want['num_experts']} experts, "
                f"top-{want['top_k']}, but this model routes over {site.get('num_experts')} "
                f"experts, top-{site.get('top_k')}; calibrate this model with "
                "`lynx-compile calibrate`"
            )
    if len(routers) > want["num_layers"]:
        raise CalibrationMismatchError(
            f"lynx calibration {cal['name']} was made for {want['num_layers']} MoE layers, but "
            f"one graph of this model holds {len(routers)} routers; calibrate this model "
            "with `lynx-compile calibrate`"
        )


def record_use(cal: dict, batch: int | None = None) -> None:
    """Remember that a compiled graph uses this calibration (report() names it)."""
    with _lock:
        _in_use[f"{cal['name']}@{batch}"] = describe(cal, batch)


def in_use() -> list[dict]:
    """The calibrations compiled graphs used since clear_in_use()."""
    with _lock:
        return [dict(v) for v in _in_use.values()]


def clear_in_use() -> None:
    """Forget the calibrations in use (with clear_report)."""
    with _lock:
        _in_use.clear()
