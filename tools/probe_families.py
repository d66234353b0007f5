"""Probe transformers MoE families that tools/hf_tiny.py does not build: what lynx does to each.

    python -m lynx_compile.tools.probe_families [--families F ...] [--out docs/results/probe]

For each family: a tiny config (the config class's defaults with toy sizes set on the
fields it has: hidden size 32, 16 experts, top-4, expert width 24, 4 groups / top-2 where
it has groups), its sparse-MoE block class found by name in the modeling module, random
seeded weights. Then backend="lynx" passes are applied to the block's Dynamo graph with no
Inductor (fast; the passes' own numerical checks still run) and, per family:
  router   the report's status and pattern per router site;
  dispatch the report's status (fused into lynx::experts or kept, with the reason);
  exact    max |lynx exact - eager| / max |eager| at a decode batch of 13 tokens;
  default  the default policy's output is finite and its routing touches <= the experts
           exact touches (from the report's telemetry).
Families that do not build from a generic config are listed with the error. The table is
what docs/support-table.md's probe rows say; CI does not run this (the families exist in
transformers 5.24 only, at toy sizes found here, not in the matrix's tools/hf_tiny.py).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
from pathlib import Path

import torch

# The families the support table lists as probed (transformers 5.24 module names).
PROBE_FAMILIES = (
    "afmoe", "inkling2", "laguna", "hy_v3", "minimax_m2", "muse_spark", "flint", "axk1",
    "axk2", "bailing_hybrid", "beam", "deepseek_v32", "glm4_moe_lite", "glm4v_moe",
    "glm_moe_dsa", "hy_v4", "kimi_linear", "mimo_v2_flash", "nemotron_h", "solar_open",
    "mistral4", "mistral_large4", "ernie4_5_vl_moe", "cohere2_moe", "granitemoe_swa",
    "kolibri1", "lara_mini", "mellum", "qwen3_5_moe", "qwen3_omni_moe", "qwen3_vl_moe",
    "qwen4_exp", "deepseek_ocr2", "unlimited_ocr", "inkling", "doge",
)  # fmt: skip

# Toy sizes, set on whichever of these fields a config has.
TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    expert_intermediate_size=24,
    moe_hidden_size=24,
    shared_expert_intermediate_size=24,
    num_experts=16,
    num_local_experts=16,
    n_routed_experts=16,
    moe_num_experts=16,
    num_experts_per_tok=4,
    moe_k=4,
    moe_topk=4,
    n_group=4,
    topk_group=2,
    num_expert_group=4,
    n_shared_experts=1,
    num_shared_experts=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_hidden_layers=2,
    vocab_size=128,
)
DECODE_TOKENS = 13
_BLOCK_NAME = re.compile(r"(Sparse)?Mo[Ee](Block|Layer|Mlp|MLP)?$")


def _config_class(module: str):
    """The text config class of a family (multimodal families: the one named *Text*)."""
    from transformers import PretrainedConfig

    cfg_mod = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    classes = [
        c
        for _, c in inspect.getmembers(cfg_mod, inspect.isclass)
        if issubclass(c, PretrainedConfig) and c.__module__ == cfg_mod.__name__
    ]
    text = [c for c in classes if "Text" in c.__name__]
    if not classes:
        raise LookupError("no config class")
    return (text or classes)[0]


def _block_classes(module: str) -> list[type]:
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    found = [
        c
        for name, c in inspect.getmembers(mod, inspect.isclass)
        if issubclass(c, torch.nn.Module) and c.__module__ == mod.__name__
        if _BLOCK_NAME.search(name) and "Experts" not in name
    ]
    if not found:
        raise LookupError("no sparse-MoE block class (named *MoE, *SparseMoeBlock, ...)")
    return sorted(found, key=lambda c: c.__name__.endswith(("Mlp", "MLP")))  # MLPs last


def tiny_config(module: str):
    config = _config_class(module)()
    for key, value in TINY.items():
        if hasattr(config, key):
            current = getattr(config, key)
            if isinstance(current, (list, tuple)):  # one size per modality (Ernie 4.5 VL)
                value = type(current)([value] * len(current))
            setattr(config, key, value)
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "grouped_mm"
    return config


def build(module: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random sparse-MoE block of the family (eval, fp32). Raises on failure."""
    from lynx_compile.tools.hf_tiny import _randomize

    config = tiny_config(module)
    errors = []
    for cls in _block_classes(module):
        for kwargs in ({}, {"layer_idx": 1}):
            try:
                block = cls(config, **kwargs).eval()
            except Exception as exc:  # noqa: BLE001  (report why, try the next form)
                errors.append(f"{cls.__name__}: {type(exc).__name__}: {exc}"[:160])
                continue
            _randomize(block, seed)
            return block
    raise RuntimeError("; ".join(errors))


def _passes_only(options: dict):
    """A torch.compile backend: the lynx passes on the Dynamo graph, no Inductor."""
    from lynx_compile.backend import apply_lynx_passes
    from lynx_compile.config import parse_options

    def backend(gm, example_inputs):
        return apply_lynx_passes(gm, example_inputs, parse_options(options)).forward

    return backend


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def probe(module: str) -> dict:
    """One family's row."""
    import lynx_compile
    from lynx_compile import capture

    row: dict = {"family": module}
    try:
        block = build(module)
    except Exception as exc:  # noqa: BLE001
        return {**row, "built": False, "error": str(exc)[:300]}
    row["built"] = True
    row["block"] = type(block).__name__
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(DECODE_TOKENS, 1, TINY["hidden_size"], generator=gen)
    try:
        want = _first(block(x))
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"eager forward failed: {type(exc).__name__}: {exc}"[:300]}
    for name, options in (("exact", {"policy": "exact"}), ("default", {"telemetry": True})):
        torch._dynamo.reset()
        lynx_compile.clear_report()
        model = torch.compile(block, backend=_passes_only(options), dynamic=True)
        try:
            with capture.lynx_capture():
                got = _first(model(x))
        except Exception as exc:  # noqa: BLE001
            row[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            continue
        sites = lynx_compile.report()["sites"]
        routers = [s for s in sites if s.get("kind", "router") == "router"]
        dispatches = [s for s in sites if s.get("kind") == "dispatch"]
        if name == "exact":
            scale = want.abs().max().clamp(min=1e-30)
            row["exact_rel_err"] = float((got - want).abs().max() / scale)
            row["router"] = sorted({f"{s['status']}: {s['reason']}" for s in routers})
            row["dispatch"] = sorted({f"{s['status']}: {s.get('reason', '')}" for s in dispatches})
        else:
            row["default_finite"] = bool(torch.isfinite(got).all())
            tel = [s["telemetry"] for s in routers if s.get("telemetry")]
            row["experts_exact_to_default"] = [
                (t["mean_experts_exact"], t["mean_experts_chosen"]) for t in tel
            ]
    return row


def _markdown(rows: list[dict], seconds: float) -> str:
    import transformers

    lines = [
        "# Family probe (python -m lynx_compile.tools.probe_families)",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; "
        f"{DECODE_TOKENS} decode tokens; lynx passes without Inductor; {seconds:.0f} s.",
        "",
        "| family | block | router | dispatch | exact rel. err | default finite |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if not r.get("built"):
            lines.append(f"| {r['family']} | not built: {r['error'][:120]} | | | | |")
            continue
        if "router" not in r:
            err = r.get("error") or r.get("exact", "")
            lines.append(f"| {r['family']} | {r['block']} | {err[:120]} | | | |")
            continue
        err = f"{r['exact_rel_err']:.1e}"
        lines.append(
            f"| {r['family']} | {r['block']} | {'; '.join(r['router']) or 'no site'} | "
            f"{'; '.join(r['dispatch']) or 'no site'} | {err} | {r.get('default_finite')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(PROBE_FAMILIES))
    parser.add_argument("--out", type=Path, default=None, help="write probe.json and probe.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for family in args.families:
        t0 = time.perf_counter()
        rows.append(probe(family))
        print(f"{family}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = _markdown(rows, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "probe.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
