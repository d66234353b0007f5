"""Calibration: the label-free distortion, the choice within a budget, the file the backend
takes (and its errors for a model it does not describe), and one end-to-end run on a small
random TinyMoE."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lynx_compile.tools import calibrate
from lynx_compile.tools.tiny_moe import TinyMoE, TinyMoEConfig

import lynx_compile
from lynx_compile import calibration
from lynx_compile.config import parse_options


def _small_model(num_experts=8, top_k=2, num_layers=2, seed=0) -> TinyMoE:
    torch.manual_seed(seed)
    config = TinyMoEConfig(
        dim=32, num_layers=num_layers, num_heads=2, num_experts=num_experts, top_k=top_k,
        expert_hidden=16, max_seq_len=64,
    )  # fmt: skip
    return TinyMoE(config).eval()


def _file(tmp_path, **overrides) -> str:
    cal = {
        "format": calibration.FORMAT,
        "model": {"name": "m", "num_layers": 2, "num_experts": 8, "top_k": 2},
        "choice": {"policy": "oea", "alpha": 3.0, "beta": 2.0, "k0": 1, "budget": 16},
        **overrides,
    }
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    return str(path)


def test_distortion_is_the_mean_kl_and_the_share_of_changed_top1():
    gen = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(13, 7, generator=gen), -1)
    b = torch.log_softmax(torch.randn(13, 7, generator=gen), -1)
    got = calibrate.distortion(a, b)
    pa, pb = a.exp().tolist(), b.exp().tolist()
    kl = [
        sum(p * math.log(p / q) for p, q in zip(ra, rb, strict=True))
        for ra, rb in zip(pa, pb, strict=True)
    ]
    flips = [max(range(7), key=ra.__getitem__) != max(range(7), key=rb.__getitem__)
             for ra, rb in zip(pa, pb, strict=True)]  # fmt: skip
    assert got["kl"] == pytest.approx(sum(kl) / 13, rel=1e-5)
    assert got["flip"] == pytest.approx(sum(flips) / 13)
    loss = [ra[max(range(7), key=ra.__getitem__)] - ra[max(range(7), key=rb.__getitem__)]
            for ra, rb in zip(pa, pb, strict=True)]  # fmt: skip
    assert got["top1_loss"] == pytest.approx(100 * sum(loss) / 13, rel=1e-5)
    assert calibrate.distortion(a, a) == {"kl": 0.0, "flip": 0.0, "top1_loss": 0.0}


def _candidate(label, policy, by_batch):
    options = calibrate.policy_options(calibrate.parse_policy(policy))
    rows = {b: {"kl": kl, "flip": fl, "experts_ratio": r} for b, (kl, fl, r) in by_batch.items()}
    return {"label": label, "choice": options, "by_batch": rows}


def test_choice_is_the_cheapest_candidate_within_budget_at_every_batch():
    cands = [
        _candidate("cheap but breaks at 16", "oea:1", {"8": (0.01, 0.0, 0.5), "16": (0.2, 0, 0.6)}),
        _candidate("fits", "affinity:3:2:1", {"8": (0.01, 0.0, 0.7), "16": (0.01, 0, 0.8)}),
        _candidate("fits, dearer", "affinity:3:2:0", {"8": (0.0, 0.0, 0.8), "16": (0.0, 0, 0.9)}),
    ]
    budget = calibrate.Budget(kl=0.05, flip=1.0)
    assert calibrate.choose(cands, [8, 16], budget)["k0"] == 1
    assert calibrate.choose(cands, [8, 16], budget)["policy"] == "affinity"
    assert calibrate.choose(cands, [8], budget)["policy"] == "oea"  # fits at 8 alone
    tight = calibrate.Budget(kl=0.001, flip=1.0)
    assert calibrate.choose(cands, [8, 16], tight)["policy"] == "affinity"  # kl 0 fits
    none = calibrate.Budget(kl=-1.0, flip=1.0)
    assert calibrate.choose(cands, [8, 16], none)["policy"] == "exact"


@pytest.mark.parametrize(
    "text", ["affinity:0:2", "affinity:3", "oea:0", "static:0", "fastest", "affinity:3:2:-1"]
)
def test_bad_policy_specs_raise_clear_errors(text):
    with pytest.raises(ValueError, match="bad policy spec"):
        calibrate.parse_policy(text)


def test_the_backend_takes_a_calibration_file_and_rejects_what_conflicts(tmp_path):
    path = _file(tmp_path)
    config = parse_options({"calibration": path})
    assert (config.policy, config.k0) == ("oea", 1)
    assert config.calibration["name"] == path
    with pytest.raises(ValueError, match=r"\['alpha'\] conflict with option calibration"):
        parse_options({"calibration": path, "alpha": 1.0})
    with pytest.raises(FileNotFoundError, match="lynx-compile calibrate"):
        parse_options({"calibration": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="not a lynx calibration"):
        parse_options({"calibration": _file(tmp_path, format="other/1")})
    with pytest.raises(ValueError, match="lacks choice.k0"):
        bad = {"policy": "oea", "alpha": 3.0, "beta": 2.0, "budget": 16}
        parse_options({"calibration": _file(tmp_path, choice=bad)})


def test_calibration_batch_takes_the_choice_for_one_decode_batch(tmp_path):
    by_batch = {"8": {"policy": "affinity", "alpha": 3.0, "beta": 1.0, "k0": 1, "budget": 16}}
    path = _file(tmp_path, choice_by_batch=by_batch)
    config = parse_options({"calibration": path, "calibration_batch": 8})
    assert (config.policy, config.beta, config.k0) == ("affinity", 1.0, 1)
    assert parse_options({"calibration": path}).policy == "oea"  # the overall choice
    with pytest.raises(ValueError, match="no choice for decode batch 16; .* at \\[8\\]"):
        parse_options({"calibration": path, "calibration_batch": 16})
    with pytest.raises(ValueError, match="calibration_batch=8 is invalid"):
        parse_options({"calibration_batch": 8})


def test_a_calibration_for_another_shape_names_what_differs():
    cal = calibration.load(
        {"format": calibration.FORMAT, "model": {"num_layers": 4, "num_experts": 32, "top_k": 4},
         "choice": {"policy": "exact", "alpha": 3.0, "beta": 2.0, "k0": 0, "budget": 16}}
    )  # fmt: skip
    with pytest.raises(calibration.CalibrationMismatchError, match="num_layers 4 .the model has 2"):
        calibration.check_model(cal, 2, 32, 4)
    with pytest.raises(
        calibration.CalibrationMismatchError, match="num_experts 32 .the model has 8"
    ):
        calibration.check_model(cal, 4, 8, 4)
    calibration.check_model(cal, 4, 32, 4)  # the right shape passes
    site = {"kind": "router", "status": "rewritten", "num_experts": 8, "top_k": 2}
    with pytest.raises(calibration.CalibrationMismatchError, match="32 experts, top-4"):
        calibration.check_sites(cal, [site])
    site = {**site, "num_experts": 32, "top_k": 4}
    with pytest.raises(calibration.CalibrationMismatchError, match="4 MoE layers.*5 routers"):
        calibration.check_sites(cal, [site] * 5)


def test_load_prompts_reads_text_jsonl_and_token_ids(tmp_path):
    (tmp_path / "p.txt").write_bytes(bytes(range(40)))
    assert calibrate.load_prompts(tmp_path / "p.txt", 3, 13).tolist()[1] == list(range(13, 26))
    (tmp_path / "p.jsonl").write_text('"abcdef"\n{"text": "ghijkl"}\n\n')
    got = calibrate.load_prompts(tmp_path / "p.jsonl", 2, 6)
    assert got.tolist() == [list(b"abcdef"), list(b"ghijkl")]
    (tmp_path / "p.json").write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7, 8, 9]]))
    assert calibrate.load_prompts(tmp_path / "p.json", 2, 4).tolist() == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    ]
    with pytest.raises(ValueError, match="holds 2 windows of 4 tokens; calibration needs 3"):
        calibrate.load_prompts(tmp_path / "p.json", 3, 4)
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        calibrate.load_prompts(tmp_path / "bad.jsonl", 1, 2)


def test_calibrate_end_to_end_and_the_backend_uses_its_choice(tmp_path):
    model = _small_model()
    prompts = torch.randint(0, 256, (6, 13), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, 256, (6, 13), generator=torch.Generator().manual_seed(2))
    cands = ["exact", "oea:1", "affinity:1:1:0"]
    cal = calibrate.calibrate(
        model, prompts, cands, (2, 3), prompt_len=4, progress=False, confirm_prompts=other
    )
    assert cal["model"] == {"name": "model", "num_layers": 2, "num_experts": 8, "top_k": 2}
    by = {c["label"]: c["by_batch"] for c in cal["candidates"]}
    for batch in ("2", "3"):
        assert by["exact"][batch]["kl"] == 0.0 and by["exact"][batch]["experts_ratio"] == 1.0
        assert by["exact"][batch]["tokens"] == 6 * (13 - 4 - 1)
        # oea k0=1 keeps only the union of top-1 choices: fewer experts than exact
        assert by["oea k0=1"][batch]["experts_ratio"] < 1.0
        assert len(by["oea k0=1"][batch]["experts_ratio_per_layer"]) == 2
    # an oea k0=1 that changes routing changes the next-token distributions
    assert by["oea k0=1"]["2"]["kl"] > 0.0
    # the file records what each draw measured for every choice it tried
    assert cal["prompts"]["draw_b"] == {"sequences": 6}
    for tries in [cal["two_draws"]["choice"], *cal["two_draws"]["choice_by_batch"].values()]:
        for t in tries:
            (cand,) = [c for c in cal["candidates"] if c["label"] == t["label"]]
            for b, row in t["draw_b"].items():
                assert t["draw_a"][b]["kl"] == cand["by_batch"][b]["kl"]
                assert row == {k: cand["by_batch_draw_b"][b][k] for k in row}
                assert row["kl"] > 0.0 and row["experts_ratio"] < 1.0
    path = tmp_path / "cal.json"
    calibrate.save(cal, path)
    assert json.loads(path.read_text())["two_draws"] == cal["two_draws"]
    assert calibrate.load_for_model(path, model)["choice"] == cal["choice"]
    with pytest.raises(calibration.CalibrationMismatchError, match="num_experts 8"):
        calibrate.load_for_model(path, _small_model(num_experts=4))

    torch._dynamo.reset()
    lynx_compile.clear_report()
    assert lynx_compile.report()["calibration"] == []
    compiled = torch.compile(model, backend="lynx", options={"calibration": str(path)})
    cache = model.new_cache(3, max_len=8)
    with torch.no_grad():
        model(prompts[:3, :4], cache, torch.tensor(0))
        compiled(prompts[:3, 4:5], cache, torch.tensor(4))
    (used,) = lynx_compile.report()["calibration"]
    assert used["name"] == str(path) and used["choice"] == cal["choice"]
    routers = [s for s in lynx_compile.report()["sites"] if s["kind"] == "router"]
    assert routers and all(s["policy"] == cal["choice"]["policy"] for s in routers)

    # the same file on a model with other expert counts: a clear error at compile time
    torch._dynamo.reset()
    other = _small_model(num_experts=4)
    wrong = torch.compile(other, backend="lynx", options={"calibration": str(path)})
    cache = other.new_cache(3, max_len=8)
    with torch.no_grad(), pytest.raises(Exception, match="made for 8 experts, top-2") as err:
        wrong(prompts[:3, :4], cache, torch.tensor(0))
    inner = getattr(err.value, "inner_exception", err.value)
    assert isinstance(inner, calibration.CalibrationMismatchError)


# ---------------------------------------------------------------- per layer, any model
def _row(kl, ratio):
    return {"by_batch": {"8": {"kl": kl, "experts_ratio": ratio}}}


def test_per_layer_choice_spends_the_budget_where_it_saves_most_per_nat():
    table = {
        "a": [_row(0.030, 0.50), _row(0.010, 0.80)],  # a's big saving is dear
        "b": [_row(0.005, 0.40), _row(0.040, 0.30)],  # b saves 0.6 for 0.005 nats
    }
    weights = {"a": 0.5, "b": 0.5}
    assert calibrate.choose_per_layer(table, weights, [8], 0.05) == {"a": 0, "b": 0}
    assert calibrate.choose_per_layer(table, weights, [8], 0.02) == {"a": 1, "b": 0}
    assert calibrate.choose_per_layer(table, weights, [8], 0.004) == {"a": None, "b": None}
    # a layer that touches few experts (small weight) is not worth the same KL
    assert calibrate.choose_per_layer(table, {"a": 0.9, "b": 0.1}, [8], 0.035)["a"] == 0


def test_per_layer_choice_keeps_the_summed_kl_within_budget_at_every_batch():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        table = {
            layer: [
                {"by_batch": {str(b): {"kl": 0.03 * float(torch.rand(1, generator=gen)),
                                       "experts_ratio": float(torch.rand(1, generator=gen))}
                              for b in (8, 16)}}
                for _ in range(3)
            ]
            for layer in "abcd"
        }  # fmt: skip
        picks = calibrate.choose_per_layer(table, dict.fromkeys("abcd", 0.25), [8, 16], 0.05)
        for b in ("8", "16"):
            spent = sum(table[k][i]["by_batch"][b]["kl"] for k, i in picks.items() if i is not None)
            assert spent <= 0.05

        # no single move left that fits and saves: the greedy stopped at a local optimum
        def kl_ratio(layer, index, b, table=table):
            if index is None:
                return 0.0, 1.0
            row = table[layer][index]["by_batch"][b]
            return row["kl"], row["experts_ratio"]

        spent = {b: sum(kl_ratio(k, i, b)[0] for k, i in picks.items()) for b in ("8", "16")}
        for layer, cands in table.items():
            for index in range(len(cands)):
                now = {b: kl_ratio(layer, picks[layer], b) for b in ("8", "16")}
                new = {b: kl_ratio(layer, index, b) for b in ("8", "16")}
                saves = sum(now[b][1] - new[b][1] for b in now) > 0
                fits = all(spent[b] - now[b][0] + new[b][0] <= 0.05 for b in now)
                assert not (saves and fits)


class ToyLM(torch.nn.Module):
    """Not TinyMoE: a stateless byte LM (each position sees only its own token), two MoE
    layers under `blocks`, no cache: decode is one call per new token."""

    def __init__(self, dim=16, experts=8, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.embed = torch.nn.Embedding(256, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {"gate": torch.nn.Linear(dim, experts, bias=False),
                 "experts": torch.nn.ParameterDict(
                     {"w": torch.nn.Parameter(torch.randn(experts, dim, dim) / dim**0.5)})}
            )
            for _ in range(2)
        )  # fmt: skip
        self.head = torch.nn.Linear(dim, 256)

    def forward(self, tokens):
        x = self.embed(tokens)  # [B, T, d]
        for block in self.blocks:
            flat = x.reshape(-1, x.shape[-1])
            probs = torch.softmax(block["gate"](flat), dim=-1)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            w = block["experts"]["w"][ids]  # [N, k, d, d]
            y = torch.einsum("nd,nkde,nk->ne", flat, w, weights)
            x = x + y.reshape(x.shape)
        return self.head(x)


def _toy_decode(compiled, tokens, prompt_len):
    """ToyLM's decode_fn: the logits predicting tokens[:, prompt_len + 1:], one call per step."""
    steps = range(prompt_len, tokens.shape[1] - 1)
    return torch.cat([compiled(tokens[:, t : t + 1]) for t in steps], dim=1)


def test_calibrate_any_model_per_layer_and_the_file_reproduces_its_measurement(tmp_path):
    torch.manual_seed(0)
    model = ToyLM().eval()
    prompts = torch.randint(0, 256, (8, 10), generator=torch.Generator().manual_seed(4))
    other = torch.randint(0, 256, (8, 10), generator=torch.Generator().manual_seed(5))
    cands = ["oea:1", "affinity:1:1:0", "affinity:3:2:1"]
    cal = calibrate.calibrate(
        model, prompts.tolist(), cands, (4,), calibrate.Budget(kl=0.1), prompt_len=2,
        progress=False, decode_fn=_toy_decode, per_layer=True, confirm_prompts=other.tolist(),
    )  # fmt: skip
    layers = ["blocks.0.gate", "blocks.1.gate"]
    assert cal["layers"] == layers and cal["model"]["num_layers"] == 2
    assert set(cal["choice_by_layer"]) == set(layers) == set(cal["choice_by_layer_by_batch"]["4"])
    table = cal["per_layer"]["candidates"]
    assert all(len(table[k]) == 3 and "4" in table[k][0]["by_batch"] for k in layers)
    verified = cal["per_layer"]["verified"]
    print(calibrate.format_table(cal))

    # the file, applied by the backend (no override), gives the KL calibrate measured
    path = tmp_path / "cal.json"
    calibrate.save(cal, path)
    got = {}
    for name, options in (("exact", {"policy": "exact"}), ("cal", {"calibration": str(path)})):
        torch._dynamo.reset()
        lynx_compile.clear_report()
        compiled = torch.compile(model, backend="lynx", options=options)
        with torch.no_grad():
            logits = torch.cat([_toy_decode(compiled, c, 2) for c in prompts.split(4)])
        got[name] = torch.log_softmax(logits.transpose(0, 1).reshape(-1, 256), -1)
    kl = calibrate.distortion(got["exact"], got["cal"])["kl"]
    # at this budget the layers take different policies (the one choice is a=3 b=2)
    assert verified["fallback"] is None
    assert len({json.dumps(c) for c in cal["choice_by_layer"].values()}) == 2
    assert kl == pytest.approx(verified["tries"][-1]["by_batch"]["4"]["kl"], rel=1e-3, abs=1e-6)
    assert kl <= 0.1
    assert verified["tries"][-1]["by_batch_draw_b"]["4"]["kl"] <= 0.1  # held on draw B too
    decode = [s for s in lynx_compile.report()["sites"] if s.get("decode")]
    assert {s["layer"]: s["policy"] for s in decode} == {
        k: c["policy"] for k, c in cal["choice_by_layer"].items()
    }
    # check_choices on the calibration prompts restates what calibrate measured
    checked = calibrate.check_choices(model, cal, prompts, prompt_len=2, decode_fn=_toy_decode)
    assert checked["per layer"]["4"]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    (one,) = [c for c in cal["candidates"] if c["choice"] == cal["choice"]]
    assert checked["one"]["4"]["kl"] == pytest.approx(one["by_batch"]["4"]["kl"], rel=1e-5)
    assert checked["one"]["4"]["experts_ratio"] == pytest.approx(
        one["by_batch"]["4"]["experts_ratio"], rel=1e-5
    )


def test_calibrate_without_decode_fn_names_what_a_model_lacks():
    with pytest.raises(TypeError, match="no new_cache.*give calibrate a decode_fn"):
        prompts = torch.zeros(4, 8, dtype=torch.int64)
        calibrate.calibrate(
            ToyLM(), prompts, batches=(4,), prompt_len=2, progress=False, two_draws=False
        )


# ------------------------------------------------------------- two draws of prompts
def test_a_choice_that_fits_draw_a_but_not_draw_b_backs_off_to_the_next_cheapest():
    cands = [
        _candidate("cheapest", "oea:1", {"8": (0.040, 0, 0.4), "16": (0.030, 0, 0.5)}),
        _candidate("breaks on A", "affinity:1:1:0", {"8": (0.2, 0, 0.3), "16": (0.2, 0, 0.3)}),
        _candidate("next", "affinity:6:1:1", {"8": (0.030, 0, 0.6), "16": (0.020, 0, 0.7)}),
        _candidate("dearest", "affinity:3:2:1", {"8": (0.010, 0, 0.8), "16": (0.0, 0, 0.9)}),
    ]
    on_b = {  # what draw B measures (a stub of the decode)
        "cheapest": {"8": 0.044, "16": 0.048},  # fits A, over the budget on B at batch 16
        "next": {"8": 0.041, "16": 0.030},
    }
    asked = []

    def rows_on_b(index, batches):
        asked.append((cands[index]["label"], tuple(batches)))
        label = cands[index]["label"]
        return {str(b): {"kl": on_b[label][str(b)], "flip": 0.0, "experts_ratio": 0.5}
                for b in batches}  # fmt: skip

    budget = calibrate.Budget(kl=0.045)
    assert calibrate.choose(cands, [8, 16], budget)["policy"] == "oea"  # draw A alone
    choice, tries = calibrate.confirm_choice(cands, [8, 16], budget, rows_on_b)
    assert (choice["policy"], choice["alpha"]) == ("affinity", 6.0)
    assert [(t["label"], t["fits"]) for t in tries] == [("cheapest", False), ("next", True)]
    assert tries[0]["draw_a"]["16"]["kl"] == 0.030 and tries[0]["draw_b"]["16"]["kl"] == 0.048
    assert asked == [("cheapest", (8, 16)), ("next", (8, 16))]  # the dearest never decoded
    # at batch 8 alone the cheapest holds on both draws
    choice, tries = calibrate.confirm_choice(cands, [8], budget, rows_on_b)
    assert choice["policy"] == "oea" and [t["fits"] for t in tries] == [True]
    # nothing that fits A holds on B: exact, every try recorded
    on_b["next"]["16"] = 0.046
    on_b["dearest"] = {"8": 0.05, "16": 0.05}
    choice, tries = calibrate.confirm_choice(cands, [8, 16], budget, rows_on_b)
    assert choice["policy"] == "exact"
    assert [t["label"] for t in tries] == ["cheapest", "next", "dearest"]


def test_a_per_layer_combination_over_budget_on_draw_b_is_chosen_again_within_less():
    table = {
        "a": [_row(0.020, 0.40), _row(0.005, 0.70)],
        "b": [_row(0.020, 0.40), _row(0.005, 0.70)],
    }
    policies = [calibrate.parse_policy("oea:1"), calibrate.parse_policy("affinity:3:2:1")]
    labels = [calibrate.policy_label(p) for p in policies]

    def rows_of(pol, batches, draw):
        """Draw A: the layers' KLs add up; draw B: 25% more (the winner's curse)."""
        kl = sum(table[k][labels.index(calibrate.policy_label(p))]["by_batch"]["8"]["kl"]
                 for k, p in pol.items())  # fmt: skip
        kl *= 1.25 if draw == "b" else 1.0
        return {str(b): {"kl": kl, "flip": 0.0, "experts_ratio": 0.5} for b in batches}

    budget, one = calibrate.Budget(kl=0.045), calibrate.policy_options(policies[1])
    got = calibrate._verified_choice(
        table, {"a": 0.5, "b": 0.5}, [8], budget, policies, rows_of, ["a", "b"], one, 0.8
    )
    first, second = got["verified"]["tries"]
    assert set(first["picks"].values()) == {"oea k0=1"}  # 0.040 on A, 0.050 on B
    assert first["by_batch"]["8"]["kl"] == pytest.approx(0.040)
    assert first["by_batch_draw_b"]["8"]["kl"] == pytest.approx(0.050)
    assert not first["fits"] and second["fits"]
    assert second["kl_budget"] == pytest.approx(0.045 * 0.9 * 0.045 / 0.050)
    assert sorted(second["picks"].values()) == ["affinity a=3 b=2 k0=1", "oea k0=1"]
    assert got["verified"]["fallback"] is None
    assert sorted(c["policy"] for c in got["choice"].values()) == ["affinity", "oea"]
    # on draw A alone the first combination stands
    alone = calibrate._verified_choice(
        table, {"a": 0.5, "b": 0.5}, [8], budget, policies, rows_of, ["a"], one, 0.8
    )
    assert len(alone["verified"]["tries"]) == 1
    assert {c["policy"] for c in alone["choice"].values()} == {"oea"}


def test_calibrate_backs_off_and_the_file_records_both_draws(tmp_path, monkeypatch):
    """A real decode, with draw B made to over-measure the first policy confirmed there (draw
    A's cheapest): the file's choice backs off to the next candidate and records what each
    draw measured."""
    model = _small_model()
    gen = torch.Generator().manual_seed(1)
    prompts, other = torch.randint(0, 256, (2, 6, 13), generator=gen)
    decode_rows, over = calibrate._RowMeasurer.__call__, []

    def over_on_b(self, policy, batches, draw):
        rows = decode_rows(self, policy, batches, draw)
        if draw == "b" and (not over or over[0] == policy):
            over[:] = [policy]
            return {b: {**r, "kl": 1.0} for b, r in rows.items()}
        return rows

    monkeypatch.setattr(calibrate._RowMeasurer, "__call__", over_on_b)
    budget = calibrate.Budget(kl=0.5)
    cal = calibrate.calibrate(
        model, prompts, ["oea:1", "affinity:1:1:0"], (2, 3), budget, prompt_len=4,
        progress=False, confirm_prompts=other,
    )  # fmt: skip
    on_a = calibrate.choose(cal["candidates"], [2, 3], budget)  # draw A's choice
    assert on_a != cal["choice"] and calibrate.policy_of(on_a) == over[0]
    tries = cal["two_draws"]["choice"]
    (second,) = [c for c in cal["candidates"] if c["choice"] == cal["choice"]]
    assert [t["fits"] for t in tries] == [False, True] and tries[1]["label"] == second["label"]
    assert tries[0]["draw_b"]["2"]["kl"] == 1.0 and tries[0]["draw_a"]["2"]["kl"] < 0.5
    path = tmp_path / "cal.json"
    calibrate.save(cal, path)
    saved = json.loads(path.read_text())
    assert saved["two_draws"]["choice"][0]["draw_b"]["3"]["kl"] == 1.0
    assert all("by_batch_draw_b" in c for c in saved["candidates"])
    assert f"{tries[0]['label']}: B2 " in calibrate.format_table(cal)


def test_two_draws_need_other_windows():
    prompts = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs confirm_prompts.*two_draws=False"):
        calibrate._prompt_draws(prompts, None, True)
    with pytest.raises(ValueError, match="repeat 1 of prompts' windows"):
        calibrate._prompt_draws(prompts, torch.cat([prompts[:1], prompts[:3] + 1]), True)
    with pytest.raises(ValueError, match=r"shaped like prompts \[4, 8\]"):
        calibrate._prompt_draws(prompts, prompts[:2] + 1, True)
    assert list(calibrate._prompt_draws(prompts, None, False)) == ["a"]


def test_the_second_draw_of_windows_overlaps_none_of_the_first():
    first = calibrate._window_starts(2000, 30, 49, 1)
    second = calibrate._window_starts(2000, 30, 49, 2, avoid=first)
    assert all(abs(a - b) >= 49 for a in first for b in second)
    assert calibrate._window_starts(2000, 30, 49, 1) == first  # draw A as before


def test_load_prompts_skips_to_the_second_draw(tmp_path):
    (tmp_path / "p.txt").write_bytes(bytes(range(40)))
    assert calibrate.load_prompts(tmp_path / "p.txt", 1, 13, skip=1).tolist() == [
        list(range(13, 26))
    ]
    with pytest.raises(ValueError, match="needs 6, 3 per draw for two draws.*--one-draw"):
        calibrate.load_prompts(tmp_path / "p.txt", 3, 10, skip=3)


@pytest.mark.parametrize("seed, one_draw", [(1, False), (2, False), (1, True)])
def test_check_seed_must_be_another_draw(seed, one_draw):
    import argparse

    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    argv = ["--out", "x.json", "--threads", "0", "--check-seed", str(seed)]  # threads as set
    argv += ["--one-draw"] * one_draw
    with pytest.raises(SystemExit, match=f"--check-seed {seed} is a draw the choice"):
        calibrate.run(parser.parse_args(argv))
