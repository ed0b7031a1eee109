"""Inputs of ``megagpt.data.prepare``: finding files, cutting them into units of work,
and the work itself (parse, pick the split, tokenize), run in a pool of processes.

Everything that decides the output (document order, positions, split) is a function of
the input bytes alone, never of how the work is cut or how many processes do it, so the
shards are identical for any number of workers.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import signal
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from tokenizers import Tokenizer

from megagpt.data.prep_progress import Progress

# Input bytes per task: ~0.3 s of tokenizing, so many cores stay balanced while the
# per-task overhead (pickling, IPC) stays far below the work.
CHUNK_BYTES = 1 << 19

Pos = tuple[int, int]  # (file index, line); a whole text file is line 0, JSONL lines count from 1


class Unit(NamedTuple):
    """A whole text file (``data is None``: the worker reads it) or a run of whole JSONL lines."""

    file: int
    path: str
    first_line: int
    last_line: int
    data: bytes | None
    size: int
    error: str | None = None  # a read error, raised when the unit is processed so errors come in input order


class Job(NamedTuple):
    """Per-pass settings sent along with every task."""

    text_field: str
    seed: int
    val_below: int  # documents whose split hash is below this go to validation (0: no split)
    skip_train: Pos | None = None  # resume: documents at or before these positions are already in shards
    skip_val: Pos | None = None


class Batch(NamedTuple):
    """Tokenized documents of one task; ``lengths[i] == -1``: skipped (already written)."""

    files: list[int]
    lines: list[int]
    val: list[bool]
    lengths: list[int]
    tokens: np.ndarray


# ---------------------------------------------------------------- files


def _walk(root: Path) -> list[Path]:
    # Hidden entries (.git, editor swap files, ...) are never corpus text.
    return [
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def find_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a sorted, de-duplicated file list."""
    found: dict[str, Path] = {}
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = _walk(path)
        elif glob.has_magic(spec):
            matches = []
            for hit in map(Path, glob.glob(spec, recursive=True)):
                matches.extend(_walk(hit) if hit.is_dir() else [hit] if hit.is_file() else [])
        else:
            raise ValueError(f"input not found: {spec}")
        if not matches:
            raise ValueError(f"no input files found for {spec!r}")
        for p in matches:
            found.setdefault(os.path.normpath(p), p)
    return [found[k] for k in sorted(found)]


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def iter_units(files: Sequence[Path], chunk: int | None = None) -> Iterator[Unit]:
    """Units of all files in order. JSONL is read here (cheap; gzip cannot be split anyway)
    and cut at line ends; parsing it, and reading text files, is left to the workers."""
    chunk = chunk or CHUNK_BYTES
    for i, path in enumerate(files):
        if not _is_jsonl(path):
            try:
                size = path.stat().st_size
            except OSError:
                size = 0  # the worker's read reports it
            yield Unit(i, str(path), 0, 0, None, size)
            continue
        line = 1
        try:
            with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
                while data := f.read(chunk):
                    if not data.endswith(b"\n"):
                        data += f.readline()
                    n = data.count(b"\n")
                    last = line + n - 1 if data.endswith(b"\n") else line + n
                    yield Unit(i, str(path), line, last, data, len(data))
                    line += n
        except (OSError, EOFError, zlib.error) as e:  # EOFError: truncated .gz; zlib.error: corrupt deflate data
            yield Unit(i, str(path), line, line, None, 0, f"cannot read {path}: {e}")
            return  # nothing after an error is used


def iter_tasks(units: Iterable[Unit], chunk: int | None = None) -> Iterator[list[Unit]]:
    """Group consecutive units (many small text files) into tasks of about ``chunk`` bytes."""
    chunk = chunk or CHUNK_BYTES
    task: list[Unit] = []
    size = 0
    for u in units:
        task.append(u)
        size += u.size
        if size >= chunk or u.error:
            yield task
            task, size = [], 0
    if task:
        yield task


def unit_texts(u: Unit, text_field: str) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of the unit's non-empty documents; errors name the file and line."""
    if u.error:
        raise ValueError(u.error)
    if u.data is None:
        try:
            # Bytes + explicit decode keeps the text exact (no newline translation).
            text = Path(u.path).read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise ValueError(f"cannot read {u.path}: {e}") from None
        if text:
            yield 0, text
        return
    for lineno, raw in enumerate(u.data.split(b"\n"), start=u.first_line):
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:  # tolerate blank lines, e.g. a trailing newline
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{u.path}:{lineno}: malformed JSON line ({e.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"{u.path}:{lineno}: missing field {text_field!r}")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{u.path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        if text:
            yield lineno, text


def iter_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[tuple[int, str]]:
    """Yield ``(file_index, text)`` for every non-empty document, in file order (in this process)."""
    for u in iter_units(files):
        for _, text in unit_texts(u, text_field):
            yield u.file, text


def split_hash(seed: int, file: int, line: int) -> int:
    """64-bit hash of a document's position: the validation split is the documents below a threshold."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{file}:{line}".encode(), digest_size=8).digest(), "little")


# ---------------------------------------------------------------- work (runs in the pool)

_TOK: Tokenizer | None = None
_DTYPE: np.dtype = np.dtype("<u2")


def init_worker(tok_json: str, dtype: str, in_pool: bool) -> None:
    global _TOK, _DTYPE
    if in_pool:  # Ctrl-C is the parent's to handle; it stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _TOK = Tokenizer.from_str(tok_json)
    # Special-token strings inside documents are plain text, so the only EODs in the stream
    # are the ones the reader inserts between documents. (Not part of the saved JSON.)
    _TOK.encode_special_tokens = True
    _DTYPE = np.dtype(dtype).newbyteorder("<")  # shards are little-endian on every host


def encode(text: str) -> list[int]:
    # One document per call: single-threaded, so N workers use N cores and no more.
    assert _TOK is not None, "init_worker() not called"
    return _TOK.encode(text, add_special_tokens=False).ids


def scan_task(job: Job, units: list[Unit]) -> tuple[int, list[int]]:
    """The task's last file and its documents' split hashes (to find the bound for a validation count)."""
    hashes = [split_hash(job.seed, u.file, line) for u in units for line, _ in unit_texts(u, job.text_field)]
    return units[-1].file, hashes


def tokenize_task(job: Job, units: list[Unit]) -> Batch:
    b = Batch([], [], [], [], np.empty(0))
    parts: list[np.ndarray] = []
    for u in units:
        for line, text in unit_texts(u, job.text_field):
            val = job.val_below > 0 and split_hash(job.seed, u.file, line) < job.val_below
            skip = job.skip_val if val else job.skip_train
            b.files.append(u.file)
            b.lines.append(line)
            b.val.append(val)
            if skip is not None and (u.file, line) <= skip:
                b.lengths.append(-1)
                continue
            ids = np.asarray(encode(text), dtype=_DTYPE)
            b.lengths.append(len(ids))
            parts.append(ids)
    return b._replace(tokens=np.concatenate(parts) if parts else np.empty(0, _DTYPE))


T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    # Cores this process may run on (slurm / cgroup cpusets), not all of the machine's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Pool:
    """Runs tasks in ``workers`` processes (in this one for 1), results in input order.

    Workers are spawned, which is safe beside threads (tokenizers, torch, CUDA); like any
    spawned process each first imports the caller's ``__main__`` module, so a calling
    script should keep heavy imports (torch: ~2 s a worker) under ``if __name__ == "__main__"``.
    """

    def __init__(self, workers: int, tok_json: str, dtype: str):
        self.workers = workers
        self._ex: ProcessPoolExecutor | None = None
        if workers == 1:
            init_worker(tok_json, dtype, in_pool=False)
        else:
            self._ex = ProcessPoolExecutor(
                workers, multiprocessing.get_context("spawn"), initializer=init_worker, initargs=(tok_json, dtype, True)
            )

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        if self._ex is None:
            yield from map(fn, tasks)
            return
        # Bounded look-ahead keeps memory flat however large the input is.
        pending: deque[Future[Any]] = deque()
        try:
            for task in tasks:
                pending.append(self._ex.submit(fn, task))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)


def val_threshold(pool: Pool, files: Sequence[Path], count: int, job: Job, prog: Progress) -> int:
    """Split-hash bound below which exactly ``count`` documents fall: the ``count`` smallest hashes."""
    best = np.empty(0, np.uint64)
    pending: list[np.ndarray] = []
    waiting = total = 0
    prog.label = "counting documents: "
    for file, hashes in pool.map(partial(scan_task, job), iter_tasks(iter_units(files))):
        pending.append(np.array(hashes, dtype=np.uint64))
        waiting += len(hashes)
        total += len(hashes)
        if waiting > max(4 * count, 1 << 20):  # keep memory at O(count), not O(documents)
            best = np.partition(np.concatenate([best, *pending]), count - 1)[:count]
            pending, waiting = [], 0
        prog.update(file, total, 0, 0)
    prog.label = ""
    if count >= total:
        raise ValueError(f"val_docs={count} leaves no training documents (the inputs hold {total})")
    kth = np.partition(np.concatenate([best, *pending]), count - 1)[count - 1]
    return int(kth) + 1
