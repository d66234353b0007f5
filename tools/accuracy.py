"""`lynx-compile accuracy`: next-byte accuracy against experts touched, for every routing policy.

Held-out stdlib sources (the files TinyMoE never trained on) are decoded step by step,
teacher-forced, as a server decodes: B sequences per batch, a short prompt prefilled
first, then one token per sequence per step through the KV cache. Every decode step runs
through torch.compile(model, backend="lynx", options={"policy": ..., "telemetry": True}),
so the routing under test is the backend's own. For each (policy, batch) row:

  acc            next-byte top-1 accuracy over the decode steps, %
  acc_exact      the same for the exact policy at that batch
  acc_change_se  standard error of acc - acc_exact, paired over the same tokens
  nll            mean next-byte negative log-likelihood, nats
  experts_ratio  distinct experts per layer per decode step under the policy, over the
                 model's own top-k on the same router logits (the backend's telemetry)

Writes OUT/accuracy.json and OUT/accuracy.png (accuracy change against experts_ratio).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lynx_compile.lowering.constants import default_k0
from lynx_compile.tools import calibrate
from lynx_compile.tools.tiny_moe import (
    DEFAULT_CHECKPOINT,
    E8K2_CHECKPOINT,
    NOLB_CHECKPOINT,
    TinyMoE,
    add_checkpoint_argument,
    load_model,
)
from lynx_compile.tools.train import load_bytes, split_files

import lynx_compile
from lynx_compile import config as lynx_config
from lynx_compile._extras import require

# Checked before any work: the run ends with a plot.
require("matplotlib", "bench", "lynx-compile accuracy")
require("safetensors", "bench", "lynx-compile accuracy")


@dataclass(frozen=True)
class PolicySpec:
    """One routing policy to measure: its name and the backend options that set it."""

    name: str
    params: dict = field(default_factory=dict)
    calibration: str | None = None  # a calibration file: the row is its calibrated choice
    calibration_batch: int | None = None  # ... for this decode batch (None: for every batch)
    per_layer: bool = False  # ... its per-layer choice (else its one policy for every layer)

    @staticmethod
    def parse(text: str) -> PolicySpec:
        """A spec as calibrate.parse_policy reads it: 'exact' | 'affinity:ALPHA:BETA[:K0]' |
        'oea:K0' | 'static:BUDGET[:K0]'."""
        return PolicySpec.from_options(calibrate.policy_options(calibrate.parse_policy(text)))

    @staticmethod
    def from_options(options: dict) -> PolicySpec:
        """The spec of backend options {policy, alpha, beta, k0, budget} (a calibration's
        choice): only the parameters its policy uses."""
        used = {"exact": (), "affinity": ("alpha", "beta", "k0"), "oea": ("k0",)}
        keys = used.get(options["policy"], ("budget", "k0"))
        return PolicySpec(options["policy"], {k: options[k] for k in keys})

    def options(self) -> dict:
        """The backend options that set this policy."""
        if self.calibration is not None:
            cal = json.loads(Path(self.calibration).read_text())
            if not self.per_layer:  # the file's one policy (per batch) at every router
                for key in ("choice_by_layer", "choice_by_layer_by_batch"):
                    cal.pop(key, None)
            cal.setdefault("name", self.calibration)
            return {"calibration": cal, "calibration_batch": self.calibration_batch}
        return {"policy": self.name, **self.params}

    def label(self) -> str:
        """Short text for tables and plots, e.g. 'affinity a=3 b=2'."""
        short = {"alpha": "a", "beta": "b", "k0": "k0", "budget": "m"}
        text = " ".join([self.name] + [f"{short[k]}={_fmt(v)}" for k, v in self.params.items()])
        if self.calibration is None:
            return text
        where = "/layer" if self.per_layer else ""
        return f"cal{where}{'' if self.calibration_batch is None else '@B'}: {text}"

    def is_default(self) -> bool:
        """Whether these are the backend's default policy and parameters."""
        if self.name != lynx_config.DEFAULT_POLICY or self.calibration is not None:
            return False
        defaults = {
            "alpha": lynx_config.DEFAULT_ALPHA,
            "beta": lynx_config.DEFAULT_BETA,
            "k0": default_k0(self.name),
            "budget": lynx_config.LynxConfig().budget,
        }
        return all(defaults[k] == v for k, v in self.params.items())


PER_LAYER = "per-layer"  # the policy name of a per-layer calibration's rows


def _fmt(value) -> str:
    return "none" if value is None else f"{value:g}"


# The alpha x beta grid spans the paper's per-family settings ((0.7, 1) .. (3, 2)), each
# token's top-1 protected (k0 = 1) and not (k0 = 0), and narrower bins (alpha 6, 12).
FULL_POLICIES = [
    "exact",
    "affinity:3:2:0",
    "affinity:3:2:1",
    "affinity:1:1:0",
    "affinity:1:1:1",
    "affinity:0.7:1:1",
    "affinity:0.5:1:1",
    "affinity:1:2:1",
    "affinity:2:1:1",
    "affinity:3:1:1",
    "affinity:6:1:1",
    "affinity:12:1:1",
    "oea:1",
    "oea:2",
]
QUICK_POLICIES = ["exact", "affinity:3:2", "affinity:1:1"]

# The model set: the embedded checkpoint and its two variants (docs/results/accuracy.md).
VARIANTS = {
    "tiny_moe": DEFAULT_CHECKPOINT,  # 32 experts, top-4, load-balancing loss
    "tiny_moe_nolb": NOLB_CHECKPOINT,  # the same without the load-balancing loss
    "tiny_moe_e8k2": E8K2_CHECKPOINT,  # 8 experts, top-2 (Mixtral-like)
}


def heldout_sequences(count: int, length: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` bytes from the held-out files: int64 [count, length].

    Windows are drawn with a fixed seed, so every policy and batch sees the same text.
    """
    data = load_bytes(split_files("heldout"))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length, (count,), generator=gen).tolist()
    return torch.stack([data[s : s + length] for s in starts]).long()


def _decode_site_totals() -> dict[int, tuple[float, float, int]]:
    """Per decode router site: (sum of exact distinct experts, sum chosen, calls) so far."""
    totals = {}
    for site in lynx_compile.report()["sites"]:
        tel = site.get("telemetry")
        if site.get("kind") != "router" or not site.get("decode") or not tel:
            continue
        calls = tel["calls"]
        totals[site["site"]] = (
            tel["mean_experts_exact"] * calls,
            tel["mean_experts_chosen"] * calls,
            calls,
        )
    return totals


@torch.no_grad()
def evaluate(
    model: TinyMoE, compiled, sequences: torch.Tensor, batch: int, prompt_len: int
) -> dict:
    """Teacher-forced decode of `sequences` [S, T] in batches of `batch`: accuracy and NLL.

    The prompt (first prompt_len bytes) is prefilled eagerly (prefill routing is exact under
    every policy); then each step feeds byte t of every sequence through `compiled` and
    scores its prediction of byte t+1.
    """
    if sequences.shape[0] % batch:
        raise ValueError(
            f"{sequences.shape[0]} sequences do not split into batches of {batch}; "
            "pass --sequences as a multiple of every --batch"
        )
    length = sequences.shape[1]
    hits = []  # per step: bool [B], whether the top-1 prediction was right
    nll = 0.0
    before = _decode_site_totals()
    for chunk in sequences.split(batch):
        cache = model.new_cache(batch, max_len=length)
        if batch > 1:  # one compiled graph serves every batch size (1 is specialised)
            for tensor in (t for kv in cache for t in kv):
                torch._dynamo.mark_dynamic(tensor, 0)
        model(chunk[:, :prompt_len], cache, torch.tensor(0))
        for t in range(prompt_len, length - 1):
            step = chunk[:, t : t + 1]
            if batch > 1:
                torch._dynamo.mark_dynamic(step, 0)
            logits = compiled(step, cache, torch.tensor(t))[:, 0].float()  # [B, vocab]
            target = chunk[:, t + 1]
            hits.append(logits.argmax(-1) == target)
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
    after = _decode_site_totals()
    exact = sum(after[s][0] - before.get(s, (0, 0, 0))[0] for s in after)
    chosen = sum(after[s][1] - before.get(s, (0, 0, 0))[1] for s in after)
    calls = sum(after[s][2] - before.get(s, (0, 0, 0))[2] for s in after)
    if calls == 0:
        raise RuntimeError(
            "the lynx backend recorded no decode router telemetry: its router pass did not "
            "rewrite TinyMoE's decode graph; inspect it with `lynx-compile dump`"
        )
    hit = torch.cat(hits)
    return {
        "acc": 100.0 * hit.float().mean().item(),
        "nll": nll / hit.numel(),
        "experts_exact": exact / calls,
        "experts_chosen": chosen / calls,
        "experts_ratio": chosen / exact,
        "hits": hit,
    }


def paired_change_se(hit: torch.Tensor, hit_exact: torch.Tensor) -> float:
    """Standard error (points) of acc - acc_exact measured on the same tokens: bool [n] each.

    Only tokens whose correctness differs between the two runs move the difference, so the
    paired error is far below the error of either accuracy alone.
    """
    n = hit.numel()
    diff = hit.float() - hit_exact.float()  # per token: -1, 0 or +1
    return 100.0 * (diff.var(unbiased=True).item() / n) ** 0.5 if n > 1 else 0.0


def run_accuracy(
    checkpoint: Path,
    policies: list[PolicySpec],
    batches: list[int],
    sequences: int,
    prompt_len: int,
    steps: int,
    seed: int = 0,
    log=print,
) -> list[dict]:
    """Every (policy, batch) row; the exact policy is measured first as the reference."""
    model = load_model(checkpoint)
    seqs = heldout_sequences(sequences, prompt_len + steps + 1, seed)
    specs = sorted(policies, key=lambda p: p != PolicySpec("exact"))
    if specs[0] != PolicySpec("exact"):
        specs.insert(0, PolicySpec("exact"))
    rows, exact_hits = [], {}
    for spec in specs:
        torch._dynamo.reset()  # a fresh cache per policy: the options differ, the code not
        lynx_compile.clear_report()
        options = {**spec.options(), "telemetry": True}
        compiled = torch.compile(model, backend="lynx", options=options)
        for batch in batches:
            if spec.calibration_batch not in (None, batch):
                continue  # a choice calibrated for another batch size
            start = time.perf_counter()
            result = evaluate(model, compiled, seqs, batch, prompt_len)
            if spec.name == "exact":
                exact_hits[batch] = result["hits"]
            hit, hit_exact = result["hits"], exact_hits[batch]
            row = {
                "policy": spec.name,
                "params": spec.params,
                "calibration": spec.calibration,
                "calibration_batch": spec.calibration_batch,
                "per_layer": spec.per_layer,
                "batch": batch,
                "acc": result["acc"],
                "acc_exact": 100.0 * hit_exact.float().mean().item(),
                "acc_change_se": paired_change_se(hit, hit_exact),
                "tokens_changed": int((hit != hit_exact).sum()),
                "nll": result["nll"],
                "experts_ratio": result["experts_ratio"],
                "experts_chosen": result["experts_chosen"],
                "experts_exact": result["experts_exact"],
                "tokens": hit.numel(),
                "is_default": spec.is_default(),
                "seconds": time.perf_counter() - start,
            }
            if spec.per_layer:
                cal = spec.options()["calibration"]
                row["choice_by_layer"] = layer_labels(cal, spec.calibration_batch)
            rows.append(row)
            log(format_row(row))
    return rows


def layer_labels(cal: dict, batch: int | None) -> dict[str, str]:
    """A per-layer calibration's choice per router module path, as short labels."""
    table = cal["choice_by_layer"]
    if batch is not None and str(batch) in (cal.get("choice_by_layer_by_batch") or {}):
        table = cal["choice_by_layer_by_batch"][str(batch)]
    return {k: calibrate.policy_label(calibrate.policy_of(v)) for k, v in table.items()}


TABLE_HEADER = (
    f"{'policy':<22} {'batch':>5} {'acc %':>7} {'change':>7} {'+-se':>5} {'nll':>7} "
    f"{'experts':>8} {'ratio':>6} {'s':>5}"
)


def format_row(row: dict) -> str:
    """One table line: policy, batch, accuracy, change vs exact (and its paired standard
    error), NLL, distinct experts per layer per step, their ratio to exact, seconds."""
    spec = PolicySpec(
        row["policy"],
        row["params"],
        row.get("calibration"),
        row.get("calibration_batch"),
        row.get("per_layer", False),
    )
    label = spec.label() + (" *" if row["is_default"] else "")
    return (
        f"{label:<22} {row['batch']:>5} {row['acc']:>7.2f} {row['acc'] - row['acc_exact']:>+7.2f} "
        f"{row['acc_change_se']:>5.2f} "
        f"{row['nll']:>7.4f} {row['experts_chosen']:>8.2f} {row['experts_ratio']:>6.3f} "
        f"{row['seconds']:>5.0f}"
    )


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy change (points) against experts_ratio, one colour per policy family."""
    matplotlib = require("matplotlib", "bench", "lynx-compile accuracy")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench", "lynx-compile accuracy")

    colours = {
        "exact": "black",
        "affinity": "tab:blue",
        "oea": "tab:orange",
        "static": "tab:green",
        PER_LAYER: "tab:purple",
    }
    markers = ["o", "s", "^", "D", "v", "P"]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row in rows:
        marker = markers[batches.index(row["batch"]) % len(markers)]
        drop = row["acc"] - row["acc_exact"]
        ax.scatter(
            row["experts_ratio"],
            drop,
            c=colours[row["policy"]],
            marker=marker,
            s=90 if row["is_default"] else 40,
            edgecolors="red" if row["is_default"] else "none",
        )
        if row["policy"] not in ("exact", PER_LAYER):
            short = PolicySpec(row["policy"], row["params"]).label().split(" ", 1)[1]
            ax.annotate(short, (row["experts_ratio"], drop), fontsize=6, alpha=0.7)
    for name, colour in colours.items():
        ax.scatter([], [], c=colour, label=name)
    for i, b in enumerate(batches):
        ax.scatter([], [], c="grey", marker=markers[i % len(markers)], label=f"batch {b}")
    ax.axhline(-1.0, color="red", linestyle=":", linewidth=1, label="-1 point")
    ax.axvline(0.70, color="grey", linestyle=":", linewidth=1, label="0.70x experts")
    ax.set_xlabel("distinct experts per layer per decode step, relative to exact")
    ax.set_ylabel("next-byte accuracy change vs exact (points)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lynx-compile accuracy`."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer policies ({', '.join(QUICK_POLICIES)}) and sequences: a few minutes on CPU",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[8, 16], help="decode batch sizes (default 8 16)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("accuracy_results"), help="output directory"
    )
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS) + ["all"],
        default=None,
        help="committed checkpoints to measure instead of --checkpoint, each into "
        "OUT/<variant>/ ('all': the three)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also calibrate each checkpoint (`lynx-compile calibrate` on its default "
        "prompts, never the held-out windows) and measure the calibrated choice",
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="with --calibrate: calibrate per layer too and measure the per-layer choices",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=None,
        help="policy specs (exact, affinity:A:B, oea:K0, static:M); default: the full grid, "
        "or the quick set with --quick",
    )
    parser.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="held-out sequences per (policy, batch); a multiple of every batch "
        "(default 48, 16 with --quick)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="decode steps per sequence (default 128, 48 with --quick)",
    )
    parser.add_argument("--prompt-len", type=int, default=16, help="prefilled bytes per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed choosing held-out windows")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)",
    )


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write accuracy.json and accuracy.png per checkpoint."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.policies or (QUICK_POLICIES if args.quick else FULL_POLICIES)
    policies = [PolicySpec.parse(text) for text in names]
    sequences = args.sequences or (16 if args.quick else 48)
    steps = args.steps or (48 if args.quick else 128)
    if args.variants:
        chosen = sorted(VARIANTS) if "all" in args.variants else args.variants
        runs = [(VARIANTS[v], args.out / v) for v in chosen]
    else:
        runs = [(args.checkpoint, args.out)]
    for checkpoint, out in runs:
        measure_checkpoint(args, checkpoint, out, policies, sequences, steps)
    return 0


def measure_checkpoint(args, checkpoint: Path, out: Path, policies, sequences, steps) -> None:
    """One checkpoint's table (and calibration with --calibrate): out/accuracy.json, .png."""
    print(f"checkpoint {checkpoint}; {sequences} held-out sequences x {steps} decode steps")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    meta = {}
    if args.calibrate:
        model = load_model(checkpoint)
        per_layer = getattr(args, "per_layer", False)
        cal = calibrate.calibrate(
            model, batches=tuple(args.batch), name=checkpoint.name, per_layer=per_layer
        )
        cal_path = out / "calibration.json"
        calibrate.save(cal, cal_path)
        print(calibrate.format_table(cal))
        overall = PolicySpec.from_options(cal["choice"])
        policies = [*policies, PolicySpec(overall.name, overall.params, str(cal_path))]
        for batch in args.batch:  # the choice for each decode batch size
            one = PolicySpec.from_options(cal["choice_by_batch"][str(batch)])
            policies.append(PolicySpec(one.name, one.params, str(cal_path), batch))
        if per_layer:  # the per-layer choices, for every batch and for each
            for batch in (None, *args.batch):
                policies.append(PolicySpec(PER_LAYER, {}, str(cal_path), batch, True))
        meta["calibration"] = {"path": str(cal_path), "seconds": cal["seconds"]}
    print(TABLE_HEADER)
    rows = run_accuracy(
        checkpoint, policies, args.batch, sequences, args.prompt_len, steps, args.seed
    )
    meta = {
        "checkpoint": str(checkpoint),
        "sequences": sequences,
        "decode_steps": steps,
        "prompt_len": args.prompt_len,
        "seed": args.seed,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
        **meta,
    }
    (out / "accuracy.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    title = (
        f"{checkpoint.name}: {sequences} held-out seqs x {steps} decode steps "
        f"(* / red edge = backend default)"
    )
    plot(rows, out / "accuracy.png", title)
    print(f"wrote {out / 'accuracy.json'} and {out / 'accuracy.png'}")
