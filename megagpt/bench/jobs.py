"""Child processes of the benchmarks: start one with its output in a log,
stop it with everything it started, read what it wrote.

A job is either a `torchrun -m megagpt.train` run (its figures are the run's
metrics.jsonl) or a benchmark module run as `python -m <module> '<spec json>'`,
whose last `BENCH_RESULT {...}` line is its result (`report`, `result_in`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

RESULT_PREFIX = "BENCH_RESULT "

# The job running now and its log ([proc, log_path] or empty), for a SIGTERM handler to stop.
current: list = []


def spawn(cmd: list[str], log_path: str) -> subprocess.Popen:
    """Start `cmd` in a session of its own, stdout and stderr to `log_path`."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    current[:] = [proc, log_path]
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a job and everything it started.  torchrun's workers run in
    sessions of their own, so killing torchrun's group would orphan them; and
    SIGTERM would make megagpt save a checkpoint first (preemption)."""
    if proc.poll() is None:
        tree = [proc.pid, *descendants(proc.pid)]  # listed before any dies and is re-parented
        for pid in tree:
            try:
                group = os.getpgid(pid)
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def stop(proc: subprocess.Popen) -> None:
    """End the job `spawn` started (kill_tree), whether it is still running or
    not, and forget it as the current one."""
    kill_tree(proc)
    current.clear()


def records(path: str) -> list[dict]:
    """The complete lines of a JSON-lines file that may still be being written."""
    try:
        with open(path) as f:
            return [json.loads(x) for x in f if x.endswith("\n")]
    except (OSError, json.JSONDecodeError):
        return []


def log_tail(path: str, n: int = 1) -> str:
    """The last `n` error lines of a job's log (its last lines if none says error),
    leaving out glog-style warnings and infos."""
    try:
        lines = [x.strip() for x in open(path, errors="replace") if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "error" in x.lower() and not x.startswith(("E1", "W1", "I1"))]
    return " | ".join((errors or lines)[-n:])[:400]


def last_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def slug(label: str) -> str:
    """A file name for a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def report(result: dict) -> None:
    """What a benchmark's child process prints last: its result, for `result_in`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def result_in(text: str) -> dict | None:
    """The last result a child printed with `report`, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None
