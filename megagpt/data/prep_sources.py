"""Where the inputs of ``megagpt.data.prepare`` come from, and what format each is read as.

An input is a local file, an ``http(s)://`` URL, or a ``pipe:COMMAND`` whose output is
the input (any other ``scheme://`` goes to webdataset's ``gopen``, as for shards). They
are opened the way the data loader opens shards (``megagpt.data.shards``), but read as a
stream, front to back, never whole: corpus files run to gigabytes.

The format follows the name's ending (``format_of``): of a local path; of a URL's path
(the query string is ignored); of a ``pipe:`` command's last word, so
``pipe:curl -s https://host/y.jsonl.zst`` is read as JSONL.zst and a command ending in
something else (``... | zstd -d``) is read as one plain text document.

``pipe:`` commands run in a shell: they are trusted operator input, like the command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

from megagpt.data.remote import is_local, open_url

HTTP_TIMEOUT = 120  # seconds without data before a URL read fails (as for shards)
HEAD_TIMEOUT = 30
READ_BYTES = 1 << 20

# Name endings, checked in this order; anything else is one plain text document.
FORMATS = (
    ("parquet", (".parquet",)),
    ("jsonl", (".jsonl", ".jsonl.gz", ".jsonl.zst")),
    ("tar", (".tar", ".tar.gz", ".tgz")),
)
# What megagpt read before Parquet, .zst and tar inputs existed. Their fingerprint lines
# stay as they were, so directories prepared then still resume; the newer formats add
# their name, so a .tar or .parquet once read as plain text starts over.
OLDER_FORMATS = ("text", "jsonl")


class Input(NamedTuple):
    """One input: its path or URL, the format it is read as, and the field (JSON) or
    column (Parquet) holding the text."""

    name: str
    format: str
    text_field: str = "text"


def is_url(spec: str) -> bool:
    return not is_local(spec)


def format_name(spec: str) -> str:
    """The name whose ending decides the format (see the module docstring)."""
    if spec.startswith("pipe:"):
        try:
            words = shlex.split(spec[5:])
        except ValueError:  # unbalanced quotes: the shell will say so; the words still name the format
            words = spec[5:].split()
        spec = words[-1] if words else ""
    if "://" in spec:
        spec = urllib.parse.urlsplit(spec).path
    return spec


def format_of(spec: str) -> str:
    name = format_name(spec)  # case-sensitive, as the JSONL check always was
    return next((fmt for fmt, endings in FORMATS if name.endswith(endings)), "text")


def as_inputs(files: Sequence[Path | str | Input], text_field: str = "text") -> list[Input]:
    return [f if isinstance(f, Input) else Input(str(f), format_of(str(f)), text_field) for f in files]


# Imported only when an input needs them: pyarrow is an optional extra, and neither
# should cost anything to a run without such inputs.
_NEEDS = {"parquet": ("pyarrow.parquet", "pyarrow", "pip install 'megagpt[parquet]'")}
_ZSTD = ("zstandard", "zstandard", "pip install zstandard")


def check_readers(inputs: Sequence[Input]) -> None:
    """Stop before any work if a reader some input needs is not installed."""
    for inp in inputs:
        need = _ZSTD if format_name(inp.name).endswith(".zst") else _NEEDS.get(inp.format)
        if need is None:
            continue
        module, package, install = need
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"{inp.name} needs {package}: {install}") from None


# ---------------------------------------------------------------- reading


def open_stream(spec: str):
    """A binary stream of the input's bytes, for reading front to back: the loader's own
    opener (``megagpt.data.remote.open_url``), kept open instead of read whole."""
    return open_url(spec, timeout=HTTP_TIMEOUT)


def blocks(stream: BinaryIO, size: int = READ_BYTES) -> Iterator[bytes]:
    """The stream's bytes in blocks of ``size`` (fewer only at the end: sockets and pipes
    return short reads, and block boundaries should not depend on the network)."""
    while True:
        parts, got = [], 0
        while got < size and (part := stream.read(size - got)):
            parts.append(part)
            got += len(part)
        if not parts:
            return
        yield b"".join(parts)
        if got < size:
            return


@contextmanager
def local_path(spec: str) -> Iterator[str]:
    """A local path holding the input's bytes, for formats that need random access (Parquet):
    the file itself, or a temporary copy of a URL's or command's output, deleted afterwards."""
    if is_local(spec):
        yield spec
        return
    with tempfile.NamedTemporaryFile(prefix="megagpt-prepare-", suffix=Path(format_name(spec)).suffix) as tmp:
        with open_stream(spec) as stream:
            shutil.copyfileobj(stream, tmp, READ_BYTES)
        tmp.flush()
        yield tmp.name


# ---------------------------------------------------------------- fingerprint


def identity(inp: Input) -> tuple[str, int | None]:
    """The input's line in the run's fingerprint, and its size in bytes if that is known.

    A local file: its absolute path, size and mtime. An http(s) URL: the URL and the
    Content-Length, ETag and Last-Modified a HEAD request returns (whichever the server
    sends; none if HEAD fails): the same URL with the same metadata is taken to hold the
    same bytes. A ``pipe:`` command (or other scheme): the command alone, so the same
    command is taken to produce the same bytes.
    """
    if is_local(inp.name):
        try:
            st = os.stat(inp.name)
        except OSError as e:
            raise ValueError(f"cannot read {inp.name}: {e}") from None
        line, size = f"{os.path.abspath(inp.name)}\0{st.st_size}\0{st.st_mtime_ns}", st.st_size
    elif inp.name.startswith(("http://", "https://")):
        meta = _head(inp.name)
        length = meta.get("Content-Length")
        line = "\0".join([inp.name, *(f"{k}={v}" for k, v in sorted(meta.items()))])
        size = int(length) if length and length.isdigit() else None
    else:
        line, size = inp.name, None
    if inp.format not in OLDER_FORMATS:
        line += f"\0{inp.format}"
    return line + "\n", size


def _head(url: str) -> dict[str, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HEAD_TIMEOUT) as r:
            return {k: r.headers[k] for k in ("Content-Length", "ETag", "Last-Modified") if r.headers.get(k)}
    except Exception:  # noqa: BLE001 - no HEAD support, or unreachable: the read itself reports real errors
        return {}
