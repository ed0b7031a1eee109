"""A resume follows the config it was started with, or stops before loading.

Real 2-process ZeRO-3 jobs on CPU (fp32, gloo):
- an extended resume (trainer.max_steps 20 -> 30, a new optim.lr, warmup and
  floor) runs every step after the resume at the learning rate of a run that
  had the longer schedule from the start, and says what changed, one line a key;
- the optimizer's other hyperparameters (weight decay, betas, eps) are this
  run's once a checkpoint is loaded (tests/engine_state.py reads them back);
- a changed shape, ZeRO stage or data layout stops every rank before
  DeepSpeed reads the checkpoint, one line per key, with no traceback;
- a run.dir whose checkpoints all fail verification stops instead of
  starting over, and metrics.jsonl is never truncated by a new start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, _torchrun_job, make_dataset, torchrun

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

BASE_STEPS = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume_cfg"), n_docs=200, docs_per_shard=8)


def args(data_dir, run_dir, *extra):
    return [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        "trainer.save_every=10",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "logger=none",
        "trainer.peak_flops=1e11",
        *extra,
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """20 steps with trainer.max_steps=20: checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("base")
    r = torchrun(args(data_dir, root / "run", f"trainer.max_steps={BASE_STEPS}"), cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


@pytest.fixture
def run_copy(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


NEW_SCHEDULE = ["trainer.max_steps=30", "optim.lr=2e-3", "optim.warmup_steps=5", "optim.min_lr_ratio=0.2"]


def test_an_extended_resume_runs_every_step_at_the_longer_schedules_rate(data_dir, run_copy, tmp_path):
    r = torchrun(args(data_dir, run_copy, *NEW_SCHEDULE), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for line in (
        "resume: trainer.max_steps: 20 -> 30",
        "resume: optim.lr: 0.003 -> 0.002",
        "resume: optim.warmup_steps: 2 -> 5",
        "resume: optim.min_lr_ratio: 0.1 -> 0.2",
    ):
        assert f"{line} (this run's value applies from step 21)" in r.stdout, r.stdout
    fresh = tmp_path / "fresh"
    r = torchrun(args(data_dir, fresh, *NEW_SCHEDULE), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = {x["step"]: x["lr"] for x in records(run_copy) if x["step"] > BASE_STEPS}
    longer = {x["step"]: x["lr"] for x in records(fresh) if x["step"] > BASE_STEPS}
    assert sorted(resumed) == list(range(BASE_STEPS + 1, 31))
    assert resumed == longer  # the same formula at the same iteration: equal to the last bit


def engine_state_after_load(data_dir, checkpoint: Path, out: Path, *overrides) -> dict:
    """The optimizer groups and schedule of an engine built with `overrides`
    once `checkpoint` is loaded into it (tests/engine_state.py, 2 ranks)."""
    cmd, env = _torchrun_job([], None, 2)
    cmd = cmd[: cmd.index("-m", 2)] + [
        str(REPO / "tests" / "engine_state.py"),
        str(out),
        str(checkpoint),
        "--",
        *args(data_dir, out.parent / "unused", *overrides),
    ]
    r = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(f"{out}0.pt", weights_only=False)


def test_a_resume_applies_this_runs_optimizer_hyperparameters(data_dir, base_run, tmp_path):
    state = engine_state_after_load(
        data_dir,
        base_run / "checkpoints" / "step_20",
        tmp_path / "state",
        "optim.weight_decay=0.05",
        "optim.beta1=0.8",
        "optim.beta2=0.9",
        "optim.eps=1e-6",
        *NEW_SCHEDULE,
    )
    decay, no_decay = state["groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    for group in (decay, no_decay):
        assert tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
    assert state["scheduler"] == {"last_batch_iteration": BASE_STEPS}
    # The rate of step 21 by the 30-step schedule: warmup over 5, cosine from 2e-3 down to 0.2 x 2e-3.
    import math

    progress = (BASE_STEPS - 5 + 1) / (30 - 5)
    expected = 2e-3 * (0.2 + 0.8 * (1 + math.cos(math.pi * progress)) / 2)
    assert decay["lr"] == pytest.approx(expected, rel=1e-12) and no_decay["lr"] == decay["lr"]


def test_what_a_resume_cannot_honour_stops_every_rank_before_loading(data_dir, run_copy, tmp_path):
    before = (run_copy / "metrics.jsonl").read_bytes()
    r = torchrun(
        args(data_dir, run_copy, "trainer.max_steps=30", "model.n_layer=3", "data.seq_len=64", "deepspeed=zero0"),
        cwd=tmp_path,
    )
    assert r.returncode != 0
    ckpt = run_copy / "checkpoints" / "step_20"
    for rank in (0, 1):
        for key, old, new in (
            ("model.n_layer", 2, 3),
            ("model.max_seq_len", 32, 64),
            ("deepspeed.zero_stage", 3, 0),
            ("data.seq_len", 32, 64),
        ):
            line = (
                f"megagpt: error (rank {rank}): cannot resume from {ckpt}: {key} is {old} in the checkpoint "
                f"and {new} here: "
            )
            assert line in r.stderr, r.stderr[-3000:]
            assert f"resume with {key}={old}, or start a new run.dir" in r.stderr
    workers = r.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report follows
    assert "Traceback" not in workers, workers[-3000:]
    assert (run_copy / "metrics.jsonl").read_bytes() == before


def damage(checkpoint: Path) -> None:
    victim = max((p for p in checkpoint.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])


def test_a_run_dir_whose_checkpoints_all_fail_verification_stops_instead_of_starting_over(data_dir, run_copy, tmp_path):
    for step in (10, 20):
        damage(run_copy / "checkpoints" / f"step_{step}")
    before = (run_copy / "metrics.jsonl").read_bytes()
    r = torchrun(args(data_dir, run_copy, "trainer.max_steps=30"), cwd=tmp_path)
    assert r.returncode != 0
    for rank in (0, 1):
        line = next(x for x in r.stderr.splitlines() if x.startswith(f"megagpt: error (rank {rank}): "))
        assert "holds 2 checkpoint(s) and none verifies (step_20: " in line and "; step_10: " in line, line
        assert "start over with trainer.resume=never" in line
    assert "training steps" not in r.stdout
    assert (run_copy / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == ["step_10", "step_20"]  # none set aside

    # Asked to start over, it does, and keeps the earlier records.
    r = torchrun(args(data_dir, run_copy, "trainer.max_steps=3", "trainer.resume=never"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [x["step"] for x in records(run_copy)]
    assert steps == list(range(1, BASE_STEPS + 1)) + [1, 2, 3]
    assert "metrics.jsonl: 20 record(s) of an earlier start kept" in r.stderr
