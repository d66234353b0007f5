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
    cands = ["exact", "oea:1", "affinity:1:1:0"]
    cal = calibrate.calibrate(model, prompts, cands, (2, 3), prompt_len=4, progress=False)
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
    path = tmp_path / "cal.json"
    calibrate.save(cal, path)
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
