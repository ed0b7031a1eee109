"""Small real datasets and process launchers shared by the tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega the of and a to in is that for it as with"
).split()


def make_texts(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n_docs)
    ]


def make_dataset(
    root: Path, n_docs: int = 60, docs_per_shard: int = 6, seed: int = 0, vocab_size: int = 300, val_docs: int = 0
) -> Path:
    """Write text files, prepare them into shards under root/data (val_docs of
    them held out as validation shards), return that dir."""
    from megagpt.data.prepare import prepare

    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(make_texts(n_docs, seed)):
        (src / f"{i:05d}.txt").write_text(text)
    out = root / "data"
    prepare([str(src)], str(out), vocab_size=vocab_size, docs_per_shard=docs_per_shard, val_docs=val_docs, log=None)
    return out


def make_two_sources(root: Path) -> tuple[Path, Path]:
    """Two prepared datasets for mixtures: the second (upper-cased texts, its own
    shard size) tokenized with the first one's tokenizer, so they share a vocabulary."""
    from megagpt.data.prepare import prepare

    a = make_dataset(root / "a", n_docs=60, docs_per_shard=6, seed=1)
    src = root / "b" / "src"
    src.mkdir(parents=True)
    for i, t in enumerate(make_texts(40, seed=2)):
        (src / f"{i}.txt").write_text(t.upper())
    b = root / "b" / "data"
    prepare([str(src)], str(b), tokenizer=str(a / "tokenizer.json"), docs_per_shard=5, log=None)
    return a, b


def stream_tokens_of_shard(path: Path, dtype: str, eod: int) -> np.ndarray:
    """All tokens a shard adds to a stream (documents + EOD each), read directly from the tar."""
    import tarfile

    out = []
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.endswith(".tokens"):
                out.append(np.frombuffer(tar.extractfile(m).read(), dtype=dtype).astype(np.int64))
                out.append(np.array([eod]))
    return np.concatenate(out)


# megagpt.train with the test-only faults of tests/faults.py (MEGAGPT_FAULT_* in env_extra): torchrun's
# `script` for a job that injects them.
FAULT_TRAIN = REPO / "tests" / "fault_train.py"


def _torchrun_job(
    args: list[str], env_extra: dict | None, nproc: int, script: Path | None = None
) -> tuple[list[str], dict]:
    """The command line and environment of a torchrun job of megagpt.train (or of `script`)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    env.update(env_extra or {})
    entry = [str(script)] if script is not None else ["-m", "megagpt.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry, *args]
    return cmd, env


def torchrun(
    args: list[str],
    cwd: Path,
    env_extra: dict | None = None,
    nproc: int = 2,
    timeout: int = 300,
    script: Path | None = None,
) -> subprocess.CompletedProcess:
    cmd, env = _torchrun_job(args, env_extra, nproc, script)
    # On a timeout the workers go too, not only torchrun (orphaned, a hung
    # job's ranks would hold cores for the rest of the test run).
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(p)
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun_popen(
    args: list[str], cwd: Path, env_extra: dict | None = None, nproc: int = 2, log: Path | None = None
) -> subprocess.Popen:
    """Start a torchrun job in its own process group, output to `log`
    (kill_job ends it whole, as a node failure would)."""
    cmd, env = _torchrun_job(args, env_extra, nproc)
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(
    predicate,
    timeout: float,
    job: subprocess.Popen | None = None,
    what: str = "a condition",
    poll: float = 0.1,
    detail=None,
):
    """Poll `predicate()` until it returns something true, and return that.  Fails
    (AssertionError naming `what`, with `detail()` where given: a log's tail) after
    `timeout` seconds, or at once when `job` has ended before it came true."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        extra = f"\n{detail()}" if detail is not None else ""
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (code {job.returncode}) before {what}{extra}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(poll)


def worker_pids(launcher_pid: int) -> list[int]:
    """PIDs of the training processes torchrun started (its children)."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL a torchrun job whole, as a node failure would: torchrun and every
    worker.  torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone leaves the workers running, orphaned."""
    workers = worker_pids(job.pid)
    os.killpg(job.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker and anything it started
        except ProcessLookupError:
            pass
    job.wait()


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The PID of the training process with RANK=rank under a torchrun launcher."""
    for pid in worker_pids(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


# -- reference losses from an earlier version of the code ------------------------
# tests/fixtures/reference_losses.json holds the losses some end-to-end runs
# logged with the code as it was before the training loop was rebuilt (commit
# recorded in the file).  The same runs must log the same losses, bit for bit,
# on the same kind of CPU: floating-point kernels differ between CPU
# generations (AVX2 / AVX-512), so on another kind the comparison is skipped,
# with the reason.  MEGAGPT_RECORD_REFERENCE=1 records instead of comparing.
REFERENCE_FILE = REPO / "tests" / "fixtures" / "reference_losses.json"


def _cpu_kind() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def check_reference(name: str, losses: dict[int, float]) -> None:
    import json

    import pytest

    if os.environ.get("MEGAGPT_RECORD_REFERENCE") == "1":
        data = json.loads(REFERENCE_FILE.read_text()) if REFERENCE_FILE.exists() else {"runs": {}}
        data["cpu"] = _cpu_kind()
        data["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        data["runs"][name] = {str(k): v for k, v in sorted(losses.items())}
        REFERENCE_FILE.parent.mkdir(exist_ok=True)
        REFERENCE_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    data = json.loads(REFERENCE_FILE.read_text())
    expected = {int(k): v for k, v in data["runs"][name].items()}
    if data["cpu"] != _cpu_kind():
        pytest.skip(f"reference losses were recorded on a {data['cpu']} CPU, this one is {_cpu_kind()}")
    assert losses == expected, {
        s: (losses.get(s), expected.get(s))
        for s in sorted(set(losses) | set(expected))
        if losses.get(s) != expected.get(s)
    }


# -- the data loader's layers read directly -----------------------------------------
# What the trainer never asks for, the tests do: one stream's or one mixed
# stream's windows one at a time, a rank's sequences without batching, a
# micro-batch split into inputs and targets.  Each reads ahead through a
# prefetch pool of its own, as the loader does, closed when it is done.


def stream_windows(streams, stream: int, start: int, raw: bool = False):
    """Windows start, start+1, ... of one stream of a ShardStreams (raw: before the shuffle)."""
    from megagpt.data.prefetch import PrefetchPool

    with PrefetchPool() as pool:
        chunks = streams.raw_chunks(stream, start, pool) if raw else streams.chunks(stream, start, pool)
        for chunk in chunks:
            yield from chunk


def mixed_windows(mix, stream: int, start: int):
    """(window, source index) for windows start, start+1, ... of mixed stream `stream`."""
    from megagpt.data.prefetch import PrefetchPool

    with PrefetchPool() as pool:
        for windows, sources in mix.chunks(stream, start, pool):
            yield from zip(windows, sources.tolist())


def rank_sequences(mix, rank: int, world: int, consumed: int):
    """This rank's (sequence, source) for g = consumed + ..., g % world == rank.
    `consumed` must be a multiple of the world size (a step boundary)."""
    from megagpt.data.loader import RankReader
    from megagpt.data.prefetch import PrefetchPool

    with PrefetchPool() as pool:
        reader = RankReader(mix, rank, world, consumed, pool)
        n = 8 * len(reader.streams)
        while True:
            windows, sources = reader.take(n)
            yield from zip(windows, sources.tolist())
            if len(windows) < n:
                raise reader.error


def next_batch(batches):
    """(inputs, targets) of a Batches' next micro-batch, each (micro_batch, seq_len) int32."""
    windows = batches.next_windows()
    return windows[:, :-1], windows[:, 1:]
