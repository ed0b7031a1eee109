"""Prepared datasets: the manifest, shard URLs, and reading one shard whole.

A shard is fetched whole (local file, `http(s)://`, or `pipe:COMMAND` through
webdataset's `gopen`), checked against the manifest (size, and xxh3_128 or
sha256), its tar headers indexed all at once (webdataset's tar iterator for
anything but plain ustar), its documents moved together in place, and every
document checked (whole tokens of the manifest's dtype, ids inside the
vocabulary) *before* any of it is used.  A bad shard therefore fails as a
unit: under `data.on_error=skip` it is dropped whole and never half-used.

`pipe:` URLs run shell commands: they are trusted operator input, like the
rest of the config.  A command's shard is its last word ending in `.tar`, not
always its last word (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`); the
files beside it (manifest, validation shards, tokenizer) are fetched by the
same command with that word's file name replaced.

Reading a URL (local, http(s) with retries, `pipe:`): megagpt/data/remote.py.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass

import numpy as np

from megagpt.data.buffers import BufferPool
from megagpt.data.remote import describe, is_http, is_local, read_bytes, read_http
from megagpt.data.tar_index import general_index, ustar_index
from megagpt.data.tokenizer import TOKENIZER_FILE

FORMAT = "megagpt-shards"
VERSION = 1
# A prepared dataset's list of shards, beside them.  (Not a checkpoint's manifest.json,
# checkpoint.CHECKPOINT_MANIFEST: that one lists a checkpoint's files.)
DATASET_MANIFEST = "manifest.json"
MANIFEST_KEYS = ("format", "version", "dtype", "vocab_size", "eod_id", "tokenizer", "documents", "tokens", "shards")
SHARD_KEYS = ("name", "documents", "tokens", "bytes", "sha256")
log = logging.getLogger("megagpt")


class DataError(RuntimeError):
    """Bad data: names the shard and the position."""


def check_manifest(m, where: str) -> dict:
    """Raise ValueError naming `where` and the first thing wrong with a manifest."""
    if not isinstance(m, dict):
        raise ValueError(f"manifest {where}: expected a JSON object")
    for key in MANIFEST_KEYS:
        if key not in m:
            raise ValueError(f"manifest {where}: missing key {key!r}")
    if m["format"] != FORMAT or m["version"] != VERSION:
        raise ValueError(f"manifest {where}: unsupported format {m['format']!r} version {m['version']!r}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"manifest {where}: unsupported dtype {m['dtype']!r}")
    if not isinstance(m["shards"], list) or not m["shards"]:
        raise ValueError(f"manifest {where}: 'shards' must be a non-empty list")
    if not isinstance(m.get("val_shards", []), list):  # absent in manifests written before the split existed
        raise ValueError(f"manifest {where}: 'val_shards' must be a list")
    for key_list in ("shards", "val_shards"):
        for i, shard in enumerate(m.get(key_list, [])):
            for key in SHARD_KEYS:
                if not isinstance(shard, dict) or key not in shard:
                    raise ValueError(f"manifest {where}: {key_list}[{i}] missing key {key!r}")
    return m


@dataclass(frozen=True)
class Shard:
    url: str
    documents: int
    stored_tokens: int
    nbytes: int | None = None
    sha256: str | None = None
    xxh3: str | None = None  # xxh3_128, the fast checksum (manifests written since it existed)

    @property
    def stream_tokens(self) -> int:  # tokens it adds to a stream: one EOD per document
        return self.stored_tokens + self.documents


@dataclass(frozen=True)
class Dataset:
    shards: tuple[Shard, ...]
    val_shards: tuple[Shard, ...]
    dtype: str
    vocab_size: int
    eod_id: int
    tokenizer_url: str

    def fingerprint(self) -> str:
        names = "\n".join(f"{shard_name(s.url)}:{s.stored_tokens}" for s in self.shards)
        return hashlib.sha256(names.encode()).hexdigest()[:16]


def _expand(urls) -> list[str]:
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(str(item)):
            if is_local(url) and any(c in url for c in "*?["):  # a local glob, in sorted order
                matches = sorted(glob.glob(url))
                if not matches:
                    raise DataError(f"data.urls: no files match {url}")
                out.extend(matches)
            else:
                out.append(url)
    return out


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# A word of a shell command as written: quoted strings, escaped and plain characters up to unquoted whitespace.
_SHELL_WORD = re.compile(r"""(?:'[^']*'|"(?:\\.|[^"\\])*"|\\.|[^ \t\r\n'"\\])+""", re.S)


def _file_word(url: str, suffix: str) -> tuple[str, re.Match, str]:
    """A ``pipe:`` command, the word naming the file it fetches (the last whose
    basename ends in `suffix`) as written, and that word's value.  The file is
    not always the last word (`aws s3 cp s3://bucket/x.tar -` ends in "-")."""
    command = url[len("pipe:") :]
    try:
        shlex.split(command)  # unbalanced quotes, a dangling backslash
    except ValueError as e:
        raise DataError(f"data.urls: cannot split the command of {url}: {e}") from None
    for word in reversed(list(_SHELL_WORD.finditer(command))):
        value = shlex.split(word.group())[0]
        if _basename(value).endswith(suffix):
            return command, word, value
    raise DataError(f"data.urls: {url} has no word ending in {suffix}, so the shard it fetches is unknown")


def shard_name(url: str) -> str:
    """A shard's name in the manifest: its basename, or for a ``pipe:`` command the
    basename of its last word that ends in `.tar`."""
    if url.startswith("pipe:"):
        return _basename(_file_word(url, ".tar")[2])
    return _basename(url)


def beside(url: str, name: str, suffix: str = ".tar") -> str:
    """The URL of file `name` in the same place as the file at `url` (a shard when
    suffix is `.tar`).  For a ``pipe:`` command: the same command with the file
    word's basename replaced.  Every other word is kept as written, and so is the
    rest of the file word where it can be, so that what the shell expands
    (`$BUCKET`, `~`) or reads as syntax (`|`, `2>/dev/null`) still is."""
    if not url.startswith("pipe:"):
        return f"{_parent(url)}/{name}"
    command, word, value = _file_word(url, suffix)
    return "pipe:" + command[: word.start()] + _renamed(word.group(), value, name) + command[word.end() :]


def _renamed(raw: str, value: str, name: str) -> str:
    """The shell word written `raw` (read as `value`) with its basename replaced by
    `name`: as written where the basename is there verbatim, else quoted anew."""
    old = _basename(value)
    new_value = value[: len(value) - len(old)] + name
    at = raw.rfind(old)
    if at >= 0:
        candidate = raw[:at] + name + raw[at + len(old) :]
        with contextlib.suppress(ValueError):  # a name with a quote in it
            if shlex.split(candidate) == [new_value]:
                return candidate
    return shlex.quote(new_value)  # the basename was written escaped, or quoted in pieces


def _entry(url: str, e: dict) -> Shard:
    return Shard(url, int(e["documents"]), int(e["tokens"]), e.get("bytes"), e.get("sha256"), e.get("xxh3_128"))


def open_dataset(urls, manifest: str | None = None) -> Dataset:
    """Resolve shard URLs (a prepared dir, brace patterns or a list) against
    the manifest that gives every shard's counts and checksum."""
    expanded = _expand(urls)
    if len(expanded) == 1 and (os.path.isdir(expanded[0]) or expanded[0].endswith("/")):
        base = expanded[0].rstrip("/")

        def near(name: str) -> str:  # a file of the prepared dir
            return f"{base}/{name}"

        expanded = []
    elif not expanded:
        raise DataError(f"data.urls: no shards in {urls!r}")
    else:
        missing = [u for u in expanded if is_local(u) and not os.path.exists(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"data.urls: {missing[0]} does not exist{more}")
        first = expanded[0]

        def near(name: str) -> str:  # a file beside the first shard, fetched the way it is
            return beside(first, name)

    manifest = manifest or near(DATASET_MANIFEST)
    try:
        man = json.loads(read_bytes(manifest))
    except Exception as e:  # noqa: BLE001 - any failure to fetch or parse is the same user error
        raise DataError(f"data.manifest: cannot read {manifest}: {describe(e)}") from None
    try:
        check_manifest(man, manifest)
    except ValueError as e:
        raise DataError(f"data.manifest: {e}") from None
    by_name = {s["name"]: s for s in man["shards"]}
    if not expanded:
        expanded = [near(s["name"]) for s in man["shards"]]
    shards = []
    for url in expanded:
        name = shard_name(url)
        if name not in by_name:
            raise DataError(f"data.urls: shard {url} is not listed in {manifest}")
        shards.append(_entry(url, by_name[name]))
    val = tuple(_entry(near(e["name"]), e) for e in man.get("val_shards", []))
    tokenizer = _tokenizer_url(manifest, man.get("tokenizer", TOKENIZER_FILE), near)
    return Dataset(tuple(shards), val, man["dtype"], int(man["vocab_size"]), int(man["eod_id"]), tokenizer)


def _tokenizer_url(manifest: str, name: str, near) -> str:
    """The tokenizer is beside the manifest; a ``pipe:`` manifest whose command
    names no `.json` file cannot say where, so look beside the shards then."""
    try:
        return beside(manifest, name, ".json")
    except DataError:
        return near(name)


VERIFY = ("fast", "sha256")


def read_shard(shard: Shard, dtype: str, vocab_size: int, eod_id: int, verify: str = "fast") -> np.ndarray:
    """The tokens a shard adds to a stream: every document followed by the EOD
    token, as one array of the manifest's dtype. Raises DataError naming the
    shard and position if anything is wrong."""
    return parse_shard(shard, fetch_shard(shard, verify), dtype, vocab_size, eod_id)


_POOL = BufferPool(keep=3)  # shard buffers: compacted in place, freed when the stream moves on


def _read_local(path: str) -> np.ndarray:
    with open(path, "rb", buffering=0) as f:
        buf = _POOL.empty(os.fstat(f.fileno()).st_size, np.uint8)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return buf[:got]


def advise(shard: Shard) -> None:
    """Ask the kernel to start reading a local shard into the page cache
    (posix_fadvise WILLNEED): the disk works ahead while no thread waits."""
    if is_local(shard.url) and hasattr(os, "posix_fadvise"):
        try:
            fd = os.open(shard.url, os.O_RDONLY)
        except OSError:
            return  # the read itself reports it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def fetch_shard(shard: Shard, verify: str = "fast") -> np.ndarray:
    """A shard's bytes as a writable uint8 array, checked against the
    manifest's size and checksum.  verify="fast" checks the manifest's
    xxh3_128 where it has one (~10 GB/s) and sha256 otherwise; "sha256"
    always checks sha256 (~1 GB/s).  I/O and hashing leave the GIL free."""
    try:
        if is_local(shard.url):
            buf = _read_local(shard.url)
        else:
            data = read_http(shard.url, shard.nbytes) if is_http(shard.url) else read_bytes(shard.url)
            buf = _POOL.empty(len(data), np.uint8)
            buf[:] = np.frombuffer(data, np.uint8)
    except Exception as e:  # noqa: BLE001 - missing file, HTTP 404, failed pipe command, every try failed...
        raise DataError(f"shard {shard.url}: cannot read: {describe(e)}") from None
    if shard.nbytes is not None and len(buf) != shard.nbytes:
        raise DataError(f"shard {shard.url}: {len(buf)} bytes, manifest says {shard.nbytes} (truncated?)")
    if verify == "fast" and shard.xxh3:
        if xxh3_hex(buf) != shard.xxh3:
            raise DataError(f"shard {shard.url}: xxh3_128 mismatch with the manifest (corrupt or replaced)")
    elif shard.sha256 and hashlib.sha256(buf).hexdigest() != shard.sha256:
        raise DataError(f"shard {shard.url}: sha256 mismatch with the manifest (corrupt or replaced)")
    return buf


def xxh3_hex(data) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


def parse_shard(shard: Shard, raw, dtype: str, vocab_size: int, eod_id: int) -> np.ndarray:
    """The tokens of a fetched, verified shard (see read_shard).  `raw` is
    compacted in place when it is a writable uint8 array."""
    np_dtype = np.dtype(dtype).newbyteorder("<")
    buf = raw if isinstance(raw, np.ndarray) and raw.flags.writeable else np.frombuffer(raw, np.uint8).copy()
    index, failure = ustar_index(buf), None
    if index is None:  # anything but plain ustar (pax, GNU long names): webdataset's iterator
        buf, index, failure = general_index(buf, np_dtype.itemsize, _POOL.empty)
    starts, sizes, names = index
    # Every document is checked in order, as if one at a time: the first bad one names itself.
    odd = np.flatnonzero(sizes % np_dtype.itemsize)
    whole = int(odd[0]) if len(odd) else len(sizes)
    tokens = _compact(buf, starts[:whole], sizes[:whole], np_dtype, eod_id)
    if len(tokens) and int(tokens.max()) >= vocab_size:  # one pass; the slow one only to name the document
        at = 0
        for k, n in enumerate((sizes[:whole] // np_dtype.itemsize).tolist()):
            top = int(tokens[at : at + n].max()) if n else 0
            if top >= vocab_size:
                raise DataError(
                    f"shard {shard.url}, document {k} ({names(k)}): token id {top} "
                    f">= vocab_size {vocab_size} (wrong dtype?)"
                )
            at += n + 1
    if whole < len(sizes):
        raise DataError(
            f"shard {shard.url}, document {whole} ({names(whole)}): {int(sizes[whole])} bytes is not "
            f"a whole number of {dtype} tokens (wrong dtype?)"
        )
    if failure is not None:
        raise DataError(f"shard {shard.url}, after document {len(sizes)}: {type(failure).__name__}: {failure}")
    toks = len(tokens) - len(sizes)
    if (len(sizes), toks) != (shard.documents, shard.stored_tokens):
        raise DataError(
            f"shard {shard.url}: holds {len(sizes)} documents / {toks} tokens, manifest says "
            f"{shard.documents} / {shard.stored_tokens}"
        )
    return tokens


def _compact(buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray, np_dtype: np.dtype, eod_id: int) -> np.ndarray:
    """The documents buf[start : start + size], each followed by eod_id, moved
    together at the front of buf (in place: no new buffer to fault in) and
    returned as tokens.  Documents only ever move towards the front."""
    size = np_dtype.itemsize
    lengths = sizes // size
    ends = np.cumsum(lengths + 1)  # token index after each document's EOD
    dest = (ends - lengths - 1) * size
    view = memoryview(buf)  # a memoryview copies overlapping ranges correctly, ~4x faster per call than numpy
    for d, s, n in zip(dest.tolist(), starts.tolist(), sizes.tolist()):
        if d != s:
            view[d : d + n] = view[s : s + n]
    total = int(ends[-1]) if len(ends) else 0
    out = buf[: total * size].view(np_dtype)
    out[ends - 1] = eod_id
    return out
