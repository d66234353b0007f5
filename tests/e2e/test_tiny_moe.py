"""TinyMoE: KV-cache decode == full forward, offline checkpoint, lynx rewrites every router,
exact policy == eager, and a smoke run of `lynx-compile accuracy`."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from lynx_compile.tools.tiny_moe import (
    DEFAULT_CHECKPOINT,
    NOLB_CHECKPOINT,
    TinyMoE,
    TinyMoEConfig,
    load_default_model,
    load_model,
)

import lynx_compile
from lynx_compile.cli import main as cli_main

# A small random model keeps the pure-PyTorch checks fast; the shapes keep E > B*k.
SMALL = TinyMoEConfig(dim=64, num_layers=2, num_heads=4, num_experts=32, top_k=4, expert_hidden=32)

# fp32 throughout: the cached and uncached paths sum attention over the same keys in a
# different order (masked full cache vs causal prefix), so they agree to rounding only.
ATOL_FP32 = 1e-5


@pytest.fixture(scope="module")
def small_model() -> TinyMoE:
    torch.manual_seed(0)
    return TinyMoE(SMALL).eval()


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(small_model):
    tokens = torch.randint(0, 256, (3, 21))
    full = small_model(tokens)  # [3, 21, 256]
    cache = small_model.new_cache(3, max_len=32)
    steps = [small_model(tokens[:, :5], cache, torch.tensor(0))]  # prefill 5 bytes
    for t in range(5, 21):
        steps.append(small_model(tokens[:, t : t + 1], cache, torch.tensor(t)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL_FP32, rtol=0)


@torch.no_grad()
def test_training_dispatch_matches_inference_dispatch(small_model):
    tokens = torch.randint(0, 256, (2, 17))
    logits, lb = small_model.forward_train(tokens)
    # Same experts and weights, summed in a different order (grouped vs per slot).
    torch.testing.assert_close(logits, small_model(tokens), atol=ATOL_FP32, rtol=0)
    assert lb.item() >= 1.0 - 1e-6  # E * sum f_e P_e is minimised (1.0) by a uniform router


def test_new_cache_rejects_length_beyond_rope_table(small_model):
    with pytest.raises(ValueError, match="max_len must be in"):
        small_model.new_cache(2, max_len=SMALL.max_seq_len + 1)


def test_checkpoints_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("loading the TinyMoE checkpoint tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for path in (DEFAULT_CHECKPOINT, NOLB_CHECKPOINT):
        assert path.stat().st_size <= 20 * 2**20, f"{path} exceeds the 20 MB budget"
        model = load_model(path)
        cfg = model.config
        assert cfg.num_layers >= 4 and cfg.num_experts >= 32 and cfg.top_k >= 4
    assert isinstance(load_default_model(), TinyMoE)


def test_load_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="lynx_compile.tools.train"):
        load_model(tmp_path / "absent.safetensors")


@torch.no_grad()
def test_lynx_rewrites_every_router_and_exact_matches_eager():
    model = load_default_model()
    lynx_compile.clear_report()
    compiled = torch.compile(model, backend="lynx", options={"policy": "exact", "telemetry": True})
    gen = torch.Generator().manual_seed(0)
    for batch in (4, 6):  # the second batch size and later steps reuse the first graph
        tokens = torch.randint(0, 256, (batch, 10), generator=gen)
        cache_eager = model.new_cache(batch, max_len=16)
        cache_lynx = model.new_cache(batch, max_len=16)
        for tensor in (t for kv in cache_lynx for t in kv):
            torch._dynamo.mark_dynamic(tensor, 0)
        model(tokens[:, :8], cache_eager, torch.tensor(0))
        model(tokens[:, :8], cache_lynx, torch.tensor(0))
        for t in (8, 9):
            step = tokens[:, t : t + 1]
            torch._dynamo.mark_dynamic(step, 0)
            expected = model(step, cache_eager, torch.tensor(t))
            got = compiled(step, cache_lynx, torch.tensor(t))
            # Inductor fuses and reorders fp32 reductions (RMSNorm, matmuls): rounding drift.
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    routers = [s for s in lynx_compile.report()["sites"] if s["kind"] == "router"]
    rewritten = [s for s in routers if s["status"] == "rewritten" and s["decode"]]
    # One site per layer in total: a recompile (new batch or position) would add 4 more.
    assert len(routers) == len(rewritten) == model.config.num_layers, routers
    assert all(s["num_experts"] == 32 and s["top_k"] == 4 for s in rewritten)
    assert all(s["telemetry"]["experts_ratio"] == 1.0 for s in rewritten)


def test_accuracy_cli_smoke(tmp_path, capsys):
    argv = ["accuracy", "--batch", "2", "--sequences", "2", "--steps", "3"]
    argv += ["--policies", "exact", "--prompt-len", "4", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [(r["policy"], r["batch"]) for r in rows] == [("exact", 2)]
    row = rows[0]
    expected = {"policy", "params", "batch", "acc", "acc_exact", "nll", "experts_ratio"}
    assert expected | {"is_default"} <= set(row)
    assert row["acc"] == row["acc_exact"] and row["experts_ratio"] == 1.0
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "exact" in capsys.readouterr().out
