"""`lynx-compile bench --suite real --quick`: the real-size suite's code path at toy
dimensions, run as a user runs it, and its memory check."""

from __future__ import annotations

import json
import math

import torch

from tests.tools.test_demo_bench import ROW_KEYS, _lynx_compile

SHAPES = ["Qwen3-30B-A3B", "DeepSeek-V3-shaped"]  # a softmax and a grouped sigmoid router
METRICS = {"ms", "ms_min", "paired_vs_inductor", "noise", "experts", "bytes", "floor_ms"}


def _exact_experts(shape_name: str, batch: int) -> int:
    """Distinct experts of the model's own top-k at `batch`, from the block's router in
    eager: softmax routers rank by the router logits (the top-k of softmax is theirs)."""
    from lynx_compile.tools import bench_real

    shape = next(s for s in bench_real.SHAPES if s.name == shape_name)
    block, u = bench_real.build(shape, quick=True, dtype=torch.bfloat16)
    x = bench_real.make_inputs(u, batch, torch.bfloat16, seed=batch).reshape(batch, -1)
    logits = torch.nn.functional.linear(x, block.gate.weight).float()
    return torch.topk(logits, block.gate.top_k, dim=-1).indices.unique().numel()


def test_real_suite_quick_writes_every_row_and_the_plot(tmp_path):
    out_dir = tmp_path / "real"
    stdout = _lynx_compile(
        ["bench", "--suite", "real", "--quick", "--shapes", *SHAPES, "--rounds", "3"]
        + ["--out", str(out_dir)],
        600,
    )
    result = json.loads((out_dir / "results.json").read_text())
    rows = result["rows"]
    assert rows and all(set(row) == ROW_KEYS for row in rows), rows[:3]
    cases = {row["case"] for row in rows}
    want = {f"{s}/bfloat16/t1/b{b}" for s in SHAPES for b in (1, 4)}
    assert cases == want, cases
    for case in cases:
        got = {(r["backend"], r["metric"]): r["value"] for r in rows if r["case"] == case}
        for backend in ("eager", "inductor", "lynx-exact", "lynx"):
            assert {(backend, m) for m in METRICS} <= set(got), (case, backend)
            assert got[backend, "ms"] > 0 and got[backend, "floor_ms"] > 0
        assert got["inductor", "paired_vs_inductor"] == 1.0
        assert got["lynx-exact", "read_gbps"] > 0  # the floor paired in the same rounds
        # the A/A control: lynx exact timed twice per round, the second turn over the first
        assert 0.2 < got["lynx-exact", "aa_ratio"] < 5.0, got["lynx-exact", "aa_ratio"]
        assert ("lynx-exact-again", "ms") not in got  # a control, not a backend row
        # lynx default never touches more experts than the exact routing
        assert got["lynx", "experts"] <= got["lynx-exact", "experts"]
        assert got["eager", "experts"] == got["lynx-exact", "experts"]
    b4 = f"{SHAPES[0]}/bfloat16/t1/b4"
    qwen = {(r["backend"], r["metric"]): r["value"] for r in rows if r["case"] == b4}
    assert qwen["lynx-exact", "experts"] == _exact_experts(SHAPES[0], 4)
    assert result["meta"]["skipped"] == [] and result["meta"]["read_bandwidth"]
    assert result["meta"]["rounds"] == 3  # --rounds reaches the suite
    assert "| Qwen3-30B-A3B | bfloat16 | 1 | 4 |" in stdout
    assert (out_dir / "time_vs_experts.png").stat().st_size > 0


def test_a_shape_that_does_not_fit_in_memory_is_skipped_and_listed():
    from lynx_compile.tools import bench, bench_real

    shape = bench_real.SHAPES[1]  # Mixtral-8x7B
    need = bench_real.block_bytes(shape, quick=False, dtype=torch.bfloat16)
    assert math.isclose(need, 3 * 8 * 4096 * 14336 * 2 + 8 * 4096 * 2, rel_tol=1e-9)
    config = bench_real.RealConfig(headroom=1e6)  # a million GiB must stay free
    meta = {"skipped": [], "read_bandwidth": {}}
    rows = bench.Rows("cpu")
    bench_real.run_shape(shape, torch.bfloat16, config, rows, meta)
    assert rows.rows == [] and len(meta["skipped"]) == 1
    assert meta["skipped"][0].startswith("Mixtral-8x7B/bfloat16: 2.6 GiB of weights")


def test_the_floor_fraction_pairs_each_round_with_the_floor_timed_in_it():
    """Two rounds in which the machine's bandwidth halves: the backend reads at the floor in
    both, so every round's fraction is 1, where a floor from the first round alone (or the
    best pass) would have said 2/3."""
    from lynx_compile.tools import bench_real

    gib = bench_real.FLOOR_BYTES
    floor_ms = [10.0, 10.0, 20.0, 20.0]  # 2 calls per round: 1 GiB in 10 ms, then in 20
    samples = [5.0, 5.0, 10.0, 10.0]  # half a GiB each call: at the floor in both rounds
    floor, fraction, bandwidth = bench_real.paired_floor(samples, floor_ms, gib / 2, calls=2)
    assert math.isclose(fraction, 1.0)
    assert math.isclose(bandwidth, gib * 75)  # the median of 100 and 50 GiB/s
    assert math.isclose(floor, 1e3 / 150)  # half a GiB at 75 GiB/s, in ms
    # a backend at half the floor's speed in the slow round only
    _, fraction, _ = bench_real.paired_floor([5.0, 5.0, 20.0, 20.0], floor_ms, gib / 2, 2)
    assert math.isclose(fraction, 0.75)  # the median of 1.0 and 0.5


def test_interleaved_rounds_alternate_the_order_of_the_backends():
    """Odd rounds run the backends in reverse order (no backend always follows the same
    other one), and each backend's samples stay `calls` consecutive calls per round."""
    from lynx_compile.tools import bench

    visits = []

    def backend(label):
        return lambda: visits.append(label)

    fns = {label: backend(label) for label in ("a", "b", "c")}
    samples = bench.time_interleaved(fns, (), torch.device("cpu"), 0, 3, 2)
    assert "".join(visits) == "aabbcc" + "ccbbaa" + "aabbcc"
    assert {label: len(s) for label, s in samples.items()} == {"a": 6, "b": 6, "c": 6}
