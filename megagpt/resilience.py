"""What keeps a long run alive: stop requests (signals, a stop file),
a watchdog for hangs, loss-spike detection, and fault injection for tests.

The training loop owns the decisions; these pieces only observe.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections import deque

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
                sys.stderr.write(f"megagpt: error (rank {self.rank}): watchdog: no progress for {idle:.0f} s "
                                 f"(trainer.watchdog_seconds={self.seconds:g}); Python stacks of every thread:\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)

    def close(self) -> None:
        self._stop.set()


class SpikeDetector:
    """A loss above `factor` x the mean of the last `window` finite losses is
    a spike (once `window` losses have been seen)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> bool:
        if loss != loss or loss in (float("inf"), float("-inf")):
            return False
        full = len(self.recent) == self.recent.maxlen
        mean = sum(self.recent) / len(self.recent) if self.recent else 0.0
        self.recent.append(loss)
        return full and self.factor > 0 and loss > self.factor * mean


class Faults:
    """Fault injection for tests, from the environment (never set in normal runs):

      MEGAGPT_FAULT_NAN=R:A-B   rank R's loss is NaN for steps whose data
                                starts at global sequence position in [A, B)
                                (bad data: skipping the window cures it)
      MEGAGPT_FAULT_NAN_STEPS=R:S1,S2,...  rank R's loss is NaN at these steps
      MEGAGPT_FAULT_HANG=R:S    rank R stops making progress at step S
      MEGAGPT_FAULT_SPIKE_STEPS=R:S1,...  rank R's loss is multiplied by 10 at these steps
    """

    def __init__(self, rank: int, environ=os.environ):
        self.rank = rank
        self.nan_window = self._parse(environ.get("MEGAGPT_FAULT_NAN"), lambda v: tuple(map(int, v.split("-"))))
        self.nan_steps = self._parse(environ.get("MEGAGPT_FAULT_NAN_STEPS"),
                                     lambda v: {int(x) for x in v.split(",")}) or set()
        self.hang_step = self._parse(environ.get("MEGAGPT_FAULT_HANG"), int)
        self.spike_steps = self._parse(environ.get("MEGAGPT_FAULT_SPIKE_STEPS"),
                                       lambda v: {int(x) for x in v.split(",")}) or set()
        if self.nan_window or self.nan_steps or self.hang_step or self.spike_steps:
            log.warning("fault injection active on rank %d (MEGAGPT_FAULT_*)", rank)

    def _parse(self, value: str | None, conv):
        if not value:
            return None
        r, _, rest = value.partition(":")
        return conv(rest) if int(r) == self.rank else None

    def nan(self, step: int, consumed: int) -> bool:
        if step in self.nan_steps:
            return True
        return bool(self.nan_window) and self.nan_window[0] <= consumed < self.nan_window[1]

    def maybe_hang(self, step: int) -> None:
        if self.hang_step is not None and step == self.hang_step:
            log.warning("fault injection: rank %d hangs at step %d", self.rank, step)
            while True:
                time.sleep(60)
