"""Writing shards, and the progress record that lets ``prepare`` resume an interrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD_KEYS = ("name", "documents", "tokens", "bytes", "sha256")
SPLITS = {"train": "shard", "val": "val"}  # split -> shard name prefix
STATE_FILE = ".prepare_state.jsonl"
_OUTPUT_RE = re.compile(r"(shard|val)-\d{6}\.tar(\.tmp)?")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def manifest_entry(shard: dict) -> dict:
    return {k: shard[k] for k in SHARD_KEYS}


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


class ShardSink:
    """Writes one split's documents into ``PREFIX-NNNNNN.tar`` files, starting a new one at either limit.

    ``done`` (finished shards of an earlier run) continues the numbering and counts, so a
    resumed run cuts the rest exactly where an uninterrupted one would have.
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
        self._file: Any = None
        self._writer: Any = None  # webdataset.TarWriter
        self._cur = {"documents": 0, "tokens": 0, "bytes": 0}
        self._last: tuple[int, int] = (0, 0)

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def add(self, data: bytes, tokens: int, pos: tuple[int, int]) -> None:
        """Append one document: ``data`` is its little-endian token ids, ``pos`` its input position."""
        # Close before overflowing shard_bytes; a single huge document still gets a shard of its own.
        if self._writer is not None and self._cur["bytes"] + len(data) > self.shard_bytes:
            self._finish()
        if self._writer is None:
            # Imported here: webdataset pulls in torch (~2 s), which the CLI's argument and
            # input checks and the cached path of ensure_embedded() do not need.
            from webdataset import TarWriter

            self._file = open(self.out / (self._name() + ".tmp"), "wb")
            # mtime=0 makes the tar bytes (and so the sha256) reproducible.
            self._writer = TarWriter(self._file, compress=False, encoder=False, mtime=0)
        self._writer.write({"__key__": f"{self.documents:09d}", "tokens": data})
        self.documents += 1
        self.tokens += tokens
        self._cur["documents"] += 1
        self._cur["tokens"] += tokens
        self._cur["bytes"] += len(data)
        self._last = pos
        if self._cur["documents"] >= self.docs_per_shard or self._cur["bytes"] >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        assert self._writer is not None
        name = self._name()
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        tmp, final = self.out / (name + ".tmp"), self.out / name
        shard = {
            "name": name,
            "documents": self._cur["documents"],
            "tokens": self._cur["tokens"],
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            # For resuming: the sample keys it holds and the input position of its last document.
            "keys": [self.documents - self._cur["documents"], self.documents],
            "last": list(self._last),
        }
        os.replace(tmp, final)
        self.shards.append(shard)
        self._cur = {"documents": 0, "tokens": 0, "bytes": 0}
        self.on_shard(shard)

    def close(self) -> None:
        if self._writer is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard in progress so no partial file is left behind."""
        if self._writer is not None:
            self._file.close()
            (self.out / (self._name() + ".tmp")).unlink(missing_ok=True)
            self._writer = self._file = None


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
        write_atomic(out / STATE_FILE, "\n".join(lines) + "\n")

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
