"""Prepared datasets: the manifest, shard URLs, and reading one shard whole.

A shard is fetched whole (local file, `http(s)://`, or `pipe:COMMAND` through
webdataset's `gopen`), checked against the manifest (size, sha256), and parsed
with webdataset's tar iterator, every document checked (whole tokens of the
manifest's dtype, ids inside the vocabulary) *before* any of it is used.  A bad
shard therefore fails as a unit: under `data.on_error=skip` it is dropped
whole and never half-used.

`pipe:` URLs run shell commands: they are trusted operator input, like the
rest of the config.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import urllib.request
from dataclasses import dataclass

import numpy as np


FORMAT = "megagpt-shards"
VERSION = 1
MANIFEST_KEYS = ("format", "version", "dtype", "vocab_size", "eod_id", "tokenizer", "documents", "tokens", "shards")
SHARD_KEYS = ("name", "documents", "tokens", "bytes", "sha256")


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
        names = "\n".join(f"{os.path.basename(s.url)}:{s.stored_tokens}" for s in self.shards)
        return hashlib.sha256(names.encode()).hexdigest()[:16]


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(url, "rb") as f:
            return f.read()
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.read()
    from webdataset import gopen

    with gopen(url) as f:  # pipe:, and the other schemes webdataset knows
        return f.read()


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


def _entry(url: str, e: dict) -> Shard:
    return Shard(url, int(e["documents"]), int(e["tokens"]), e.get("bytes"), e.get("sha256"))


def open_dataset(urls, manifest: str | None = None) -> Dataset:
    """Resolve shard URLs (a prepared dir, brace patterns or a list) against
    the manifest that gives every shard's counts and checksum."""
    expanded = _expand(urls)
    if len(expanded) == 1 and (os.path.isdir(expanded[0]) or expanded[0].endswith("/")):
        base = expanded[0].rstrip("/")
        manifest = manifest or f"{base}/manifest.json"
        expanded = []
    elif not expanded:
        raise DataError(f"data.urls: no shards in {urls!r}")
    else:
        missing = [u for u in expanded if is_local(u) and not os.path.exists(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"data.urls: {missing[0]} does not exist{more}")
        base = _parent(expanded[0])
        manifest = manifest or f"{base}/manifest.json"
    try:
        man = json.loads(read_bytes(manifest))
    except Exception as e:  # noqa: BLE001 - any failure to fetch or parse is the same user error
        raise DataError(f"data.manifest: cannot read {manifest}: {type(e).__name__}: {e}") from None
    try:
        check_manifest(man, manifest)
    except ValueError as e:
        raise DataError(f"data.manifest: {e}") from None
    mbase = _parent(manifest)
    by_name = {s["name"]: s for s in man["shards"]}
    if not expanded:
        expanded = [f"{base}/{s['name']}" for s in man["shards"]]
    shards = []
    for url in expanded:
        name = url.rsplit("/", 1)[-1]
        if name not in by_name:
            raise DataError(f"data.urls: shard {url} is not listed in {manifest}")
        shards.append(_entry(url, by_name[name]))
    vbase = base if expanded else mbase
    val = tuple(_entry(f"{vbase}/{e['name']}", e) for e in man.get("val_shards", []))
    tok = man.get("tokenizer", "tokenizer.json")
    return Dataset(tuple(shards), val, man["dtype"], int(man["vocab_size"]), int(man["eod_id"]),
                   f"{mbase}/{tok}")


def read_shard(shard: Shard, dtype: str, vocab_size: int, eod_id: int) -> np.ndarray:
    """The tokens a shard adds to a stream: every document followed by the EOD
    token, as one array of the manifest's dtype. Raises DataError naming the
    shard and position if anything is wrong."""
    return parse_shard(shard, fetch_shard(shard), dtype, vocab_size, eod_id)


def fetch_shard(shard: Shard) -> bytes:
    """A shard's bytes, checked against the manifest's size and sha256 (the
    part of reading that runs without the GIL: I/O and hashing)."""
    try:
        raw = read_bytes(shard.url)
    except Exception as e:  # noqa: BLE001 - missing file, HTTP 404, failed pipe command...
        raise DataError(f"shard {shard.url}: cannot read: {type(e).__name__}: {e}") from None
    if shard.nbytes is not None and len(raw) != shard.nbytes:
        raise DataError(f"shard {shard.url}: {len(raw)} bytes, manifest says {shard.nbytes} (truncated?)")
    if shard.sha256 and hashlib.sha256(raw).hexdigest() != shard.sha256:
        raise DataError(f"shard {shard.url}: sha256 mismatch with the manifest (corrupt or replaced)")
    return raw


def parse_shard(shard: Shard, raw: bytes, dtype: str, vocab_size: int, eod_id: int) -> np.ndarray:
    """The tokens of a fetched, verified shard (see read_shard)."""
    np_dtype = np.dtype(dtype).newbyteorder("<")
    members, failure = _ustar_members(raw), None
    if members is None:  # anything but plain ustar (pax, GNU long names): webdataset's iterator
        import webdataset as wds

        members = []
        try:
            for m in wds.tariterators.tar_file_iterator(io.BytesIO(raw)):
                members.append((m["fname"], m["data"]))
        except Exception as e:  # noqa: BLE001 - tarfile.ReadError and friends: after the documents before it
            failure = e
    docs = [(fname, data) for fname, data in members if fname.endswith(".tokens")]
    # Every document is checked in order, as if one at a time: the first bad one names itself.
    whole = next((k for k, (_, data) in enumerate(docs) if len(data) % np_dtype.itemsize), len(docs))
    tokens = _join(docs[:whole], np_dtype, eod_id)
    if len(tokens) and int(tokens.max()) >= vocab_size:  # one pass; the slow one only to name the document
        for k, (fname, data) in enumerate(docs[:whole]):
            ids = np.frombuffer(data, dtype=np_dtype)
            if len(ids) and int(ids.max()) >= vocab_size:
                raise DataError(f"shard {shard.url}, document {k} ({fname}): token id {int(ids.max())} "
                                f">= vocab_size {vocab_size} (wrong dtype?)")
    if whole < len(docs):
        fname, data = docs[whole]
        raise DataError(f"shard {shard.url}, document {whole} ({fname}): {len(data)} bytes is not "
                        f"a whole number of {dtype} tokens (wrong dtype?)")
    if failure is not None:
        raise DataError(f"shard {shard.url}, after document {len(docs)}: {type(failure).__name__}: {failure}")
    toks = len(tokens) - len(docs)
    if (len(docs), toks) != (shard.documents, shard.stored_tokens):
        raise DataError(f"shard {shard.url}: holds {len(docs)} documents / {toks} tokens, manifest says "
                        f"{shard.documents} / {shard.stored_tokens}")
    return tokens


def _join(docs: list, np_dtype: np.dtype, eod_id: int) -> np.ndarray:
    """The documents' tokens, each followed by eod_id, in one array (one copy)."""
    size = np_dtype.itemsize
    lengths = np.array([len(data) // size for _, data in docs], dtype=np.int64)
    out = np.empty(int(lengths.sum()) + len(docs), dtype=np_dtype)
    dest, at = memoryview(out.view(np.uint8)), 0
    for (_, data), n in zip(docs, lengths.tolist()):
        dest[at : at + n * size] = data
        at += (n + 1) * size
    out[np.cumsum(lengths + 1) - 1] = eod_id
    return out


def _ustar_members(raw: bytes) -> list[tuple[str, memoryview]] | None:
    """(name, data) of a plain ustar archive's regular files, parsed straight
    from the bytes without copying (tarfile's stream mode costs ~100 us a
    member, this ~2 us); None if the archive uses anything else, so the caller
    falls back to the general reader. Header checksums are verified, all at
    once at the end."""
    view, out, off, n = memoryview(raw), [], 0, len(raw)
    heads, stored_sums = [], []
    while off + 512 <= n:
        header = raw[off : off + 512]
        if header.count(0) == 512:  # end-of-archive marker
            return out if _checksums_ok(raw, heads, stored_sums) else None
        try:
            stored = int(header[148:156].rstrip(b"\0 ").decode() or "0", 8)
            size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
        except ValueError:
            return None
        heads.append(off)
        stored_sums.append(stored)
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5"):
            return None
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        if prefix:
            name = f"{prefix}/{name}"
        start = off + 512
        if start + size > n:
            return None  # truncated: let the general reader name the error
        if kind != b"5":
            out.append((name, view[start : start + size]))
        off = start + (size + 511) // 512 * 512
    return None  # no end marker: truncated


def _checksums_ok(raw: bytes, heads: list[int], stored: list[int]) -> bool:
    """Every header's checksum: the sum of its bytes, the checksum field counted as spaces.
    Headers start on 512-byte blocks, so they are rows of the archive seen as (blocks, 512)."""
    if not heads:
        return True
    blocks = np.frombuffer(raw, dtype=np.uint8, count=len(raw) // 512 * 512).reshape(-1, 512)
    h = blocks[np.asarray(heads) // 512]
    sums = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    return bool((sums == np.asarray(stored, dtype=np.int64)).all())
