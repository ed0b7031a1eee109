"""Atomic file writes: a file is either its old self or complete, never half written.

Everything megagpt writes that a crash must not leave torn (checkpoint state
and manifests, the `latest` pointer, run.json, metrics.jsonl after a rewind,
exported configs, prepared shards and tokenizers) goes through `atomic_open`:
the bytes go to `<path>.tmp`, which is renamed over `path` only once the file
is closed (and, with `fsync`, on disk).  A failure removes the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open `path` for writing; the file appears under its name when the block ends
    without an exception.  `fsync`: the bytes reach the disk before the rename (the
    rename itself is made durable by fsyncing the directory: `fsync_dir`)."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files, not mode {mode!r}")
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = False, indent: int | None = 1) -> None:
    with atomic_open(path, "w", fsync=fsync) as f:
        json.dump(obj, f, indent=indent)


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside directory `path` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
