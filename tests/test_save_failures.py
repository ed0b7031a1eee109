"""A save the disk cannot take stops every rank with one line, and a run.dir
that cannot be written stops the run at start.

The disk is real: a tmpfs of a few MiB mounted for the test (root only; the
test skips, saying why, where mounting is not allowed).  The first checkpoint
of the tiny model (1.5 MB) fits, the second does not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import make_dataset, torchrun

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("save_failures"), n_docs=200, docs_per_shard=8)


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
        "trainer.save_every=5",
        "trainer.max_steps=10",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "logger=none",
        "trainer.peak_flops=1e11",
        *extra,
    ]


@contextlib.contextmanager
def small_disk(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def error_lines(stderr: str, rank: int) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith(f"megagpt: error (rank {rank}): ")]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays_the_newest(
    data_dir, tmp_path, async_save
):
    with small_disk(tmp_path / "disk", "2600k") as disk:
        run_dir = disk / "run"
        r = torchrun(args(data_dir, run_dir, f"trainer.async_save={str(async_save).lower()}"), cwd=tmp_path)
        assert r.returncode != 0
        lines = [error_lines(r.stderr, rank) for rank in (0, 1)]
        assert len(lines[0]) == 1 and [x.replace("rank 1", "rank 0") for x in lines[1]] == lines[0], r.stderr[-4000:]
        line = lines[0][0]
        # ... and the file that could not be written: whichever of the save's files the disk ran out in
        assert f"cannot save checkpoint step_10 in {run_dir / 'checkpoints'}: {run_dir / 'checkpoints'}/" in line, line
        assert ": no space left on device (" in line and " free of 2.5 MiB on its filesystem; " in line, line
        assert line.endswith("); the newest checkpoint remains step_5"), line
        workers = r.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report follows
        assert "Traceback" not in workers, workers[-4000:]
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_5\n"
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_5"]  # the partial is gone
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 11))
        # With space again, the run resumes from the checkpoint that remained.
        moved = tmp_path / "moved"
        shutil.copytree(run_dir, moved)
    r = torchrun(args(data_dir, moved), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {moved / 'checkpoints' / 'step_5'} at step 5" in r.stdout


@pytest.mark.parametrize("where", ["run.dir", "its parent"])
def test_a_read_only_run_dir_stops_every_rank_at_start_in_one_line(data_dir, tmp_path, where):
    with small_disk(tmp_path / "ro", "1m", read_only=True) as disk:
        run_dir = disk if where == "run.dir" else disk / "run"
        r = torchrun(args(data_dir, run_dir), cwd=tmp_path)
    assert r.returncode != 0
    for rank in (0, 1):
        assert error_lines(r.stderr, rank) == [
            f"megagpt: error (rank {rank}): run.dir: {run_dir} is not writable (Read-only file system); the run "
            "writes its checkpoints and metrics there: choose a writable run.dir"
        ], r.stderr[-3000:]
    assert "training steps" not in r.stdout and "Traceback" not in r.stderr.split("torch/distributed/elastic")[0]
