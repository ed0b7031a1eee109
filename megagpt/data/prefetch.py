"""Reads run ahead of the data loader by a few background threads.

A `PrefetchPool` belongs to whoever reads the data (a `Batches`, one
validation read) and is stopped by its close(): its threads end, and reads
it had not started fail instead of leaving anyone waiting.  Reading a shard
is mostly I/O and numpy (fetch, checksum, index, compact), which leave the GIL
free, so two threads keep a rank's streams ahead of the thread that cuts
and batches windows.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable


class PoolClosed(RuntimeError):
    """A read its pool was closed before it started."""


class Pending:
    """fn(*args), run by a pool's thread; result() gives its value or raises its error."""

    def __init__(self, fn: Callable, args: tuple):
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._call: tuple | None = (fn, args)

    def _run(self) -> None:
        fn, args = self._call
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the stream where it reaches the shard
            self._error = e
        finally:
            self._call = None  # the arguments (a shard, a dataset) are no longer needed
            self._done.set()

    def _cancel(self) -> None:
        self._call, self._error = None, PoolClosed("the prefetch pool was closed before this read started")
        self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class PrefetchPool:
    """`threads` daemon threads running submitted reads in order.

    The threads start on the first submit, so a pool nobody reads through
    costs nothing; they are daemons, so a fetch stuck past close() never holds
    up the interpreter's exit."""

    THREADS = 2
    THREAD_NAME = "megagpt-shard-reader"

    def __init__(self, threads: int = THREADS):
        self.size = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # Pending jobs; None tells a thread to end
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable, *args) -> Pending:
        job = Pending(fn, args)
        with self._lock:
            if self._closed:
                raise PoolClosed("submit to a closed prefetch pool")
            while len(self._threads) < self.size:
                thread = threading.Thread(target=self._serve, name=self.THREAD_NAME, daemon=True)
                thread.start()
                self._threads.append(thread)
            self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job._run()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads: reads not yet started fail with PoolClosed, reads
        under way finish, and each thread ends (waiting up to `timeout`
        seconds for it; a thread stuck in a fetch ends when the fetch does)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            job._cancel()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> PrefetchPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
