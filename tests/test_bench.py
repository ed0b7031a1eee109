"""The benchmark runs and its figures are well-formed (the figures themselves go in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, make_dataset


def test_bench_data_prints_side_by_side_figures(tmp_path):
    data = make_dataset(tmp_path, n_docs=40, docs_per_shard=5)
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.bench",
            "data",
            "--data",
            str(data),
            "--seq-len",
            "64",
            "--micro-batch",
            "4",
            "--seconds",
            "0.2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for label in (
        "raw read of the shard files",
        "webdataset.WebDataset iteration",
        "megagpt loader",
        "tiny model training step",
    ):
        assert label in r.stdout
    fig = json.loads(out.read_text())
    assert "warm tokens/s" in r.stdout and "cold tokens/s" in r.stdout
    for key in (
        "raw_read_tokens_per_sec",
        "webdataset_tokens_per_sec",
        "loader_tokens_per_sec",
        "tiny_model_train_tokens_per_sec",
        "raw_read_cold_tokens_per_sec",
        "loader_cold_tokens_per_sec",
    ):
        assert fig[key] > 0
    assert abs(fig["loader_vs_raw"] - fig["loader_tokens_per_sec"] / fig["raw_read_tokens_per_sec"]) < 1e-9
    assert (
        abs(fig["loader_vs_raw_cold"] - fig["loader_cold_tokens_per_sec"] / fig["raw_read_cold_tokens_per_sec"]) < 1e-9
    )


def test_bench_train_rows_side_by_side(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.bench",
            "train",
            "--layers",
            "1",
            "--heads",
            "2",
            "--width",
            "32",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--vocab",
            "128",
            "--rounds",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--no-compile",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    fig = json.loads(out.read_text())
    names = [row["variant"] for row in fig["rows"]]
    assert names[0].startswith("GPT2LMHeadModel") and len(names) == 4
    assert all(row["step_sec"] > 0 and row["tokens_per_sec"] > 0 and row["mfu"] > 0 for row in fig["rows"])
    assert fig["rows"][0]["speedup_vs_peer"] == 1.0
    # same model shape on both sides: megagpt counts the same parameters as GPT2LMHeadModel
    assert len({row["params"] for row in fig["rows"]}) == 1
    assert "GPT2LMHeadModel (sdpa) + torch AdamW" in r.stdout and "vs peer" in r.stdout


def test_bench_gpu_says_plainly_without_cuda():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is here: the benchmark would run for real")
    r = subprocess.run([sys.executable, "-m", "megagpt.bench", "gpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device here" in r.stderr


@pytest.mark.slow
def test_bench_compile_rows_compile_once_each(tmp_path):
    """`python -m megagpt.bench compile`: every row runs in its own process with a cold
    inductor cache; the compiled rows each build one graph (the blocks share theirs)."""
    out = tmp_path / "compile.json"
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.bench", "compile", "--layers", "2", "--width", "64", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["label"]: x for x in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        "megagpt, eager",
        "megagpt, compiled blocks",
        "megagpt, compiled whole",
        "transformers, compiled whole",
    ]
    assert all("error" not in x for x in rows.values()), rows
    assert rows["megagpt, eager"]["graphs"] == 0
    for label in list(rows)[1:]:
        assert rows[label]["graphs"] == 1, rows[label]
        assert rows[label]["first_step_s"] > rows[label]["step_ms"] / 1e3  # the compile is in the first step
    assert "megagpt, compiled blocks" in r.stdout
