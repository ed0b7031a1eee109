"""Writing shards, and the progress record that lets ``prepare`` resume an interrupted run
(and tells an earlier run's folder from a stranger's)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, NamedTuple

import xxhash

from megagpt.atomic import sha256_file, write_text
from megagpt.data.prep_formats import Note
from megagpt.data.prep_inputs import Job, Pool, iter_tasks, iter_units, tokenize_task
from megagpt.data.prep_progress import Progress
from megagpt.data.prep_sources import Input, as_inputs
from megagpt.data.shards import DATASET_MANIFEST, SHARD_KEYS
from megagpt.data.tokenizer import TOKENIZER_FILE

SPLITS = {"train": "shard", "val": "val"}  # split -> shard name prefix
STATE_FILE = ".prepare_state.jsonl"
_OUTPUT_RE = re.compile(r"(shard|val)-\d{6}\.tar(\.tmp)?")


def manifest_entry(shard: dict) -> dict:
    return {k: shard[k] for k in (*SHARD_KEYS, "xxh3_128") if k in shard}


def shard_ok(out: Path, shard: dict) -> bool:
    """The file is there with the recorded size and sha256."""
    try:
        path = out / shard["name"]
        return path.stat().st_size == shard["bytes"] and sha256_file(path)[1] == shard["sha256"]
    except (OSError, KeyError, TypeError):  # gone, or a record from some other version
        return False


def other_entries(out: Path) -> list[str]:
    """Names in ``out`` that no run of prepare left there (its ``.tmp`` files of a crash are its own)."""
    own_temporary = {name + ".tmp" for name in (DATASET_MANIFEST, STATE_FILE, TOKENIZER_FILE)}
    try:
        names = sorted(p.name for p in out.iterdir())
    except FileNotFoundError:
        return []
    return [n for n in names if n not in own_temporary and not (n.endswith(".tar.tmp") and _OUTPUT_RE.fullmatch(n))]


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


class Tally(NamedTuple):
    """What the inputs that are not text cost, counted up to an input position (see
    ``prep_formats.Note``). Each shard's record holds the tally at its last document, so
    a resumed run counts on from where it starts reading: nothing lost, nothing twice."""

    skipped: int = 0  # documents skipped as not text
    replaced: int = 0  # U+FFFD put in for bytes that are not UTF-8
    replaced_files: int = 0
    file: int = -1  # the last input with replacements, and its count so far
    file_replaced: int = 0

    def add(self, note: Note) -> Tally:
        t = self._replace(skipped=self.skipped + 1) if note.skipped else self
        if note.replaced:
            if note.file != t.file:
                t = t._replace(replaced_files=t.replaced_files + 1, file=note.file, file_replaced=0)
            t = t._replace(replaced=t.replaced + note.replaced, file_replaced=t.file_replaced + note.replaced)
        return t


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


@dataclass
class State:
    """``DIR/.prepare_state.jsonl``: a header line (fingerprint of inputs and options, the
    options and inputs themselves, tokenizer hash), then one line per finished shard.

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

    def differences(self, options: dict, inputs: list[list[str]]) -> str:
        """What differs between the run this records and one with ``options`` and ``inputs``
        (``[name, digest]`` pairs), briefly: the changed settings, then the inputs."""
        old_options, old_inputs = self.header.get("options"), self.header.get("inputs")
        if old_options is None or old_inputs is None:
            return "the earlier run did not record which"
        parts = []
        if old_options.get("format") != options["format"]:
            parts.append("made by another version of prepare")
        for key, new in options.items():
            old = old_options.get(key)
            if key == "format" or old == new:
                continue
            if key != "tokenizer":
                parts.append(f"{key} {_shown(old)} -> {_shown(new)}")
            elif isinstance(old, dict) and isinstance(new, dict):  # both trained: by their size
                parts.append(f"vocab_size {old.get('train_vocab')} -> {new.get('train_vocab')}")
            else:
                parts.append("another tokenizer")
        was, now = dict(old_inputs), dict(inputs)
        for names, one, many in (
            ([n for n in now if n not in was], "new input", "new inputs"),
            ([n for n in was if n not in now], "input gone", "inputs gone"),
            ([n for n in now if n in was and was[n] != now[n]], "changed input", "changed inputs"),
        ):
            if names:
                parts.append(f"{one} {names[0]}" if len(names) == 1 else f"{len(names)} {many} (first: {names[0]})")
        return ", ".join(parts) or "the earlier run did not record which"

    def verified_prefix(self, out: Path, split: str) -> list[dict]:
        """The finished shards of ``split`` up to the first missing or changed one."""
        kept = []
        for shard in self.shards[split]:
            if not shard_ok(out, shard):
                break
            kept.append(shard)
        return kept


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def write_shards(
    out: Path,
    files: Sequence[Path | str | Input],
    state: State,
    pool: Pool,
    job: Job,
    docs_per_shard: int,
    shard_bytes: int,
    say: Callable[[str], None],
    prog: Progress,
) -> tuple[dict, Tally]:
    """Tokenize everything not yet in finished shards and write it; returns the manifest's
    counts, and the tally of what was skipped or replaced as not text (warned about here)."""
    inputs = as_inputs(files)
    last = {split: tuple(s[-1]["last"]) if s else None for split, s in state.shards.items()}
    job = job._replace(skip_train=last["train"], skip_val=last["val"])
    # Units wholly at or before both resume points hold nothing to write: not even parsed.
    ends = [last["train"], last["val"]] if job.val_below else [last["train"]]
    floor = None if None in ends else min(e for e in ends if e is not None)
    units = iter_units(inputs)
    if floor is not None:
        units = (u for u in units if u.error or (u.file, u.last_line) > floor)
    notes = _Notes(inputs, state, floor, say)

    files_done = 0
    # Per split, the tally at its last two documents: a shard ends at the one or the other.
    marks: dict[str, dict[tuple[int, int], Tally]] = {split: {} for split in SPLITS}

    def add(split: str, data: bytes, n: int, pos: tuple[int, int]) -> None:
        mark = marks[split]
        if len(mark) > 1:
            del mark[next(iter(mark))]
        mark[pos] = notes.tally
        sinks[split].add(data, n, pos)

    def on_shard(split: str, s: dict) -> None:
        s["tally"] = marks[split][tuple(s["last"])]._asdict()
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
            pending = iter(batch.notes)
            note = next(pending, None)
            for file, line, val, n in zip(batch.files, batch.lines, batch.val, batch.lengths):
                while note is not None and (note.file, note.pos) <= (file, line):  # in position order
                    notes.add(note)
                    note = next(pending, None)
                # n == 0: a tokenizer's normalizer can reduce a text to nothing; n < 0: already written.
                if n > 0:
                    add("val" if val else "train", batch.tokens[offset : offset + n].tobytes(), n, (file, line))
                    offset += n
                files_done = file  # the files before this document's are complete
            while note is not None:  # after the task's last document: skipped ones
                notes.add(note)
                note = next(pending, None)
            notes.warn_before(files_done)
            tokens = sum(k.tokens for k in sinks.values())
            prog.update(files_done, sum(k.documents for k in sinks.values()), tokens, tokens - start_tokens)
        files_done = len(files)
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    notes.warn_before(len(files))
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
        "skipped_not_text": notes.tally.skipped,
        "replaced_chars": notes.tally.replaced,
    }, notes.tally


class _Notes:
    """Counts the notes of the documents read (``prep_formats.Note``) and warns: at once
    for a skipped one, once an input is done for its replaced characters. A resumed run
    starts from the tally the earlier one recorded at ``floor`` (the shard ending there)
    and ignores the notes up to it, which it reads again."""

    def __init__(
        self, inputs: Sequence[Input], state: State, floor: tuple[int, int] | None, say: Callable[[str], None]
    ):
        self.inputs, self.floor, self.say = inputs, floor, say
        self.tally = Tally()
        if floor is not None:
            ending = next(s[-1] for s in state.shards.values() if s and tuple(s[-1]["last"]) == floor)
            self.tally = Tally(**ending.get("tally", {}))  # none in records of older versions: from 0
        # An earlier input's replacements were reported by the earlier run.
        self.warned = self.tally.file if floor is not None and self.tally.file < floor[0] else -1

    def add(self, note: Note) -> None:
        if self.floor is not None and (note.file, note.pos) <= self.floor:
            return
        self.warn_before(note.file)
        if note.skipped:
            self.say(f"warning: skipping {note.skipped}")
        self.tally = self.tally.add(note)

    def warn_before(self, file: int) -> None:
        """Report the replacements of the last input with any, if reading has moved past it."""
        t = self.tally
        if t.file_replaced and t.file < file and t.file != self.warned:
            self.say(
                f"warning: {self.inputs[t.file].name}: "
                f"{plural(t.file_replaced, 'invalid UTF-8 sequence')} replaced with U+FFFD"
            )
            self.warned = t.file
