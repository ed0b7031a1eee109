"""The default corpus: the Python standard library's own source, available in every installation."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

from megagpt.data.prepare import DATASET_MANIFEST, prepare

# Bump when the corpus recipe or shard format changes so old caches are not reused.
EMBEDDED_VERSION = 3  # 2: validation split (val_docs); 3: xxh3_128 checksums
MIN_SHARDS = 16  # the trainer splits shards across up to 16 streams
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


def stdlib_files(max_bytes: int = 6_000_000) -> list[Path]:
    """Standard-library ``.py`` files in relative-path order, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so excluded trees (site-packages can be huge) are never walked.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                candidates.append((path.relative_to(root).as_posix(), path))
    files, total = [], 0
    for _, path in sorted(candidates):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def _key(vocab_size: int, max_bytes: int, docs_per_shard: int, val_docs: int) -> str:
    # workers is not part of it: the output does not depend on it.
    spec = [platform.python_version(), vocab_size, max_bytes, docs_per_shard, val_docs, EMBEDDED_VERSION]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


def ensure_embedded(
    cache_dir: str,
    vocab_size: int = 4096,
    max_bytes: int = 6_000_000,
    docs_per_shard: int = 16,
    log: Callable[[str], None] | None = print,
    val_docs: int = 16,
    workers: int | None = None,
) -> Path:
    """Return ``cache_dir/embedded-<key>``, preparing it first if needed.

    Safe to call from many processes at once (ranks of one node, or nodes sharing a
    filesystem): an exclusive lock lets one of them prepare while the others wait, and
    the result appears by an atomic rename, so a directory with a manifest is complete.
    ``val_docs`` documents go to validation shards; ``workers`` as in ``prepare``.
    """
    say = log or (lambda _: None)
    key = _key(vocab_size, max_bytes, docs_per_shard, val_docs)
    cache = Path(cache_dir)
    final = cache / f"embedded-{key}"
    if (final / DATASET_MANIFEST).is_file():
        return final

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"embedded-{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process to prepare {final}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on a filesystem mounted without lock support
            raise OSError(f"cannot lock {lock.name}: {e} (put the cache on a filesystem with flock support)") from e
        # The lock is released when the file is closed, also if this process dies.
        if (final / DATASET_MANIFEST).is_file():  # the lock holder before us finished it
            return final
        # We hold the lock, so leftovers of crashed earlier attempts are nobody's work in progress.
        for stale in cache.glob(f".embedded-{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without manifest is not a finished dataset
            shutil.rmtree(final)

        files = stdlib_files(max_bytes)
        say(f"preparing the embedded stdlib corpus ({len(files)} files) into {final}")
        tmp = Path(tempfile.mkdtemp(prefix=f".embedded-{key}.", dir=cache))
        try:
            manifest = prepare(
                [str(f) for f in files],
                str(tmp),
                vocab_size=vocab_size,
                docs_per_shard=docs_per_shard,
                log=say,
                val_docs=val_docs,
                workers=workers,
            )
            if len(manifest["shards"]) < MIN_SHARDS:
                raise ValueError(
                    f"embedded corpus gave {len(manifest['shards'])} shards, need >= {MIN_SHARDS}: "
                    f"lower docs_per_shard ({docs_per_shard}) or raise max_bytes ({max_bytes})"
                )
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                os.rename(tmp, final)
            except OSError:
                # Only possible if someone without the lock (e.g. a filesystem where flock
                # is a no-op) finished first; their complete copy is as good as ours.
                if not (final / DATASET_MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
