"""trainer.async_save stages DeepSpeed's state in host memory and writes it
from the checkpointer's thread (megagpt/engine/staged_save.py).  Real 2-rank torchrun
jobs on CPU (fp32, gloo), for ZeRO-0, ZeRO-2 and ZeRO-3:

- every file of an async checkpoint is byte for byte the file DeepSpeed's own
  engine writes at the same step of the same run;
- a run resumed from an async checkpoint logs the losses of the uninterrupted
  run, bit for bit;
- the staged state is a copy, taken at the save: changing the live state
  afterwards does not reach the file (unit test of the engine itself, since
  the jobs' files are written too quickly for the next step to race them).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from helpers import make_dataset, torchrun

STEPS = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("staged"), n_docs=120, docs_per_shard=8)


def args(data_dir, run_dir, stage: int, *extra):
    return [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=4",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "logger=none",
        f"deepspeed=zero{stage}",
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def deepspeed_files(step_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in step_dir.glob("*.pt") if not p.name.startswith("rng_rank")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_async_checkpoints_equal_deepspeeds_and_resume_bit_for_bit(data_dir, tmp_path, stage):
    sync_dir, async_dir, resumed_dir = tmp_path / "sync", tmp_path / "async", tmp_path / "resumed"
    r = torchrun(args(data_dir, sync_dir, stage), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(args(data_dir, async_dir, stage, "trainer.async_save=true"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(committing in the background)" in r.stdout
    assert losses(async_dir) == losses(sync_dir)

    from megagpt.checkpoint import verify

    for step in (4, 8):
        sync_step, async_step = (d / "checkpoints" / f"step_{step}" for d in (sync_dir, async_dir))
        assert verify(str(async_step)) is None
        files = deepspeed_files(sync_step)
        assert files and sorted(files) == sorted(deepspeed_files(async_step)), (sorted(files), step)
        for name, path in files.items():
            assert path.read_bytes() == (async_step / name).read_bytes(), f"step_{step}/{name} differs"

    r = torchrun(
        args(
            data_dir,
            resumed_dir,
            stage,
            "trainer.async_save=true",
            f"trainer.resume={async_dir / 'checkpoints' / 'step_4'}",
        ),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    resumed = losses(resumed_dir)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert resumed == {s: x for s, x in losses(sync_dir).items() if s > 4}


def test_staged_state_is_a_copy_taken_at_the_save(tmp_path, caplog):
    from megagpt.engine.staged_save import StagedCheckpointEngine

    weight = torch.nn.Parameter(torch.randn(4, 3))
    moment = torch.randn(5, requires_grad=True)
    moment.ds_id = "0_24"  # a Python attribute torch.save keeps (DeepSpeed marks its flat groups so)
    flat = torch.arange(10.0)
    state = {
        "module": {"w": weight, "tied": weight.detach()},  # two tensor objects, one storage (a tied weight)
        "optimizer": {"exp_avg": moment, "step": 3, "betas": [0.9, 0.95]},
        "flat": flat,
        "piece": flat[2:8].view(2, 3).t(),
        "ds_version": "x",
    }
    expected = {
        "module": {"w": weight.detach().clone(), "tied": None},
        "optimizer": {"exp_avg": moment.detach().clone(), "step": 3, "betas": [0.9, 0.95]},
    }
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

    info = CheckpointCommitInfo(tag="step_1", save_dir=str(tmp_path), save_latest=False)
    engine = StagedCheckpointEngine(torch.device("cpu"))
    engine.create(info)
    engine.save(state, str(tmp_path / "a.pt"))
    with caplog.at_level(logging.INFO, logger="megagpt"):
        engine.commit(info)  # the first save allocates its buffers, and says so
    assert "checkpoint step_1: staged 0.00 GB in host memory; 0.00 GB of host buffers allocated in" in caplog.text
    with pytest.raises(RuntimeError, match="not written yet"):
        engine.create(type("Info", (), {"tag": "step_2"})())
    with torch.no_grad():  # training goes on before the file is written
        weight.add_(1.0)
        moment.mul_(2.0)
    state["optimizer"]["betas"].append(0.0)
    state["optimizer"]["step"] = 4
    assert engine.write_pending() == [str(tmp_path / "a.pt")]
    loaded = torch.load(tmp_path / "a.pt", weights_only=False)
    assert type(loaded["module"]["w"]) is torch.nn.Parameter and loaded["module"]["w"].requires_grad
    tied = loaded["module"]["tied"]  # still one storage, as torch.save would have written it
    assert tied.untyped_storage().data_ptr() == loaded["module"]["w"].untyped_storage().data_ptr()
    piece = loaded["piece"]  # a strided view keeps its offset and strides into the shared storage
    assert (piece.storage_offset(), piece.stride()) == (2, (1, 3))
    assert piece.untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert torch.equal(piece, torch.arange(2.0, 8.0).view(2, 3).t())
    assert torch.equal(loaded["module"]["w"], expected["module"]["w"])
    assert loaded["optimizer"]["exp_avg"].requires_grad and loaded["optimizer"]["exp_avg"].ds_id == "0_24"
    assert torch.equal(loaded["optimizer"]["exp_avg"], expected["optimizer"]["exp_avg"])
    assert (loaded["optimizer"]["step"], loaded["optimizer"]["betas"]) == (3, [0.9, 0.95])
    assert engine.staged_bytes == (12 + 5 + 10) * 4

    # The next save of the same file reuses the host buffers and sees the new values.
    buffers = [b.data_ptr() for b in engine._buffers["a.pt"]]
    engine.create(info)
    (tmp_path / "next").mkdir()
    engine.save(state, str(tmp_path / "next" / "a.pt"))  # DeepSpeed's file names repeat in each step's folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megagpt"):
        engine.commit(info)
    assert "allocated" not in caplog.text  # reused, nothing allocated
    assert [b.data_ptr() for b in engine._buffers["a.pt"]] == buffers
    engine.write_pending()
    again = torch.load(tmp_path / "next" / "a.pt", weights_only=False)
    assert torch.equal(again["module"]["w"], weight.detach()) and again["optimizer"]["step"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_from_cuda_is_pinned_asynchronous_and_a_copy(tmp_path):
    """On CUDA the host buffers are page-locked and the copies asynchronous: commit()
    waits for them, after which kernels changing the live state do not reach the file.
    Prints the staging rate of 1 GiB (device to page-locked host memory)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

    from megagpt.engine.staged_save import StagedCheckpointEngine

    info = CheckpointCommitInfo(tag="step_1", save_dir=str(tmp_path), save_latest=False)
    device = torch.device("cuda")
    big = torch.randn(256 * 2**20, device=device)  # 1 GiB of fp32
    small = torch.randn(1000, device=device, dtype=torch.bfloat16)
    engine = StagedCheckpointEngine(device)
    for attempt in range(2):  # the second save reuses the page-locked buffers
        expected = {"big": big[:: 2**16].cpu(), "small": small.cpu(), "tail": big[-4:].cpu()}
        engine.create(info)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (tmp_path / str(attempt)).mkdir()
        engine.save({"big": big, "small": small}, str(tmp_path / str(attempt) / "state.pt"))
        engine.commit(info)
        seconds = time.perf_counter() - t0
        # Read on the host at once, as the writer thread will: commit() waited for the copy's last bytes.
        assert torch.equal(engine._buffers["state.pt"][0][-16:].view(torch.float32), expected["tail"])
        print(f"staged 1 GiB in {seconds:.3f} s ({'first save, buffers allocated' if attempt == 0 else 'reused'})")
        assert all(b.is_pinned() for b in engine._buffers["state.pt"])
        big.mul_(3.0)  # on the device, right after the save: must not reach the staged copy
        small.add_(1.0)
        engine.write_pending()
        loaded = torch.load(tmp_path / str(attempt) / "state.pt", weights_only=True)
        assert loaded["big"].device.type == "cpu"  # DeepSpeed loads every file to the CPU anyway
        assert torch.equal(loaded["big"][:: 2**16], expected["big"])
        assert torch.equal(loaded["small"], expected["small"])
