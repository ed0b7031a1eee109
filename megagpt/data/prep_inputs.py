"""Inputs of ``megagpt.data.prepare``: finding files, cutting them into units of work,
and the work itself (parse, pick the split, tokenize), run in a pool of processes.
The formats are read and parsed in ``prep_formats``; URLs and ``pipe:`` commands are
opened in ``prep_sources``.

Everything that decides the output (document order, positions, split) is a function of
the input bytes alone, never of how the work is cut or how many processes do it, so the
shards are identical for any number of workers: a document's position is its input's
index and its line, row or member number there, whatever unit carried it.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import http.client
import multiprocessing
import os
import signal
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
from tokenizers import Tokenizer

from megagpt.data.prep_formats import InputError, Note, Unit, read_units, unit_texts
from megagpt.data.prep_progress import Progress
from megagpt.data.prep_sources import Input, as_inputs, is_url

# Input bytes per task: ~0.3 s of tokenizing, so many cores stay balanced while the
# per-task overhead (pickling, IPC) stays far below the work.
CHUNK_BYTES = 1 << 19

# (input index, position in it): a whole text file is 0, JSONL lines count from 1, Parquet
# rows and tar members from 0 (see prep_formats).
Pos = tuple[int, int]


class Job(NamedTuple):
    """Per-pass settings sent along with every task."""

    text_field: str
    seed: int
    val_below: int  # documents whose split hash is below this go to validation (0: no split)
    skip_train: Pos | None = None  # resume: documents at or before these positions are already in shards
    skip_val: Pos | None = None


class Batch(NamedTuple):
    """Tokenized documents of one task; ``lengths[i] == -1``: skipped (already written).
    ``notes``: documents skipped as not text, and replaced characters, in position order."""

    files: list[int]
    lines: list[int]
    val: list[bool]
    lengths: list[int]
    tokens: np.ndarray
    notes: list[Note]


# ---------------------------------------------------------------- files


def _walk(root: Path) -> list[Path]:
    # Hidden entries (.git, editor swap files, ...) are never corpus text.
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def find_inputs(inputs: Sequence[str]) -> list[Path | str]:
    """Expand files, directories (recursively) and glob patterns into a sorted, de-duplicated
    list; URLs and ``pipe:`` commands are kept as given (sorted among the files by their text)."""
    found: dict[str, Path | str] = {}
    for spec in inputs:
        if is_url(spec):
            found.setdefault(spec, spec)
            continue
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


def check_apart(inputs: Sequence[str], files: Sequence[Path | str], output: str) -> None:
    """Refuse an output folder inside (or equal to) an input folder, and an input inside the
    output folder: a run would read its own shards, and a re-run would replace its inputs.
    A glob counts by what it could match, so the output it would match only once it exists
    is refused on the first run already."""
    out = os.path.realpath(output)
    advice = "; choose an output folder outside the inputs"
    for spec in inputs:
        if is_url(spec):
            continue
        hits = glob.glob(spec, recursive=True) if glob.has_magic(spec) else [spec]
        for hit in filter(os.path.isdir, hits):
            folder = os.path.realpath(hit)
            if out == folder or _within(out, folder):
                relation = "is" if out == folder else "is inside"
                raise ValueError(f"the output folder {output} {relation} the input folder {hit}{advice}")
        if glob.has_magic(spec) and _reaches(os.path.abspath(spec), os.path.abspath(output)):
            raise ValueError(f"the input {spec} reaches into the output folder {output}{advice}")
    for f in files:
        if is_url(str(f)):
            continue
        if _within(os.path.realpath(f), out):
            raise ValueError(f"the input {f} is inside the output folder {output}{advice}")


def _within(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _reaches(pattern: str, folder: str) -> bool:
    """Whether the glob ``pattern`` could match ``folder``, an ancestor (walked) or something in it."""
    return _match_prefix(Path(pattern).parts, Path(folder).parts)


def _match_prefix(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    # True when all of ``parts`` are matched by a prefix of ``pattern``, or when the pattern
    # matches fewer parts (an ancestor folder, walked whole).
    if not pattern or not parts:
        return True
    head, rest = pattern[0], pattern[1:]
    if head == "**":  # any number of folders (glob's recursive form)
        return any(_match_prefix(rest, parts[i:]) for i in range(len(parts) + 1))
    hidden_ok = head.startswith(".") or not parts[0].startswith(".")  # glob's * skips hidden names
    return hidden_ok and fnmatch.fnmatchcase(parts[0], head) and _match_prefix(rest, parts[1:])


# What reading an input can raise besides InputError: a missing file, a failed download or
# command, a truncated or corrupt gzip / zstd / tar stream.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    tarfile.TarError,
    http.client.HTTPException,
)


def _read_errors() -> tuple[type[BaseException], ...]:
    try:
        from zstandard import ZstdError
    except ImportError:  # only a .zst input needs it (check_readers says so)
        return _READ_ERRORS
    return (*_READ_ERRORS, ZstdError)


def iter_units(files: Sequence[Path | str | Input], chunk: int | None = None) -> Iterator[Unit]:
    """Units of all inputs in order. Reading and cutting happen here (streams cannot be
    split); parsing, and reading local text files, is left to the workers. A read error
    becomes a unit that raises it, after the units before it, and ends the inputs."""
    chunk = chunk or CHUNK_BYTES
    read_errors = _read_errors()
    for i, inp in enumerate(as_inputs(files)):
        at = 0
        try:
            for unit in read_units(i, inp, chunk):
                at = unit.last_line
                yield unit
        except InputError as e:
            yield Unit(i, inp.name, at, at, None, 0, str(e))
            return  # nothing after an error is used
        except read_errors as e:
            yield Unit(i, inp.name, at, at, None, 0, f"cannot read {inp.name}: {e}")
            return


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


def iter_documents(files: Sequence[Path | str | Input], text_field: str = "text") -> Iterator[tuple[int, str]]:
    """Yield ``(file_index, text)`` for every non-empty text document, in input order (in this process)."""
    for u in iter_units(as_inputs(files, text_field)):
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
    b = Batch([], [], [], [], np.empty(0), [])
    parts: list[np.ndarray] = []
    for u in units:
        for line, text in unit_texts(u, job.text_field, b.notes):
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


def val_threshold(pool: Pool, files: Sequence[Path | str | Input], count: int, job: Job, prog: Progress) -> int:
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
