"""Progress of ``megagpt.data.prepare`` on stderr, without a dependency."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

PLAIN_PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal

Log = Callable[[str], None]


class Progress:
    """Files, documents and tokens done on stderr: one line redrawn in place on a terminal,
    otherwise a plain line every few seconds, so logs stay readable."""

    def __init__(self, enabled: bool, files: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.files = files
        self.label = ""
        self.start = time.monotonic()
        self._next = self.start + (0.2 if self.tty else PLAIN_PROGRESS_EVERY)
        self._drawn = False

    def update(self, files: int, docs: int, tokens: int, new_tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now < self._next and not force):
            return
        self._next = now + (0.2 if self.tty else PLAIN_PROGRESS_EVERY)
        rate = new_tokens / max(now - self.start, 1e-6)
        line = f"{self.label}files {files}/{self.files} | docs {docs:,} | tokens {tokens:,} | {rate:,.0f} tokens/s"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
        self._drawn = self.tty

    def clear(self) -> None:
        """Erase the bar before other output goes to the same terminal."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def clearing(prog: Progress, say: Log) -> Log:
    def log(msg: str) -> None:  # the bar shares the terminal: erase it first
        prog.clear()
        say(msg)

    return log
