"""`lynx-compile calibrate`: the cheapest routing policy within a distortion budget, per model.

No labels: the model decodes calibration prompts (teacher-forced, B sequences per decode
step, as the accuracy harness and a server decode) once with exact routing and once per
candidate policy, and each candidate is scored at each decode batch size by

  kl             mean KL(exact || policy) of the next-token distributions, nats
  flip           share of decode tokens whose most likely next token changes
  experts_ratio  distinct experts per layer per decode step, over exact routing's

A candidate fits the budget when kl and flip stay within it at every batch size; the
choice is the fitting candidate with the lowest mean experts_ratio (exact when none fits).
The choice is written as a small JSON file that the backend takes through
options={"calibration": path}; lynx_compile.report() then names it.

One compiled model serves every candidate: it is compiled once with telemetry on, so its
decode routers are opaque lynx::route_recorded calls, and each measurement routes them
with the candidate (lowering.ops.decode_policy_override). The routing is the reference's,
which every kernel matches.

The model needs TinyMoE's decode interface: new_cache(batch, max_len) and
model(tokens [B, T], cache, start). Prompts: a text file (.txt: its bytes) or JSONL (one
string, or an object with "text", per line) for byte-level models, or token ids (.json: a
list of lists of ints); the embedded model's default set is drawn from its training split
(the accuracy harness's held-out files are never read).

    lynx-compile calibrate --out tiny_moe.calibration.json
    python -m lynx_compile.tools.calibrate --checkpoint ckpt.safetensors --out cal.json
    cal = calibrate.calibrate(model, batches=(8, 16)); calibrate.save(cal, path)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lynx_compile.lowering import ops
from lynx_compile.lowering.reference import RoutingPolicy
from lynx_compile.tools.tiny_moe import add_checkpoint_argument, load_model
from lynx_compile.tools.train import load_bytes, split_files

import lynx_compile
from lynx_compile import calibration
from lynx_compile._extras import require


@dataclass(frozen=True)
class Budget:
    """The distortion a calibrated policy may add at every decode batch size.

    The KL default comes from the accuracy harness on the three TinyMoE variants
    (docs/results/accuracy.md, issue 18): the grid points within 0.045 nats on the default
    prompts lost at most 1.01 points of held-out accuracy (se ~0.35), those above it up to
    6. The flip share is recorded but not budgeted by default: it counts changes between
    near-equal predictions that cost no accuracy (6% at the backend default).
    """

    kl: float = 0.045  # mean KL(exact || policy) of next-token distributions, nats
    flip: float = 1.0  # share of decode tokens whose top-1 next token changes (1: any)


# Candidates, cheapest-looking first; exact is always the fallback. Specs as the accuracy
# harness writes them: affinity:ALPHA:BETA:K0, oea:K0, static:BUDGET:K0.
DEFAULT_CANDIDATES = (
    "affinity:3:2:1",
    "affinity:3:1:1",
    "affinity:2:1:1",
    "affinity:1:1:1",
    "affinity:1:1:2",
    "affinity:6:1:1",
    "affinity:12:1:1",
    "oea:1",
    "oea:2",
)


def parse_policy(text: str) -> RoutingPolicy:
    """A policy spec: 'exact' | 'affinity:ALPHA:BETA[:K0]' (BETA may be 'none') | 'oea:K0' |
    'static:BUDGET[:K0]'; a K0 left out is the policy's default (constants.default_k0)."""
    name, *values = text.split(":")
    try:
        if name == "exact" and not values:
            return RoutingPolicy("exact")
        if name == "affinity" and len(values) in (2, 3):
            beta = None if values[1].lower() == "none" else float(values[1])
            k0 = int(values[2]) if len(values) == 3 else None
            if float(values[0]) > 0 and (beta is None or beta > 0) and (k0 or 0) >= 0:
                return RoutingPolicy("affinity", float(values[0]), beta, k0)
        if name == "oea" and len(values) == 1 and int(values[0]) >= 1:
            return RoutingPolicy("oea", k0=int(values[0]))
        if name == "static" and len(values) in (1, 2) and int(values[0]) >= 1:
            k0 = int(values[1]) if len(values) == 2 else None
            if (k0 or 0) >= 0:
                return RoutingPolicy("static", k0=k0, budget=int(values[0]))
    except ValueError:
        pass
    raise ValueError(
        f"bad policy spec {text!r}: expected exact, affinity:ALPHA:BETA[:K0] (ALPHA > 0, BETA "
        "> 0 or none, K0 >= 0), oea:K0 (K0 >= 1) or static:BUDGET[:K0], e.g. affinity:3:2:1"
    )


def policy_options(policy: RoutingPolicy) -> dict:
    """The backend options of one policy (what a calibration file's "choice" holds)."""
    return {
        "policy": policy.name,
        "alpha": policy.alpha,
        "beta": policy.beta,
        "k0": policy.k0,
        "budget": policy.budget,
    }


def policy_label(policy: RoutingPolicy) -> str:
    """Short text, e.g. 'affinity a=3 b=2 k0=1'."""
    beta = "none" if policy.beta is None else f"{policy.beta:g}"
    if policy.name == "affinity":
        return f"affinity a={policy.alpha:g} b={beta} k0={policy.k0}"
    if policy.name == "oea":
        return f"oea k0={policy.k0}"
    if policy.name == "static":
        return f"static m={policy.budget} k0={policy.k0}"
    return policy.name


# ------------------------------------------------------------------------------ prompts


def default_prompts(count: int = 32, length: int = 49, seed: int = 1) -> torch.Tensor:
    """The embedded model's calibration set: `count` windows of `length` bytes from its
    training split (never the held-out files the accuracy harness scores): int64."""
    data = load_bytes(split_files("train"))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length, (count,), generator=gen).tolist()
    return torch.stack([data[s : s + length] for s in starts]).long()


def load_prompts(path: Path, count: int, length: int) -> torch.Tensor:
    """Calibration prompts from a file, as int64 [count, length] token windows.

    .json: token ids, a list of lists of ints; .jsonl: one string (or {"text": ...}) per
    line; anything else: text. Text is taken as bytes (byte-level models such as TinyMoE).
    Sequences are cut into windows of `length`; the first `count` windows are used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration prompts {path} do not exist")
    if path.suffix == ".json":
        ids = json.loads(path.read_text())
        if not (isinstance(ids, list) and all(isinstance(s, list) for s in ids)):
            raise ValueError(f"{path}: token ids must be a JSON list of lists of ints")
        seqs = [torch.tensor(s, dtype=torch.int64) for s in ids]
    elif path.suffix == ".jsonl":
        seqs = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: want a string or an object with 'text'")
            seqs.append(torch.tensor(list(text.encode()), dtype=torch.int64))
    else:
        seqs = [torch.tensor(list(path.read_bytes()), dtype=torch.int64)]
    windows = [w for s in seqs for w in s.split(length) if w.numel() == length]
    if len(windows) < count:
        raise ValueError(
            f"{path} holds {len(windows)} windows of {length} tokens; calibration needs "
            f"{count} (give more text, or lower --sequences / --steps)"
        )
    return torch.stack(windows[:count])


# ---------------------------------------------------------------------------- measuring


def _decode_sites() -> dict[int, tuple[int, int]]:
    """Per decode router site: (exact distinct experts summed, chosen summed) so far."""
    totals = {}
    for site in lynx_compile.report()["sites"]:
        tel = site.get("telemetry")
        if site.get("kind") == "router" and site.get("decode") and tel:
            calls = tel["calls"]
            exact, chosen = tel["mean_experts_exact"], tel["mean_experts_chosen"]
            totals[site["site"]] = (exact * calls, chosen * calls)
    return totals


@torch.no_grad()
def decode_log_probs(model, compiled, prompts: torch.Tensor, batch: int, prompt_len: int):
    """Teacher-forced decode of prompts [S, T] in batches of `batch`: next-token log-probs
    [S/B * B * (T - prompt_len - 1), V] fp32, and the distinct-experts totals per decode
    router site (exact, chosen) it added."""
    before = _decode_sites()
    out = []
    for chunk in prompts.split(batch):
        cache = model.new_cache(chunk.shape[0], max_len=prompts.shape[1])
        if batch > 1:  # one compiled graph serves every batch size (1 is specialised)
            for tensor in (t for kv in cache for t in kv):
                torch._dynamo.mark_dynamic(tensor, 0)
        model(chunk[:, :prompt_len], cache, torch.tensor(0))
        for t in range(prompt_len, prompts.shape[1] - 1):
            step = chunk[:, t : t + 1]
            if batch > 1:
                torch._dynamo.mark_dynamic(step, 0)
            logits = compiled(step, cache, torch.tensor(t))[:, 0].float()
            out.append(F.log_softmax(logits, dim=-1))
    after = _decode_sites()
    added = {
        s: (after[s][0] - before.get(s, (0, 0))[0], after[s][1] - before.get(s, (0, 0))[1])
        for s in after
    }
    return torch.cat(out), added


def distortion(exact: torch.Tensor, other: torch.Tensor) -> dict:
    """Label-free distortion of log-probs other [n, V] against exact [n, V]:

    kl         mean KL(exact || other), nats
    flip       share of tokens whose argmax changed
    top1_loss  expected top-1 accuracy lost, in points, if the exact model's own next-token
               distribution were the truth: mean of p(argmax exact) - p(argmax other)
    """
    probs = exact.exp()
    kl = (probs * (exact - other)).sum(-1).clamp(min=0.0)
    top_exact, top_other = exact.argmax(-1, keepdim=True), other.argmax(-1, keepdim=True)
    loss = probs.gather(1, top_exact) - probs.gather(1, top_other)
    return {
        "kl": float(kl.mean()),
        "flip": float((top_exact != top_other).float().mean()),
        "top1_loss": 100.0 * float(loss.mean()),
    }


def _experts_ratio(sites: dict[int, tuple[int, int]]) -> tuple[float, list[float]]:
    """Overall and per-layer (site order) chosen / exact distinct experts."""
    exact = sum(v[0] for v in sites.values())
    chosen = sum(v[1] for v in sites.values())
    per_layer = [sites[s][1] / sites[s][0] for s in sorted(sites) if sites[s][0] > 0]
    return (chosen / exact if exact else 1.0), per_layer


def _model_shape(name: str) -> dict:
    """num_layers / num_experts / top_k of the compiled model, from its decode routers."""
    routers = [
        s
        for s in lynx_compile.report()["sites"]
        if s["kind"] == "router" and s["status"] == "rewritten" and s.get("decode")
    ]
    if not routers:
        raise RuntimeError(
            "the lynx backend rewrote no decode router of this model, so there is nothing to "
            "calibrate; inspect it with `lynx-compile dump`"
        )
    shapes = {(s["num_experts"], s["top_k"]) for s in routers}
    if len(shapes) != 1:
        raise RuntimeError(f"the model's routers differ in (experts, top_k): {sorted(shapes)}")
    ((experts, top_k),) = shapes
    layers = len({s["site"] for s in routers})
    return {"name": name, "num_layers": layers, "num_experts": experts, "top_k": top_k}


def choose(candidates: list[dict], batches: list[int], budget: Budget) -> dict:
    """The fitting candidate with the lowest mean experts_ratio over the batches (candidates
    as calibrate() records them); exact when none fits."""
    best, best_ratio = None, 1.0
    for cand in candidates:
        rows = [cand["by_batch"][str(b)] for b in batches]
        fits = all(r["kl"] <= budget.kl and r["flip"] <= budget.flip for r in rows)
        ratio = sum(r["experts_ratio"] for r in rows) / len(rows)
        if fits and ratio < best_ratio:
            best, best_ratio = cand, ratio
    return best["choice"] if best else policy_options(RoutingPolicy("exact"))


def calibrate(
    model,
    prompts: torch.Tensor | None = None,
    candidates: list[str] | tuple[str, ...] = DEFAULT_CANDIDATES,
    batches: tuple[int, ...] = (8, 16),
    budget: Budget = Budget(),
    prompt_len: int = 16,
    name: str = "model",
    progress: bool = True,
) -> dict:
    """Measure every candidate policy at every decode batch size on `prompts` (int64
    [S, T], S a multiple of every batch; default: default_prompts()) and choose one: the
    calibration dict that save() writes and the backend's `calibration` option takes."""
    start = time.perf_counter()
    prompts = default_prompts() if prompts is None else prompts
    bad = [b for b in batches if b < 2 or prompts.shape[0] % b]
    if bad:
        raise ValueError(
            f"decode batches {bad} do not split {prompts.shape[0]} prompts (each must be >= 2 "
            "and divide the prompt count)"
        )
    if prompts.shape[1] < prompt_len + 2:
        raise ValueError(f"prompts of {prompts.shape[1]} tokens leave no decode steps")
    policies = [parse_policy(c) for c in candidates]
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(
        model, backend="lynx", options={"policy": "affinity", "k0": 0, "telemetry": True}
    )
    bar = _progress(len(batches) * (len(policies) + 1), progress)
    records = {i: {} for i in range(len(policies))}
    for batch in batches:
        exact_pol = RoutingPolicy("exact")
        with ops.decode_policy_override(lambda site, p=exact_pol: p):
            exact, _ = decode_log_probs(model, compiled, prompts, batch, prompt_len)
        bar.update(1)
        for i, pol in enumerate(policies):
            bar.set_postfix_str(f"B={batch} {policy_label(pol)}")
            with ops.decode_policy_override(lambda site, p=pol: p):
                logp, sites = decode_log_probs(model, compiled, prompts, batch, prompt_len)
            ratio, per_layer = _experts_ratio(sites)
            records[i][str(batch)] = {
                **distortion(exact, logp),
                "experts_ratio": ratio,
                "experts_ratio_per_layer": per_layer,
                "tokens": exact.shape[0],
            }
            bar.update(1)
    bar.close()
    shape = _model_shape(name)
    cands = [
        {"label": policy_label(p), "choice": policy_options(p), "by_batch": records[i]}
        for i, p in enumerate(policies)
    ]
    by_batch = {str(b): choose(cands, [b], budget) for b in batches}
    return {
        "format": calibration.FORMAT,
        "model": shape,
        "choice": choose(cands, list(batches), budget),
        "choice_by_batch": by_batch,
        "budget": asdict(budget),
        "batches": list(batches),
        "prompts": {"sequences": prompts.shape[0], "length": prompts.shape[1]},
        "prompt_len": prompt_len,
        "candidates": cands,
        "seconds": time.perf_counter() - start,
    }


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress(total: int, show: bool):
    """A tqdm progress bar (the [demo] extra) or a silent stand-in."""
    if not show:
        return _NoBar()
    tqdm = require("tqdm", "demo", "the calibrate progress bar").tqdm
    return tqdm(total=total, desc="calibrate", unit="run")


def save(cal: dict, path: Path) -> None:
    """Write a calibration as JSON (what options={"calibration": path} reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal, indent=1) + "\n")


def load_for_model(path: Path, model) -> dict:
    """A calibration file checked against a TinyMoE-like model's config (num_layers,
    num_experts, top_k): CalibrationMismatchError naming what differs."""
    cal = calibration.load(path)
    cfg = model.config
    calibration.check_model(cal, cfg.num_layers, cfg.num_experts, cfg.top_k)
    return cal


# ---------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `lynx-compile calibrate`."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--out", type=Path, required=True, help="calibration JSON to write (the backend's input)"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="calibration prompts: .txt (bytes), .jsonl (text per line) or .json (token ids); "
        "default: windows of the embedded model's training split",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[8, 16], help="decode batch sizes (default 8 16)"
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=list(DEFAULT_CANDIDATES),
        help="candidate policies (affinity:A:B[:K0], oea:K0, static:M[:K0]); default: a grid",
    )
    parser.add_argument(
        "--max-kl", type=float, default=Budget.kl, help=f"KL budget, nats (default {Budget.kl})"
    )
    parser.add_argument(
        "--max-flip",
        type=float,
        default=Budget.flip,
        help=f"budget on the share of changed top-1 predictions (default {Budget.flip})",
    )
    parser.add_argument(
        "--sequences", type=int, default=32, help="calibration sequences (default 32)"
    )
    parser.add_argument(
        "--steps", type=int, default=32, help="decode steps per sequence (default 32)"
    )
    parser.add_argument("--prompt-len", type=int, default=16, help="prefilled tokens per sequence")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Calibrate the checkpoint, write the JSON, print the table; returns 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    length = args.prompt_len + args.steps + 1
    model = load_model(args.checkpoint)
    if args.prompts is None:
        prompts = default_prompts(args.sequences, length)
    else:
        prompts = load_prompts(args.prompts, args.sequences, length)
    cal = calibrate(
        model,
        prompts,
        args.candidates,
        tuple(args.batch),
        Budget(args.max_kl, args.max_flip),
        args.prompt_len,
        name=args.checkpoint.name,
        progress=not args.no_progress,
    )
    save(cal, args.out)
    print(format_table(cal))
    usage = f"options={{'calibration': '{args.out}'}}"
    print(f"wrote {args.out} ({cal['seconds']:.0f} s); compile with backend='lynx', {usage}")
    return 0


def format_table(cal: dict) -> str:
    """Every candidate's kl / flip / experts_ratio per batch, the choice marked *."""
    batches = cal["batches"]
    head = f"{'policy':<26}" + "".join(
        f" {'B' + str(b) + ' kl':>9} {'flip %':>7} {'ratio':>6}" for b in batches
    )
    lines = [head]
    for cand in cal["candidates"]:
        mark = " *" if cand["choice"] == cal["choice"] else ""
        cells = "".join(
            f" {r['kl']:>9.4f} {100 * r['flip']:>7.2f} {r['experts_ratio']:>6.3f}"
            for r in (cand["by_batch"][str(b)] for b in batches)
        )
        lines.append(f"{cand['label'] + mark:<26}{cells}")
    params = {k: v for k, v in cal["choice"].items() if k != "policy"}
    choice = RoutingPolicy(cal["choice"]["policy"], **params)
    lines.append(f"choice: {policy_label(choice)} (budget {cal['budget']})")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m lynx_compile.tools.calibrate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
