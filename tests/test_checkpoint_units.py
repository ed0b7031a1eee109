"""What megagpt.checkpoint and the DeepSpeed config promise, checked in one
process without DeepSpeed engines: stale `.partial` saves are cleared and never
resumed, `trainer.resume=PATH` takes only an intact checkpoint, and the
learning rate follows linear warmup then cosine decay."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from test_config import make_cfg

from megagpt.checkpoint import Checkpointer, CheckpointError, resolve_resume
from megagpt.engine import deepspeed_config
from megagpt.engine.optimizer import build_optimizer

FILES = {
    "mp_rank_00_model_states.pt": b"model " * 100,
    "zero/optim_states.pt": b"optim " * 300,
    "rng_rank0.pt": b"rng",
    "tokenizer.json": b"{}",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(path: Path, step: int, files: dict[str, bytes] = FILES) -> Path:
    """A checkpoint as a save commits it: the files, manifest.json with each
    one's size and sha256, and megagpt_state.json (written last) with the
    manifest's own sha256."""
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    manifest = json.dumps(
        {"files": {rel: {"bytes": len(data), "sha256": sha256(data)} for rel, data in files.items()}}
    ).encode()
    (path / "manifest.json").write_bytes(manifest)
    (path / "megagpt_state.json").write_text(json.dumps({"step": step, "manifest_sha256": sha256(manifest)}))
    return path


# -- (a) a save killed midway ------------------------------------------------------------------


def test_partial_save_is_removed_by_rank_0_only(tmp_path):
    root = tmp_path / "checkpoints"
    intact = write_checkpoint(root / "step_2", 2)
    partial = write_checkpoint(root / "step_4.partial", 4)  # killed just before its rename
    Checkpointer(str(root), rank=1, world_size=2)
    assert partial.is_dir()  # one rank clears it, so that ranks sharing the filesystem do not race
    Checkpointer(str(root), rank=0, world_size=2)
    assert not partial.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert resolve_resume("auto", str(root)) == str(intact)


def test_auto_resume_never_chooses_a_partial_save(tmp_path):
    root = tmp_path / "checkpoints"
    partial = write_checkpoint(root / "step_9.partial", 9)  # newer, and complete in all but its name
    assert resolve_resume("auto", str(root)) is None
    intact = write_checkpoint(root / "step_3", 3)
    assert resolve_resume("auto", str(root)) == str(intact)
    assert partial.is_dir()  # resolving only reads: removing it is the Checkpointer's job


# -- (b) trainer.resume=PATH ------------------------------------------------------------------


def test_resume_from_an_intact_path(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "run" / "step_7", 7)
    assert resolve_resume(str(ckpt), str(tmp_path / "elsewhere")) == str(ckpt)
    monkeypatch.chdir(tmp_path)
    assert resolve_resume("run/step_7", "unused") == str(ckpt)  # relative: made absolute


def truncate(ckpt: Path) -> str:
    path = ckpt / "zero" / "optim_states.pt"
    path.write_bytes(path.read_bytes()[:-10])
    return "zero/optim_states.pt has 1790 bytes, the manifest says 1800 (truncated?)"


def alter(ckpt: Path) -> str:
    path = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[17] ^= 1
    path.write_bytes(bytes(data))
    return "mp_rank_00_model_states.pt does not match its sha256 (corrupt)"


def remove(ckpt: Path) -> str:
    (ckpt / "rng_rank0.pt").unlink()
    return "rng_rank0.pt is missing"


def edit_manifest(ckpt: Path) -> str:  # e.g. "fixing" a size by hand
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["rng_rank0.pt"]["bytes"] = 4
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json does not match its checksum"


@pytest.mark.parametrize("damage", [truncate, alter, remove, edit_manifest])
def test_resume_from_a_damaged_path_is_one_line_naming_it_and_the_damage(tmp_path, damage):
    ckpt = write_checkpoint(tmp_path / "step_5", 5)
    problem = damage(ckpt)
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(ckpt), str(tmp_path))
    assert str(e.value) == f"trainer.resume: checkpoint {ckpt} is damaged: {problem}"
    assert ckpt.is_dir()  # an explicit PATH is reported, not set aside


def test_a_checkpoint_without_a_manifest_checksum_is_damaged(tmp_path):
    """Every checkpoint megagpt commits records its manifest's sha256: one without
    it has nothing to be verified against, and is refused like any damaged one."""
    root = tmp_path / "checkpoints"
    intact = write_checkpoint(root / "step_3", 3)
    ckpt = write_checkpoint(root / "step_5", 5)
    state = json.loads((ckpt / "megagpt_state.json").read_text())
    del state["manifest_sha256"]
    (ckpt / "megagpt_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(ckpt), str(root))
    assert str(e.value) == (
        f"trainer.resume: checkpoint {ckpt} is damaged: megagpt_state.json names no manifest "
        "checksum (manifest_sha256): nothing to verify against"
    )
    assert resolve_resume("auto", str(root)) == str(intact)  # set aside, the previous one used
    assert not ckpt.exists() and len(list(root.glob("step_5.damaged-*"))) == 1


@pytest.mark.parametrize("contents", ["empty", "files without a state"])
def test_resume_from_a_directory_that_is_not_a_checkpoint(tmp_path, contents):
    path = tmp_path / "step_5"
    path.mkdir()
    if contents == "files without a state":
        write_checkpoint(path, 5)
        (path / "megagpt_state.json").unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_resume(str(path), str(tmp_path))
    assert str(e.value) == f"trainer.resume: {path} is not a complete megagpt checkpoint (no megagpt_state.json)"


# -- (c) the learning-rate schedule -----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [[], ["optim.lr=3e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.2", "trainer.max_steps=100"]],
    ids=["defaults", "custom"],
)
def test_lr_warms_up_linearly_then_decays_with_a_cosine_to_the_floor(overrides):
    """The schedule megagpt asks DeepSpeed for, stepped as the engine steps it
    (once after each optimizer step): lrs[k - 1] is the rate after the k-th
    step, the one the trainer logs for step k."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = make_cfg(*overrides)
    lr, warmup, total, floor = cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_ratio
    scheduler = deepspeed_config(cfg, 1, "cpu")["scheduler"]
    assert scheduler["type"] == "WarmupCosineLR"
    optimizer = build_optimizer(cfg.optim, torch.nn.Linear(4, 4), "cpu")  # megagpt's two groups: decay and no decay
    schedule = WarmupCosineLR(optimizer, **scheduler["params"])
    lrs = []
    for _ in range(total):
        schedule.step()
        assert len({g["lr"] for g in optimizer.param_groups}) == 1  # both groups follow it
        lrs.append(optimizer.param_groups[0]["lr"])

    # Warmup: lr / warmup at the first step, then up by equal steps along the line
    # that reaches lr warmup_steps steps later.
    rise = lr * (1 - 1 / warmup) / warmup
    assert lrs[0] == pytest.approx(lr / warmup, rel=1e-9)
    assert lrs[:warmup] == pytest.approx([lr / warmup + k * rise for k in range(warmup)], rel=1e-9)
    assert lrs[0] + warmup * rise == pytest.approx(lr, rel=1e-9)

    def cosine(k: int) -> float:  # the decay after step k, from lr at the end of the warmup to lr * floor
        progress = (k - warmup) / (total - warmup)
        return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    # There the cosine takes over: its first step is the peak, a hair under lr,
    # and it never rises again.
    assert max(lrs) == lrs[warmup] == pytest.approx(cosine(warmup + 1), rel=1e-6)
    assert lrs[warmup] == pytest.approx(lr, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    middle = warmup + (total - warmup) // 2
    assert (total - warmup) % 2 == 0 and cosine(middle) == pytest.approx(lr * (1 + floor) / 2, rel=1e-12)
    assert lrs[middle - 1] == pytest.approx(cosine(middle), rel=1e-6)
    assert lrs[-1] == pytest.approx(lr * floor, rel=1e-6)  # the floor at max_steps


# -- keep_last --------------------------------------------------------------------------------


def test_keep_last_keeps_the_highest_steps_and_never_the_one_just_written(tmp_path):
    """After `trainer.resume=never` (or a resume from an older PATH) the run.dir
    may hold higher steps of an earlier run: pruning keeps the K highest and
    the checkpoint just committed, which `latest` names."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        write_checkpoint(root / f"step_{step}", step)
    just_written = write_checkpoint(root / "step_2", 2)
    keeper = Checkpointer(str(root), rank=0, world_size=1, keep_last=2)
    keeper._prune(keep=str(just_written))
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_20", "step_30"]
    write_checkpoint(root / "step_40", 40)
    keeper._prune(keep=str(root / "step_40"))
    assert sorted(p.name for p in root.iterdir()) == ["step_30", "step_40"]
