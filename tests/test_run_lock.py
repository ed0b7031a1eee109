"""One job per run.dir (megagpt/run_lock.py): the lock itself, held by real
processes (started, SIGKILLed, racing each other); then real jobs: two
torchrun jobs on one run.dir, a SIGKILLed job's successor, a Hydra multirun
in one process, and a job that fails after taking the lock."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from helpers import REPO, kill_job, make_dataset, torchrun, torchrun_popen, wait_for, worker_pid

from megagpt.run_lock import LOCK_NAME, Holder, LockError, acquire

CLEAN_ENV = {}  # a job outside SLURM and torchrun (the tests may run inside either)
NOT_IN_SLURM = {"SLURM_JOB_ID": ""}  # for torchrun jobs: the same SLURM job would take over its own lock


def outside_slurm_and_torchrun() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}


# A process that takes the lock, says so, and holds it until its stdin closes.
# With a go FIFO, it first waits for it (so that several start at once).
HOLDER = r"""
import os, sys
from megagpt.run_lock import LockError, acquire
run_dir, stale, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if go:  # a FIFO: opening it waits until the test opens it for writing, which wakes every racer at once
    print("READY", flush=True)
    open(go).close()
try:
    lock = acquire(run_dir, stale, say=lambda line: print("SAID", line, flush=True))
except LockError as e:
    print("REFUSED", e, flush=True)
    sys.exit(3)
print("HELD", os.getpid(), flush=True)
sys.stdin.read()
lock.release()
print("RELEASED", flush=True)
"""


def start_holder(
    run_dir: Path, env: dict | None = None, stale: float = 3600, go: Path | None = None, wait: bool = True
) -> subprocess.Popen:
    environ = {**outside_slurm_and_torchrun(), "PYTHONPATH": str(REPO), **(env or {})}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), str(stale), str(go or "")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    if wait:
        line = p.stdout.readline()
        assert line.startswith("HELD"), line + p.stderr.read()
    return p


def stop_holder(p: subprocess.Popen) -> str:
    out, err = p.communicate(input="", timeout=60)
    return out + err


def filesystem_now(directory: Path) -> float:
    probe = directory / "probe"
    probe.touch()
    now = probe.stat().st_mtime
    probe.unlink()
    return now


def write_lock(run_dir: Path, holder: Holder, heartbeat_age: float) -> Path:
    """A lock as another job left it, its heartbeat `heartbeat_age` s old on the filesystem's clock."""
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)))
    mtime = filesystem_now(run_dir) - heartbeat_age
    os.utime(path, (mtime, mtime))
    return path


def elsewhere() -> Holder:
    """The record of a job on another host: its PID cannot be checked from here."""
    return replace(Holder.of_this_process({"SLURM_JOB_ID": "41"}), host="node-elsewhere", pid=4242)


IN_USE = re.compile(
    r"run\.dir (?P<dir>\S+) is in use by another job: host (?P<host>\S+), PID (?P<pid>\d+)"
    r"(?P<slurm>, SLURM job \S+( \(array task \S+\))?)?, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
    r"\(lock (?P<lock>\S+), heartbeat (?P<age>\d+) s ago\); stop that job or use another run\.dir$"
)


def test_a_held_lock_refuses_a_second_job_naming_it_and_is_released(tmp_path):
    run_dir = tmp_path / "run" / "nested"  # created by acquire
    lock = acquire(str(run_dir), 3600, environ=CLEAN_ENV)
    record = json.loads((run_dir / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["pid_start"] == int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert record["started"].endswith(" UTC")

    other = start_holder(run_dir, wait=False)
    out = stop_holder(other)
    assert other.returncode == 3, out
    m = IN_USE.search(out.splitlines()[0][len("REFUSED ") :])
    assert m, out
    assert (m["dir"], m["host"], int(m["pid"]), m["slurm"]) == (str(run_dir), socket.gethostname(), os.getpid(), None)
    assert m["lock"] == str(run_dir / LOCK_NAME) and int(m["age"]) < 60

    lock.release()
    lock.release()  # twice is harmless
    assert not (run_dir / LOCK_NAME).exists()
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no temporary file left behind
    other = start_holder(run_dir)
    assert "RELEASED" in stop_holder(other)
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow
def test_the_refusal_names_the_slurm_job_and_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    holder = start_holder(
        tmp_path, env={"SLURM_JOB_ID": "567", "SLURM_ARRAY_JOB_ID": "560", "SLURM_ARRAY_TASK_ID": "7"}, stale=3.0
    )  # a beat every 0.3 s
    try:
        time.sleep(4.5)  # longer than the threshold: the heartbeats keep the lock fresh
        with pytest.raises(LockError) as e:
            acquire(str(tmp_path), 3.0, environ={"SLURM_JOB_ID": "568"})
        m = IN_USE.search(str(e.value))
        assert m and m["slurm"] == ", SLURM job 567 (array task 560_7)" and int(m["pid"]) == holder.pid, e.value
    finally:
        stop_holder(holder)


def test_a_sigkilled_holder_is_stale_at_once(tmp_path):
    for reaped in (True, False):  # a zombie (killed, not yet reaped) is no longer running either
        holder = start_holder(tmp_path)
        holder.kill()
        if reaped:
            holder.wait()
        else:
            time.sleep(0.5)
        said = []
        lock = acquire(str(tmp_path), 3600, environ=CLEAN_ENV, say=said.append)
        host = re.escape(socket.gethostname())
        assert len(said) == 1 and re.fullmatch(
            rf"run\.dir {re.escape(str(tmp_path))}: took over the stale lock of host {host}, PID {holder.pid}, "
            rf"started [0-9: -]+ UTC: PID {holder.pid} on {host} is no longer running",
            said[0],
        ), said
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.release()
        holder.wait()


def test_a_reused_pid_is_stale_at_once(tmp_path):
    """The lock names this very PID, but a process that started at another time."""
    me = Holder.of_this_process(CLEAN_ENV)
    write_lock(tmp_path, replace(me, token="earlier", pid_start=me.pid_start - 1), heartbeat_age=0)
    said = []
    acquire(str(tmp_path), 3600, environ=CLEAN_ENV, say=said.append).release()
    assert said and said[0].endswith(
        f": PID {me.pid} on {me.host} is now another process (it started at another time)"
    ), said


def test_a_silent_heartbeat_is_stale_after_the_threshold_on_the_filesystem_clock(tmp_path):
    """A job on another host: its lock is held while its heartbeat is younger than
    run.lock_stale_seconds, stale after, by the filesystem's clock: a new job
    whose own clock is an hour off decides the same."""
    write_lock(tmp_path, elsewhere(), heartbeat_age=50)
    skewed = r"""
import sys, time
from megagpt.run_lock import LockError, acquire
offset = float(sys.argv[3])  # this host's clock, an hour ahead or behind
real_time, real_ns = time.time, time.time_ns
time.time, time.time_ns = (lambda: real_time() + offset), (lambda: real_ns() + int(offset * 1e9))
try:
    acquire(sys.argv[1], float(sys.argv[2]), environ={}, say=lambda line: print("SAID", line)).release()
except LockError as e:
    print("REFUSED", e)
"""
    for offset in (3600, -3600):
        out = subprocess.run(
            [sys.executable, "-c", skewed, str(tmp_path), "100", str(offset)],
            capture_output=True,
            text=True,
            env={**outside_slurm_and_torchrun(), "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr
        m = IN_USE.search(out.stdout.strip()[len("REFUSED ") :])
        assert m and m["host"] == "node-elsewhere" and m["slurm"] == ", SLURM job 41" and 49 <= int(m["age"]) <= 80
    out = subprocess.run(
        [sys.executable, "-c", skewed, str(tmp_path), "30", "-3600"],
        capture_output=True,
        text=True,
        env={**outside_slurm_and_torchrun(), "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.stdout.startswith("SAID"), out.stdout + out.stderr
    assert "took over the stale lock of host node-elsewhere, PID 4242, SLURM job 41, started" in out.stdout
    assert re.search(r": its heartbeat is (5\d|6\d|7\d) s old \(run\.lock_stale_seconds=30\)$", out.stdout.strip())
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_same_slurm_job_or_a_torchrun_restart_takes_over_its_own_lock(tmp_path):
    """A requeue (same SLURM_JOB_ID) takes over at once, even from a holder that
    still runs (on a failed node, say); that holder's heartbeat then finds the
    lock gone, and its release leaves the new holder's lock alone."""
    holder = start_holder(tmp_path, env={"SLURM_JOB_ID": "777"}, stale=1.0)
    said = []
    lock = acquire(str(tmp_path), 1.0, environ={"SLURM_JOB_ID": "777"}, say=said.append)
    assert said[0].endswith(": it is this SLURM job's own lock (job 777, requeued or restarted)"), said
    time.sleep(1.0)  # the old holder's next beats
    out = stop_holder(holder)
    assert "is no longer this job's" in out, out
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.holder.token
    lock.release()

    run = {"TORCHELASTIC_RUN_ID": "abc123", "TORCHELASTIC_RESTART_COUNT": "0"}
    holder = start_holder(tmp_path, env=run)
    try:
        with pytest.raises(LockError, match="is in use by another job"):  # another torchrun run
            acquire(str(tmp_path), 3600, environ={**run, "TORCHELASTIC_RUN_ID": "def456"})
        # A restart of the same run, whatever its agent's count says: each node's agent counts only
        # its own failures, so a restart that puts rank 0 on another node may count 0 again.
        for count in ("1", "0"):
            said = []
            acquire(
                str(tmp_path), 3600, environ={**run, "TORCHELASTIC_RESTART_COUNT": count}, say=said.append
            ).release()
            assert said[0].endswith(": it is this torchrun run's own lock (run abc123, restart 0; restarted)"), said
            stop_holder(holder)
            holder = start_holder(tmp_path, env=run)
    finally:
        stop_holder(holder)


@pytest.mark.slow
def test_two_jobs_taking_over_one_stale_lock_at_once_one_wins(tmp_path):
    """Several processes find one stale lock at the same moment: exactly one
    takes it over, the others are refused naming that one."""
    for round_ in range(8):
        run_dir = tmp_path / str(round_)
        run_dir.mkdir()
        write_lock(run_dir, elsewhere(), heartbeat_age=100)
        go = tmp_path / f"go-{round_}"
        os.mkfifo(go)
        racers = [start_holder(run_dir, stale=30, go=go, wait=False) for _ in range(5)]
        assert all(p.stdout.readline() == "READY\n" for p in racers)
        time.sleep(0.2)  # each waiting to open the FIFO
        go_signal = os.open(go, os.O_WRONLY)
        firsts = {p.pid: p.stdout.readline() for p in racers}
        os.close(go_signal)
        winners = [pid for pid, line in firsts.items() if line.startswith("SAID")]
        try:
            assert len(winners) == 1, firsts
            for pid, line in firsts.items():
                if pid != winners[0]:
                    assert line.startswith("REFUSED") and f"PID {winners[0]}," in line, firsts
        finally:
            for p in racers:
                stop_holder(p)
        assert not list(run_dir.iterdir())  # the lock released, no claim or temporary file left


def test_an_unreadable_lock_counts_by_its_heartbeat_and_bad_settings_are_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not a lock")
    with pytest.raises(LockError, match=r"is in use by another job \(lock .*, unreadable: .*heartbeat \d+ s ago\)"):
        acquire(str(tmp_path), 3600, environ=CLEAN_ENV)
    said = []
    old = filesystem_now(tmp_path) - 100
    os.utime(tmp_path / LOCK_NAME, (old, old))
    acquire(str(tmp_path), 30, environ=CLEAN_ENV, say=said.append).release()
    assert "took over the stale lock of unknown (" in said[0] and "heartbeat is" in said[0], said
    with pytest.raises(LockError, match=r"^run\.lock_stale_seconds=0: must be > 0"):
        acquire(str(tmp_path), 0, environ=CLEAN_ENV)


# -- real jobs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lock-data"), n_docs=200, docs_per_shard=8)


def job_args(data_dir, run_dir, steps, *extra):
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


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_second_job_on_a_run_dir_in_use_stops_at_start_and_the_first_is_intact(data_dir, tmp_path):
    run_dir, log, stop_file = tmp_path / "run", tmp_path / "first.log", tmp_path / "STOP"
    first = torchrun_popen(
        job_args(data_dir, run_dir, 10_000),
        cwd=tmp_path,
        log=log,
        env_extra={**NOT_IN_SLURM, "MEGAGPT_STOP_FILE": str(stop_file)},
    )
    try:
        wait_for(lambda: len(logged_steps(run_dir)) >= 2, 240, first, "the first job's step 2")
        holder = worker_pid(first.pid, 0)
        # Another max_steps: had the second job written config.yaml, it would show.
        second = torchrun(job_args(data_dir, run_dir, 6), cwd=tmp_path, env_extra=NOT_IN_SLURM)
        assert second.returncode != 0
        lines = [x for x in second.stderr.splitlines() if x.startswith("megagpt: error")]
        assert sorted(x[: len("megagpt: error (rank 0)")] for x in lines) == [
            "megagpt: error (rank 0)",
            "megagpt: error (rank 1)",
        ], second.stderr
        for line in lines:
            m = IN_USE.search(line.split(": ", 2)[2])
            assert m and m["dir"] == str(run_dir) and int(m["pid"]) == holder and m["host"] == socket.gethostname()
        assert "run.dir:" not in second.stdout  # stopped before anything else
        stop_file.touch()
        assert first.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            kill_job(first)
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), steps  # every step once, none replaced
    assert "max_steps: 10000" in (run_dir / "config.yaml").read_text()
    from megagpt.checkpoint import verify

    newest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert newest == f"step_{steps[-1]}" and verify(str(run_dir / "checkpoints" / newest)) is None
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    assert not (run_dir / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_sigkilled_job_does_not_block_the_next_which_resumes(data_dir, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = torchrun_popen(job_args(data_dir, run_dir, 12), cwd=tmp_path, log=log, env_extra=NOT_IN_SLURM)
    try:
        wait_for(
            lambda: (run_dir / "checkpoints" / "step_4" / "megagpt_state.json").exists(),
            240,
            first,
            "checkpoint step_4",
        )
        holder = worker_pid(first.pid, 0)
    finally:
        kill_job(first)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder  # left behind by the killed job
    second = torchrun(job_args(data_dir, run_dir, 12), cwd=tmp_path, env_extra=NOT_IN_SLURM)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"took over the stale lock of host {socket.gethostname()}, PID {holder}, started " in second.stdout
    assert f"PID {holder} on {socket.gethostname()} is no longer running" in second.stdout
    assert "resumed from" in second.stdout
    assert logged_steps(run_dir)[-1] == 12
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_multirun_in_one_process_releases_the_lock_between_points(data_dir, tmp_path):
    """`python -m megagpt.train -m`: the points run one after another in this
    process, each in a run.dir of its own; the first one's was left locked by a
    SIGKILLed job.  Each point takes its lock (the first taking that one over)
    and releases it when it ends, not when the process does."""
    runs = tmp_path / "runs"
    dead = start_holder(runs / "2")
    dead.kill()
    dead.wait()
    args = [a for a in job_args(data_dir, runs / "${trainer.max_steps}", 2) if not a.startswith("trainer.max_steps")]
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.train", "-m", *args, "trainer.max_steps=2,3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**outside_slurm_and_torchrun(), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("took over the stale lock") == 1, r.stdout[-3000:]
    assert f"run.dir {runs / '2'}: took over the stale lock of host {socket.gethostname()}, PID {dead.pid}" in r.stdout
    assert (logged_steps(runs / "2"), logged_steps(runs / "3")) == ([1, 2], [1, 2, 3])
    assert not (runs / "2" / LOCK_NAME).exists() and not (runs / "3" / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_job_that_fails_after_taking_the_lock_releases_it(tmp_path):
    """A user error after the lock was taken (here: no data at data.urls) ends
    the job with its one line and exit code 2, and leaves no lock behind (the
    one a SIGKILLed job had left is taken over first)."""
    run_dir, missing = tmp_path / "run", tmp_path / "no-data"
    dead = start_holder(run_dir)
    dead.kill()
    dead.wait()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.train",
            f"run.dir={run_dir}",
            "data=webdataset",
            f"data.urls={missing}",
            "logger=none",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**outside_slurm_and_torchrun(), "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"run.dir {run_dir}: took over the stale lock of host {socket.gethostname()}, PID {dead.pid}" in r.stdout
    assert f"megagpt: error (rank 0): data.urls: {missing} does not exist" in r.stderr
    assert not (run_dir / LOCK_NAME).exists()
