"""`lynx-compile dump TARGET --out DIR`: see what the lynx pass did to each graph, and why.

TARGET is `tiny` (the embedded TinyMoE of lynx_compile.tools.tiny_moe; a built-in small
MoE when its checkpoint or safetensors is missing), `hf:<family>` (a tiny random
transformers MoE block, see lynx_compile.tools.hf_tiny.FAMILIES) or `file.py:factory`
(a function returning (model, example_inputs)). The model runs once under torch.compile
with a backend that applies exactly the lynx passes and then runs the graph eagerly
(Inductor's codegen changes nothing the dump shows and costs minutes on CPU).

Everything is written to a hidden sibling folder first and renamed to DIR at the end, so
a failed run never leaves a DIR that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from lynx_compile import graph_dump
from lynx_compile._extras import MissingExtraError, require
from lynx_compile.backend import apply_lynx_passes
from lynx_compile.config import parse_options
from lynx_compile.export import ExportError, describe_error
from lynx_compile.lowering.reference import POLICIES
from lynx_compile.passes import report as report_mod

EXIT_BAD_INPUT = 2


class DumpError(Exception):
    """A problem with the user's input (target, model, output folder): one line, exit 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lynx-compile dump`."""
    parser.add_argument(
        "target",
        help="tiny | hf:<family> (e.g. hf:mixtral) | path/to/file.py:factory, where factory() "
        "returns (model, example_inputs)",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write the dump to")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (tiny, hf)")
    parser.add_argument(
        "--seq",
        type=int,
        default=1,
        help="tokens per sequence (tiny, hf); 1 is a decode step, where approximate policies apply",
    )
    parser.add_argument(
        "--policy", choices=POLICIES, default=None, help="routing policy (default: the backend's)"
    )
    parser.add_argument(
        "--experts-impl",
        default="grouped_mm",
        help="transformers experts_implementation for hf targets (eager splits the block "
        "into several graphs; ONNX export needs batched_mm)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx (lynx ops as standard ONNX ops), inputs.npz, expected.npz",
    )


def _builtin_tiny(batch: int, seq: int):
    """A seeded DenseMoE (16 experts, top-2, d=32) and x [batch, seq, 32]."""
    from lynx_compile.examples.moe_modules import DenseMoE

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DenseMoE(dim=32, hidden=48, num_experts=16, top_k=2).eval()
        x = torch.randn(batch, seq, 32)
    return model, (x,)


def _tiny(batch: int, seq: int):
    """The embedded trained model with byte ids [batch, seq] when its checkpoint is
    installed, else the built-in small MoE (with a note on stderr)."""
    from lynx_compile.tools import tiny_moe

    try:
        model = tiny_moe.load_default_model().eval()
    except (FileNotFoundError, MissingExtraError) as err:
        print(f"lynx-compile dump: note: {err}; `tiny` uses the built-in DenseMoE", file=sys.stderr)
        return _builtin_tiny(batch, seq)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _hf(family: str, batch: int, seq: int, impl: str):
    """A tiny random transformers MoE block of `family` and hidden states [batch, seq, d]."""
    require("transformers", "dump", f"lynx-compile dump hf:{family}")
    from lynx_compile.tools import hf_tiny

    try:
        model = hf_tiny.build_block(family, impl)
        hidden = hf_tiny.tiny_config(family, impl).hidden_size
    except (ValueError, ImportError, AttributeError) as err:
        raise DumpError(f"target hf:{family}: {err}") from err
    x = torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(0))
    return model, (x,)


def _factory(target: str):
    """Call `factory()` from `file.py:factory`; returns (model, example_inputs tuple)."""
    file_name, _, func_name = target.rpartition(":")
    path = Path(file_name)
    if not path.is_file():
        raise DumpError(f"target {target!r}: no such file {file_name!r}")
    spec = importlib.util.spec_from_file_location(f"_lynx_dump_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise DumpError(
            f"target {target!r}: importing {file_name} failed: {describe_error(err)}"
        ) from err
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise DumpError(f"target {target!r}: {file_name} has no function {func_name!r}")
    try:
        result = factory()
    except Exception as err:
        raise DumpError(f"target {target!r}: the factory raised {describe_error(err)}") from err
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and callable(result[0])):
        raise DumpError(
            f"target {target!r}: the factory must return (model, example_inputs), "
            f"got {type(result).__name__}"
        )
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return model, inputs


def load_target(target: str, batch: int, seq: int, impl: str = "grouped_mm"):
    """(model, example_inputs) for a dump TARGET string; DumpError when it names nothing."""
    if batch < 1 or seq < 1:
        raise DumpError(f"--batch and --seq must be >= 1, got {batch} and {seq}")
    if target == "tiny":
        return _tiny(batch, seq)
    if target.startswith("hf:"):
        return _hf(target[3:], batch, seq, impl)
    if ".py:" in target:
        return _factory(target)
    raise DumpError(
        f"unknown target {target!r}: expected tiny, hf:<family> (e.g. hf:mixtral) or "
        "path/to/file.py:factory"
    )


def _staging_dir(out: Path) -> Path:
    """A fresh hidden folder next to `out` to write into; checks `out` may be replaced."""
    if out.exists() and not out.is_dir():
        raise DumpError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise DumpError(
            f"--out {out} is a non-empty folder without a lynx dump in it; "
            "choose a new or empty folder (a previous dump there is replaced)"
        )
    parent = out.absolute().parent
    for ancestor in out.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise DumpError(f"cannot write --out {out}: {ancestor} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        return staging
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise DumpError(f"cannot write --out {out}: {err.strerror or err}{where}") from err


def _publish(staging: Path, out: Path) -> None:
    """Move the finished dump to `out`, replacing a previous dump there."""
    old = None
    if out.exists():
        old = staging.with_name(staging.name.replace(".partial-", ".old-"))
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _run_compiled(model, inputs, options: dict, staging: Path):
    """Run `model(*inputs)` under torch.compile with the lynx passes, dumping every graph;
    returns (compiled outputs, eager outputs) as flat lists."""
    config = parse_options(options)

    def lynx_pass_only(gm, example_inputs):
        return apply_lynx_passes(gm, example_inputs, config).forward

    torch._dynamo.reset()
    report_mod.clear_report()
    try:
        with graph_dump.dump_to(staging), torch.no_grad():
            compiled = pytree.tree_leaves(torch.compile(model, backend=lynx_pass_only)(*inputs))
            eager = pytree.tree_leaves(model(*inputs))
    except Exception as err:
        raise DumpError(
            f"running the model under torch.compile failed: {describe_error(err)}"
        ) from err
    finally:
        torch._dynamo.reset()
    return compiled, eager


def _max_diff(a: list, b: list) -> float:
    diffs = [
        (x.double() - y.double()).abs().max().item()
        for x, y in zip(a, b, strict=True)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()
    ]
    return max(diffs, default=0.0)


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx(model, inputs, options: dict, staging: Path) -> dict:
    from lynx_compile.onnx_export import onnxruntime_error, to_onnx

    try:
        # The exporter warns about optional packages (torchvision) and deprecations that
        # say nothing about this model; its real failures arrive as exceptions.
        with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            written = to_onnx(model, inputs, staging / "model.onnx", options)
    except ExportError as err:
        raise DumpError(f"--onnx: {err}") from err
    info = {"inputs": written.input_names, "outputs": written.output_names}
    if importlib.util.find_spec("onnxruntime") is not None:
        info["onnxruntime_max_rel_error"] = onnxruntime_error(written)
    return info


def _print_summary(target: str, report: dict, out: Path) -> None:
    sites = report["sites"]
    rewritten = sum(s["status"] == "rewritten" for s in sites)
    print(
        f"lynx-compile dump {target}: {len(report['graphs'])} graph(s), {len(sites)} candidate "
        f"site(s), {rewritten} rewritten, {len(sites) - rewritten} skipped"
    )
    rows = [("graph", "site", "kind", "node", "status", "E", "k", "policy", "why")]
    rows += [
        tuple(
            str(v if v is not None else "-")
            for v in (
                s.get("graph"),
                s["site"],
                s["kind"],
                s.get("node"),
                s["status"],
                s["num_experts"],
                s["top_k"],
                s.get("policy"),
                s["reason"],
            )
        )
        for s in sites
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    print(f"max |lynx - eager| over outputs: {report['max_abs_diff_vs_eager']:.3g}")
    if "onnx" in report:
        err = report["onnx"].get("onnxruntime_max_rel_error")
        note = f"onnxruntime vs PyTorch max rel error {err:.3g}" if err is not None else ""
        print(f"onnx: {out / 'model.onnx'} {note}".rstrip())
    print(f"wrote {out} (before*.py, after*.py, region*.dot, report.json, report.txt)")


def dump(target: str, out: Path, batch=8, seq=1, policy=None, onnx=False, impl="grouped_mm"):
    """Write the dump of `target` to `out`; returns the report dict. DumpError on bad input."""
    options = {} if policy is None else {"policy": policy}
    staging = _staging_dir(out)  # first: a bad --out fails before any model is built
    try:
        model, inputs = load_target(target, batch, seq, impl)
        if isinstance(model, torch.nn.Module):
            model.eval()
        compiled, eager = _run_compiled(model, inputs, options, staging)
        report = graph_dump.write_report(staging)
        if not report["sites"]:
            raise DumpError(
                f"target {target!r} has no MoE router: none of its {len(report['graphs'])} "
                "graph(s) has a top-k over router scores, so lynx has nothing to rewrite"
            )
        extra = {
            "target": target,
            "policy": parse_options(options).policy,
            "batch": batch,
            "seq": seq,
            "max_abs_diff_vs_eager": _max_diff(compiled, eager),
        }
        if onnx:
            extra["onnx"] = _onnx(model, inputs, options, staging)
        report = graph_dump.write_report(staging, extra)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def run(args: argparse.Namespace) -> int:
    """`lynx-compile dump`: exit 0 on success, 2 with a one-line error on bad input."""
    try:
        report = dump(
            args.target, args.out, args.batch, args.seq, args.policy, args.onnx, args.experts_impl
        )
    except DumpError as err:
        print(f"lynx-compile dump: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print_summary(args.target, report, args.out)
    return 0
