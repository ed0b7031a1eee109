"""`python -m megagpt.bench scaling | memory | cost` run and their figures are well-formed.

Benchmarks are not timed tests: these check that each runs end to end with
tiny settings and that its JSON holds the expected rows with positive,
consistent figures.  The figures themselves go in the README.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import make_dataset

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)


def _bench(args: list[str], out, timeout: int = 600) -> tuple[dict, str]:
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(out.read_text()), r.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_scaling_runs_three_setups_with_breakdown(tmp_path):
    data = make_dataset(tmp_path, n_docs=60, docs_per_shard=6)
    fig, stdout = _bench(
        [
            "scaling",
            "--data",
            str(data),
            "--n-layer",
            "2",
            "--n-embd",
            "64",
            "--seq-len",
            "32",
            "--global-batch",
            "4",
            "--micro-batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            # A peak above any CPU's fp32 rate (this one's: ~9e10), so that MFU < 1
            # holds for any correct count (1e10 did not once the loop lost its syncs).
            "--profile-steps",
            "1",
            "--peak-flops",
            "1e12",
            "--out",
            str(tmp_path / "runs"),
        ],
        tmp_path / "scaling.json",
    )
    rows = fig["rows"]
    assert [(r["zero_stage"], r["processes"]) for r in rows] == [(0, 1), (0, 2), (3, 2)]
    assert [r["grad_accum"] for r in rows] == [2, 1, 1]  # the same global batch everywhere
    assert fig["machine_peak_flops"] == 1e12
    for r in rows:
        for key in ("tokens_per_sec", "step_time", "mfu", "vs_1_process", "scaling_efficiency", "memory_gb_rank0"):
            assert _positive(r[key]), (r["setup"], key, r[key])
        assert r["mfu"] < 1
        assert r["timed_steps"] == [3, 4]  # warm-up (1) and profiled (2) steps left out
        assert abs(r["scaling_efficiency"] - r["vs_1_process"] / r["processes"]) < 1e-9
        assert sorted(r["breakdown"]) == [f"rank{i}" for i in range(r["processes"])]
        for b in r["breakdown"].values():
            assert set(b) == {"compute", "all_gather", "reduce", "data_wait", "optimizer", "wall"}
            assert all(v >= 0 and math.isfinite(v) for v in b.values())
            assert b["wall"] > 0 and b["compute"] > 0
    assert rows[0]["vs_1_process"] == 1.0
    assert rows[2]["breakdown"]["rank0"]["all_gather"] > 0  # ZeRO-3 gathers parameters
    assert rows[1]["breakdown"]["rank0"]["reduce"] > 0  # data parallel all-reduces gradients
    for label in ("ZeRO-0 x 1 proc", "ZeRO-0 x 2 procs", "ZeRO-3 x 2 procs", "tokens/s", "MFU", "effic."):
        assert label in stdout


def test_bench_memory_zero3_params_per_rank_fall_as_one_over_ranks(tmp_path):
    fig, stdout = _bench(
        [
            "memory",
            "--n-layer",
            "2",
            "--n-embd",
            "128",
            "--n-head",
            "4",
            "--vocab",
            "1024",
            "--seq-len",
            "16",
            "--micro-batch",
            "1",
            "--steps",
            "1",
            "--ranks",
            "1",
            "2",
            "--stages",
            "0",
            "3",
            "--out",
            str(tmp_path / "runs"),
        ],
        tmp_path / "memory.json",
    )
    rows = {(r["zero_stage"], r["ranks"]): r for r in fig["rows"]}
    assert sorted(rows) == [(0, 1), (0, 2), (3, 1), (3, 2)]
    full = fig["model"]["param_bytes"]
    assert full == 4 * fig["model"]["n_params"]  # fp32
    for r in rows.values():
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes", "model_state_bytes"):
            assert _positive(r[key]), (r["zero_stage"], r["ranks"], key)
        assert len(r["per_rank"]) == r["ranks"]
        assert all(p["inner_is_megagpt_optimizer"] for p in r["per_rank"])
    for ranks in (1, 2):  # ZeRO-0 replicates everything
        z0 = rows[(0, ranks)]
        assert z0["param_bytes"] == full and z0["params_vs_replicated"] == 1.0
        assert z0["grad_bytes"] == full
        assert z0["optimizer_state_bytes"] == pytest.approx(2 * full, rel=0.01)  # AdamW: 2 fp32 moments
    one, two = rows[(3, 1)], rows[(3, 2)]
    assert one["param_bytes"] == pytest.approx(full, rel=0.1)
    assert two["param_bytes"] / one["param_bytes"] == pytest.approx(0.5, rel=0.1)
    assert two["params_vs_replicated"] == pytest.approx(0.5, rel=0.1)
    assert two["grad_bytes"] / one["grad_bytes"] == pytest.approx(0.5, rel=0.1)
    assert two["optimizer_state_bytes"] / one["optimizer_state_bytes"] == pytest.approx(0.5, rel=0.1)
    # Collectives of one step, in model sizes: data parallel all-reduces the gradients once;
    # ZeRO-3 gathers the parameters (at least once) and reduce-scatters the gradients once.
    assert rows[(0, 2)]["reduced_vs_model"] == pytest.approx(1.0, rel=0.05)
    assert rows[(0, 2)]["gathered_vs_model"] == 0
    assert rows[(3, 2)]["gathered_vs_model"] >= 0.9
    assert rows[(3, 2)]["reduced_vs_model"] == pytest.approx(1.0, rel=0.05)
    assert "params/replicated" in stdout and "peak RSS" in stdout


def test_bench_cost_table_over_width_and_seq_len(tmp_path):
    fig, stdout = _bench(
        [
            "cost",
            "--widths",
            "32",
            "64",
            "--seq-lens",
            "16",
            "32",
            "--n-layer",
            "1",
            "--micro-batch",
            "2",
            "--steps",
            "1",
            "--peak-flops",
            "1e10",
        ],
        tmp_path / "cost.json",
    )
    rows = fig["rows"]
    assert [(r["n_embd"], r["seq_len"]) for r in rows] == [(32, 16), (32, 32), (64, 16), (64, 32)]
    for r in rows:
        for key in ("step_time", "tokens_per_sec", "mfu", "peak_rss_bytes", "n_params", "model_state_bytes"):
            assert _positive(r[key]), (r["n_embd"], r["seq_len"], key)
        assert r["tokens_per_step"] == 2 * r["seq_len"]
        assert r["model_state_bytes"] == 16 * r["n_params"]
    assert rows[2]["n_params"] > rows[0]["n_params"]
    assert rows[0]["step_time_vs_smallest_width"] == 1.0 and rows[0]["step_time_vs_shortest_seq"] == 1.0
    assert "step s" in stdout and "peak RSS MB" in stdout
