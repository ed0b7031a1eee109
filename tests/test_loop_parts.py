"""The training loop's parts, each on its own: collectives and Stateful parts
on two in-process gloo ranks (tests/distributed.py), the non-finite policy,
the stop-and-requeue hook and the W&B names in one process."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from distributed import run_distributed

from megagpt.hooks import StopAndRequeue
from megagpt.metrics import wandb_name
from megagpt.resilience import NanPolicy, TrainingDiverged
from megagpt.state import Counters, RngState, Snapshot, TrainState

# -- collectives, on two ranks --------------------------------------------------------------


def _collectives(rank: int, world: int) -> dict:
    from megagpt import collectives

    out = {
        "sum": collectives.sum_(torch.tensor([1.0, float(rank)], dtype=torch.float64)).tolist(),
        "union": collectives.union([f"shard-{rank}", "shared"]),
        "broadcast": collectives.broadcast_from_main(f"from rank {rank}"),
        "first_message": collectives.first_message(None if rank == 0 else f"rank {rank}: broken"),
        "agree": collectives.agree("same", "run.dir"),
    }
    try:
        collectives.agree(f"dir-{rank}", "run.dir")
    except ValueError as e:
        out["disagree"] = str(e)
    return out


def test_collectives_on_two_ranks():
    results = run_distributed(_collectives)
    for r in results:
        assert r["sum"] == [2.0, 1.0]
        assert r["union"] == ["shard-0", "shard-1", "shared"]
        assert r["broadcast"] == "from rank 0"
        assert r["first_message"] == "rank 1: broken"
        assert r["agree"] == "same"
        assert r["disagree"] == "run.dir: ranks disagree (['dir-0', 'dir-1']); set it explicitly"


class _Data:
    """A stand-in for the data position: each rank found a different bad shard."""

    def __init__(self, rank: int):
        self.rank, self.loaded = rank, None

    def state_dict(self) -> dict:
        return {"consumed": 40, "bad_shards": [f"shard-{self.rank}"]}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def _snapshot_round_trip(rank: int, world: int) -> dict:
    train = TrainState(step=7, tokens_seen=700, wandb_id="abc", counters=Counters(skipped_steps=1, rollbacks=2))
    spikes = SimpleNamespace(state_dict=lambda: {"recent": [1.0, 2.0]}, loaded=None)
    spikes.load_state_dict = lambda s: setattr(spikes, "loaded", s)
    saved = Snapshot(train, _Data(rank), {"spikes": spikes}, {"world_size": world}).gather_state_dict()
    saved = json.loads(json.dumps(saved))  # as megagpt_state.json holds it
    restored = TrainState()
    data = _Data(rank)
    Snapshot(restored, data, {"spikes": spikes}, {}).load_state_dict(saved)
    return {"saved": saved, "restored": restored.state_dict(), "data": data.loaded, "spikes": spikes.loaded}


def test_snapshot_saves_every_part_and_restores_it():
    """Every rank writes the same state: the bad shards are the union of all
    ranks'.  The layout is the one checkpoints always had (step, tokens_seen,
    wandb_id at the top), so older checkpoints resume."""
    for r in run_distributed(_snapshot_round_trip):
        saved = r["saved"]
        assert saved["step"] == 7 and saved["tokens_seen"] == 700 and saved["wandb_id"] == "abc"
        assert saved["counters"] == {"skipped_steps": 1, "rollbacks": 2, "loss_spikes": 0, "skipped_sequences": 0}
        assert saved["data"] == {"consumed": 40, "bad_shards": ["shard-0", "shard-1"]}
        assert saved["hooks"] == {"spikes": {"recent": [1.0, 2.0]}} and saved["world_size"] == 2
        assert r["restored"] == {k: saved[k] for k in ("step", "tokens_seen", "wandb_id", "counters")}
        assert r["data"] == saved["data"] and r["spikes"] == {"recent": [1.0, 2.0]}


def test_train_state_rewinds_the_step_but_keeps_counting():
    state = TrainState(step=8, tokens_seen=800, counters=Counters(skipped_steps=3, rollbacks=1))
    state.rewind({"step": 4, "tokens_seen": 400, "counters": {"skipped_steps": 0, "rollbacks": 0}})
    assert (state.step, state.tokens_seen) == (4, 400)
    assert state.counters == Counters(skipped_steps=3, rollbacks=1)


def test_old_checkpoint_state_loads():
    """megagpt_state.json as written before the loop was rebuilt: no hooks."""
    state = TrainState()
    state.load_state_dict(
        {
            "version": 1,
            "step": 12,
            "tokens_seen": 96,
            "wandb_id": None,
            "counters": {"skipped_steps": 0, "rollbacks": 1, "loss_spikes": 2, "skipped_sequences": 8},
        }
    )
    assert state.step == 12 and state.counters.loss_spikes == 2 and state.counters.skipped_sequences == 8


def test_rng_state_round_trip():
    rng = RngState(torch.device("cpu"))
    torch.manual_seed(5)
    saved = rng.state_dict()
    first = torch.rand(3)
    torch.rand(10)
    rng.load_state_dict(saved)
    assert torch.equal(torch.rand(3), first)


# -- the non-finite policy ------------------------------------------------------------------


def test_nan_policy_skip_then_rollback_then_stop():
    policy = NanPolicy("skip", max_skips=2, max_rollbacks=1, is_main=False)
    state = TrainState(step=5)
    assert [policy.on_skipped(state, float("nan")) for _ in range(2)] == ["skip", "skip"]
    assert policy.on_skipped(state, float("nan")) == "rollback"  # the third in a row
    state.counters.rollbacks += 1  # the loop rolls back
    assert policy.on_skipped(state, float("nan")) == "skip"  # counting starts again
    policy.on_update()  # a good step in between resets the run
    assert [policy.on_skipped(state, float("nan")) for _ in range(2)] == ["skip", "skip"]
    with pytest.raises(TrainingDiverged, match=r"persists after 1 rollback\(s\)"):
        policy.on_skipped(state, float("nan"))
    assert state.counters.skipped_steps == 7


def test_nan_policy_rollback_at_once_and_stop_at_once():
    state = TrainState(step=3)
    assert NanPolicy("rollback", max_skips=5, max_rollbacks=2, is_main=False).on_skipped(state, 1.0) == "rollback"
    with pytest.raises(TrainingDiverged, match=r"^step 3: non-finite loss or gradient \(trainer.on_nan=stop\)$"):
        NanPolicy("stop", max_skips=5, max_rollbacks=2, is_main=False).on_skipped(state, 1.0)


# -- stop and requeue -----------------------------------------------------------------------


class _Checkpointer:
    def __init__(self, saved_step):
        self.saved_step, self.waited = saved_step, False

    def wait(self):
        self.waited = True


def _loop(step: int, saved_step: int):
    loop = SimpleNamespace(state=TrainState(step=step), checkpointer=_Checkpointer(saved_step), stopped=None, saves=[])
    loop.save = lambda: loop.saves.append(loop.state.step)
    return loop


@pytest.mark.parametrize("requeue, with_file", [(True, True), (False, True), (True, False)])
def test_stop_saves_once_and_requeues_as_configured(tmp_path, requeue, with_file, capsys, monkeypatch):
    stop_file, request = tmp_path / "STOP", tmp_path / "requeue"
    stop_file.touch()
    stop = SimpleNamespace(stop_file=str(stop_file), local=lambda: f"stop file {stop_file}")
    environ = {"SLURM_JOB_ID": "42"}
    if with_file:
        environ["MEGAGPT_REQUEUE_FILE"] = str(request)
    else:  # no batch script: megagpt calls scontrol itself; a stand-in on PATH records the call
        scontrol = tmp_path / "bin" / "scontrol"
        scontrol.parent.mkdir()
        scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
        scontrol.chmod(0o755)
        monkeypatch.setenv("PATH", f"{scontrol.parent}:/usr/bin:/bin")
    hook = StopAndRequeue(stop, requeue=requeue, is_main=True, environ=environ)
    loop = _loop(step=9, saved_step=6)
    hook.after_step(loop, None, SimpleNamespace(stop=False), {})
    assert loop.stopped is None and loop.saves == []  # no stop asked: nothing happens
    hook.after_step(loop, None, SimpleNamespace(stop=True), {})
    assert loop.saves == [9] and loop.checkpointer.waited and loop.stopped == f"stop file {stop_file}"
    assert not stop_file.exists()  # honoured: the restarted run must not stop at once
    out = capsys.readouterr().out
    assert f"megagpt: stop requested (stop file {stop_file}); checkpoint saved at step 9" in out
    if not requeue:
        assert not request.exists() and not (tmp_path / "scontrol.args").exists() and "requeue" not in out
    elif with_file:
        assert request.read_text() == "9\n" and "the batch script will requeue SLURM job 42" in out
    else:
        assert (tmp_path / "scontrol.args").read_text() == "requeue 42\n" and "requeued SLURM job 42" in out


def test_stop_after_a_save_at_the_same_step_does_not_save_again():
    stop = SimpleNamespace(stop_file=None, local=lambda: None)  # another rank was asked
    loop = _loop(step=6, saved_step=6)
    StopAndRequeue(stop, requeue=False, is_main=False, environ={}).after_step(
        loop, None, SimpleNamespace(stop=True), {}
    )
    assert loop.saves == [] and loop.stopped == "another rank"


# -- what W&B is given ----------------------------------------------------------------------


def test_wandb_names_group_by_section():
    names = {
        k: wandb_name(k)
        for k in (
            "loss",
            "lr",
            "grad_norm",
            "val_loss",
            "val_loss/code",
            "tokens_per_sec",
            "mfu",
            "data_wait",
            "data_skipped_shards",
            "mix/code",
            "memory_gb",
            "save_blocked_sec",
            "rollbacks",
        )
    }
    assert names == {
        "loss": "train/loss",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "val_loss": "val/loss",
        "val_loss/code": "val/loss/code",
        "tokens_per_sec": "perf/tokens_per_sec",
        "mfu": "perf/mfu",
        "data_wait": "data/wait",
        "data_skipped_shards": "data/skipped_shards",
        "mix/code": "data/mix/code",
        "memory_gb": "system/memory_gb",
        "save_blocked_sec": "perf/save_blocked_sec",
        "rollbacks": "train/rollbacks",
    }
