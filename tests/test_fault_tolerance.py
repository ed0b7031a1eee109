"""Fault tolerance with real 2-process ZeRO-3 jobs on CPU (fp32, gloo):
verified checkpoints, bitwise resume after SIGKILL, damaged-checkpoint
fallback, stop requests (signal,
stop file), the non-finite-loss policy, loss spikes, the watchdog and a
crashed rank.  (Resharding to another number of ranks:
tests/test_elastic_resume.py.)"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import FAULT_TRAIN, check_reference, kill_job, make_dataset, torchrun, torchrun_popen, wait_for, worker_pid

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ft"), n_docs=200, docs_per_shard=8)


def args(data_dir, run_dir, steps=STEPS, *extra):
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
        "trainer.save_every=4",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "logger=none",
        "trainer.peak_flops=1e11",
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("ref")
    r = torchrun(args(data_dir, root / "run", STEPS, "trainer.keep_last=2"), cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


def committed(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{step}" / "megagpt_state.json").exists()


def newest_committed(run_dir: Path) -> int:
    """The newest committed checkpoint's step (step_N.partial holds its state file before the rename)."""
    names = [p.parent.name for p in (run_dir / "checkpoints").glob("step_*/megagpt_state.json")]
    return max((int(n[5:]) for n in names if n[5:].isdigit()), default=0)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_learning_rate_schedule_as_the_steps_ran_it(reference):
    """The logged lr is the one each update used: step 1 already learns at
    lr / warmup_steps (DeepSpeed's schedule would start it at 0), the last step
    runs at lr * min_lr_ratio, and the schedule peaks at lr in between."""
    lrs = [r["lr"] for r in records(reference)]
    assert len(lrs) == STEPS
    assert lrs[0] == pytest.approx(3e-3 / 2, rel=1e-9)
    assert lrs[-1] == pytest.approx(3e-3 * 0.1, rel=1e-9)
    assert max(lrs) == pytest.approx(3e-3, rel=0.01) and lrs.index(max(lrs)) <= 3
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # cosine decay after the warmup


def test_verified_checkpoints_layout(reference):
    ckpts = reference / "checkpoints"
    steps = sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*"))
    assert steps == [20, 24]  # keep_last=2
    assert (ckpts / "latest").read_text().strip() == "step_24"
    assert not list(ckpts.glob("*.partial"))
    from megagpt.checkpoint import verify

    newest = ckpts / "step_24"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()} - {
        "manifest.json",
        "megagpt_state.json",
    }
    assert set(manifest) == on_disk and len(manifest) >= 6  # shards, rng files, tokenizer
    assert verify(str(newest)) is None


def test_verify_finds_truncation_corruption_and_missing_files(reference, tmp_path):
    from megagpt.checkpoint import complete_checkpoints, verify

    src = reference / "checkpoints" / "step_24"
    cases = {
        "truncated": lambda f: f.write_bytes(f.read_bytes()[:-10]),
        "corrupt": lambda f: f.write_bytes(_flip(f.read_bytes())),
        "missing": lambda f: f.unlink(),
    }
    for name, damage in cases.items():
        ck = tmp_path / name / "step_24"
        shutil.copytree(src, ck)
        damage(sorted(ck.glob("*optim_states.pt"))[0])
        problem = verify(str(ck))
        assert problem and {"truncated": "truncated", "corrupt": "sha256", "missing": "missing"}[name] in problem
    # a save killed midway leaves only step_N.partial, which is never a checkpoint
    partial = tmp_path / "killed" / "step_28.partial"
    shutil.copytree(src, partial)
    assert complete_checkpoints(str(partial.parent)) == []


def _flip(b: bytes) -> bytes:
    i = len(b) // 2
    return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :]


def test_bitwise_resume_after_sigkill_twice(data_dir, reference, tmp_path):
    """SIGKILL the whole job at a random moment, twice; the restarted runs
    reproduce the uninterrupted losses to the last bit, no step logged twice."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    seed = os.getpid()
    rng = random.Random(seed)
    for kill_after in (8, 16):
        job = torchrun_popen(args(data_dir, run_dir, STEPS, "trainer.keep_last=2"), cwd=tmp_path, log=log)
        # the kill lands anywhere in the four steps after a checkpoint (a save
        # included), bounded by progress rather than by time (polled every
        # 20 ms) so that a fast machine cannot finish the run before the kill
        # (seed printed on failure)
        target = kill_after + rng.randint(0, 3)
        wait_for(
            lambda kill_after=kill_after, target=target: (
                newest_committed(run_dir) >= kill_after and logged_steps(run_dir) >= target
            ),
            240,
            job,
            f"checkpoint step_{kill_after} and step {target} (seed {seed})",
            poll=0.02,
        )
        time.sleep(rng.uniform(0.0, 0.05))  # within the step, or a save
        assert job.poll() is None, f"the run ended before the kill (seed {seed})"
        kill_job(job)
    r = torchrun(args(data_dir, run_dir, STEPS, "trainer.keep_last=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert losses(run_dir) == losses(reference)  # exact equality, every step 1..24
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_damaged_newest_checkpoint_falls_back_to_previous(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = sorted((run_dir / "checkpoints" / "step_24").glob("*optim_states.pt"))[0]
    shard.write_bytes(_flip(shard.read_bytes()))
    r = torchrun(args(data_dir, run_dir, STEPS, "trainer.keep_last=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/step_24 is damaged" in r.stderr and "sha256" in r.stderr
    assert f"resumed from {run_dir}/checkpoints/step_20 at step 20" in r.stdout
    assert list((run_dir / "checkpoints").glob("step_24.damaged-*"))
    assert losses(run_dir) == losses(reference)  # steps 21..24 redone, bit for bit


def test_stop_on_signal_and_stop_file_then_resume_bitwise(data_dir, reference, tmp_path):
    """SIGUSR1 to one rank, later a stop file: every rank stops at the same
    step boundary after saving; restarts continue bit for bit."""
    run_dir, log, stop_file = tmp_path / "run", tmp_path / "job.log", tmp_path / "STOP"
    env = {"MEGAGPT_STOP_FILE": str(stop_file)}
    extra = ("trainer.save_every=1000",)  # only the stop requests save (and the end)

    job = torchrun_popen(args(data_dir, run_dir, STEPS, *extra), cwd=tmp_path, env_extra=env, log=log)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 5, 240, job, "step 5")
    os.kill(worker_pid(job.pid, 1), signal.SIGUSR1)
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "megagpt: stop requested (another rank)" in out or "megagpt: stop requested (SIGUSR1)" in out
    first_stop = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert 5 <= first_stop < STEPS

    job = torchrun_popen(args(data_dir, run_dir, STEPS, *extra), cwd=tmp_path, env_extra=env, log=log)
    wait_for(lambda: len(records(run_dir)) >= first_stop + 3, 240, job, "three more steps")
    stop_file.touch()
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"stop requested (stop file {stop_file})" in log.read_text(), log.read_text()[-3000:]
    assert not stop_file.exists()  # honoured and removed

    r = torchrun(args(data_dir, run_dir, STEPS, *extra), cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run_dir) == losses(reference)


def test_nan_skip_then_spike_counted(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun(
        args(data_dir, run_dir, 12, "trainer.spike_window=4"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_NAN_STEPS": "1:5", "MEGAGPT_FAULT_SPIKE_STEPS": "0:10"},
        script=FAULT_TRAIN,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 5: non-finite loss or gradient" in r.stderr and "update skipped (1 in a row)" in r.stderr
    assert "step 10: loss spike" in r.stderr
    recs = records(run_dir)
    assert 5 not in [x["step"] for x in recs]  # the skipped step trained nothing
    last = recs[-1]
    assert last["step"] == 12 and last["skipped_steps"] == 1 and last["loss_spikes"] == 1
    assert all(x["loss"] == x["loss"] for x in recs)  # no NaN got into the weights


@pytest.fixture(scope="module")
def rollback_run(data_dir, tmp_path_factory):
    """Steps 6-8 read a bad window ([40, 64) in global sequences)."""
    tmp_path = tmp_path_factory.mktemp("rollback")
    run_dir = tmp_path / "run"
    r = torchrun(
        args(data_dir, run_dir, 12, "trainer.max_nan_skips=2"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_NAN": "1:40-64"},
        script=FAULT_TRAIN,
    )
    return run_dir, r


def test_losses_match_the_recorded_reference(reference, rollback_run):
    """The uninterrupted run and the rollback run log the losses the code
    logged before the training loop was rebuilt, bit for bit (the SIGKILL,
    stop and damaged-checkpoint runs equal the uninterrupted one, bit for bit)."""
    run_dir, r = rollback_run
    assert r.returncode == 0, r.stderr[-3000:]
    check_reference("fault_tolerance/uninterrupted", losses(reference))
    check_reference("fault_tolerance/nan_rollback", losses(run_dir))


def test_nan_rollback_skips_the_bad_window(rollback_run):
    """Two skips, then a rollback to step 4; the stream continues at 64 and
    the run finishes."""
    run_dir, r = rollback_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollback: step 8 -> step 4" in r.stdout and "sequences [32, 64) are skipped" in r.stdout
    recs = records(run_dir)
    assert [x["step"] for x in recs] == list(range(1, 13))  # after the rollback, steps 5.. once each
    assert recs[-1]["rollbacks"] == 1 and recs[-1]["skipped_steps"] == 3
    state = json.loads((run_dir / "checkpoints" / "step_12" / "megagpt_state.json").read_text())
    assert state["data"]["consumed"] == 64 + 8 * 8  # 8 steps after the rollback, from sequence 64


def test_nan_persisting_after_rollback_stops_clearly(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun(
        args(data_dir, run_dir, 12, "trainer.max_nan_skips=1", "trainer.max_rollbacks=1"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_NAN_STEPS": "1:6,7"},
        script=FAULT_TRAIN,
    )
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("megagpt: error")]
    assert errors and all("persists after 1 rollback(s)" in x for x in errors), r.stderr[-2000:]
    assert {x.split("(rank ")[1][0] for x in errors} == {"0", "1"}  # every rank says why


def test_on_nan_stop(data_dir, tmp_path):
    r = torchrun(
        args(data_dir, tmp_path / "run", 12, "trainer.on_nan=stop"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_NAN_STEPS": "0:3"},
        script=FAULT_TRAIN,
    )
    assert r.returncode != 0
    assert "megagpt: error (rank 0): step 3: non-finite loss or gradient (trainer.on_nan=stop)" in r.stderr


def test_watchdog_ends_a_hung_job_then_restart_resumes(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun(
        args(data_dir, run_dir, 12, "trainer.watchdog_seconds=8"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_HANG": "1:6"},
        timeout=300,
        script=FAULT_TRAIN,
    )
    ended = time.time()
    assert r.returncode != 0
    err = r.stderr
    assert "watchdog: no progress for" in err and "Python stacks of every thread" in err
    # Timed from the hang (its log line's timestamp), not from the launch, whose
    # set-up time depends on the machine: 8 s of no progress, checked every 2 s,
    # then torchrun's teardown.
    hang = re.search(r"^(\S+ \S+) WARNING megagpt: fault injection: rank 1 hangs at step 6", err, re.M)
    assert hang, err[-3000:]
    hung_at = datetime.datetime.strptime(hang.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert ended - hung_at < 90, (ended - hung_at, err[-3000:])
    idle = [int(x) for x in re.findall(r"watchdog: no progress for (\d+) s", err)]
    assert idle and all(8 <= x <= 30 for x in idle), idle
    assert "maybe_hang" in err  # the hung rank's stack names where it is stuck
    assert re.search(r"exitcode\s*:\s*70\b", err), err[-3000:]  # the watchdog's own exit code
    r = torchrun(args(data_dir, run_dir, 12), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_4 at step 4" in r.stdout


def test_killed_rank_ends_the_job_then_restart_resumes(data_dir, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = torchrun_popen(args(data_dir, run_dir, 200), cwd=tmp_path, log=log)
    wait_for(lambda: committed(run_dir, 4), 240, job, "checkpoint step_4")
    os.kill(worker_pid(job.pid, 1), signal.SIGKILL)
    t0 = time.time()
    code = job.wait(timeout=180)
    assert code != 0 and time.time() - t0 < 120, (code, log.read_text()[-2000:])
    r = torchrun(args(data_dir, run_dir, 12), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout


def test_async_save_commits_verified_checkpoints_and_logs_blocked_time(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun(args(data_dir, run_dir, STEPS, "trainer.async_save=true", "trainer.keep_last=3"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(committing in the background)" in r.stdout
    from megagpt.checkpoint import verify

    for step in (16, 20, 24):
        assert verify(str(run_dir / "checkpoints" / f"step_{step}")) is None
    recs = records(run_dir)
    assert all(x["save_blocked_sec"] >= 0 for x in recs)
    assert sum(x["save_blocked_sec"] for x in recs) > 0  # the saves' own write time is still counted
    assert losses(run_dir) == losses(reference)  # saving in the background changes nothing
