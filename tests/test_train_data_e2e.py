"""Real 2-process runs over a two-source mixture with validation splits and a
truncated shard: on_error=skip trains on, counts it and keeps it out after a
resume; on_error=raise stops both ranks with one line naming the shard."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_texts, torchrun

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from megagpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("mix")
    for name, seed in (("a", 1), ("b", 2)):
        src = root / name / "src"
        src.mkdir(parents=True)
        for i, t in enumerate(make_texts(70, seed=seed)):
            (src / f"{i:03d}.txt").write_text(t if name == "a" else t.upper())
    prepare([str(root / "a" / "src")], str(root / "a" / "data"), vocab_size=300, docs_per_shard=6, val_docs=8, log=None)
    prepare(
        [str(root / "b" / "src")],
        str(root / "b" / "data"),
        tokenizer=str(root / "a" / "data" / "tokenizer.json"),
        docs_per_shard=6,
        val_docs=8,
        log=None,
    )
    return root / "a" / "data", root / "b" / "data"


def args(a, b, run_dir, steps, on_error):
    return [
        f"run.dir={run_dir}",
        "data=mixture",
        f"data.sources=[{{name:a,urls:{a},weight:0.7}},{{name:b,urls:{b},weight:0.3}}]",
        "data.seq_len=16",
        "data.num_streams=2",
        "data.shuffle_shards=false",
        "data.mix_period=10",
        f"data.on_error={on_error}",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "trainer.micro_batch_size=5",
        f"trainer.max_steps={steps}",
        "trainer.save_every=4",
        "trainer.log_every=4",
        "trainer.eval_every=4",
        "trainer.eval_batches=2",
        "logger=none",
        "trainer.peak_flops=1e11",
    ]


def damaged_copy(a, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(a, copy)
    victim = copy / "shard-000000.tar"  # stream 0 (rank 0) reads it first: no shuffle
    victim.write_bytes(victim.read_bytes()[:3000])
    return copy, victim


def test_mixture_skip_bad_shard_validation_and_resume(sources, tmp_path):
    a, b = sources
    a_bad, victim = damaged_copy(a, tmp_path)
    run_dir = tmp_path / "run"
    r = torchrun(args(a_bad, b, run_dir, 8, "skip"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping shard" in r.stderr and victim.name in r.stderr
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [4, 8]
    assert recs[-1]["data_skipped_shards"] >= 1
    assert abs(recs[-1]["mix/a"] - 0.7) <= 0.1 and abs(recs[-1]["mix/b"] - 0.3) <= 0.1
    for x in recs:
        assert x["val_loss"] > 0 and x["val_loss/a"] > 0 and x["val_loss/b"] > 0
        assert "data_wait" in x
    state = json.loads((run_dir / "checkpoints/step_8/megagpt_state.json").read_text())
    assert state["data"]["bad_shards"] == [str(victim)]
    assert state["data"]["consumed"] == 8 * 10

    again = torchrun(args(a_bad, b, run_dir, 12, "skip"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 8" in again.stdout
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]


def test_bad_shard_raise_stops_every_rank_with_one_line(sources, tmp_path):
    a, b = sources
    a_bad, victim = damaged_copy(a, tmp_path)
    r = torchrun(args(a_bad, b, tmp_path / "run", 8, "raise"), cwd=tmp_path, timeout=180)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("megagpt: error")]
    assert {x.split(")")[0] for x in errors} == {"megagpt: error (rank 0", "megagpt: error (rank 1"}
    assert all(victim.name in x for x in errors), errors
