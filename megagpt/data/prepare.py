"""Turn text / JSONL files into webdataset tar shards of pre-tokenized documents.

    python -m megagpt.data.prepare --input corpus/ more.jsonl.gz --output data/mycorpus

Each sample holds one document's token ids (no EOD; the reader appends it). The
directory is complete once ``manifest.json`` exists: it is written last, and every
shard is written under a ``.tmp`` name first, so an interrupted run never leaves
output that looks finished.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from megagpt.data.tokenizer import eod_id, load_tokenizer, token_dtype, train_bpe

FORMAT = "megagpt-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
ENCODE_BATCH = 256  # documents per encode_batch call; the Rust side spreads a batch over threads
PROG = "megagpt.data.prepare"

_SHARD_RE = re.compile(r"shard-\d{6}\.tar(\.tmp)?")
_MANIFEST_KEYS = ("format", "version", "dtype", "vocab_size", "eod_id", "tokenizer", "documents", "tokens", "shards")
_SHARD_KEYS = ("name", "documents", "tokens", "bytes", "sha256")

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- inputs


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


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:  # tolerate blank lines, e.g. a trailing newline
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                raise ValueError(f"{path}:{lineno}: missing field {text_field!r}")
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


def iter_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[tuple[int, str]]:
    """Yield ``(file_index, text)`` for every non-empty document, in file order."""
    for i, path in enumerate(files):
        try:
            if _is_jsonl(path):
                texts: Iterator[str] = _jsonl_texts(path, text_field)
            else:
                # Bytes + explicit decode keeps the text exact (no newline translation).
                texts = iter([path.read_bytes().decode("utf-8", errors="replace")])
            for text in texts:
                if text:
                    yield i, text
        except (OSError, EOFError) as e:  # EOFError: truncated .gz
            raise ValueError(f"cannot read {path}: {e}") from e


# ---------------------------------------------------------------- output


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _ShardSink:
    """Writes documents into ``shard-NNNNNN.tar`` files, starting a new one at either limit."""

    def __init__(self, out: Path, dtype: str, docs_per_shard: int, shard_bytes: int, on_shard: Callable[[dict], None]):
        self.out = out
        self.dtype = np.dtype(dtype).newbyteorder("<")  # shards are little-endian on every host
        self.docs_per_shard = docs_per_shard
        self.shard_bytes = shard_bytes
        self.on_shard = on_shard
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0
        self._file: Any = None
        self._writer: Any = None  # webdataset.TarWriter
        self._cur = {"documents": 0, "tokens": 0, "bytes": 0}

    def _name(self) -> str:
        return f"shard-{len(self.shards):06d}.tar"

    def add(self, ids: list[int]) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
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
        self.tokens += len(ids)
        self._cur["documents"] += 1
        self._cur["tokens"] += len(ids)
        self._cur["bytes"] += len(data)
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
            "sha256": _sha256(tmp),
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


def _remove_stale(out: Path) -> None:
    # Drop the old manifest first: from here until the new one is written the directory reads as incomplete.
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if _SHARD_RE.fullmatch(p.name):
            p.unlink()


def _encode(tok: Tokenizer, docs: Iterator[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
    """Tokenize ``(file_index, text)`` pairs in batches; yields ``(file_index, ids)`` in order."""

    def flush(batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
        return ((i, enc.ids) for (i, _), enc in zip(batch, encodings))

    batch: list[tuple[int, str]] = []
    for item in docs:
        batch.append(item)
        if len(batch) == ENCODE_BATCH:
            yield from flush(batch)
            batch = []
    yield from flush(batch)


def prepare(
    inputs: list[str],
    output: str,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    docs_per_shard: int = 2000,
    shard_bytes: int = 64 << 20,
    text_field: str = "text",
    log: Log | None = print,
) -> dict:
    """Tokenize ``inputs`` into shards under ``output``; returns the manifest."""
    say = log or _quiet
    if docs_per_shard < 1 or shard_bytes < 1:
        raise ValueError("docs_per_shard and shard_bytes must be positive")
    files = find_inputs(inputs)
    say(f"{len(files)} input files")

    tok: Tokenizer
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        say(f"loaded tokenizer {tokenizer}: {tok.get_vocab_size()} tokens")
    else:
        say(f"training byte-level BPE tokenizer (vocab_size={vocab_size}) on the inputs")
        tok = train_bpe((text for _, text in iter_documents(files, text_field)), vocab_size)
    eod = eod_id(tok, tokenizer)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    # Treat special-token strings inside documents as plain text, so the only EODs in the
    # stream are the ones the reader inserts between documents. (Not saved by tok.save.)
    tok.encode_special_tokens = True

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)

    files_done = 0

    def on_shard(s: dict) -> None:
        say(
            f"{s['name']}: {s['documents']} docs, {s['tokens']:,} tokens | "
            f"files {files_done}/{len(files)}, docs {sink.documents:,}, tokens {sink.tokens:,}"
        )

    sink = _ShardSink(out, dtype, docs_per_shard, shard_bytes, on_shard)
    try:
        for file_index, ids in _encode(tok, iter_documents(files, text_field)):
            files_done = file_index  # the files before this document's file are complete
            if ids:  # a tokenizer's normalizer can reduce a text to nothing
                sink.add(ids)
        files_done = len(files)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    if sink.documents == 0:
        raise ValueError(f"no non-empty documents in inputs: {' '.join(inputs)}")

    tmp = out / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out / TOKENIZER_FILE)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "vocab_size": vocab,
        "eod_id": eod,
        "tokenizer": TOKENIZER_FILE,
        "documents": sink.documents,
        "tokens": sink.tokens,
        "shards": sink.shards,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    say(f"done: {len(sink.shards)} shards, {sink.documents:,} documents, {sink.tokens:,} tokens ({dtype}) in {out}")
    return manifest


def read_manifest(dir_or_file: str) -> dict:
    """Load and validate the manifest of a prepared dataset (its directory or the file itself)."""
    p = Path(dir_or_file)
    path = p / MANIFEST if p.is_dir() else p
    if not path.is_file():
        raise ValueError(f"no dataset manifest at {path} (run `python -m {PROG}` to create one)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(m, dict):
        raise ValueError(f"manifest {path}: expected a JSON object")
    for key in _MANIFEST_KEYS:
        if key not in m:
            raise ValueError(f"manifest {path}: missing key {key!r}")
    if m["format"] != FORMAT or m["version"] != VERSION:
        raise ValueError(f"manifest {path}: unsupported format {m['format']!r} version {m['version']!r}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"manifest {path}: unsupported dtype {m['dtype']!r}")
    if not isinstance(m["shards"], list) or not m["shards"]:
        raise ValueError(f"manifest {path}: 'shards' must be a non-empty list")
    for i, shard in enumerate(m["shards"]):
        for key in _SHARD_KEYS:
            if not isinstance(shard, dict) or key not in shard:
                raise ValueError(f"manifest {path}: shards[{i}] missing key {key!r}")
    return m


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    ap.add_argument("--output", required=True, metavar="DIR")
    ap.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or HF tokenizer folder (default: train BPE)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size when training (default 8192)")
    ap.add_argument("--docs-per-shard", type=int, default=2000)
    ap.add_argument("--shard-bytes", type=int, default=64 << 20, help="max token bytes per shard (default 64 MiB)")
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    ap.add_argument("--workers", type=int, help="tokenizer threads (default: all cores)")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.workers is not None:
        if args.workers < 1:
            ap.error("--workers must be >= 1")
        # The tokenizers thread pool reads this when it starts, i.e. on first use, which is after this point.
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    try:
        prepare(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            docs_per_shard=args.docs_per_shard,
            shard_bytes=args.shard_bytes,
            text_field=args.text_field,
        )
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split())  # one line, even for multi-line library errors
        ap.exit(2, f"{PROG}: error: {msg}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
