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
     "layers": ["layers.0.moe.router.proj", ...],
     "choice_by_layer": {"layers.0.moe.router.proj": {... as choice}, ...},
     "choice_by_layer_by_batch": {"8": {"layers.0.moe.router.proj": {...}, ...}, ...},
     "budget": {...}, "batches": [int, ...], "candidates": [...], ...}

The backend reads "format", "model", "choice", "choice_by_batch" (option
calibration_batch) and, where present, "layers" (the router module paths the file was
made for: every router the backend rewrites must be one of them) and "choice_by_layer"
(one policy per router, overriding "choice"; "choice_by_layer_by_batch" with
calibration_batch). Files written before the per-layer fields load unchanged (one policy
for every router); a reader that predates them applies "choice" everywhere, which is the
best single policy within the same budget. The rest records how the choice was made (the
distortion of every candidate at every decode batch size on the draw of prompts it was
chosen on, and under "two_draws" and "by_batch_draw_b" what the choices measured on the
second draw they were confirmed on).
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
    _check_layer_fields(cal, where)
    cal = dict(cal)
    cal.setdefault("name", model.get("name", "calibration") if where != str(source) else where)
    return cal


def _check_layer_fields(cal: dict, where: str) -> None:
    """ValueError unless the optional per-layer fields are well formed: "layers" a list of
    module paths, every per-layer choice a full policy for one of them."""
    layers = cal.get("layers")
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(k, str) for k in layers)
    ):
        raise ValueError(f"{where}: 'layers' must be a list of router module paths")
    tables = [("choice_by_layer", cal.get("choice_by_layer"))]
    tables += [
        (f"choice_by_layer_by_batch.{b}", t)
        for b, t in (cal.get("choice_by_layer_by_batch") or {}).items()
    ]
    for field, table in tables:
        if table is None:
            continue
        if layers is None:
            raise ValueError(f"{where} has {field} but no 'layers'; rewrite it with calibrate")
        unknown = sorted(set(table) - set(layers))
        short = [k for k, v in table.items() if any(f not in v for f in _POLICY_FIELDS)]
        if unknown or short or set(table) != set(layers):
            raise ValueError(
                f"{where}: {field} must hold a full policy ({', '.join(_POLICY_FIELDS)}) for "
                f"each of its 'layers' {layers}; unknown {unknown}, incomplete {short}, "
                f"missing {sorted(set(layers) - set(table))}; rewrite it with calibrate"
            )


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


def layer_choices(cal: dict, batch: int | None = None) -> dict[str, dict] | None:
    """The per-layer policies a calibration sets (router module path -> policy options),
    for every calibrated batch or for one decode batch size; None for one policy."""
    if batch is None:
        table = cal.get("choice_by_layer")
    else:
        table = (cal.get("choice_by_layer_by_batch") or {}).get(str(batch))
        if table is None and cal.get("choice_by_layer") is not None:
            raise ValueError(
                f"lynx calibration {cal['name']} holds per-layer choices but none for decode "
                f"batch {batch}; calibrated at "
                f"{sorted(int(b) for b in cal.get('choice_by_layer_by_batch') or {})} "
                "(calibrate with --per-layer --batch to add one, or leave calibration_batch out)"
            )
    return (
        None if table is None else {k: {f: v[f] for f in _POLICY_FIELDS} for k, v in table.items()}
    )


def layer_policy(cal: dict, batch: int | None, layer: str | None) -> dict:
    """The policy options a calibration gives the router at module path `layer`: its
    per-layer choice, or the one choice; CalibrationMismatchError for a router the file
    was not made for (a module path not among its "layers")."""
    known = cal.get("layers")
    if known is not None and layer not in known:
        found = (
            "records no module path (nn_module_stack) for its router"
            if layer is None
            else f"has a router at {layer!r}"
        )
        raise CalibrationMismatchError(
            f"lynx calibration {cal['name']} was made for the routers {known}, but the "
            f"compiled graph {found}, which is not one of them: the file belongs to another "
            "model, or the model was compiled from another root module (compile the module "
            "the file was calibrated on); calibrate this model with `lynx-compile calibrate`"
        )
    table = layer_choices(cal, batch)
    return policy_options(cal, batch) if table is None else table[layer]


def describe(cal: dict, batch: int | None = None) -> dict:
    """What report() shows of a calibration in use (its choice for `batch`, or overall, and
    the per-layer choices where the file has them)."""
    return {
        "name": cal["name"],
        "model": dict(cal["model"]),
        "choice": policy_options(cal, batch),
        "choice_by_layer": layer_choices(cal, batch),
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
