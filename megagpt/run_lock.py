"""One job per run directory: the lock file `<run.dir>/.megagpt.lock`.

Rank 0 takes it before anything in run.dir is written or deleted, and a second
job on the same run.dir stops at start, naming the holder.  It must work on the
shared filesystems of clusters (NFS, Lustre, GPFS), where flock() may be absent
or local to one node, so it is built from operations those make atomic:

- Taking a free lock: the holder's record (JSON) is written whole to a file of
  its own, which is then hard-linked to the lock's name.  link() fails when the
  name exists, atomically, NFSv2 included (where O_CREAT|O_EXCL is not); a
  retransmitted link whose first reply was lost reports EEXIST although it
  succeeded, so the file's link count (2: it has the lock's name too) decides.
  Unlike O_CREAT|O_EXCL followed by a write, the lock never exists half written.
- The record: host, boot id and PID namespace (which together say "this
  machine"), PID and the process's start time (/proc/<pid>/stat field 22: a
  reused PID has another), the SLURM job (SLURM_JOB_ID, and the array
  job/task), the torchrun run id and restart count, and the start time (UTC).
- The heartbeat is the file's mtime: a thread in the holder touches it every
  `stale_seconds / 10` seconds (at most every 30 s) while the lock is still its
  own.  Touching changes no byte and no inode, so a reader never sees a torn
  lock and a holder can never put back a lock that was taken over.

A lock is STALE, and a new job takes it over, saying so in one line, when
  (a) the new job is on the holder's machine and the holder's PID is not
      running, or is another process (its start time differs): at once;
  (b) the new job is the holder's own SLURM job (a requeue, or a torchrun
      restart inside it), or a restart of the holder's torchrun run (the same
      run id: torchrun ends every worker of an attempt before the next): at
      once;
  (c) otherwise, when the heartbeat is older than `stale_seconds`
      (run.lock_stale_seconds), measured against the filesystem's clock (the
      mtime of a file just created in run.dir), not this host's, so hosts
      whose clocks disagree still agree on a lock's age.
A holder that stalls (SIGSTOP, a hung filesystem) for longer than that can be
taken over while alive; its heartbeat then finds the lock gone, stops, and
logs an error.  Choose stale_seconds well above such stalls.

Taking over is race-free: two jobs may find one lock stale at once.  Each
first claims it with an exclusive link `<lock>.takeover-<its id>-<n>`; only one
gets the claim, re-reads the lock and, if it is still the stale one, replaces
it with its own by an atomic rename.  The lock's name never goes missing, so a
third job cannot slip in.  A claim left by a job that died inside those few
microseconds expires after `stale_seconds` (the next claim takes n + 1).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

LOCK_NAME = ".megagpt.lock"
ROUNDS = 20  # attempts when the lock changes hands while we look at it (0.1 s apart)
log = logging.getLogger("megagpt")


class LockError(Exception):
    """The run directory cannot be locked; the message is one line."""


@dataclass(frozen=True)
class Holder:
    """A lock's record: who holds it."""

    token: str
    host: str
    boot_id: str | None
    pid_namespace: str | None
    pid: int
    pid_start: int | None
    slurm_job: str | None
    slurm_array: str | None
    torchrun_run: str | None
    torchrun_restart: int
    started: str

    @classmethod
    def of_this_process(cls, environ: Mapping[str, str]) -> Holder:
        array = (
            f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
            if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID")
            else None
        )
        run_id = environ.get("TORCHELASTIC_RUN_ID")
        return cls(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_namespace=_link_target("/proc/self/ns/pid"),
            pid=os.getpid(),
            pid_start=_start_time(os.getpid()),
            slurm_job=environ.get("SLURM_JOB_ID") or None,
            slurm_array=array,
            torchrun_run=run_id if run_id and run_id != "none" else None,
            torchrun_restart=int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0),
            started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )

    def describe(self) -> str:
        slurm = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        array = f" (array task {self.slurm_array})" if self.slurm_array else ""
        return f"host {self.host}, PID {self.pid}{slurm}{array}, started {self.started}"

    def same_machine(self, other: Holder) -> bool:
        return (self.host, self.boot_id, self.pid_namespace) == (other.host, other.boot_id, other.pid_namespace)


@dataclass(frozen=True)
class Found:
    """The lock file as read: its holder (None if unreadable, with `problem`), its mtime (the heartbeat)."""

    holder: Holder | None
    mtime: float
    key: str  # the holder's token, or for an unreadable lock its inode and mtime
    problem: str = ""


class RunLock:
    """This job's hold on a run directory; `release()` ends it (once is enough; later calls do nothing)."""

    def __init__(self, path: str, holder: Holder, heartbeat_every: float):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_every,), name="megagpt-run-lock", daemon=True
        )
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                found = _read_lock(self.path)
                if found is None or found.key != self.holder.token:
                    whose = "nobody's" if found is None or found.holder is None else found.holder.describe()
                    log.error(
                        "the lock %s is no longer this job's (now %s): another job judged it stale "
                        "and may be writing to this run.dir too",
                        self.path,
                        whose,
                    )
                    return
                os.utime(self.path)  # no times given: the filesystem's own clock (the server's on NFS)
            except OSError as e:  # a filesystem hiccup: the next beat tries again
                log.warning("cannot refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this job's."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=60)
        try:
            found = _read_lock(self.path)
            if found is not None and found.key == self.holder.token:
                os.unlink(self.path)
        except OSError as e:  # never hide the error that ends the run behind this one
            log.warning("cannot remove the lock %s: %s", self.path, e)


def acquire(
    run_dir: str, stale_seconds: float, environ: Mapping[str, str] = os.environ, say: Callable[[str], None] = print
) -> RunLock:
    """Lock `run_dir` (created if needed) for this process, or raise LockError
    naming the job that holds it.  `say` gets the line about a stale lock taken over."""
    if not stale_seconds > 0:
        raise LockError(
            f"run.lock_stale_seconds={stale_seconds}: must be > 0 (seconds without a heartbeat "
            "after which a run.dir's lock counts as left behind)"
        )
    path = os.path.join(run_dir, LOCK_NAME)
    me = Holder.of_this_process(environ)
    try:
        os.makedirs(run_dir, exist_ok=True)
        mine = f"{path}.{me.host}.{me.pid}.{me.token[:8]}.tmp"
        _write_record(mine, me)
        try:
            for _ in range(ROUNDS):
                if _link_exclusive(mine, path):
                    return RunLock(path, me, min(30.0, stale_seconds / 10))
                found = _read_lock(path)
                if found is None:  # released while we looked
                    continue
                why = _stale_because(found, me, run_dir, stale_seconds)
                if why is None:
                    raise LockError(_in_use(run_dir, path, found, _filesystem_now(run_dir)))
                if _take_over(path, mine, found, run_dir, stale_seconds):
                    whose = found.holder.describe() if found.holder else f"unknown ({found.problem})"
                    say(f"run.dir {run_dir}: took over the stale lock of {whose}: {why}")
                    return RunLock(path, me, min(30.0, stale_seconds / 10))
                time.sleep(0.1)  # another job is taking it over: look again once it has
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mine)
    except OSError as e:
        raise LockError(f"run.dir {run_dir}: cannot take the lock {path}: {e}") from e
    raise LockError(
        f"run.dir {run_dir}: the lock {path} kept changing hands for {ROUNDS * 0.1:.0f} s; "
        "are several jobs starting on this run.dir?"
    )


def _stale_because(found: Found, me: Holder, run_dir: str, stale_seconds: float) -> str | None:
    """Why the lock `found` is stale for job `me` (see the module docstring), or None if it is held."""
    held = found.holder
    if held is not None and me.slurm_job and held.slurm_job == me.slurm_job:
        return f"it is this SLURM job's own lock (job {me.slurm_job}, requeued or restarted)"
    if held is not None and me.torchrun_run and held.torchrun_run == me.torchrun_run:
        # One attempt of a torchrun run is alive at a time: its agents end every worker before a
        # restart.  (Not the restart count: each node's agent counts only its own failures, and
        # a restart may put rank 0 on another node.)
        return f"it is this torchrun run's own lock (run {me.torchrun_run}, restart {held.torchrun_restart}; restarted)"
    if held is not None and held.same_machine(me):
        gone = _why_not_running(held.pid, held.pid_start)
        if gone is not None:
            return f"PID {held.pid} on {held.host} {gone}"
    age = _filesystem_now(run_dir) - found.mtime
    if age > stale_seconds:
        return f"its heartbeat is {age:.0f} s old (run.lock_stale_seconds={stale_seconds:g})"
    return None


def _in_use(run_dir: str, path: str, found: Found, now: float) -> str:
    heartbeat = f"heartbeat {max(0.0, now - found.mtime):.0f} s ago"
    if found.holder is None:
        return (
            f"run.dir {run_dir} is in use by another job (lock {path}, unreadable: {found.problem}; "
            f"{heartbeat}); stop that job or use another run.dir"
        )
    return (
        f"run.dir {run_dir} is in use by another job: {found.holder.describe()} (lock {path}, {heartbeat}); "
        "stop that job or use another run.dir"
    )


def _take_over(path: str, mine: str, stale: Found, run_dir: str, stale_seconds: float) -> bool:
    """Replace the stale lock by `mine`; False if another job got to it first (see the module docstring)."""
    attempt = 0
    while True:
        claim = f"{path}.takeover-{stale.key}-{attempt}"
        if _link_exclusive(mine, claim):
            break
        try:
            claim_age = _filesystem_now(run_dir) - os.stat(claim).st_mtime
        except FileNotFoundError:  # that claimant has finished: the lock is no longer `stale`
            return False
        if claim_age <= stale_seconds:
            return False
        attempt += 1  # its claimant died mid-way
    try:
        current = _read_lock(path)
        if current is None or current.key != stale.key:
            return False
        os.replace(mine, path)
        return True
    finally:
        os.unlink(claim)


def _link_exclusive(src: str, dst: str) -> bool:
    """Give file `src` the name `dst` too, unless `dst` exists; True if this call did."""
    with contextlib.suppress(FileExistsError):
        os.link(src, dst)
    return os.stat(src).st_nlink == 2


def _write_record(path: str, holder: Holder) -> None:
    with open(path, "x") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())


def _read_lock(path: str) -> Found | None:
    """The lock at `path` (content and mtime of the same file), or None if there is none."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
        holder = Holder(**{f.name: record[f.name] for f in fields(Holder)})  # KeyError: not a lock record
        return Found(holder, st.st_mtime, holder.token)
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or not a lock record
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        return Found(None, st.st_mtime, f"{st.st_ino}-{st.st_mtime_ns}", problem)


def _filesystem_now(directory: str) -> float:
    """The filesystem's clock: the mtime of a file created in `directory` now."""
    probe = os.path.join(directory, f"{LOCK_NAME}.clock-{uuid.uuid4().hex}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _why_not_running(pid: int, start: int | None) -> str | None:
    """None if `pid` is the process that started at `start`; else why not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "is no longer running"
    except PermissionError:  # another user's process: it exists
        pass
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:  # no /proc (or it just ended): the signal said it exists
        return None
    after_name = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (the state) onwards
    if after_name[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return "is no longer running"
    if start is not None and int(after_name[19]) != start:
        return "is now another process (it started at another time)"
    return None


def _start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _link_target(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
