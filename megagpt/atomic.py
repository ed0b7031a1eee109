"""Atomic file writes: a file is either its old self or complete, never half written.

Everything megagpt writes that a crash must not leave torn (checkpoint state
and manifests, the `latest` pointer, run.json, metrics.jsonl after a rewind,
exported configs, prepared shards and tokenizers) goes through `atomic_open`:
the bytes go to `<path>.tmp`, which is renamed over `path` only once the file
is closed (and, with `fsync`, on disk).  A failure removes the temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
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


def sha256_file(path: str | os.PathLike, sync: bool = False) -> tuple[int, str]:
    """(bytes, sha256 hex digest) of a file, as checkpoint and dataset manifests
    record it.  `sync`: also fsync it, so that the bytes hashed are on disk."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())  # the bytes are on disk before the checkpoint is committed
    return n, h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside directory `path` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteFailed(Exception):
    """A write to `path` failed with `error` (an OSError, or the RuntimeError
    torch.save raises), carried with the path it failed on."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Name `path` in any write error raised inside the block (WriteFailed)."""
    try:
        yield
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as e:
        raise WriteFailed(path, e) from e


def write_failure(path: str, error: BaseException) -> str:
    """One line for a write to `path` that failed, with the space left on its
    filesystem at that moment.  A full disk is named as such: torch.save
    reports it only as "file write failed", "unexpected pos ..." or
    "basic_ios::clear: iostream error"."""
    import errno
    import shutil

    if isinstance(error, WriteFailed):
        path, error = error.path, error.error
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = f"{type(error).__name__}: {text}" if text else type(error).__name__
    try:
        usage = shutil.disk_usage(_existing_parent(path))
        space = f"{_size(usage.free)} free of {_size(usage.total)} on its filesystem"
        full = getattr(error, "errno", None) == errno.ENOSPC or usage.free < max(1 << 20, usage.total // 10000)
    except OSError:
        space, full = "free space unknown", getattr(error, "errno", None) == errno.ENOSPC
    if full:
        return f"{path}: no space left on device ({space}; {detail})"
    return f"{path}: {detail} ({space})"


def _existing_parent(path: str) -> str:
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
