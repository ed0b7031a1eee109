"""The benchmark runs and its figures are well-formed (the figures themselves go in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import make_dataset


def test_bench_data_prints_side_by_side_figures(tmp_path):
    data = make_dataset(tmp_path, n_docs=40, docs_per_shard=5)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "megagpt.bench", "data", "--data", str(data), "--seq-len", "64",
                        "--micro-batch", "4", "--seconds", "0.2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for label in ("raw read of the shard files", "webdataset.WebDataset iteration", "megagpt loader",
                  "tiny model training step"):
        assert label in r.stdout
    fig = json.loads(out.read_text())
    assert "warm tokens/s" in r.stdout and "cold tokens/s" in r.stdout
    for key in ("raw_read_tokens_per_sec", "webdataset_tokens_per_sec", "loader_tokens_per_sec",
                "tiny_model_train_tokens_per_sec", "raw_read_cold_tokens_per_sec", "loader_cold_tokens_per_sec"):
        assert fig[key] > 0
    assert abs(fig["loader_vs_raw"] - fig["loader_tokens_per_sec"] / fig["raw_read_tokens_per_sec"]) < 1e-9
    assert abs(fig["loader_vs_raw_cold"] - fig["loader_cold_tokens_per_sec"] / fig["raw_read_cold_tokens_per_sec"]) < 1e-9
