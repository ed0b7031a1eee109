"""A real 2-process ZeRO-3 run over real shards: loss falls, checkpoints,
metrics.jsonl and W&B offline files appear, and a second start resumes."""

from __future__ import annotations

import json
import re

import pytest
from helpers import make_dataset, torchrun

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("e2e"), n_docs=160, docs_per_shard=8)


def common(data_dir, run_dir, steps):
    return [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={steps}",
        "trainer.save_every=6",
        "trainer.log_every=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "trainer.peak_flops=1e11",
    ]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_ranks_train_checkpoint_resume(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = torchrun(common(data_dir, run_dir, 12), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ZeRO stage 3" in first.stdout and "2 rank(s)" in first.stdout
    assert re.search(r"step\s+12/12 \| loss", first.stdout)  # the progress line

    recs = metrics(run_dir)
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tokens_seen", "mfu", "step_time", "memory_gb"):
        assert all(isinstance(r[key], (int, float)) for r in recs), key
    assert recs[-1]["tokens_seen"] == 12 * 2 * 4 * 32  # steps x ranks x micro-batch x seq_len
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3, [r["loss"] for r in recs]
    for step in (6, 12):
        ckpt = run_dir / "checkpoints" / f"step_{step}"
        state = json.loads((ckpt / "megagpt_state.json").read_text())
        assert state["step"] == step and state["data"]["consumed"] == step * 8
        assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
        assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # one ZeRO shard per rank
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert offline and list(offline[0].glob("run-*.wandb"))

    second = torchrun(common(data_dir, run_dir, 16), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_12 at step 12" in second.stdout
    assert "training steps 13..16" in second.stdout
    assert [r["step"] for r in metrics(run_dir)] == [2, 4, 6, 8, 10, 12, 14, 16]  # none repeated
    assert json.loads((run_dir / "run.json").read_text())["wandb_id"] == wandb_id  # same W&B run
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2
    assert json.loads((run_dir / "checkpoints/step_16/megagpt_state.json").read_text())["data"]["consumed"] == 128


def test_model_compile_through_the_engine_matches_eager(data_dir, tmp_path):
    """model.compile=true: the compiled blocks (inductor on CPU) train the same
    losses as the eager engine, to float tolerance."""
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile-{compiled}"
        r = torchrun(
            common(data_dir, run_dir, 4)
            + ["logger=none", "deepspeed=zero0", "trainer.log_every=1", f"model.compile={str(compiled).lower()}"],
            cwd=tmp_path,
            nproc=1,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[compiled] = [x["loss"] for x in metrics(run_dir)]
        # After the first step, what Dynamo built: the blocks share one graph, unbroken.
        assert ("compiled: 1 graph(s), 0 graph break(s); the first step took" in r.stdout) == compiled, r.stdout
    assert len(runs[True]) == 4
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) <= 1e-4 * abs(a), (runs[False], runs[True])


def test_hydra_multirun_runs_each_point_in_its_own_run_dir(data_dir, tmp_path):
    """`-m` without a launcher: the points run one after another in the same
    two processes (one process group, one DeepSpeed set-up), each in its own
    default run.dir, none resuming another's checkpoint."""
    args = [a for a in common(data_dir, tmp_path, 4) if not a.startswith(("run.dir=", "optim.lr="))]
    r = torchrun(["-m", *args, "logger=none", "optim.lr=3e-3,1e-3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((tmp_path / "outputs").glob("torchrun-*"))
    assert [p.name[-2:] for p in runs] == ["-0", "-1"], runs
    assert "resumed from" not in r.stdout
    for run, lr in zip(runs, (3e-3, 1e-3)):
        assert [x["step"] for x in metrics(run)] == [2, 4]
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        assert (run / "checkpoints" / "step_4").is_dir()
