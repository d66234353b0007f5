"""`lynx-compile calibrate`: the cheapest routing policy within a distortion budget, per
model (and, with --per-layer, per router layer).

No labels: the model decodes calibration prompts (teacher-forced, B sequences per decode
step, as the accuracy harness and a server decode) once with exact routing and once per
candidate policy, and each candidate is scored at each decode batch size by

  kl             mean KL(exact || policy) of the next-token distributions, nats
  flip           share of decode tokens whose most likely next token changes
  experts_ratio  distinct experts per layer per decode step, over exact routing's

A candidate fits the budget when kl and flip stay within it at every batch size; the
choice is the fitting candidate with the lowest mean experts_ratio (exact when none fits).

Two draws (the default; --one-draw, two_draws=False to skip): the cheapest candidate on
one draw of prompts is biased towards prompts that favour it, so every choice is made on
draw A and then decoded on draw B, other windows of the same source (the training split's
seed-2 windows, none overlapping draw A's; the next --sequences windows of --prompts; or
confirm_prompts). Where it exceeds the budget on draw B, the next cheapest candidate that
fits on A is decoded there, until one fits both (confirm_choice; exact if none does). The
file records both draws' measurements ("two_draws", each candidate's "by_batch_draw_b").

The choice is written as a small JSON file that the backend takes through
options={"calibration": path}; lynx_compile.report() then names it.

One compiled model serves every candidate: it is compiled once with telemetry on, so its
decode routers are opaque lynx::route_recorded calls, and each measurement routes them
with the candidate (lowering.ops.decode_policy_override). The routing is the reference's,
which every kernel matches.

Per layer (--per-layer, per_layer=True): each router layer is measured with each candidate
while the other layers route exactly; the layers' KLs, taken as adding up, are spent
greedily on the largest experts saving per nat (choose_per_layer); the combination is
decoded as a whole on draw A and, where it fits there, on draw B, and chosen anew within a
smaller budget while it exceeds the real one on either. The file then names a policy per
router module path (lynx_compile/calibration.py).

Any model: the Python API takes decode_fn(compiled, tokens, prompt_len) -> next-token
logits (calibrate's docstring); the CLI and the default decode_fn use TinyMoE's interface,
new_cache(batch, max_len) and model(tokens [B, T], cache, start). Prompts: a text file
(.txt: its bytes) or JSONL (one string, or an object with "text", per line) for byte-level
models, or token ids (.json: a list of lists of ints); the embedded model's default set is
drawn from its training split (the accuracy harness's held-out files are never read).

    lynx-compile calibrate --out tiny_moe.calibration.json [--per-layer] [--one-draw]
    python -m lynx_compile.tools.calibrate --checkpoint ckpt.safetensors --out cal.json
    cal = calibrate.calibrate(model, batches=(8, 16)); calibrate.save(cal, path)
    cal = calibrate.calibrate(model, ids[:32], confirm_prompts=ids[32:64], decode_fn=my_decode)
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


def _window_starts(data_len: int, count: int, length: int, seed: int, avoid=()) -> list[int]:
    """`count` random window starts in a corpus of data_len tokens (seed `seed`), each
    window overlapping none of the windows starting at `avoid` (drawn again until so)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data_len - length, (count,), generator=gen).tolist()
    avoid = sorted(avoid)

    def clear(start):
        return all(abs(start - a) >= length for a in avoid)

    for i, start in enumerate(starts):
        while not clear(start):
            start = int(torch.randint(0, data_len - length, (1,), generator=gen))
        starts[i] = start
    return starts


def default_prompts(count: int = 32, length: int = 49, seed: int = 1) -> torch.Tensor:
    """The embedded model's calibration set: `count` windows of `length` bytes from its
    training split (never the held-out files the accuracy harness scores): int64."""
    data = load_bytes(split_files("train"))
    starts = _window_starts(data.numel(), count, length, seed)
    return torch.stack([data[s : s + length] for s in starts]).long()


def default_prompt_draws(count: int = 32, length: int = 49) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded model's two calibration draws, int64 [count, length] each: draw A is
    default_prompts(seed=1), the windows a choice is made on; draw B (seed 2) the windows it
    is confirmed on, each overlapping no window of draw A. Both from the training split."""
    data = load_bytes(split_files("train"))
    first = _window_starts(data.numel(), count, length, 1)
    second = _window_starts(data.numel(), count, length, 2, avoid=first)
    return tuple(torch.stack([data[s : s + length] for s in w]).long() for w in (first, second))


def load_prompts(path: Path, count: int, length: int, skip: int = 0) -> torch.Tensor:
    """Calibration prompts from a file, as int64 [count, length] token windows.

    .json: token ids, a list of lists of ints; .jsonl: one string (or {"text": ...}) per
    line; anything else: text. Text is taken as bytes (byte-level models such as TinyMoE).
    Sequences are cut into windows of `length`; windows skip .. skip + count - 1 are used
    (skip=count: the second draw, disjoint from the first).
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
    if len(windows) < skip + count:
        draws = "" if skip == 0 else f", {count} per draw for two draws"
        raise ValueError(
            f"{path} holds {len(windows)} windows of {length} tokens; calibration needs "
            f"{skip + count}{draws} (give more text, or lower --sequences / --steps"
            f"{'' if skip == 0 else ', or --one-draw'})"
        )
    return torch.stack(windows[skip : skip + count])


# ---------------------------------------------------------------------------- measuring


def _decode_routers() -> list[dict]:
    """The rewritten decode router sites the report holds."""
    return [
        s
        for s in lynx_compile.report()["sites"]
        if s["kind"] == "router" and s["status"] == "rewritten" and s.get("decode")
    ]


def _layer_of(site: dict) -> str:
    """A router site's layer key: its module path, or its site id where the graph has none."""
    return site["layer"] if site.get("layer") is not None else f"site {site['site']}"


def _decode_totals() -> dict[str, tuple[float, float]]:
    """Per decode router layer (module path): (exact distinct experts summed, chosen summed)
    so far, over every graph that routes it."""
    totals: dict[str, tuple[float, float]] = {}
    for site in _decode_routers():
        tel = site.get("telemetry")
        if tel:
            calls = tel["calls"]
            old = totals.get(_layer_of(site), (0.0, 0.0))
            exact, chosen = tel["mean_experts_exact"] * calls, tel["mean_experts_chosen"] * calls
            totals[_layer_of(site)] = (old[0] + exact, old[1] + chosen)
    return totals


def tiny_moe_decode(model):
    """The decode_fn of a model with TinyMoE's interface (new_cache(batch, max_len) and
    model(tokens [B, T], cache, start)): prefill eagerly, then one compiled call per step."""

    def decode(compiled, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T - prompt_len - 1, V]."""
        batch = tokens.shape[0]
        cache = model.new_cache(batch, max_len=tokens.shape[1])
        if batch > 1:  # one compiled graph serves every batch size (1 is specialised)
            for tensor in (t for kv in cache for t in kv):
                torch._dynamo.mark_dynamic(tensor, 0)
        model(tokens[:, :prompt_len], cache, torch.tensor(0))
        out = []
        for t in range(prompt_len, tokens.shape[1] - 1):
            step = tokens[:, t : t + 1]
            if batch > 1:
                torch._dynamo.mark_dynamic(step, 0)
            out.append(compiled(step, cache, torch.tensor(t))[:, -1])
        return torch.stack(out, dim=1)

    return decode


@torch.no_grad()
def decode_log_probs(decode_fn, compiled, prompts: torch.Tensor, batch: int, prompt_len: int):
    """Teacher-forced decode of prompts [S, T] in batches of `batch` through
    decode_fn(compiled, tokens [B, T], prompt_len) -> logits [B, T - prompt_len - 1, V]:
    next-token log-probs [S * (T - prompt_len - 1), V] fp32 (step-major within a batch),
    and the distinct-experts totals per decode router layer (exact, chosen) it added."""
    before = _decode_totals()
    steps = prompts.shape[1] - prompt_len - 1
    out = []
    for chunk in prompts.split(batch):
        logits = decode_fn(compiled, chunk, prompt_len)
        if tuple(logits.shape[:2]) != (chunk.shape[0], steps):
            raise ValueError(
                f"decode_fn returned logits of shape {tuple(logits.shape)} for tokens "
                f"{tuple(chunk.shape)}: want [B, T - prompt_len - 1, V] = "
                f"[{chunk.shape[0]}, {steps}, V], one row per decode step"
            )
        out.append(F.log_softmax(logits.float().transpose(0, 1).reshape(-1, logits.shape[-1]), -1))
    after = _decode_totals()
    added = {
        k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1])
        for k in after
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


def _experts_ratio(totals: dict[str, tuple[float, float]], layers: list[str]):
    """Overall chosen / exact distinct experts, and per layer (in `layers` order)."""
    exact = sum(v[0] for v in totals.values())
    chosen = sum(v[1] for v in totals.values())
    per_layer = [totals[k][1] / totals[k][0] for k in layers if totals.get(k, (0, 0))[0] > 0]
    return (chosen / exact if exact else 1.0), per_layer


def _model_shape(name: str) -> tuple[dict, list[str]]:
    """num_layers / num_experts / top_k of the compiled model, from its decode routers, and
    their layer keys (module paths) in graph order."""
    routers = _decode_routers()
    if not routers:
        raise RuntimeError(
            "the lynx backend rewrote no decode router of this model, so there is nothing to "
            "calibrate: check that decode_fn runs the compiled model one new token per "
            "sequence ([B, 1]), and inspect the graphs with `lynx-compile dump`"
        )
    shapes = {(s["num_experts"], s["top_k"]) for s in routers}
    if len(shapes) != 1:
        raise RuntimeError(f"the model's routers differ in (experts, top_k): {sorted(shapes)}")
    ((experts, top_k),) = shapes
    layers = list(dict.fromkeys(_layer_of(s) for s in routers))
    shape = {"name": name, "num_layers": len(layers), "num_experts": experts, "top_k": top_k}
    return shape, layers


def fits(rows, budget: Budget) -> bool:
    """Whether measured rows (kl, flip) all keep the budget."""
    return all(r["kl"] <= budget.kl and r["flip"] <= budget.flip for r in rows)


def fitting_by_cost(candidates: list[dict], batches: list[int], budget: Budget) -> list[int]:
    """Indices of the candidates (as calibrate() records them) that fit the budget at every
    batch on the draw they were measured on and touch fewer experts than exact, cheapest
    (lowest mean experts_ratio over the batches) first, ties in candidate order."""
    ratios = {}
    for i, cand in enumerate(candidates):
        rows = [cand["by_batch"][str(b)] for b in batches]
        ratio = sum(r["experts_ratio"] for r in rows) / len(rows)
        if fits(rows, budget) and ratio < 1.0:
            ratios[i] = ratio
    return sorted(ratios, key=ratios.__getitem__)


def choose(candidates: list[dict], batches: list[int], budget: Budget) -> dict:
    """The fitting candidate with the lowest mean experts_ratio over the batches (candidates
    as calibrate() records them); exact when none fits."""
    order = fitting_by_cost(candidates, batches, budget)
    return candidates[order[0]]["choice"] if order else policy_options(RoutingPolicy("exact"))


def _brief(row: dict) -> dict:
    """The budgeted fields of a measured row: kl, flip, experts_ratio."""
    return {k: row[k] for k in ("kl", "flip", "experts_ratio") if k in row}


def confirm_choice(
    candidates: list[dict], batches: list[int], budget: Budget, rows_on_b
) -> tuple[dict, list[dict]]:
    """The choice that holds on two draws: the cheapest candidate fitting the budget at every
    batch on draw A (candidates' by_batch, where they were chosen), decoded on draw B by
    rows_on_b(index, batches) -> {batch: row}; while it exceeds the budget there, the next
    cheapest fitting on A; exact when none fits both. Returns the choice and the tries
    (label, what each draw measured, whether it fits both), in the order made."""
    tries = []
    for i in fitting_by_cost(candidates, batches, budget):
        on_b = rows_on_b(i, batches)
        ok = fits(on_b.values(), budget)
        tries.append(
            {
                "label": candidates[i]["label"],
                "draw_a": {str(b): _brief(candidates[i]["by_batch"][str(b)]) for b in batches},
                "draw_b": {b: _brief(r) for b, r in on_b.items()},
                "fits": ok,
            }
        )
        if ok:
            return candidates[i]["choice"], tries
    return policy_options(RoutingPolicy("exact")), tries


def choose_per_layer(
    table: dict[str, list[dict]], weights: dict[str, float], batches: list[int], kl_budget: float
) -> dict[str, int | None]:
    """Greedy per-layer choice: layer -> candidate index (None: exact).

    table[layer][i]["by_batch"][b] holds candidate i's kl and layer experts_ratio measured
    with only that layer routed by it (the others exact); weights[layer] is the layer's
    share of exact distinct experts. Layers' KLs are taken as adding up: starting from
    exact everywhere, the move (one layer to a cheaper candidate) that saves the most
    weighted experts ratio per nat of added KL (the largest added KL over the batches) is
    taken while the summed KL stays within kl_budget at every batch.
    """
    current: dict[str, int | None] = dict.fromkeys(table)

    def row(layer, index, batch):
        if index is None:
            return {"kl": 0.0, "experts_ratio": 1.0}
        return table[layer][index]["by_batch"][str(batch)]

    def ratio(layer, index):
        return sum(row(layer, index, b)["experts_ratio"] for b in batches) / len(batches)

    while True:
        spent = {b: sum(row(k, current[k], b)["kl"] for k in table) for b in batches}
        best, best_score = None, 0.0
        for layer, cands in table.items():
            for index in range(len(cands)):
                saved = weights[layer] * (ratio(layer, current[layer]) - ratio(layer, index))
                added = {
                    b: row(layer, index, b)["kl"] - row(layer, current[layer], b)["kl"]
                    for b in batches
                }
                if saved <= 0 or any(spent[b] + added[b] > kl_budget for b in batches):
                    continue
                score = saved / max(max(added.values()), 1e-9)
                if score > best_score:
                    best, best_score = (layer, index), score
        if best is None:
            return current
        current[best[0]] = best[1]


def calibrate(
    model,
    prompts: torch.Tensor | list[list[int]] | None = None,
    candidates: list[str] | tuple[str, ...] = DEFAULT_CANDIDATES,
    batches: tuple[int, ...] = (8, 16),
    budget: Budget = Budget(),
    prompt_len: int = 16,
    name: str = "model",
    progress: bool = True,
    decode_fn=None,
    per_layer: bool = False,
    confirm_prompts: torch.Tensor | list[list[int]] | None = None,
    two_draws: bool = True,
) -> dict:
    """Measure every candidate policy at every decode batch size on `prompts` and choose
    the cheapest within `budget` that also keeps it on `confirm_prompts`: the calibration
    dict that save() writes and the backend's `calibration` option takes.

    model      any nn.Module with softmax or scored top-k routers; it is compiled once
               (backend="lynx", telemetry on) and that one compiled model serves every
               candidate.
    prompts    draw A, token ids, int64 [S, T] (or a list of S equal-length lists); S a
               multiple of every batch. Default: default_prompt_draws()'s first (TinyMoE's
               byte-level set).
    confirm_prompts  draw B, other windows of the same source, shaped like prompts: each
               choice made on draw A is decoded on it and, where it exceeds the budget
               there, replaced by the next cheaper-on-A candidate (confirm_choice; per
               layer, re-chosen within a smaller budget). Default: default_prompt_draws()'s
               second when prompts is None; required with prompts unless two_draws=False.
    two_draws  False: choose on draw A alone (half the decodes of the check, less robust:
               docs/results/accuracy.md, issue 18).
    decode_fn  decode_fn(compiled, tokens [B, T], prompt_len) -> next-token logits
               [B, T - prompt_len - 1, V]: the logits predicting tokens[:, prompt_len + 1:],
               teacher-forced, each decode step one call of `compiled` on one new token per
               sequence ([B, 1, ...] at the routers; prefill may run eagerly or compiled,
               it is routed exactly). Default: tiny_moe_decode(model), for models with
               TinyMoE's new_cache / model(tokens, cache, start) interface.
    per_layer  also choose one policy per router (choose_per_layer): each layer measured
               with each candidate and the other layers exact (on draw A), the greedy
               combination decoded as a whole on both draws and backed off until it fits;
               adds choice_by_layer and choice_by_layer_by_batch to the file.

    E.g. for a Hugging Face causal LM with a KV cache:

        def decode_fn(compiled, tokens, prompt_len):
            out = model(tokens[:, :prompt_len], use_cache=True)   # prefill, eager
            past, logits = out.past_key_values, []
            for t in range(prompt_len, tokens.shape[1] - 1):
                out = compiled(tokens[:, t : t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits.append(out.logits[:, -1])
            return torch.stack(logits, dim=1)

        cal = calibrate(model, ids[:32], confirm_prompts=ids[32:64], decode_fn=decode_fn)
    """
    start = time.perf_counter()
    draws = _prompt_draws(prompts, confirm_prompts, two_draws)
    measure = _measurer(model, draws, batches, prompt_len, decode_fn)
    policies = [parse_policy(c) for c in candidates]
    exact_pol = RoutingPolicy("exact")
    bar = _progress(len(batches) * (len(policies) + 1), progress)
    records = {i: {} for i in range(len(policies))}
    exact_logp = {draw: {} for draw in draws}  # draw -> batch -> log-probs of exact routing
    layers = None
    for batch in batches:
        exact_logp["a"][batch], _ = measure(lambda layer: exact_pol, batch, "a")
        if layers is None:
            shape, layers = _model_shape(name)
        bar.update(1)
        for i, pol in enumerate(policies):
            bar.set_postfix_str(f"B={batch} {policy_label(pol)}")
            logp, totals = measure(lambda layer, p=pol: p, batch, "a")
            ratio, per_layer_ratio = _experts_ratio(totals, layers)
            records[i][str(batch)] = {
                **distortion(exact_logp["a"][batch], logp),
                "experts_ratio": ratio,
                "experts_ratio_per_layer": per_layer_ratio,
                "tokens": logp.shape[0],
            }
            bar.update(1)
    bar.close()
    rows_of = _RowMeasurer(measure, exact_logp, layers)
    cands = [
        {"label": policy_label(p), "choice": policy_options(p), "by_batch": records[i]}
        for i, p in enumerate(policies)
    ]
    cal = {
        "format": calibration.FORMAT,
        "model": shape,
        "layers": layers if all(not k.startswith("site ") for k in layers) else None,
        "budget": asdict(budget),
        "batches": list(batches),
        "prompts": {"sequences": draws["a"].shape[0], "length": draws["a"].shape[1]},
        "prompt_len": prompt_len,
        "candidates": cands,
    }
    if "b" in draws:
        rows_of.bar = _progress(None, progress, "draw B")
        cal["prompts"]["draw_b"] = {"sequences": draws["b"].shape[0]}

        def rows_on_b(index, batch_list):
            return rows_of(policies[index], batch_list, "b")

        cal["choice"], tries = confirm_choice(cands, list(batches), budget, rows_on_b)
        by_batch = {str(b): confirm_choice(cands, [b], budget, rows_on_b) for b in batches}
        cal["choice_by_batch"] = {b: choice for b, (choice, _) in by_batch.items()}
        cal["two_draws"] = {
            "choice": tries,
            "choice_by_batch": {b: t for b, (_, t) in by_batch.items()},
        }
        for i, pol in enumerate(policies):  # every candidate decoded on draw B, as measured
            on_b = {str(b): rows_of.memo.get((pol, b, "b")) for b in batches}
            if any(on_b.values()):
                cands[i]["by_batch_draw_b"] = {b: r for b, r in on_b.items() if r}
        rows_of.bar.close()
    else:
        cal["choice"] = choose(cands, list(batches), budget)
        cal["choice_by_batch"] = {str(b): choose(cands, [b], budget) for b in batches}
    if cal["layers"] is None:
        del cal["layers"]
    if per_layer:
        cal.update(_calibrate_per_layer(cal, policies, measure, exact_logp, budget, progress))
    cal["seconds"] = time.perf_counter() - start
    return cal


def _prompt_draws(prompts, confirm_prompts, two_draws: bool) -> dict[str, torch.Tensor]:
    """{"a": the prompts choices are made on, "b": the other prompts they must hold on
    (with two_draws)}: the default draws, or the caller's, checked to be other windows."""
    if prompts is None:
        if confirm_prompts is not None:
            raise ValueError("confirm_prompts without prompts: give both, or neither")
        first, second = default_prompt_draws()
        return {"a": first, "b": second} if two_draws else {"a": first}
    first = torch.as_tensor(prompts)
    if not two_draws:
        if confirm_prompts is not None:
            raise ValueError("confirm_prompts with two_draws=False: leave one of them out")
        return {"a": first}
    if confirm_prompts is None:
        raise ValueError(
            "a two-draw calibration needs confirm_prompts: as many other windows of the same "
            "source as prompts (e.g. the next S windows of the text), on which every choice "
            "made on prompts must keep the budget; or pass two_draws=False to choose on "
            "prompts alone"
        )
    second = torch.as_tensor(confirm_prompts)
    if second.shape != first.shape:
        raise ValueError(
            f"confirm_prompts {list(second.shape)} must be shaped like prompts "
            f"{list(first.shape)} (the same windows per draw and decode steps)"
        )
    shared = {tuple(r) for r in first.tolist()} & {tuple(r) for r in second.tolist()}
    if shared:
        raise ValueError(
            f"confirm_prompts repeat {len(shared)} of prompts' windows: the second draw must "
            "be other windows (e.g. the next S windows of the text)"
        )
    return {"a": first, "b": second}


def _measurer(model, draws: dict[str, torch.Tensor], batches, prompt_len: int, decode_fn):
    """The prompts of each draw checked, the model compiled once (telemetry on, so decode
    routers are opaque calls the override reaches): measure(policy_of_layer, batch, draw)
    -> (log-probs, distinct-experts totals per layer) of a decode of draw's prompts with
    policy_of_layer(module path) at each decode router."""
    for prompts in draws.values():
        if prompts.dim() != 2 or prompts.dtype != torch.int64:
            raise ValueError(
                f"prompts must be int64 token ids [S, T], got {prompts.dtype} {list(prompts.shape)}"
            )
        bad = [b for b in batches if b < 2 or prompts.shape[0] % b]
        if bad:
            raise ValueError(
                f"decode batches {bad} do not split {prompts.shape[0]} prompts (each must be "
                ">= 2 and divide the prompt count)"
            )
        if prompts.shape[1] < prompt_len + 2:
            raise ValueError(f"prompts of {prompts.shape[1]} tokens leave no decode steps")
    if decode_fn is None:
        if not hasattr(model, "new_cache"):
            raise TypeError(
                f"{type(model).__name__} has no new_cache(batch, max_len): give calibrate a "
                "decode_fn(compiled, tokens, prompt_len) -> logits (see its docstring)"
            )
        decode_fn = tiny_moe_decode(model)
    torch._dynamo.reset()
    lynx_compile.clear_report()
    compiled = torch.compile(
        model, backend="lynx", options={"policy": "affinity", "k0": 0, "telemetry": True}
    )

    def measure(policy_of_layer, batch, draw="a"):
        site_layer = {}

        def chooser(site):
            if site not in site_layer:
                site_layer.update({s["site"]: _layer_of(s) for s in _decode_routers()})
            return policy_of_layer(site_layer[site])

        with ops.decode_policy_override(chooser):
            return decode_log_probs(decode_fn, compiled, draws[draw], batch, prompt_len)

    return measure


class _RowMeasurer:
    """rows(policy, batches, draw) -> {batch: distortion and experts_ratio} of routing with
    `policy` (a RoutingPolicy for every layer, or layer -> RoutingPolicy) on one draw,
    against exact routing on that draw; each (policy, batch, draw) decoded once (memo)."""

    def __init__(self, measure, exact_logp: dict, layers: list[str]):
        self.measure, self.exact_logp, self.layers = measure, exact_logp, layers
        self.memo: dict[tuple, dict] = {}
        self.bar = _NoBar()

    def exact(self, batch: int, draw: str) -> torch.Tensor:
        """Exact routing's log-probs on a draw (decoded on first use)."""
        if batch not in self.exact_logp[draw]:
            exact = RoutingPolicy("exact")
            self.exact_logp[draw][batch], _ = self.measure(lambda k: exact, batch, draw)
            self.bar.update(1)
        return self.exact_logp[draw][batch]

    def __call__(self, policy, batches, draw: str) -> dict[str, dict]:
        one = isinstance(policy, RoutingPolicy)
        key = policy if one else tuple(sorted(policy.items()))
        out = {}
        for b in batches:
            if (key, b, draw) not in self.memo:
                at = (lambda k: policy) if one else policy.__getitem__
                logp, totals = self.measure(at, b, draw)
                ratio, _ = _experts_ratio(totals, self.layers)
                row = {**distortion(self.exact(b, draw), logp), "experts_ratio": ratio}
                self.memo[(key, b, draw)] = row
                self.bar.update(1)
            out[str(b)] = self.memo[(key, b, draw)]
        return out


def check_choices(
    model, cal: dict, prompts: torch.Tensor, prompt_len: int = 16, decode_fn=None
) -> dict:
    """Each choice a calibration holds (one policy, per batch, per layer, per layer per
    batch), decoded on other prompts than it was chosen on: {what: {batch: distortion and
    experts_ratio}}, to see whether the budget holds out of sample."""
    batches = cal["batches"]
    draws = {"a": torch.as_tensor(prompts)}
    measure = _measurer(model, draws, batches, prompt_len, decode_fn)
    exact = {b: measure(lambda k: RoutingPolicy("exact"), b)[0] for b in batches}
    choices = {"one": {b: cal["choice"] for b in batches}}
    choices["for the batch"] = {b: cal["choice_by_batch"][str(b)] for b in batches}
    if cal.get("choice_by_layer"):
        choices["per layer"] = {b: cal["choice_by_layer"] for b in batches}
        choices["per layer, for the batch"] = {
            b: cal["choice_by_layer_by_batch"][str(b)] for b in batches
        }
    out = {}
    for what, by_batch in choices.items():
        out[what] = {}
        for b, choice in by_batch.items():
            if "policy" in choice:  # one policy for every layer
                pol = {None: policy_of(choice)}
            else:
                pol = {k: policy_of(c) for k, c in choice.items()}
            logp, totals = measure(lambda k, pol=pol: pol.get(k, pol.get(None)), b)
            ratio, _ = _experts_ratio(totals, list(totals))
            out[what][str(b)] = {**distortion(exact[b], logp), "experts_ratio": ratio}
    return out


def _calibrate_per_layer(cal, policies, measure, exact_logp, budget, progress) -> dict:
    """The per-layer fields of a calibration: each layer measured alone with each
    candidate on draw A, the greedy choice for every batch and for each one, each decoded
    as a whole on draw A and, where there is one, draw B, and backed off until it fits."""
    layers = cal.get("layers")
    if not layers:
        raise RuntimeError(
            "per-layer calibration needs each router's module path, and this model's graphs "
            "record none (nn_module_stack); calibrate without per_layer"
        )
    batches = cal["batches"]
    exact_pol = RoutingPolicy("exact")
    bar = _progress(len(batches) * len(layers) * len(policies), progress, "per layer")
    table = {k: [{"label": policy_label(p), "by_batch": {}} for p in policies] for k in layers}
    weights = dict.fromkeys(layers, 0.0)
    for batch in batches:
        for layer in layers:
            for i, pol in enumerate(policies):
                bar.set_postfix_str(f"B={batch} {layer} {policy_label(pol)}")
                logp, totals = measure(
                    lambda k, layer=layer, p=pol: p if k == layer else exact_pol, batch, "a"
                )
                exact, chosen = totals.get(layer, (0.0, 0.0))
                table[layer][i]["by_batch"][str(batch)] = {
                    **distortion(exact_logp["a"][batch], logp),
                    "experts_ratio": chosen / exact if exact else 1.0,
                }
                weights[layer] += exact / len(batches) / len(policies)
                bar.update(1)
    bar.close()
    total = sum(weights.values()) or 1.0
    weights = {k: w / total for k, w in weights.items()}
    rows_of = _RowMeasurer(measure, exact_logp, layers)
    rows_of.bar = _progress(None, progress, "per layer, verify")
    draws = list(exact_logp)

    def verified(batch_list, one):
        one_ratio = _mean_ratio(cal["candidates"], one, batch_list)
        args = (budget, policies, rows_of, draws, one, one_ratio)
        return _verified_choice(table, weights, batch_list, *args)

    overall = verified(batches, cal["choice"])
    by_batch = {str(b): verified([b], cal["choice_by_batch"][str(b)]) for b in batches}
    rows_of.bar.close()
    return {
        "choice_by_layer": overall["choice"],
        "choice_by_layer_by_batch": {b: v["choice"] for b, v in by_batch.items()},
        "per_layer": {
            "weights": weights,
            "candidates": table,
            "verified": overall["verified"],
            "verified_by_batch": {b: v["verified"] for b, v in by_batch.items()},
        },
    }


def _mean_ratio(candidates: list[dict], choice: dict, batches: list[int]) -> float:
    """The mean experts ratio over the batches the candidate `choice` measured on draw A
    (1.0 for exact, or a choice that is no candidate)."""
    for cand in candidates:
        if cand["choice"] == choice:
            return sum(cand["by_batch"][str(b)]["experts_ratio"] for b in batches) / len(batches)
    return 1.0


PER_LAYER_TRIES = 4  # combinations decoded per per-layer choice before the fallback


def _verified_choice(table, weights, batches, budget, policies, rows_of, draws, one, one_ratio):
    """choose_per_layer within the budget, its combination decoded as a whole at each
    batch on draw A (rows_of(layer -> policy, batches, draw)) and, where it fits there and
    `draws` holds "b", on draw B. While the measured KL (or flip) exceeds the budget on
    either draw, choose again within a budget scaled down by 0.9 x budget / the worst
    measured KL (PER_LAYER_TRIES combinations in all), then fall back to `one` (the single
    choice, already held on both draws) at every layer. A combination that touches no
    fewer experts than `one` (one_ratio, on draw A) also falls back to it."""
    scale, tries = 1.0, []
    for _ in range(PER_LAYER_TRIES):
        picks = choose_per_layer(table, weights, batches, budget.kl * scale)
        pol = {k: RoutingPolicy("exact") if i is None else policies[i] for k, i in picks.items()}
        rows = rows_of(pol, batches, "a")
        record = {
            "kl_budget": budget.kl * scale,
            "picks": {k: policy_label(p) for k, p in pol.items()},
            "by_batch": rows,
        }
        measured, ok = list(rows.values()), fits(rows.values(), budget)
        if ok and "b" in draws:
            record["by_batch_draw_b"] = rows_of(pol, batches, "b")
            measured = list(record["by_batch_draw_b"].values())
            ok = fits(measured, budget)
        record["fits"] = ok
        tries.append(record)
        if ok:
            mean = sum(r["experts_ratio"] for r in rows.values()) / len(rows)
            if mean < one_ratio - 1e-6:  # telemetry sums differ in the last bits
                choice = {k: policy_options(p) for k, p in pol.items()}
                return {"choice": choice, "verified": {"tries": tries, "fallback": None}}
            reason = f"experts ratio {mean:.3f}, not below the single choice's {one_ratio:.3f}"
            break
        worst = max(r["kl"] for r in measured)
        where = "draw B" if "by_batch_draw_b" in record else "draw A"
        reason = f"measured KL {worst:.4f} over the budget on {where} after {len(tries)} tries"
        scale *= min(0.9, 0.9 * budget.kl / max(worst, 1e-12))
    choice = dict.fromkeys(table, dict(one))
    return {"choice": choice, "verified": {"tries": tries, "fallback": reason}}


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress(total: int | None, show: bool, desc: str = "calibrate"):
    """A tqdm progress bar (the [demo] extra; total None: a counter) or a silent stand-in."""
    if not show:
        return _NoBar()
    tqdm = require("tqdm", "demo", "the calibrate progress bar").tqdm
    return tqdm(total=total, desc=desc, unit="run")


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
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also choose one policy per router layer within the same budget (about 3x the "
        "runs; docs/results/accuracy.md, issue 18)",
    )
    parser.add_argument(
        "--one-draw",
        action="store_true",
        help="choose on one draw of prompts only; default: every choice must also keep the "
        "budget on a second, disjoint draw (the training split's seed-2 windows, or the "
        "next --sequences windows of --prompts), else the next safer one is taken",
    )
    parser.add_argument(
        "--check-seed",
        type=int,
        default=None,
        help="then decode the file's choices on another draw of the default prompts (this "
        "seed; the choice used seeds 1 and 2, or 1 with --one-draw) and record their "
        "distortion under 'check'",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Calibrate the checkpoint, write the JSON, print the table; returns 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    length = args.prompt_len + args.steps + 1
    used_seeds = (1,) if args.one_draw else (1, 2)
    if args.check_seed is not None:
        if args.prompts is not None:
            raise SystemExit("--check-seed draws other default prompts: leave --prompts out")
        if args.check_seed in used_seeds:
            raise SystemExit(
                f"--check-seed {args.check_seed} is a draw the choice was made or confirmed "
                f"on (seeds {', '.join(map(str, used_seeds))}): pick another, e.g. 3"
            )
    model = load_model(args.checkpoint)
    n, confirm = args.sequences, None
    if args.prompts is None and args.one_draw:
        prompts, source = default_prompts(n, length), "the training split's seed-1 windows"
    elif args.prompts is None:
        prompts, confirm = default_prompt_draws(n, length)
        source = "draw A: the training split's seed-1 windows; draw B: its seed-2 windows"
    else:
        prompts, source = (
            load_prompts(args.prompts, n, length),
            f"{args.prompts} windows 0..{n - 1}",
        )
        if not args.one_draw:
            confirm = load_prompts(args.prompts, n, length, skip=n)
            source = f"draw A: {source}; draw B: windows {n}..{2 * n - 1}"
    cal = calibrate(
        model,
        prompts,
        args.candidates,
        tuple(args.batch),
        Budget(args.max_kl, args.max_flip),
        args.prompt_len,
        name=args.checkpoint.name,
        progress=not args.no_progress,
        per_layer=args.per_layer,
        confirm_prompts=confirm,
        two_draws=not args.one_draw,
    )
    cal["prompts"]["source"] = source
    if args.check_seed is not None:
        other = default_prompts(args.sequences, length, seed=args.check_seed)
        checked = check_choices(model, cal, other, args.prompt_len)
        cal["check"] = {"seed": args.check_seed, "by_choice": checked}
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
    for batch, choice in cal["choice_by_batch"].items():
        lines.append(f"choice for batch {batch}: {policy_label(policy_of(choice))}")
    two = cal.get("two_draws")
    if two:
        lines.append("confirmed on draw B (tries, cheapest on draw A first; kl A / B):")
        tables = [("every batch", two["choice"])]
        tables += [(f"batch {b}", tries) for b, tries in two["choice_by_batch"].items()]
        for what, tries in tables:
            cells = "; ".join(
                f"{t['label']}: "
                + " ".join(
                    f"B{b} {t['draw_a'][b]['kl']:.4f} / {t['draw_b'][b]['kl']:.4f}"
                    for b in t["draw_b"]
                )
                + ("" if t["fits"] else " over")
                for t in tries
            )
            lines.append(f"  {what}: {cells or 'nothing fits draw A: exact'}")
    per_layer = cal.get("per_layer")
    if per_layer:
        tables = [("every batch", cal["choice_by_layer"], per_layer["verified"])]
        tables += [
            (f"batch {b}", cal["choice_by_layer_by_batch"][b], per_layer["verified_by_batch"][b])
            for b in cal["choice_by_layer_by_batch"]
        ]
        for what, choice, verified in tables:
            picks = ", ".join(f"{k}: {policy_label(policy_of(c))}" for k, c in choice.items())
            last = verified["tries"][-1] if verified["tries"] else {"by_batch": {}}
            on_b = last.get("by_batch_draw_b", {})
            measured = " ".join(
                f"B{b} kl {r['kl']:.4f}"
                + (f" / {on_b[b]['kl']:.4f} (draw B)" if b in on_b else "")
                + f" ratio {r['experts_ratio']:.3f}"
                for b, r in last["by_batch"].items()
            )
            note = f" (fallback: {verified['fallback']})" if verified["fallback"] else ""
            lines.append(f"per layer, {what}: {picks}; measured {measured}{note}")
    if cal.get("check"):
        lines.append(f"the choices on other prompts (seed {cal['check']['seed']}):")
        for what, rows in cal["check"]["by_choice"].items():
            cells = " ".join(
                f"B{b} kl {r['kl']:.4f} ratio {r['experts_ratio']:.3f}" for b, r in rows.items()
            )
            lines.append(f"  {what}: {cells}")
    return "\n".join(lines)


def policy_of(choice: dict) -> RoutingPolicy:
    """The RoutingPolicy of a file's choice dict."""
    return RoutingPolicy(choice["policy"], **{k: v for k, v in choice.items() if k != "policy"})


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m lynx_compile.tools.calibrate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
