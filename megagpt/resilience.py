"""What keeps a long run alive: stop requests (signals, a stop file), a
watchdog for hangs and the policy for non-finite losses.  The hooks
(megagpt/hooks.py) and the loop put them to work.  And what ends a worker
whose torchrun agent is gone (end_with_launcher).  (The faults the tests
inject are the tests' own: tests/faults.py, added through run.build's
extra_hooks.)
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("megagpt")


class StopRequest:
    """Notes SIGUSR1 / SIGTERM delivered to this process, and a stop file
    (MEGAGPT_STOP_FILE, which slurm/pretrain.sh touches when the batch shell
    gets the signal).  The loop asks `local()` at each step boundary and the
    ranks agree on the answer."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self, stop_file: str | None = None):
        self.stop_file = stop_file
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def local(self) -> str | None:
        if self.received:
            return self.received
        if self.stop_file and os.path.exists(self.stop_file):
            return f"stop file {self.stop_file}"
        return None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def end_with_launcher(environ=os.environ) -> bool:
    """Under torchrun, have the kernel SIGKILL this worker when its parent, the
    torchrun agent, dies (returns whether it did).  The agent ends its workers
    itself whenever it can; a SIGKILLed agent cannot, and its workers lived on
    as orphans until their own timeouts ended them (deepspeed.timeout_minutes,
    30 by default, for a worker waiting in init_process_group).  Called first
    thing in the worker (megagpt.train.main), so the window in which an agent
    can die unnoticed is the interpreter's start; an agent dying during the
    call is caught by the check after it (the parent changed) and the worker
    exits at once.  (A parent of PID 1 proves nothing by itself: in a
    container torchrun is often PID 1.)  Not under SLURM's srun alone or a
    plain `python -m` (no TORCHELASTIC_RUN_ID): no agent started the process."""
    if not environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return False
    agent = os.getppid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes, prctl.restype = [ctypes.c_int] + [ctypes.c_ulong] * 4, ctypes.c_int
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning(
            "could not tie this worker to its torchrun agent (prctl: %s); it outlives a killed agent",
            os.strerror(ctypes.get_errno()),
        )
        return False
    if os.getppid() != agent:  # the agent died between getppid() and prctl(): init (or a subreaper) adopted us
        try:
            sys.stderr.write(
                f"megagpt: error (rank {environ.get('RANK', '?')}): the torchrun agent that "
                "started this worker is gone; exiting\n"
            )
            sys.stderr.flush()
        except OSError:
            pass
        os._exit(1)
    return True


class Watchdog:
    """Exits the process (code 70) after dumping every thread's Python stack
    when no heartbeat came for `seconds`: a hung collective or a stuck loader
    then ends the job, so the scheduler can restart it, instead of idling."""

    EXIT_CODE = 70

    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="megagpt-watchdog", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.seconds / 4)):
            idle = time.monotonic() - self._last
            if idle > self.seconds:
                sys.stderr.write(
                    f"megagpt: error (rank {self.rank}): watchdog: no progress for {idle:.0f} s "
                    f"(trainer.watchdog_seconds={self.seconds:g}); Python stacks of every thread:\n"
                )
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)

    def close(self) -> None:
        self._stop.set()


class TrainingDiverged(RuntimeError):
    """Non-finite losses the policy (trainer.on_nan) cannot get past."""


class NanPolicy:
    """What a skipped update (a non-finite loss or gradient on some rank, agreed
    by all) leads to, by trainer.on_nan: `skip` goes on, up to max_nan_skips
    in a row, then rolls back; `rollback` rolls back at once; `stop` stops.
    After max_rollbacks rollbacks it stops."""

    def __init__(self, on_nan: str, max_skips: int, max_rollbacks: int, is_main: bool):
        self.on_nan, self.max_skips, self.max_rollbacks, self.is_main = on_nan, max_skips, max_rollbacks, is_main
        self.in_a_row = 0

    def on_update(self) -> None:
        self.in_a_row = 0

    def on_skipped(self, state, mean_loss: float) -> str:
        """`state`: the loop's TrainState.  Returns "skip" or "rollback", or raises."""
        state.counters.skipped_steps += 1
        self.in_a_row += 1
        if self.is_main:
            log.warning(
                "step %d: non-finite loss or gradient (mean loss %s); update skipped (%d in a row)",
                state.step,
                mean_loss,
                self.in_a_row,
            )
        if self.on_nan == "stop":
            raise TrainingDiverged(f"step {state.step}: non-finite loss or gradient (trainer.on_nan=stop)")
        if self.on_nan == "skip" and self.in_a_row <= self.max_skips:
            return "skip"
        if state.counters.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"step {state.step}: non-finite loss or gradient persists after {state.counters.rollbacks} "
                f"rollback(s) (trainer.max_rollbacks={self.max_rollbacks}); stopping"
            )
        self.in_a_row = 0
        return "rollback"
