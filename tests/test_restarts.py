"""torchrun's own restarts (--max-restarts) and the end of a torchrun agent,
with real 2-process jobs on CPU (fp32, gloo): a SIGKILLed rank leads to a
restart of every worker that resumes from the newest checkpoint and logs the
uninterrupted run's losses bit for bit; workers end with their agent.  And,
in seconds, how a restarted rank finds its attempt's process-group store
(runtime._attempt_store) past what the previous attempt left in torchrun's.
(A whole job killed and started again by hand: tests/test_fault_tolerance.py.)"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import _torchrun_job, kill_job, make_dataset, torchrun, torchrun_popen, wait_for, worker_pid, worker_pids

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

STEPS = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("restarts"), n_docs=200, docs_per_shard=8)


def args(data_dir, run_dir, steps=STEPS):
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
        # a restart that cannot meet fails in a minute, not in 30
        "deepspeed.timeout_minutes=1",
    ]


def torchrun_restarting(args: list[str], cwd: Path, log: Path, restarts: int = 2) -> subprocess.Popen:
    """torchrun_popen's job, with torchrun restarting its workers up to `restarts` times."""
    cmd, env = _torchrun_job(args, None, 2)
    cmd.insert(cmd.index("--standalone") + 1, f"--max-restarts={restarts}")
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def newest_committed(run_dir: Path) -> int:
    """The newest committed checkpoint's step (step_N.partial holds its state file before the rename)."""
    names = [p.parent.name for p in (run_dir / "checkpoints").glob("step_*/megagpt_state.json")]
    return max((int(n[5:]) for n in names if n[5:].isdigit()), default=0)


def test_a_restarted_rank_passes_over_the_previous_attempts_store(monkeypatch):
    """torchrun's store still announces the previous attempt's process-group
    store (its rank 0 is dead; then its port is another store's): rank 1
    waits for, and meets rank 0 in, the store of this attempt."""
    from torch.distributed import TCPStore

    from megagpt import runtime

    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # torchrun's, kept across attempts
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    agent.set(runtime._ANNOUNCE_KEY, f"127.0.0.1 {dead_port} previous-attempt")
    timeout = datetime.timedelta(seconds=60)
    with ThreadPoolExecutor(1) as pool:
        rank1 = pool.submit(runtime._attempt_store, runtime.Env(1, 2, 1, 2), timeout)
        time.sleep(1)
        assert not rank1.done()
        stranger = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        agent.set(
            runtime._ANNOUNCE_KEY, f"127.0.0.1 {stranger.port} previous-attempt"
        )  # its port taken by another store
        time.sleep(3)
        assert not rank1.done()
        rank0_store = runtime._attempt_store(runtime.Env(0, 2, 0, 2), timeout)
        rank1_store = rank1.result(timeout=60)
    rank0_store.set("from rank 0", "hello")
    assert rank1_store.get("from rank 0") == b"hello"


def test_max_restarts_resume_a_killed_rank_bit_for_bit(data_dir, tmp_path):
    """Rank 1 SIGKILLed twice, each time a step after a checkpoint: torchrun
    --max-restarts=2 restarts both workers, each restart resumes from the
    newest checkpoint, and the job finishes with the uninterrupted losses."""
    reference = tmp_path / "reference"
    r = torchrun(args(data_dir, reference), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = torchrun_restarting(args(data_dir, run_dir), cwd=tmp_path, log=log)
    killed_after = []  # the newest checkpoint at each kill: where the restart must resume
    try:
        for kill in range(2):
            # a step after a checkpoint this attempt wrote (the second kill: in the first restart)
            wait_for(
                lambda: (
                    newest_committed(run_dir) > max(killed_after, default=0)
                    and logged_steps(run_dir) > newest_committed(run_dir)
                ),
                180,
                job,
                f"{'the job' if kill == 0 else 'the restarted job'} to train a step past a new checkpoint",
            )
            killed_after.append(newest_committed(run_dir))
            os.kill(worker_pid(job.pid, 1), signal.SIGKILL)
        code = job.wait(timeout=400)
    finally:
        if job.poll() is None:
            kill_job(job)
    out = log.read_text(errors="replace")
    assert code == 0, out[-4000:]
    for step in killed_after:
        assert f"resumed from {run_dir}/checkpoints/step_{step} at step {step}" in out, (killed_after, out[-4000:])
    assert losses(run_dir) == losses(reference)  # exact equality, every step 1..16
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_end_when_their_agent_is_killed(data_dir, tmp_path):
    """The torchrun agent alone SIGKILLed while rank 0 waits in
    init_process_group for rank 1 (stopped): both workers are gone within
    seconds, not when the process group's timeout ends them."""
    job = torchrun_popen(args(data_dir, tmp_path / "run"), cwd=tmp_path, log=tmp_path / "job.log")
    workers: list[int] = []
    try:
        wait_for(lambda: len(worker_pids(job.pid)) == 2 and worker_pid(job.pid, 1) is not None, 60, job, "two workers")
        workers = worker_pids(job.pid)
        rank0, rank1 = worker_pid(job.pid, 0), worker_pid(job.pid, 1)
        # Rank 1 is stopped a second of CPU into its start: past megagpt.train's
        # first lines (0.2 s) and well before the process group (3 s of imports).
        wait_for(lambda: _cpu_seconds(rank1) >= 1.0, 120, job, "rank 1's start", poll=0.05)
        os.kill(rank1, signal.SIGSTOP)
        # Rank 0 cannot get past init_process_group without rank 1: once it has
        # done its imports and stopped using the CPU, it waits there.
        last, idle_since = -1.0, time.time()
        deadline = time.time() + 180
        while time.time() < deadline:
            used = _cpu_seconds(rank0)
            if used != last:
                last, idle_since = used, time.time()
            elif used > 2.5 and time.time() - idle_since > 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"rank 0 never settled in init_process_group ({last:.1f} s of CPU)")
        os.kill(job.pid, signal.SIGKILL)  # the agent only
        job.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(map(_running, workers)):
            time.sleep(0.1)
        alive = [f"rank {rank} (pid {pid})" for rank, pid in ((0, rank0), (1, rank1)) if _running(pid)]
        assert not alive, f"{', '.join(alive)} outlived the torchrun agent"
    finally:
        if job.poll() is None:
            kill_job(job)
        for pid in workers:  # this test's own processes, left by a failure
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
