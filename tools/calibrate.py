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
The choice is written as a small JSON file that the backend takes through
options={"calibration": path}; lynx_compile.report() then names it.

One compiled model serves every candidate: it is compiled once with telemetry on, so its
decode routers are opaque lynx::route_recorded calls, and each measurement routes them
with the candidate (lowering.ops.decode_policy_override). The routing is the reference's,
which every kernel matches.

Per layer (--per-layer, per_layer=True): each router layer is measured with each candidate
while the other layers route exactly; the layers' KLs, taken as adding up, are spent
greedily on the largest experts saving per nat (choose_per_layer); the combination is
measured again and chosen anew within a smaller budget while it exceeds the real one. The
file then names a policy per router module path (lynx_compile/calibration.py).

Any model: the Python API takes decode_fn(compiled, tokens, prompt_len) -> next-token
logits (calibrate's docstring); the CLI and the default decode_fn use TinyMoE's interface,
new_cache(batch, max_len) and model(tokens [B, T], cache, start). Prompts: a text file
(.txt: its bytes) or JSONL (one string, or an object with "text", per line) for byte-level
models, or token ids (.json: a list of lists of ints); the embedded model's default set is
drawn from its training split (the accuracy harness's held-out files are never read).

    lynx-compile calibrate --out tiny_moe.calibration.json [--per-layer]
    python -m lynx_compile.tools.calibrate --checkpoint ckpt.safetensors --out cal.json
    cal = calibrate.calibrate(model, batches=(8, 16)); calibrate.save(cal, path)
    cal = calibrate.calibrate(model, token_ids, decode_fn=my_decode, per_layer=True)
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
) -> dict:
    """Measure every candidate policy at every decode batch size on `prompts` and choose
    the cheapest within `budget`: the calibration dict that save() writes and the
    backend's `calibration` option takes.

    model      any nn.Module with softmax or scored top-k routers; it is compiled once
               (backend="lynx", telemetry on) and that one compiled model serves every
               candidate.
    prompts    token ids, int64 [S, T] (or a list of S equal-length lists); S a multiple
               of every batch. Default: default_prompts() (TinyMoE's byte-level set).
    decode_fn  decode_fn(compiled, tokens [B, T], prompt_len) -> next-token logits
               [B, T - prompt_len - 1, V]: the logits predicting tokens[:, prompt_len + 1:],
               teacher-forced, each decode step one call of `compiled` on one new token per
               sequence ([B, 1, ...] at the routers; prefill may run eagerly or compiled,
               it is routed exactly). Default: tiny_moe_decode(model), for models with
               TinyMoE's new_cache / model(tokens, cache, start) interface.
    per_layer  also choose one policy per router (choose_per_layer): each layer measured
               with each candidate and the other layers exact, the greedy combination
               measured again and backed off until it fits; adds choice_by_layer and
               choice_by_layer_by_batch to the file.

    E.g. for a Hugging Face causal LM with a KV cache:

        def decode_fn(compiled, tokens, prompt_len):
            out = model(tokens[:, :prompt_len], use_cache=True)   # prefill, eager
            past, logits = out.past_key_values, []
            for t in range(prompt_len, tokens.shape[1] - 1):
                out = compiled(tokens[:, t : t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits.append(out.logits[:, -1])
            return torch.stack(logits, dim=1)

        cal = calibrate(model, token_ids, decode_fn=decode_fn, batches=(8,))
    """
    start = time.perf_counter()
    prompts = default_prompts() if prompts is None else torch.as_tensor(prompts)
    measure = _measurer(model, prompts, batches, prompt_len, decode_fn)
    policies = [parse_policy(c) for c in candidates]
    exact_pol = RoutingPolicy("exact")
    bar = _progress(len(batches) * (len(policies) + 1), progress)
    records = {i: {} for i in range(len(policies))}
    exact_logp = {}
    layers = None
    for batch in batches:
        exact_logp[batch], _ = measure(lambda layer: exact_pol, batch)
        if layers is None:
            shape, layers = _model_shape(name)
        bar.update(1)
        for i, pol in enumerate(policies):
            bar.set_postfix_str(f"B={batch} {policy_label(pol)}")
            logp, totals = measure(lambda layer, p=pol: p, batch)
            ratio, per_layer_ratio = _experts_ratio(totals, layers)
            records[i][str(batch)] = {
                **distortion(exact_logp[batch], logp),
                "experts_ratio": ratio,
                "experts_ratio_per_layer": per_layer_ratio,
                "tokens": logp.shape[0],
            }
            bar.update(1)
    bar.close()
    cands = [
        {"label": policy_label(p), "choice": policy_options(p), "by_batch": records[i]}
        for i, p in enumerate(policies)
    ]
    cal = {
        "format": calibration.FORMAT,
        "model": shape,
        "choice": choose(cands, list(batches), budget),
        "choice_by_batch": {str(b): choose(cands, [b], budget) for b in batches},
        "layers": layers if all(not k.startswith("site ") for k in layers) else None,
        "budget": asdict(budget),
        "batches": list(batches),
        "prompts": {"sequences": prompts.shape[0], "length": prompts.shape[1]},
        "prompt_len": prompt_len,
        "candidates": cands,
    }
    if cal["layers"] is None:
        del cal["layers"]
    if per_layer:
        cal.update(_calibrate_per_layer(cal, policies, measure, exact_logp, budget, progress))
    cal["seconds"] = time.perf_counter() - start
    return cal


def _measurer(model, prompts: torch.Tensor, batches, prompt_len: int, decode_fn):
    """The prompts checked, the model compiled once (telemetry on, so decode routers are
    opaque calls the override reaches): measure(policy_of_layer, batch) -> (log-probs,
    distinct-experts totals per layer) of a decode with policy_of_layer(module path) at
    each decode router."""
    if prompts.dim() != 2 or prompts.dtype != torch.int64:
        raise ValueError(
            f"prompts must be int64 token ids [S, T], got {prompts.dtype} {list(prompts.shape)}"
        )
    bad = [b for b in batches if b < 2 or prompts.shape[0] % b]
    if bad:
        raise ValueError(
            f"decode batches {bad} do not split {prompts.shape[0]} prompts (each must be >= 2 "
            "and divide the prompt count)"
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

    def measure(policy_of_layer, batch):
        site_layer = {}

        def chooser(site):
            if site not in site_layer:
                site_layer.update({s["site"]: _layer_of(s) for s in _decode_routers()})
            return policy_of_layer(site_layer[site])

        with ops.decode_policy_override(chooser):
            return decode_log_probs(decode_fn, compiled, prompts, batch, prompt_len)

    return measure


def check_choices(
    model, cal: dict, prompts: torch.Tensor, prompt_len: int = 16, decode_fn=None
) -> dict:
    """Each choice a calibration holds (one policy, per batch, per layer, per layer per
    batch), decoded on other prompts than it was chosen on: {what: {batch: distortion and
    experts_ratio}}, to see whether the budget holds out of sample."""
    batches = cal["batches"]
    measure = _measurer(model, torch.as_tensor(prompts), batches, prompt_len, decode_fn)
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
    candidate, the greedy choice for every batch and for each one, each verified."""
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
                    lambda k, layer=layer, p=pol: p if k == layer else exact_pol, batch
                )
                exact, chosen = totals.get(layer, (0.0, 0.0))
                table[layer][i]["by_batch"][str(batch)] = {
                    **distortion(exact_logp[batch], logp),
                    "experts_ratio": chosen / exact if exact else 1.0,
                }
                weights[layer] += exact / len(batches) / len(policies)
                bar.update(1)
    bar.close()
    total = sum(weights.values()) or 1.0
    weights = {k: w / total for k, w in weights.items()}
    uniform = {b: cal["choice_by_batch"][str(b)] for b in batches}
    overall = _verified_choice(
        table, weights, batches, budget, policies, measure, exact_logp, cal["choice"], cal
    )
    by_batch = {
        str(b): _verified_choice(
            table, weights, [b], budget, policies, measure, exact_logp, uniform[b], cal
        )
        for b in batches
    }
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


def _verified_choice(table, weights, batches, budget, policies, measure, exact_logp, one, cal):
    """choose_per_layer within the budget, its combination measured at each batch; while
    the measured KL (or flip) exceeds the budget, choose again within a budget scaled down
    by budget / measured (3 tries), then fall back to `one` (the single choice) at every
    layer. A combination that touches no fewer experts than `one` also falls back to it."""
    cands = {c["label"]: c for c in cal["candidates"]}
    one_label = next((lab for lab, c in cands.items() if c["choice"] == one), None)
    one_ratio = (
        1.0
        if one_label is None
        else sum(cands[one_label]["by_batch"][str(b)]["experts_ratio"] for b in batches)
        / len(batches)
    )
    scale, tries = 1.0, []
    for _ in range(3):
        picks = choose_per_layer(table, weights, batches, budget.kl * scale)
        pol = {k: RoutingPolicy("exact") if i is None else policies[i] for k, i in picks.items()}
        rows = {}
        for b in batches:
            logp, totals = measure(lambda k, pol=pol: pol[k], b)
            ratio, _ = _experts_ratio(totals, list(table))
            rows[str(b)] = {**distortion(exact_logp[b], logp), "experts_ratio": ratio}
        worst = max(r["kl"] for r in rows.values())
        fits = all(r["kl"] <= budget.kl and r["flip"] <= budget.flip for r in rows.values())
        tries.append(
            {
                "kl_budget": budget.kl * scale,
                "picks": {k: policy_label(p) for k, p in pol.items()},
                "by_batch": rows,
                "fits": fits,
            }
        )
        if fits:
            mean = sum(r["experts_ratio"] for r in rows.values()) / len(rows)
            if mean < one_ratio - 1e-6:  # telemetry sums differ in the last bits
                choice = {k: policy_options(p) for k, p in pol.items()}
                return {"choice": choice, "verified": {"tries": tries, "fallback": None}}
            reason = f"experts ratio {mean:.3f}, not below the single choice's {one_ratio:.3f}"
            break
        reason = f"measured KL {worst:.4f} over the budget after {len(tries)} tries"
        scale *= 0.9 * budget.kl / max(worst, 1e-12)
    choice = dict.fromkeys(table, dict(one))
    return {"choice": choice, "verified": {"tries": tries, "fallback": reason}}


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress(total: int, show: bool, desc: str = "calibrate"):
    """A tqdm progress bar (the [demo] extra) or a silent stand-in."""
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
        "--check-seed",
        type=int,
        default=None,
        help="then decode the file's choices on another draw of the default prompts (this "
        "seed; the choice used seed 1) and record their distortion under 'check'",
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
        per_layer=args.per_layer,
    )
    if args.check_seed is not None:
        if args.prompts is not None:
            raise SystemExit("--check-seed draws other default prompts: leave --prompts out")
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
    per_layer = cal.get("per_layer")
    if per_layer:
        tables = [("every batch", cal["choice_by_layer"], per_layer["verified"])]
        tables += [
            (f"batch {b}", cal["choice_by_layer_by_batch"][b], per_layer["verified_by_batch"][b])
            for b in cal["choice_by_layer_by_batch"]
        ]
        for what, choice, verified in tables:
            picks = ", ".join(f"{k}: {policy_label(policy_of(c))}" for k, c in choice.items())
            last = verified["tries"][-1]["by_batch"] if verified["tries"] else {}
            measured = " ".join(
                f"B{b} kl {r['kl']:.4f} ratio {r['experts_ratio']:.3f}" for b, r in last.items()
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
