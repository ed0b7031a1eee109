"""Reading one shard (tar index, compaction, checksums), the buffer pool, the
shuffle permutations, and Batches against rank_sequences.

Every parse is compared with a reference built by Python's `tarfile`: every
regular member whose name ends in `.tokens`, in archive order, read as
little-endian uint16 and followed by the EOD id.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from helpers import make_dataset, make_two_sources, next_batch, rank_sequences

from megagpt.data.buffers import BufferPool
from megagpt.data.loader import Batches
from megagpt.data.mixture import Mixture
from megagpt.data.order import permutation, permutations
from megagpt.data.shards import DataError, Shard, fetch_shard, open_dataset, parse_shard, read_shard
from megagpt.data.shardwriter import ShardSink, manifest_entry, tar_header
from megagpt.data.streams import ShardStreams, StreamSettings, make_reader
from megagpt.data.tar_index import ustar_index

VOCAB = 65535  # token ids below it; the EOD id is inside the vocabulary too
EOD = 65534
URL = "mem://test-shard.tar"


# -- helpers -----------------------------------------------------------------------------------


def reference(raw: bytes, eod: int = EOD) -> np.ndarray:
    """The stream tokens of a tar archive, read with tarfile (archive order)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for m in tar:
            if m.isreg() and m.name.endswith(".tokens"):
                out.append(np.frombuffer(tar.extractfile(m).read(), dtype="<u2"))
                out.append(np.array([eod], dtype="<u2"))
    return np.concatenate(out) if out else np.zeros(0, dtype="<u2")


def token_members(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [m for m in tar if m.isreg() and m.name.endswith(".tokens")]


def counts(raw: bytes) -> tuple[int, int]:
    members = token_members(raw)
    return len(members), sum(m.size for m in members) // 2


def as_buf(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).copy()  # writable, as fetch_shard hands it


def parse(raw: bytes) -> np.ndarray:
    """parse_shard of an archive, with the counts a manifest would give it."""
    docs, toks = counts(raw)
    return parse_shard(Shard(URL, docs, toks), as_buf(raw), "uint16", VOCAB, EOD)


def check_index(raw: bytes) -> None:
    """ustar_index finds exactly tarfile's `.tokens` members: data offsets, sizes, names."""
    idx = ustar_index(as_buf(raw))
    assert idx is not None
    starts, sizes, names = idx
    members = token_members(raw)
    assert starts.tolist() == [m.offset_data for m in members]
    assert sizes.tolist() == [m.size for m in members]
    assert [names(k) for k in range(len(members))] == [m.name for m in members]


def tokens_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, EOD, n, dtype=np.uint16).astype("<u2").tobytes()


def write_tar(members, fmt) -> bytes:
    """members: (name, bytes) for files, (name, None) for directories."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


LONG_DIR = "a" * 70 + "/" + "b" * 60  # a path over 100 characters: ustar's prefix field holds the dirs


def rename_member(raw: bytes, old: str, new: str) -> bytes:
    """The archive with one header's name field rewritten (and its checksum made right again)."""
    out = bytearray(raw)
    (at,) = [i for i in range(0, len(raw), 512) if raw[i : i + 100].rstrip(b"\0") == old.encode()]
    out[at : at + 100] = new.encode().ljust(100, b"\0")
    out[at + 148 : at + 156] = b" " * 8
    out[at + 148 : at + 155] = b"%06o\0" % sum(out[at : at + 512])
    return bytes(out)


def mixed_members() -> list:
    return [
        ("000.tokens", tokens_bytes(5, 1)),  # 10 bytes: not a multiple of 512
        ("000.json", b'{"source": "x"}'),  # not a document
        ("sub", None),  # a directory entry
        ("sub/dir.tokens", None),  # a directory whose name ends in .tokens
        ("sub/001.tokens", b""),  # a zero-length document
        ("sub/002.tokens", tokens_bytes(256, 2)),  # exactly one block
        ("003.tokens.json", b"[]"),  # .tokens not at the end
        (f"{LONG_DIR}/004.tokens", tokens_bytes(700, 3)),  # 1400 bytes, name split into prefix/name
        ("x" * 93 + ".tokens", tokens_bytes(1, 4)),  # a name of exactly 100 characters (no NUL)
        ("005.tokens", tokens_bytes(1025, 5)),  # 2050 bytes
        ("README", b"hello"),
    ]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reading"), n_docs=60, docs_per_shard=6)


@pytest.fixture
def data_copy(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("mix"))


# -- 1. the ustar index and parse_shard against tarfile ----------------------------------------


def test_prepared_shards_use_the_fast_index_and_match_tarfile(data_dir):
    ds = open_dataset(str(data_dir))
    assert ds.dtype == "uint16"
    for shard in ds.shards:
        raw = Path(shard.url).read_bytes()
        check_index(raw)
        buf = fetch_shard(shard, "fast")
        tokens = parse_shard(shard, buf, ds.dtype, ds.vocab_size, ds.eod_id)
        np.testing.assert_array_equal(tokens, reference(raw, ds.eod_id))
        assert np.shares_memory(tokens, buf)  # compacted in place inside the fetched buffer
        np.testing.assert_array_equal(
            read_shard(shard, ds.dtype, ds.vocab_size, ds.eod_id, "sha256"), reference(raw, ds.eod_id)
        )


def test_shard_sink_edge_documents_match_tarfile(tmp_path):
    """Documents of 0 tokens, 1 token, exactly one block and just over one block, written by ShardSink."""
    written = []
    sink = ShardSink(tmp_path, "shard", docs_per_shard=100, shard_bytes=1 << 20, on_shard=written.append)
    for i, n in enumerate([3, 0, 1, 256, 257, 1000, 0, 7]):
        sink.add(tokens_bytes(n, 10 + i), n, (0, i))
    sink.close()
    (entry,) = [manifest_entry(s) for s in written]
    raw = (tmp_path / entry["name"]).read_bytes()
    check_index(raw)
    shard = Shard(
        str(tmp_path / entry["name"]),
        entry["documents"],
        entry["tokens"],
        entry["bytes"],
        entry["sha256"],
        entry["xxh3_128"],
    )
    assert (shard.documents, shard.stored_tokens) == counts(raw) == (8, 1524)
    np.testing.assert_array_equal(read_shard(shard, "uint16", VOCAB, EOD), reference(raw))
    # tar_header is byte for byte what tarfile writes for the same member (ustar, mtime 0, owner bigdata)
    info = tarfile.TarInfo("000000042.tokens")
    info.size, info.mode, info.uname, info.gname = 1234, 0o444, "bigdata", "bigdata"
    assert tar_header("000000042.tokens", 1234) == info.tobuf(tarfile.USTAR_FORMAT)


def test_ustar_archive_from_tarfile_matches_reference():
    raw = write_tar(mixed_members(), tarfile.USTAR_FORMAT)
    # tarfile writes a directory's name with a trailing '/'; other writers may not: still a directory
    raw = rename_member(raw, "sub/dir.tokens/", "sub/dir.tokens")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getmember("sub/dir.tokens").isdir()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # the long path really uses the prefix field
        long = next(m for m in tar if m.name.startswith(LONG_DIR))
    header = raw[long.offset : long.offset + 512]
    prefix, name = header[345:500].rstrip(b"\0"), header[:100].rstrip(b"\0")
    assert prefix and prefix + b"/" + name == f"{LONG_DIR}/004.tokens".encode()
    check_index(raw)
    np.testing.assert_array_equal(parse(raw), reference(raw))
    docs, toks = counts(raw)
    assert docs == 6 and toks == 5 + 0 + 256 + 700 + 1 + 1025
    # bytes (not a writable array) are copied, not refused
    np.testing.assert_array_equal(parse_shard(Shard(URL, docs, toks), raw, "uint16", VOCAB, EOD), reference(raw))


EXTENDED = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


def extended_archive(fmt) -> bytes:
    members = mixed_members() + [("c" * 120 + ".tokens", tokens_bytes(33, 6))]  # no '/': needs an extension
    return write_tar(members, fmt)


@pytest.mark.parametrize("fmt", EXTENDED, ids=["gnu", "pax"])
def test_gnu_and_pax_extension_headers_leave_the_fast_index(fmt):
    raw = extended_archive(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # the long name does need an extension header
        assert any(m.name.startswith("c" * 120) for m in tar)
    kinds = {raw[i + 156 : i + 157] for i in range(0, len(raw), 512) if raw[i + 257 : i + 262] == b"ustar"}
    assert kinds & {tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE}
    assert ustar_index(as_buf(raw)) is None


@pytest.mark.parametrize("fmt", EXTENDED, ids=["gnu", "pax"])
def test_gnu_and_pax_archives_parse_like_tarfile(fmt):
    raw = extended_archive(fmt)
    np.testing.assert_array_equal(parse(raw), reference(raw))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, *EXTENDED], ids=["ustar", "gnu", "pax"])
def test_members_under_dunder_dirs_count_on_both_paths(fmt):
    """webdataset skips __x__/ members by default; both readers must keep them, as tarfile does."""
    raw = write_tar(
        [("__x__/a.tokens", tokens_bytes(5, 1)), ("d" * 120 + ".tokens", tokens_bytes(3, 2))]
        if fmt != tarfile.USTAR_FORMAT
        else [("__x__/a.tokens", tokens_bytes(5, 1)), ("b.tokens", tokens_bytes(3, 2))],
        fmt,
    )
    assert (ustar_index(as_buf(raw)) is None) == (fmt != tarfile.USTAR_FORMAT)
    got = parse(raw)
    assert len(got) == 5 + 1 + 3 + 1
    np.testing.assert_array_equal(got, reference(raw))


@pytest.mark.parametrize("fmt", EXTENDED, ids=["gnu", "pax"])
def test_general_reader_with_no_documents(fmt):
    raw = write_tar([("d" * 120 + ".json", b"{}"), ("sub", None)], fmt)
    assert ustar_index(as_buf(raw)) is None
    assert len(parse(raw)) == 0


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, *EXTENDED], ids=["ustar", "gnu", "pax"])
def test_empty_archive(fmt):
    raw = write_tar([], fmt)
    assert len(raw) >= 1024 and not any(raw)
    starts, sizes, _ = ustar_index(as_buf(raw))
    assert len(starts) == len(sizes) == 0
    tokens = parse(raw)
    assert len(tokens) == 0 and tokens.dtype == np.dtype("<u2")
    with pytest.raises(DataError, match="holds 0 documents"):
        parse_shard(Shard(URL, 1, 1), as_buf(raw), "uint16", VOCAB, EOD)


# -- 2. a document whose data looks like a header ----------------------------------------------


def fake_header_archives():
    """(label, archive, index of the document carrying a fake header block)."""
    out = []
    real = tar_header("999999999.tokens", 512)  # a real header, as ShardSink writes it
    for where in ("first", "last"):
        for kind in ("copy", "consistent"):
            n_blocks = 4
            data = bytearray(tokens_bytes(n_blocks * 256, 20))
            if kind == "copy":
                fake = real
            else:  # claims exactly the rest of the document: a walker that trusted it would land in step
                fake = tar_header("evil.tokens", (n_blocks - 2) * 512)
            data[512:1024] = fake  # block 1 of the data, 512-aligned in the archive
            docs = [
                ("000.tokens", tokens_bytes(100, 21)),
                ("001.tokens", bytes(data)),
                ("002.tokens", tokens_bytes(3, 22)),
            ]
            if where == "last":
                docs = docs[:1] + docs[2:] + docs[1:2]
            out.append(pytest.param(write_tar(docs, tarfile.USTAR_FORMAT), id=f"{kind}-{where}"))
    return out


@pytest.mark.parametrize("raw", fake_header_archives())
def test_header_lookalike_in_data_is_never_indexed(raw):
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # tarfile itself sees three documents
        assert len([m for m in tar if m.isreg()]) == 3
    blocks = [raw[i : i + 512] for i in range(0, len(raw), 512)]
    assert sum(b[257:262] == b"ustar" for b in blocks) == 4  # three headers and the lookalike
    idx = ustar_index(as_buf(raw))
    if idx is not None:  # a smarter index may handle it, but only exactly right
        check_index(raw)


@pytest.mark.parametrize("raw", fake_header_archives())
def test_header_lookalike_in_data_parses_like_tarfile(raw):
    np.testing.assert_array_equal(parse(raw), reference(raw))


# -- 3. a damaged header checksum ------------------------------------------------------------


def damaged(data_dir, member: int):
    """Shard 0 without manifest checksums, and its bytes with header `member`'s checksum changed."""
    ds = open_dataset(str(data_dir))
    shard = replace(ds.shards[0], sha256=None, xxh3=None)
    raw = bytearray(Path(shard.url).read_bytes())
    at = token_members(bytes(raw))[member].offset + 148
    raw[at] = ord("1") if raw[at] != ord("1") else ord("2")
    return ds, shard, bytes(raw)


def test_damaged_first_header_checksum_is_a_data_error(data_dir):
    ds, shard, raw = damaged(data_dir, 0)
    assert ustar_index(as_buf(raw)) is None  # header checksums are verified by the fast index
    with pytest.raises(DataError) as e:
        parse_shard(shard, as_buf(raw), ds.dtype, ds.vocab_size, ds.eod_id)
    assert shard.url in str(e.value) and "after document 0" in str(e.value) and "checksum" in str(e.value)


def test_damaged_later_header_checksum_is_a_data_error(data_dir):
    """tarfile stops quietly at a bad header after the first: the documents before it are read,
    and the manifest's counts must then name the shard as short."""
    ds, shard, raw = damaged(data_dir, 2)
    assert ustar_index(as_buf(raw)) is None
    with pytest.raises(DataError, match=f"{shard.url}.*holds 2 documents"):
        parse_shard(shard, as_buf(raw), ds.dtype, ds.vocab_size, ds.eod_id)


# -- 4. shard checksums ----------------------------------------------------------------------


def flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))


def rewrite_manifest(copy: Path, edit) -> None:
    man = json.loads((copy / "manifest.json").read_text())
    for entry in man["shards"] + man.get("val_shards", []):
        edit(entry)
    (copy / "manifest.json").write_text(json.dumps(man))


def test_flipped_byte_fails_the_check_of_each_mode(data_copy):
    flip_middle_byte(data_copy / "shard-000003.tar")
    ds = open_dataset(str(data_copy))
    bad, good = ds.shards[3], ds.shards[4]
    assert bad.xxh3 and bad.sha256
    with pytest.raises(DataError, match="xxh3_128 mismatch") as e:
        fetch_shard(bad, "fast")
    assert bad.url in str(e.value)
    with pytest.raises(DataError, match="sha256 mismatch") as e:
        fetch_shard(bad, "sha256")
    assert bad.url in str(e.value)
    for verify, what in (("fast", "xxh3_128 mismatch"), ("sha256", "sha256 mismatch")):
        with pytest.raises(DataError, match=what):
            make_reader(verify)(bad, ds)
        raw = Path(good.url).read_bytes()
        np.testing.assert_array_equal(make_reader(verify)(good, ds), reference(raw, ds.eod_id))


def test_each_mode_checks_its_own_hash(data_copy):
    """fast checks xxh3_128 (not sha256) where the manifest has it; sha256 always checks sha256."""
    rewrite_manifest(data_copy, lambda e: e.update(sha256="0" * 64) if e["name"] == "shard-000001.tar" else None)
    rewrite_manifest(data_copy, lambda e: e.update(xxh3_128="0" * 32) if e["name"] == "shard-000002.tar" else None)
    ds = open_dataset(str(data_copy))
    fetch_shard(ds.shards[1], "fast")
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch_shard(ds.shards[1], "sha256")
    with pytest.raises(DataError, match="xxh3_128 mismatch"):
        fetch_shard(ds.shards[2], "fast")
    fetch_shard(ds.shards[2], "sha256")


def test_manifest_without_xxh3_falls_back_to_sha256(data_copy):
    rewrite_manifest(data_copy, lambda e: e.pop("xxh3_128"))
    assert "xxh3_128" not in (data_copy / "manifest.json").read_text()
    ds = open_dataset(str(data_copy))
    assert all(s.xxh3 is None and s.sha256 for s in ds.shards)
    raw = Path(ds.shards[3].url).read_bytes()
    np.testing.assert_array_equal(
        read_shard(ds.shards[3], ds.dtype, ds.vocab_size, ds.eod_id, "fast"), reference(raw, ds.eod_id)
    )
    flip_middle_byte(data_copy / "shard-000003.tar")
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch_shard(ds.shards[3], "fast")
    with pytest.raises(DataError, match="sha256 mismatch"):
        make_reader("fast")(ds.shards[3], ds)


def test_prepare_records_xxh3_and_sha256_of_every_shard(tmp_path):
    out = make_dataset(tmp_path, n_docs=30, docs_per_shard=5, seed=9, val_docs=10)
    man = json.loads((out / "manifest.json").read_text())
    entries = man["shards"] + man["val_shards"]
    assert man["shards"] and man["val_shards"]
    for e in entries:
        data = (out / e["name"]).read_bytes()
        assert e["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["bytes"] == len(data)
    ds = open_dataset(str(out))
    assert [s.xxh3 for s in ds.shards + ds.val_shards] == [e["xxh3_128"] for e in entries]


def test_unknown_verify_mode_is_refused():
    with pytest.raises(DataError, match="data.verify: unknown check 'bogus'"):
        make_reader("bogus")


def make_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import megagpt.config
    import megagpt.train

    megagpt.config.register()
    with initialize_config_dir(config_dir=megagpt.train.CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_config_rejects_unknown_verify_in_one_line():
    from megagpt.config import ConfigError
    from megagpt.config_checks import validate

    validate(make_cfg("data.verify=sha256"), 1)
    validate(make_cfg("data.verify=fast"), 1)
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("data.verify=bogus"), 1)
    msg = str(e.value)
    assert msg.startswith("data.verify:") and "bogus" in msg and "\n" not in msg, msg


@pytest.mark.slow
def test_cli_rejects_unknown_verify_in_one_line(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["MEGAGPT_CACHE"] = str(tmp_path / "cache")
    p = subprocess.run(
        [sys.executable, "-m", "megagpt.train", "data.verify=bogus"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("megagpt: error") and "data.verify" in lines[0], p.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


# -- 5. the buffer pool ----------------------------------------------------------------------


def addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def overlaps(a: np.ndarray, ptr: int, nbytes: int) -> bool:
    return addr(a) < ptr + nbytes and ptr < addr(a) + a.nbytes


def test_pool_reuses_memory_once_every_reference_is_gone():
    pool = BufferPool(keep=2)
    a = pool.empty(4096, np.uint8)
    base = addr(a)
    del a
    b = pool.empty((16, 32), np.int64)  # the same bytes, another shape and dtype
    assert addr(b) == base and b.shape == (16, 32) and b.dtype == np.int64 and b.flags.c_contiguous
    del b
    c = pool.empty(100, np.int32)  # smaller: still the same memory
    assert addr(c) == base and c.shape == (100,)
    del c
    gc.collect()
    assert addr(pool.empty(4096, np.uint8)) == base


def test_pool_never_hands_out_memory_a_numpy_view_uses():
    pool = BufferPool(keep=2)
    a = pool.empty(4096, np.uint8)
    base = addr(a)
    view = a[1000:1100]
    view[:] = 7
    del a
    others = [pool.empty(4096, np.uint8) for _ in range(3)]  # more than keep: new memory every time
    for o in others:
        assert not np.shares_memory(o, view)
        o[:] = 0xFF
    assert (view == 7).all()
    mv = memoryview(view)  # a memoryview, too, keeps it
    del view, others
    gc.collect()
    again = pool.empty(4096, np.uint8)
    assert not overlaps(again, base, 4096)
    del again, mv
    gc.collect()
    assert addr(pool.empty(4096, np.uint8)) == base


def test_pool_never_hands_out_memory_a_tensor_uses():
    pool = BufferPool(keep=3)
    t = torch.from_numpy(pool.empty((8, 17), np.int32))
    base = t.data_ptr()
    t[:] = 5
    part = t.split(2)[1]  # a view made by split, and nothing else: the array and t are gone
    del t
    gc.collect()
    held = [pool.empty((8, 17), np.int32) for _ in range(4)]
    for h in held:
        assert not overlaps(h, part.data_ptr(), part.numel() * part.element_size())
        assert not overlaps(h, base, 8 * 17 * 4)
        h[:] = -1
    assert (part == 5).all()
    del held
    gc.collect()
    assert addr(pool.empty((8, 17), np.int32)) != base  # still held by `part`
    del part
    gc.collect()
    assert addr(pool.empty((8, 17), np.int32)) == base


def test_pool_holds_at_most_keep_arrays():
    pool = BufferPool(keep=3)
    held = []
    for size in (100, 200, 300, 400, 500, 600):
        held.append(pool.empty(size, np.uint8))
        assert len(pool._arrays) <= 3
    pooled = {addr(a) for a in pool._arrays}
    reused = {addr(a) for a in held[:3]}
    assert pooled == reused  # the first three are kept, the later ones are not
    del held
    gc.collect()
    again = [pool.empty(1000, np.uint8) for _ in range(5)]  # bigger than every free one
    assert len(pool._arrays) <= 3
    assert len({addr(a) for a in again}) == 5
    del again
    gc.collect()
    for size in (10, 2000, 50, 3000):
        pool.empty(size, np.uint8)
        assert len(pool._arrays) <= 3


def test_shard_buffers_in_use_survive_later_reads(data_dir):
    ds = open_dataset(str(data_dir))
    held = [read_shard(s, ds.dtype, ds.vocab_size, ds.eod_id) for s in ds.shards[:2]]
    as_tensor = torch.from_numpy(read_shard(ds.shards[2], ds.dtype, ds.vocab_size, ds.eod_id).view(np.int16))
    piece = as_tensor.split(50)[1]
    del as_tensor
    for s in ds.shards * 2:  # far more reads than the shard pool keeps, each released at once
        read_shard(s, ds.dtype, ds.vocab_size, ds.eod_id)
    for s, h in zip(ds.shards[:2], held):
        np.testing.assert_array_equal(h, reference(Path(s.url).read_bytes(), ds.eod_id))
    expected = reference(Path(ds.shards[2].url).read_bytes(), ds.eod_id).view(np.int16)[50:100]
    np.testing.assert_array_equal(piece.numpy(), expected)


# -- 6. permutations -------------------------------------------------------------------------


def test_permutations_are_deterministic_rows_of_permutation():
    key = (7, 0x5EED, -3)
    last = np.arange(-5, 250)
    rows = permutations(16, key, last)
    assert rows.shape == (len(last), 16)
    np.testing.assert_array_equal(rows, permutations(16, key, last))  # the same on every call
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.broadcast_to(np.arange(16), rows.shape))
    for j in (0, 1, 5, 100, len(last) - 1):
        np.testing.assert_array_equal(rows[j], permutation(16, *key, int(last[j])))
    np.testing.assert_array_equal(permutations(16, key, last[100:110]), rows[100:110])  # batching is free
    assert len({r.tobytes() for r in rows}) == len(last)  # different last keys: different orders
    assert permutation(1, 3, 4).tolist() == [0]


def test_permutations_differ_between_keys():
    keys = [(a, b, c) for a in range(6) for b in (0, 1, 0x5A4D, 2**63 + 5) for c in range(4)]
    keys += [(1,), (2,), (1, 0), (0, 1), (1, 0, 0, 0), (0, 0, 0, 1), (-1, 0), (2**64 - 2, 0)]
    perms = {tuple(permutation(16, *k)) for k in keys}
    assert len(perms) == len(keys)
    assert not np.array_equal(permutations(16, (1, 2), [0]), permutations(16, (2, 1), [0]))


def test_permutation_positions_are_roughly_uniform():
    n = 8
    rows = permutations(n, (11, 22), np.arange(20000))
    hits = np.zeros((n, n), dtype=np.int64)  # hits[position, value]
    np.add.at(hits, (np.broadcast_to(np.arange(n), rows.shape), rows), 1)
    mean = len(rows) / n
    assert np.abs(hits - mean).max() < 0.15 * mean, hits
    # consecutive blocks are not correlated: (value at 0 in row j, value at 0 in row j + 1)
    pairs = np.zeros((n, n), dtype=np.int64)
    np.add.at(pairs, (rows[:-1, 0], rows[1:, 0]), 1)
    assert np.abs(pairs - (len(rows) - 1) / n**2).max() < 0.3 * (len(rows) - 1) / n**2, pairs
    # and over the first key, with the last one fixed
    by_key = np.array([permutation(n, k, 5, 0) for k in range(4000)])
    hits = np.zeros((n, n), dtype=np.int64)
    np.add.at(hits, (np.broadcast_to(np.arange(n), by_key.shape), by_key), 1)
    assert np.abs(hits - 4000 / n).max() < 0.2 * 4000 / n, hits


# -- 7. Batches ------------------------------------------------------------------------------

L = 16


def one_source(data_dir):
    return Mixture([ShardStreams(open_dataset(str(data_dir)), StreamSettings(4, L, seed=5, shuffle_buffer=4))], [1.0])


def two_source(two_sets):
    a, b = two_sets
    return Mixture(
        [
            ShardStreams(open_dataset(str(a)), StreamSettings(4, L, seed=3, shuffle_buffer=4), name="a"),
            ShardStreams(open_dataset(str(b)), StreamSettings(4, L, seed=3), name="b"),
        ],
        [0.6, 0.4],
        period=7,
    )


def expected(mix, rank, world, consumed, n):
    got = [(w.copy(), i) for w, i in islice(rank_sequences(mix, rank, world, consumed), n)]
    return np.stack([w for w, _ in got]).astype(np.int64), np.array([i for _, i in got])


@pytest.mark.parametrize("rank, world, consumed", [(0, 1, 0), (1, 2, 6)])
def test_batches_windows_equal_rank_sequences(data_dir, rank, world, consumed):
    M, k = 4, 16
    want, _ = expected(one_source(data_dir), rank, world, consumed, M * k)
    bt = Batches(one_source(data_dir), rank, world, M, consumed=consumed, group_tokens=3 * M * (L + 1))
    assert bt.group == 3
    kept = []
    try:
        for step in range(k):
            if step % 2:
                x, y = next_batch(bt)
                assert x.shape == y.shape == (M, L) and x.dtype == y.dtype == torch.int32
                assert x.data_ptr() + 4 == y.data_ptr()  # views of one (M, L + 1) block
                assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                np.testing.assert_array_equal(x.numpy(), want[step * M : (step + 1) * M, :-1])
                np.testing.assert_array_equal(y.numpy(), want[step * M : (step + 1) * M, 1:])
                kept.append((step, x, y))
            else:
                t = bt.next_windows()
                assert t.shape == (M, L + 1) and t.dtype == torch.int32
                np.testing.assert_array_equal(t.numpy(), want[step * M : (step + 1) * M])
                if step % 4 == 0:
                    kept.append((step, t[:, :-1], t[:, 1:]))
        assert bt.consumed == consumed + k * M * world
    finally:
        bt.close()
    for step, x, y in kept:  # batches still held were never overwritten by later groups
        np.testing.assert_array_equal(x.numpy(), want[step * M : (step + 1) * M, :-1])
        np.testing.assert_array_equal(y.numpy(), want[step * M : (step + 1) * M, 1:])


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_batches_source_counts_follow_every_micro_batch(two_sets, rank, world):
    M, k = 3, 14
    want, sources = expected(two_source(two_sets), rank, world, 0, M * k)
    assert set(sources.tolist()) == {0, 1}
    bt = Batches(two_source(two_sets), rank, world, M, group_tokens=4 * M * (L + 1))
    assert bt.group == 4  # k = 1, 2, 3, 5, ... end inside a group; 4, 8, 12 at its end
    try:
        assert bt.source_counts.tolist() == [0, 0]
        for step in range(1, k + 1):
            t = bt.next_windows()
            np.testing.assert_array_equal(t.numpy(), want[(step - 1) * M : step * M])
            assert bt.source_counts.tolist() == np.bincount(sources[: step * M], minlength=2).tolist(), step
    finally:
        bt.close()
