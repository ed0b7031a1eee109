"""Writing shards, and the progress record that lets ``prepare`` resume an interrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import xxhash

from megagpt.atomic import write_text
from megagpt.data.prep_inputs import Job, Pool, iter_tasks, iter_units, tokenize_task
from megagpt.data.prep_progress import Progress
from megagpt.data.shards import SHARD_KEYS

SPLITS = {"train": "shard", "val": "val"}  # split -> shard name prefix
STATE_FILE = ".prepare_state.jsonl"
_OUTPUT_RE = re.compile(r"(shard|val)-\d{6}\.tar(\.tmp)?")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_entry(shard: dict) -> dict:
    return {k: shard[k] for k in (*SHARD_KEYS, "xxh3_128") if k in shard}


def shard_ok(out: Path, shard: dict) -> bool:
    """The file is there with the recorded size and sha256."""
    try:
        path = out / shard["name"]
        return path.stat().st_size == shard["bytes"] and sha256_file(path) == shard["sha256"]
    except (OSError, KeyError, TypeError):  # gone, or a record from some other version
        return False


def remove_outputs(out: Path, keep: Iterable[str] = ()) -> None:
    """Delete shard files (finished or ``.tmp``) except those named in ``keep``."""
    kept = set(keep)
    for p in out.iterdir():
        if _OUTPUT_RE.fullmatch(p.name) and p.name not in kept:
            p.unlink()


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads the archive to whole records (like `tar -b20`)
# The parts of a member header that never change: mode 0444, uid/gid 0, mtime 0 (so
# the bytes, and the sha256, are reproducible), regular file, owner "bigdata".
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_MTIME_TO_OWNER = b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header that ``tarfile`` (and so webdataset's TarWriter(mtime=0))
    writes for a member, built directly: tarfile's own path costs ~100 us a document,
    which would make the single writing process the limit of a many-core run."""
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        raise ValueError(f"tar member {name!r} ({size} bytes) does not fit a plain ustar header")
    head = (name.encode().ljust(100, b"\0") + _MODE_IDS + b"%011o\0" % size + _MTIME_TO_OWNER).ljust(_BLOCK, b"\0")
    # The checksum is the byte sum with its own field counted as spaces, which it holds here.
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


class ShardSink:
    """Writes one split's documents into ``PREFIX-NNNNNN.tar`` files, starting a new one at either limit.

    Each document is a member ``KEY.tokens`` (webdataset's layout). ``done`` (finished shards
    of an earlier run) continues the numbering and counts, so a resumed run cuts the rest
    exactly where an uninterrupted one would have.
    """

    def __init__(
        self,
        out: Path,
        prefix: str,
        docs_per_shard: int,
        shard_bytes: int,
        on_shard: Callable[[dict], None],
        done: Iterable[dict] = (),
    ):
        self.out, self.prefix = out, prefix
        self.docs_per_shard, self.shard_bytes = docs_per_shard, shard_bytes
        self.on_shard = on_shard
        self.shards: list[dict] = [dict(s) for s in done]
        self.documents = sum(s["documents"] for s in self.shards)
        self.tokens = sum(s["tokens"] for s in self.shards)
        self._file: BinaryIO | None = None
        self._hash, self._fast = hashlib.sha256(), xxhash.xxh3_128()
        self._offset = 0
        self._cur = {"documents": 0, "tokens": 0, "bytes": 0}
        self._last: tuple[int, int] = (0, 0)

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)  # hashed on the way out: no second read of the shard
        self._fast.update(data)
        self._offset += len(data)

    def add(self, data: bytes, tokens: int, pos: tuple[int, int]) -> None:
        """Append one document: ``data`` is its little-endian token ids, ``pos`` its input position."""
        # Close before overflowing shard_bytes; a single huge document still gets a shard of its own.
        if self._file is not None and self._cur["bytes"] + len(data) > self.shard_bytes:
            self._finish()
        if self._file is None:
            self._file = open(self.out / (self._name() + ".tmp"), "wb")
            self._hash, self._fast, self._offset = hashlib.sha256(), xxhash.xxh3_128(), 0
        self._write(tar_header(f"{self.documents:09d}.tokens", len(data)) + data + bytes(-len(data) % _BLOCK))
        self.documents += 1
        self.tokens += tokens
        self._cur["documents"] += 1
        self._cur["tokens"] += tokens
        self._cur["bytes"] += len(data)
        self._last = pos
        if self._cur["documents"] >= self.docs_per_shard or self._cur["bytes"] >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        assert self._file is not None
        name = self._name()
        self._write(bytes(2 * _BLOCK))  # end-of-archive marker
        self._write(bytes(-self._offset % _RECORD))
        self._file.close()
        self._file = None
        shard = {
            "name": name,
            "documents": self._cur["documents"],
            "tokens": self._cur["tokens"],
            "bytes": self._offset,
            "sha256": self._hash.hexdigest(),
            "xxh3_128": self._fast.hexdigest(),  # what the loader checks on every read (~10x faster)
            # For resuming: the sample keys it holds and the input position of its last document.
            "keys": [self.documents - self._cur["documents"], self.documents],
            "last": list(self._last),
        }
        os.replace(self.out / (name + ".tmp"), self.out / name)
        self.shards.append(shard)
        self._cur = {"documents": 0, "tokens": 0, "bytes": 0}
        self.on_shard(shard)

    def close(self) -> None:
        if self._file is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard in progress so no partial file is left behind."""
        if self._file is not None:
            self._file.close()
            (self.out / (self._name() + ".tmp")).unlink(missing_ok=True)
            self._file = None


@dataclass
class State:
    """``DIR/.prepare_state.jsonl``: a header line (fingerprint of inputs and options,
    tokenizer hash), then one line per finished shard.

    Appending a line per shard keeps the cost per shard constant for runs of many
    thousands of shards; a line torn by a crash is ignored (its shard is redone).
    """

    header: dict
    shards: dict[str, list[dict]] = field(default_factory=lambda: {split: [] for split in SPLITS})

    @classmethod
    def load(cls, out: Path) -> State | None:
        try:
            lines = (out / STATE_FILE).read_text().splitlines()
            state = cls(json.loads(lines[0]))
        except (OSError, ValueError, IndexError):
            return None
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                state.shards[entry.pop("split")].append(entry)
            except (ValueError, KeyError, AttributeError):
                break
        return state

    def rewrite(self, out: Path) -> None:
        lines = [json.dumps(self.header)]
        lines += [json.dumps({"split": split, **s}) for split, shards in self.shards.items() for s in shards]
        write_text(out / STATE_FILE, "\n".join(lines) + "\n")

    def append(self, out: Path, split: str, shard: dict) -> None:
        self.shards[split].append(shard)
        with open(out / STATE_FILE, "a") as f:
            f.write(json.dumps({"split": split, **shard}) + "\n")

    def verified_prefix(self, out: Path, split: str) -> list[dict]:
        """The finished shards of ``split`` up to the first missing or changed one."""
        kept = []
        for shard in self.shards[split]:
            if not shard_ok(out, shard):
                break
            kept.append(shard)
        return kept


def write_shards(
    out: Path,
    files: Sequence[Path],
    state: State,
    pool: Pool,
    job: Job,
    docs_per_shard: int,
    shard_bytes: int,
    say: Callable[[str], None],
    prog: Progress,
) -> dict:
    """Tokenize everything not yet in finished shards and write it; returns the manifest's counts."""
    last = {split: tuple(s[-1]["last"]) if s else None for split, s in state.shards.items()}
    job = job._replace(skip_train=last["train"], skip_val=last["val"])
    # Units wholly at or before both resume points hold nothing to write: not even parsed.
    ends = [last["train"], last["val"]] if job.val_below else [last["train"]]
    floor = None if None in ends else min(e for e in ends if e is not None)
    units = iter_units(files)
    if floor is not None:
        units = (u for u in units if u.error or (u.file, u.last_line) > floor)

    files_done = 0

    def on_shard(split: str, s: dict) -> None:
        state.append(out, split, s)
        say(
            f"{s['name']}: {s['documents']} docs, {s['tokens']:,} tokens | "
            f"files {files_done}/{len(files)}, docs {sum(k.documents for k in sinks.values()):,}, "
            f"tokens {sum(k.tokens for k in sinks.values()):,}"
        )

    sinks = {
        split: ShardSink(out, prefix, docs_per_shard, shard_bytes, partial(on_shard, split), state.shards[split])
        for split, prefix in SPLITS.items()
    }
    start_tokens = sum(k.tokens for k in sinks.values())
    try:
        for batch in pool.map(partial(tokenize_task, job), iter_tasks(units)):
            offset = 0
            for file, line, val, n in zip(batch.files, batch.lines, batch.val, batch.lengths):
                # n == 0: a tokenizer's normalizer can reduce a text to nothing; n < 0: already written.
                if n > 0:
                    sinks["val" if val else "train"].add(batch.tokens[offset : offset + n].tobytes(), n, (file, line))
                    offset += n
                files_done = file  # the files before this document's are complete
            tokens = sum(k.tokens for k in sinks.values())
            prog.update(files_done, sum(k.documents for k in sinks.values()), tokens, tokens - start_tokens)
        files_done = len(files)
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    tokens = sum(k.tokens for k in sinks.values())
    prog.update(files_done, sum(k.documents for k in sinks.values()), tokens, tokens - start_tokens, force=True)
    train, val = sinks["train"], sinks["val"]
    return {
        "documents": train.documents,
        "tokens": train.tokens,
        "shards": [manifest_entry(s) for s in train.shards],
        "val_documents": val.documents,
        "val_tokens": val.tokens,
        "val_shards": [manifest_entry(s) for s in val.shards],
    }
