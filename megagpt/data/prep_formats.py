"""The input formats of ``megagpt.data.prepare``: each is read into units in the main
process (``read_units``) and parsed into documents by the workers (``unit_texts``).

============  =====================================  ===================================
format        one document is                         its position (in errors: ``name``)
============  =====================================  ===================================
text          a whole file                            0
JSONL         a line: the ``text_field`` of its       line, from 1 (``x.jsonl:42``)
              object (.jsonl, .jsonl.gz, .jsonl.zst)
Parquet       a row: its ``text_field`` column        row, from 0 (``x.parquet: row 17``)
tar           a webdataset sample: its ``.txt``       member, from 0 (``z.tar: member
              member, else the ``text_field`` of      000123.json``)
              its ``.json`` member
============  =====================================  ===================================

Empty documents are skipped. Compressed and remote inputs are streamed; Parquet is read
a batch of rows at a time (a URL is first copied to a temporary file: Parquet needs
random access). Reading, decompressing and cutting happen in the main process, which
runs far ahead of the tokenizing workers (hundreds of MB/s against ~2 MB/s a worker).

Text is UTF-8. A document that is a whole file or a tar's ``.txt`` member is skipped as
not text when its first 8 KiB hold a NUL byte (binaries, UTF-16) or when more than a tenth
of their characters are not UTF-8 (another encoding, random bytes): tokens of such bytes
teach nothing. Bytes that are not UTF-8 in the text that is kept (a Latin-1 accent, a
stray byte in a JSON line) become U+FFFD and are counted. Each such event is a ``Note``
the workers hand back, so the main process can warn per file and count them. Parquet
strings are UTF-8 by Arrow's own check, and a binary file named ``.jsonl`` or a ``.json``
member fails as malformed JSON, so neither needs the test.
"""

from __future__ import annotations

import codecs
import gzip
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from megagpt.data.prep_sources import Input, blocks, format_name, local_path, open_stream
from megagpt.data.remote import is_local

PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: bounded memory whatever the row groups' size
ZSTD_MAX_WINDOW = 1 << 31  # accept files compressed with --long=31 (zstd's default limit is 128 MiB)
SNIFF_BYTES = 8192  # how much of a document decides whether it is text
MAX_INVALID_SHARE = 0.1  # above this share of characters not UTF-8 there, a document is not text
_ENCODED_FFFD = "\ufffd".encode()


class InputError(ValueError):
    """A problem with an input's content; the message names the input (and where in it)."""


class Unit(NamedTuple):
    """A run of whole documents of one input, positions ``first_line`` to ``last_line``.

    ``kind`` says what ``data`` holds: "file": nothing (a local text file; the worker
    reads it); "text": one document's bytes; "jsonl": whole JSON lines; "rows":
    ``(row, text or None)`` Parquet rows; "members": ``(member number, (name, ext, bytes))``
    of tar samples.
    """

    file: int
    path: str
    first_line: int
    last_line: int
    data: Any
    size: int
    error: str | None = None  # a read error, raised when the unit is processed so errors come in input order
    kind: str = "file"


class Note(NamedTuple):
    """Something parsing did to one document: ``skipped`` it as not text (the warning,
    naming the input), or put ``replaced`` U+FFFD characters for bytes that are not UTF-8."""

    file: int
    pos: int
    replaced: int = 0
    skipped: str = ""


# ---------------------------------------------------------------- reading (main process)


def read_units(index: int, inp: Input, chunk: int) -> Iterator[Unit]:
    """The input's units of about ``chunk`` bytes, in order. Raises InputError for bad
    content, and whatever reading raises (OSError, zlib / zstd / tar / Arrow errors)."""
    yield from _READERS[inp.format](index, inp, chunk)


def _text_units(index: int, inp: Input, chunk: int) -> Iterator[Unit]:
    if is_local(inp.name):
        try:
            size = Path(inp.name).stat().st_size
        except OSError:
            size = 0  # the worker's read reports it
        yield Unit(index, inp.name, 0, 0, None, size, kind="file")
        return
    with open_stream(inp.name) as stream:  # one document: read whole
        data = b"".join(blocks(stream))
    yield Unit(index, inp.name, 0, 0, data, len(data), kind="text")


def _decompressed(stream, name: str) -> Iterator[bytes]:
    if name.endswith(".gz"):
        return blocks(gzip.GzipFile(fileobj=stream))
    if name.endswith(".zst"):
        return _zstd_blocks(stream)
    return blocks(stream)


def _zstd_blocks(stream) -> Iterator[bytes]:
    """Decompressed bytes of all the frames of a zstd stream. Frame by frame, because
    zstandard's stream reader takes a stream cut inside a frame for a clean end."""
    import zstandard

    unzstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame, in_frame = unzstd.decompressobj(), False
    for data in blocks(stream):
        while data:
            in_frame = True
            if out := frame.decompress(data):
                yield out
            data = b""
            if frame.eof:  # the next frame starts in what is left
                data, frame, in_frame = frame.unused_data, unzstd.decompressobj(), False
    if in_frame:
        raise EOFError("zstd data ended inside a frame (truncated file?)")


def _jsonl_units(index: int, inp: Input, chunk: int) -> Iterator[Unit]:
    """Runs of whole lines (cut at the first line end after ``chunk`` bytes; parsing is the workers')."""
    line = 1
    with open_stream(inp.name) as stream:
        for data in _lines(_decompressed(stream, format_name(inp.name)), chunk):
            n = data.count(b"\n")
            last = line + n - 1 if data.endswith(b"\n") else line + n
            yield Unit(index, inp.name, line, last, data, len(data), kind="jsonl")
            line += n


def _lines(pieces: Iterable[bytes], chunk: int) -> Iterator[bytes]:
    """The bytes regrouped into runs of whole lines, each ending at the first line end after ``chunk`` bytes."""
    held: list[bytes] = []
    size = 0
    for piece in pieces:
        held.append(piece)
        size += len(piece)
        if size < chunk:
            continue
        data, start = b"".join(held), 0
        while len(data) - start >= chunk and (cut := data.find(b"\n", start + chunk - 1) + 1):
            yield data[start:cut]
            start = cut
        held, size = [data[start:]], len(data) - start  # the start of the next run (or of a very long line)
    if size:
        yield b"".join(held)


def _runs(index: int, name: str, kind: str, items: Iterable[tuple[int, Any, int]], chunk: int) -> Iterator[Unit]:
    """Units of consecutive ``(position, payload, bytes)`` items, about ``chunk`` bytes each."""
    run: list[tuple[int, Any]] = []
    size = 0
    for pos, payload, nbytes in items:
        run.append((pos, payload))
        size += nbytes
        if size >= chunk:
            yield Unit(index, name, run[0][0], run[-1][0], run, size, kind=kind)
            run, size = [], 0
    if run:
        yield Unit(index, name, run[0][0], run[-1][0], run, size, kind=kind)


def _parquet_units(index: int, inp: Input, chunk: int) -> Iterator[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with local_path(inp.name) as path:
        try:
            with pq.ParquetFile(path) as pf:
                _check_text_column(pf.schema_arrow, inp)
                yield from _runs(index, inp.name, "rows", _parquet_rows(pf, inp.text_field), chunk)
        except pa.ArrowException as e:  # not Parquet, corrupt pages, ...
            raise InputError(f"cannot read {inp.name}: {e}") from None


def _check_text_column(schema, inp: Input) -> None:
    import pyarrow as pa

    if inp.text_field not in schema.names:
        raise InputError(f"{inp.name}: no column {inp.text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(inp.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise InputError(f"{inp.name}: column {inp.text_field!r} holds {kind}, not strings")


def _parquet_rows(pf, column: str) -> Iterator[tuple[int, str | None, int]]:
    # use_threads=False: one column, and the cores belong to the tokenizing workers.
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column], use_threads=False):
        for text in batch.column(0).to_pylist():
            yield row, text, len(text) if text else 0
            row += 1


def _tar_units(index: int, inp: Input, chunk: int) -> Iterator[Unit]:
    with open_stream(inp.name) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:  # r|*: plain or gzip
        yield from _runs(index, inp.name, "members", _tar_documents(tar, inp.name), chunk)


def _sample_key(member: str) -> tuple[str, str]:
    """webdataset's split of a member name: the sample key (directory and the name up to
    its first dot) and the extension (the rest, lower case)."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _tar_documents(tar: tarfile.TarFile, name: str) -> Iterator[tuple[int, Any, int]]:
    """One document per sample, in member order: its ``.txt`` member, else its ``.json``
    (a ``.json`` beside a ``.txt`` is the sample's metadata, as webdataset text shards have it)."""
    key, found, number, any_text = None, {}, -1, False
    for member in tar:  # stream mode: each member's data is read before moving on
        if not member.isfile():
            continue
        number += 1
        this_key, ext = _sample_key(member.name)
        if this_key != key:
            if doc := _sample_document(found):
                yield doc
            key, found = this_key, {}
        if ext in ("txt", "json") and ext not in found:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            found[ext] = (number, (member.name, ext, data), len(data))
            any_text = True
    if doc := _sample_document(found):
        yield doc
    if not any_text:
        raise InputError(
            f"{name}: no .txt or .json members to read text from "
            "(megagpt's own prepared shards hold .tokens: they are output, not input)"
        )


def _sample_document(found: dict) -> tuple[int, Any, int] | None:
    return found.get("txt") or found.get("json")


_READERS: dict[str, Callable[[int, Input, int], Iterator[Unit]]] = {
    "text": _text_units,
    "jsonl": _jsonl_units,
    "parquet": _parquet_units,
    "tar": _tar_units,
}


# ---------------------------------------------------------------- parsing (workers)


def unit_texts(u: Unit, text_field: str, notes: list[Note] | None = None) -> Iterator[tuple[int, str]]:
    """``(position, text)`` of the unit's non-empty documents; errors name the input and position.
    What parsing skipped or replaced is appended to ``notes``, in position order."""
    if u.error:
        raise ValueError(u.error)
    return _PARSERS[u.kind](u, text_field, [] if notes is None else notes)


def decode(data: bytes) -> tuple[str, int]:
    """The UTF-8 text of ``data`` and how many U+FFFD stand in for bytes that are not UTF-8."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # An encoded U+FFFD always decodes to one U+FFFD; every other one is a replacement.
        return text, text.count("\ufffd") - data.count(_ENCODED_FFFD)


def not_text(data: bytes) -> str | None:
    """Why ``data`` is not UTF-8 text (judged by its first ``SNIFF_BYTES``), or None if it is."""
    head = data[:SNIFF_BYTES]
    if b"\0" in head:
        return f"a NUL byte in its first {SNIFF_BYTES // 1024} KiB"
    # Not final unless the block is all of it: a character cut at the block's end is not an error.
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=len(data) <= SNIFF_BYTES)
    invalid = text.count("\ufffd") - head.count(_ENCODED_FFFD)
    if invalid > MAX_INVALID_SHARE * len(text):
        return f"{invalid} invalid UTF-8 sequences in its first {len(head)} bytes"
    return None


def _document(data: bytes, file: int, pos: int, where: str, notes: list[Note]) -> str:
    """The text of a document that is a whole file or member: '' (and a note) if it is not text."""
    if why := not_text(data):
        notes.append(Note(file, pos, skipped=f"{where}: not UTF-8 text ({why})"))
        return ""
    text, invalid = decode(data)
    if invalid:
        notes.append(Note(file, pos, replaced=invalid))
    return text


def _file_texts(u: Unit, _: str, notes: list[Note]) -> Iterator[tuple[int, str]]:
    try:
        # Bytes + explicit decode keeps the text exact (no newline translation).
        data = Path(u.path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {u.path}: {e}") from None
    if text := _document(data, u.file, 0, u.path, notes):
        yield 0, text


def _text_texts(u: Unit, _: str, notes: list[Note]) -> Iterator[tuple[int, str]]:
    if text := _document(u.data, u.file, 0, u.path, notes):
        yield 0, text


def _jsonl_texts(u: Unit, text_field: str, notes: list[Note]) -> Iterator[tuple[int, str]]:
    for lineno, raw in enumerate(u.data.split(b"\n"), start=u.first_line):
        line, invalid = decode(raw)
        line = line.strip()
        if invalid:
            notes.append(Note(u.file, lineno, replaced=invalid))
        if not line:  # tolerate blank lines, e.g. a trailing newline
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{u.path}:{lineno}: malformed JSON line ({e.msg})") from None
        if text := _field_text(obj, text_field, f"{u.path}:{lineno}"):
            yield lineno, text


def _row_texts(u: Unit, text_field: str, _: list[Note]) -> Iterator[tuple[int, str]]:
    for row, text in u.data:
        if text is None:
            raise ValueError(f"{u.path}: row {row}: field {text_field!r} is null")
        if text:
            yield row, text


def _member_texts(u: Unit, text_field: str, notes: list[Note]) -> Iterator[tuple[int, str]]:
    for number, (member, ext, data) in u.data:
        where = f"{u.path}: member {member}"
        if ext == "txt":
            text = _document(data, u.file, number, where, notes)
        else:
            raw, invalid = decode(data)
            if invalid:
                notes.append(Note(u.file, number, replaced=invalid))
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            text = _field_text(obj, text_field, where)
        if text:
            yield number, text


def _field_text(obj: object, text_field: str, where: str) -> str:
    if not isinstance(obj, dict) or text_field not in obj:
        raise ValueError(f"{where}: missing field {text_field!r}")
    text = obj[text_field]
    if text is None:
        raise ValueError(f"{where}: field {text_field!r} is null")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


_PARSERS: dict[str, Callable[[Unit, str, list[Note]], Iterator[tuple[int, str]]]] = {
    "file": _file_texts,
    "text": _text_texts,
    "jsonl": _jsonl_texts,
    "rows": _row_texts,
    "members": _member_texts,
}
