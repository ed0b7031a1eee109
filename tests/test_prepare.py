"""Tests for megagpt.data.prepare / tokenizer / embedded (small synthetic inputs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import megagpt.data.embedded as embedded
from megagpt.data.embedded import ensure_embedded, stdlib_files
from megagpt.data.prepare import prepare, read_manifest
from megagpt.data.tokenizer import EOD_TOKEN, eod_id, load_tokenizer, token_dtype, train_bpe

REPO = Path(__file__).resolve().parents[1]

TXT_DOCS = {
    "a/one.txt": "The quick brown fox jumps over the lazy dog.\nSecond line.\n",
    "a/two.md": "# Title\n\nUnicode: h\u00e9llo w\u00f6rld \u2014 \u4f60\u597d \U0001f600\r\nand a literal "
    + EOD_TOKEN
    + " inside.",
}
JSONL_DOCS = ["def f(x):\n    return x * 2\n", "", 'Another document, with "quotes" and tabs\t.']
GZ_DOCS = ["gzip document number one", "gzip document number two " * 20]


def _make_corpus(root: Path) -> list[str]:
    """Write the synthetic inputs; returns the non-empty documents in expected order."""
    for rel, text in TXT_DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode())
    (root / "a" / "empty.txt").write_text("")  # skipped: empty document
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(JSONL_DOCS)))
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in GZ_DOCS)
    return [*TXT_DOCS.values(), *[t for t in JSONL_DOCS if t], *GZ_DOCS]


def _read_docs(out: Path, manifest: dict) -> list[tuple[str, np.ndarray]]:
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return [(s["__key__"], np.frombuffer(s["tokens"], dtype=dtype)) for s in wds.WebDataset(urls, shardshuffle=False)]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "in"
    root.mkdir()
    return root, _make_corpus(root)


def test_prepare_roundtrip(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    out = tmp_path / "out"
    m = prepare([str(root)], str(out), vocab_size=300, docs_per_shard=3, log=None)

    assert m == read_manifest(str(out))
    assert m["format"] == "megagpt-shards" and m["version"] == 1 and m["dtype"] == "uint16"
    tok = load_tokenizer(str(out / m["tokenizer"]))
    assert m["vocab_size"] == tok.get_vocab_size() and m["eod_id"] == eod_id(tok) == tok.token_to_id(EOD_TOKEN)

    samples = _read_docs(out, m)
    assert [k for k, _ in samples] == [f"{i:09d}" for i in range(len(docs))]
    assert [tok.decode(ids.tolist()) for _, ids in samples] == docs  # content and order
    # The literal EOD text inside a document is stored as ordinary text, not as the EOD id.
    assert all(m["eod_id"] not in ids for _, ids in samples)

    assert m["documents"] == len(docs) == sum(s["documents"] for s in m["shards"])
    assert m["tokens"] == sum(len(ids) for _, ids in samples) == sum(s["tokens"] for s in m["shards"])
    for shard in m["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        # Byte for byte what webdataset's own writer makes of the same samples.
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0) as w:
            for s in wds.WebDataset([str(out / shard["name"])], shardshuffle=False):
                w.write({"__key__": s["__key__"], "tokens": s["tokens"]})
        assert buf.getvalue() == data
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".prepare_state.jsonl", "manifest.json", "tokenizer.json", *(s["name"] for s in m["shards"])]
    )
    assert m["val_shards"] == [] and m["val_documents"] == m["val_tokens"] == 0


def test_prepare_is_deterministic(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    a = prepare([str(root)], str(tmp_path / "a"), vocab_size=300, log=None)
    b = prepare([str(root / "*")], str(tmp_path / "b"), vocab_size=300, log=None)  # glob spelling
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_shard_limits(tmp_path: Path) -> None:
    docs = [f"document {i}: " + "word " * (i * 7 % 23 + 1) for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    m = prepare(
        [str(tmp_path / "d.jsonl")], str(tmp_path / "o1"), vocab_size=280, docs_per_shard=3, text_field="body", log=None
    )
    assert [s["documents"] for s in m["shards"]] == [3, 3, 3, 1]

    doc_bytes = [ids.nbytes for _, ids in _read_docs(tmp_path / "o1", m)]
    limit = 2 * max(doc_bytes)  # every doc fits, so every shard must stay within the limit
    m = prepare(
        [str(tmp_path / "d.jsonl")],
        str(tmp_path / "o2"),
        vocab_size=280,
        shard_bytes=limit,
        text_field="body",
        log=None,
    )
    sizes = [s["tokens"] * 2 for s in m["shards"]]
    assert len(m["shards"]) > 1 and max(sizes) <= limit
    assert min(a + b for a, b in zip(sizes, sizes[1:])) > limit  # ...and no shard was closed early
    assert m["documents"] == 10


def test_malformed_jsonl(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2"):
        prepare([str(bad)], str(tmp_path / "out"), log=None)

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a"}\n\n{"content": "b"}\n')
    with pytest.raises(ValueError, match=rf"{missing}:3: missing field 'text'"):
        prepare([str(missing)], str(tmp_path / "out"), log=None)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.data.prepare", "--input", str(bad), "--output", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megagpt.data.prepare: error: ") and f"{bad}:2" in lines[0]
    assert not (tmp_path / "cli" / "manifest.json").exists()


def test_cli_success(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.data.prepare",
            "--input",
            str(root / "a"),
            str(root / "*.jsonl*"),
            "--output",
            str(out),
            "--vocab-size",
            "300",
            "--docs-per-shard",
            "2",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    m = read_manifest(str(out))
    assert m["documents"] == len(docs) and len(m["shards"]) == 3
    assert "tokens" in r.stdout


def test_existing_tokenizer(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    tok = train_bpe(["some unrelated training text for the tokenizer"] * 10, vocab_size=270)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))

    out = tmp_path / "out"
    m = prepare([str(root)], str(out), tokenizer=str(tok_dir), log=None)
    assert m["vocab_size"] == tok.get_vocab_size()
    got = [ids.tolist() for _, ids in _read_docs(out, m)]
    assert got[0] == tok.encode(docs[0], add_special_tokens=False).ids
    # prepare() encodes special-token strings found in documents as plain text.
    tok.encode_special_tokens = True
    assert got == [tok.encode(d, add_special_tokens=False).ids for d in docs]


def test_tokenizer_helpers(tmp_path: Path) -> None:
    a = train_bpe(["hello hello world", "more words here"], vocab_size=280)
    b = train_bpe(["hello hello world", "more words here"], vocab_size=280)
    assert a.to_str() == b.to_str()
    assert a.token_to_id(EOD_TOKEN) == eod_id(a)
    # Every byte is encodable and decodes back.
    text = "\x00\x7f \u00ff \U0001f600"
    assert a.decode(a.encode(text).ids) == text

    with pytest.raises(ValueError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "megagpt-shards", "version": 1}))
    with pytest.raises(ValueError, match=r"manifest\.json: missing key 'dtype'"):
        read_manifest(str(tmp_path))


# ---------------------------------------------------------------- scale: workers, validation split, resume

import megagpt.data.prep_inputs as prep_inputs  # noqa: E402
import megagpt.data.prepare as prepare_mod  # noqa: E402

MANY_DOCS = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 31}" for j in range(i % 9 + 3)) for i in range(48)]


def _many_corpus(root: Path) -> list[str]:
    """48 distinct documents over text, JSONL and JSONL.gz files; returns them in input order."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (root / f"a{i}.txt").write_text(MANY_DOCS[i])
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in MANY_DOCS[8:30]))
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in MANY_DOCS[30:])
    return MANY_DOCS


def _decoded(out: Path, m: dict, key: str = "shards") -> list[str]:
    tok = load_tokenizer(str(out / m["tokenizer"]))
    return [tok.decode(ids.tolist()) for _, ids in _read_docs(out, {**m, "shards": m[key]})]


def _shard_bytes(out: Path, m: dict) -> dict[str, bytes]:
    return {s["name"]: (out / s["name"]).read_bytes() for s in m["shards"] + m["val_shards"]}


class _Counter:
    """Wraps prep_inputs.encode (in-process, workers=1) to count tokenized documents."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after
        self._encode = prep_inputs.encode
        monkeypatch.setattr(prep_inputs, "encode", self)

    def __call__(self, text: str) -> list[int]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        self.calls += 1
        return self._encode(text)


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object, **k: object) -> None:
        raise AssertionError("tokenizer trained again")

    monkeypatch.setattr(prepare_mod, "train_bpe", fail)


def test_workers_give_identical_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _many_corpus(tmp_path / "in")
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 200)  # many small tasks, so the pool interleaves them
    files = prepare_mod.find_inputs([str(tmp_path / "in")])
    assert len(list(prep_inputs.iter_tasks(prep_inputs.iter_units(files)))) > 6
    kw = dict(vocab_size=300, docs_per_shard=5, val_fraction=0.2, log=None)
    m1 = prepare([str(tmp_path / "in")], str(tmp_path / "w1"), workers=1, **kw)
    m2 = prepare([str(tmp_path / "in")], str(tmp_path / "w2"), workers=2, **kw)
    assert m1 == m2 and m1["val_shards"]
    for name in ("manifest.json", "tokenizer.json", *_shard_bytes(tmp_path / "w1", m1)):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.parametrize("split", [{"val_fraction": 0.25}, {"val_docs": 7}])
def test_validation_split(tmp_path: Path, split: dict) -> None:
    docs = _many_corpus(tmp_path / "in")
    m = prepare([str(tmp_path / "in")], str(tmp_path / "o"), vocab_size=300, docs_per_shard=4, log=None, **split)
    assert m == read_manifest(str(tmp_path / "o"))
    train, val = _decoded(tmp_path / "o", m), _decoded(tmp_path / "o", m, "val_shards")
    assert len(val) == m["val_documents"] == sum(s["documents"] for s in m["val_shards"])
    assert len(train) == m["documents"] and m["documents"] + m["val_documents"] == len(docs)
    assert m["val_tokens"] == sum(s["tokens"] for s in m["val_shards"])
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]  # input order
    assert [s["name"] for s in m["val_shards"]] == [f"val-{i:06d}.tar" for i in range(len(m["val_shards"]))]
    if "val_docs" in split:
        assert len(val) == 7
    else:
        assert 4 <= len(val) <= 20  # about a quarter of 48
    # Deterministic: same options -> same split; another seed -> another split.
    again = prepare([str(tmp_path / "in")], str(tmp_path / "o2"), vocab_size=300, docs_per_shard=4, log=None, **split)
    assert again == m
    other = prepare(
        [str(tmp_path / "in")], str(tmp_path / "o3"), vocab_size=300, docs_per_shard=4, log=None, seed=1, **split
    )
    assert set(_decoded(tmp_path / "o3", other, "val_shards")) != set(val)


def test_validation_split_errors(tmp_path: Path) -> None:
    _many_corpus(tmp_path / "in")
    with pytest.raises(ValueError, match="not both"):
        prepare([str(tmp_path / "in")], str(tmp_path / "o"), val_fraction=0.1, val_docs=3, log=None)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(tmp_path / "in")], str(tmp_path / "o"), val_fraction=1.0, log=None)
    with pytest.raises(ValueError, match="val_docs=48 leaves no training documents"):
        prepare([str(tmp_path / "in")], str(tmp_path / "o"), vocab_size=300, val_docs=48, log=None)


def test_rerun_on_complete_output_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _many_corpus(tmp_path / "in")
    kw = dict(vocab_size=300, docs_per_shard=4, val_docs=5, workers=1)
    m = prepare([str(tmp_path / "in")], str(tmp_path / "o"), log=None, **kw)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    _no_training(monkeypatch)
    counter = _Counter(monkeypatch)
    logs: list[str] = []
    assert prepare([str(tmp_path / "in")], str(tmp_path / "o"), log=logs.append, **kw) == m
    n = len(m["shards"]) + len(m["val_shards"])
    assert counter.calls == 0 and f"all {n} shards already complete in {tmp_path / 'o'}" in logs
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == before  # nothing rewritten


def test_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _many_corpus(tmp_path / "in")
    kw = dict(vocab_size=300, docs_per_shard=4, val_docs=5, workers=1, log=None)
    ref = prepare([str(tmp_path / "in")], str(tmp_path / "ref"), **kw)
    ref_bytes = _shard_bytes(tmp_path / "ref", ref)
    assert len(ref["shards"]) >= 8

    # Damage a finished run: no manifest, the last 2 shards gone, a third corrupted (same size).
    out = tmp_path / "o"
    m = prepare([str(tmp_path / "in")], str(out), **kw)
    assert m == ref
    (out / "manifest.json").unlink()
    for s in m["shards"][-2:]:
        (out / s["name"]).unlink()
    hurt = out / m["shards"][-3]["name"]
    data = bytearray(hurt.read_bytes())
    data[600] ^= 0xFF
    hurt.write_bytes(bytes(data))
    _no_training(monkeypatch)  # the tokenizer of the first run is reused
    counter = _Counter(monkeypatch)
    assert prepare([str(tmp_path / "in")], str(out), **kw) == ref
    assert _shard_bytes(out, ref) == ref_bytes
    # Only the documents of the 3 redone shards were tokenized again.
    assert counter.calls == sum(s["documents"] for s in ref["shards"][-3:])
    monkeypatch.undo()

    # A real interruption (Ctrl-C) in the middle of a fresh run, then the same call again.
    out = tmp_path / "o2"
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 200)  # small tasks: shards get finished before the stop
    _Counter(monkeypatch, fail_after=20)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "in")], str(out), **kw)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    written = sorted(p.name for p in out.glob("*.tar"))
    assert 0 < len(written) < len(ref["shards"]) + len(ref["val_shards"])
    monkeypatch.undo()
    _no_training(monkeypatch)
    counter = _Counter(monkeypatch)
    assert prepare([str(tmp_path / "in")], str(out), **kw) == ref
    assert _shard_bytes(out, ref) == ref_bytes
    # The documents of the shards finished before the interruption were not tokenized again.
    finished = {s["name"]: s["documents"] for s in ref["shards"] + ref["val_shards"]}
    assert counter.calls == 48 - sum(finished[name] for name in written)


def test_changed_input_or_options_start_over_with_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _many_corpus(tmp_path / "in")
    out = tmp_path / "o"
    m = prepare([str(tmp_path / "in")], str(out), vocab_size=300, docs_per_shard=4, log=None)
    with open(tmp_path / "in" / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "a new document"}) + "\n")
    with pytest.raises(ValueError, match=rf"changed input {tmp_path / 'in' / 'b.jsonl'}\); give --overwrite"):
        prepare([str(tmp_path / "in")], str(out), vocab_size=300, docs_per_shard=4, log=None)
    logs: list[str] = []
    m2 = prepare([str(tmp_path / "in")], str(out), vocab_size=300, docs_per_shard=4, log=logs.append, overwrite=True)
    assert any(line.startswith(f"replacing the prepared dataset in {out}") for line in logs)
    assert any("training" in line for line in logs)
    assert m2["documents"] == m["documents"] + 1 and "a new document" in _decoded(out, m2)

    m3 = prepare([str(tmp_path / "in")], str(out), vocab_size=300, docs_per_shard=100, log=None, overwrite=True)
    assert len(m3["shards"]) == 1 and m3["documents"] == len(docs) + 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["shard-000000.tar"]  # old shards removed


def test_unreadable_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    bad = src / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=rf"cannot read {bad}: Not a gzipped file"):
        prepare([str(src)], str(tmp_path / "o1"), log=None)
    whole = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(2000)))
    bad.write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"cannot read {bad}: Compressed file ended"):
        prepare([str(src)], str(tmp_path / "o2"), log=None, tokenizer=None)
    bad.write_bytes(whole[:20] + b"\xff" * 50 + whole[70:])  # corrupt deflate stream
    with pytest.raises(ValueError, match=rf"cannot read {bad}: "):
        prepare([str(src)], str(tmp_path / "o3"), log=None)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.data.prepare",
            "--input",
            str(src / "*.*"),
            "--output",
            str(tmp_path / "cli"),
            "--val-docs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megagpt.data.prepare: error: cannot read {bad}: "), r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path: Path) -> None:
    locked = tmp_path / "in" / "locked.txt"
    locked.parent.mkdir()
    locked.write_text("secret")
    locked.chmod(0)
    with pytest.raises(ValueError, match=rf"cannot read {locked}: .*Permission denied"):
        prepare([str(locked.parent)], str(tmp_path / "o"), tokenizer=None, log=None)


def test_progress_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    _many_corpus(tmp_path / "in")
    for stream, tty in ((Tty(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        m = prepare([str(tmp_path / "in")], str(tmp_path / f"o{tty}"), vocab_size=300, log=None, progress=True)
        text = stream.getvalue()
        final = f"files 10/10 | docs {m['documents']:,} | tokens {m['tokens']:,}"
        if tty:  # redrawn in place, then erased
            assert final in text and "\n" not in text and text.endswith("\r\x1b[K")
        else:
            assert text.splitlines()[-1].startswith(final) and "\r" not in text


# ---------------------------------------------------------------- embedded corpus

EMB_MAX_BYTES = 1_000_000
EMB_VOCAB = 512


def _emb_docs_per_shard() -> int:
    n = sum(1 for p in stdlib_files(EMB_MAX_BYTES) if p.stat().st_size > 0) - 16  # 16 go to validation
    assert n >= 16, "stdlib too small for this test's max_bytes"
    return n // 16  # ceil(n / (n // 16)) >= 16 shards


def test_stdlib_files() -> None:
    files = stdlib_files(EMB_MAX_BYTES)
    assert files == stdlib_files(EMB_MAX_BYTES)
    assert files and all(p.suffix == ".py" for p in files)
    assert sum(p.stat().st_size for p in files) <= EMB_MAX_BYTES
    excluded = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    assert not any(excluded & set(p.parts) for p in stdlib_files(10**12))


def test_ensure_embedded_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dps = _emb_docs_per_shard()
    d = ensure_embedded(str(tmp_path), vocab_size=EMB_VOCAB, max_bytes=EMB_MAX_BYTES, docs_per_shard=dps, log=None)
    m = read_manifest(str(d))
    assert d.parent == tmp_path and d.name.startswith("embedded-") and len(m["shards"]) >= 16
    assert m["val_documents"] == 16 and m["val_shards"]
    mtime = (d / "manifest.json").stat().st_mtime_ns

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("prepared again")

    monkeypatch.setattr(embedded, "prepare", fail)
    again = ensure_embedded(str(tmp_path), vocab_size=EMB_VOCAB, max_bytes=EMB_MAX_BYTES, docs_per_shard=dps, log=None)
    assert again == d and (d / "manifest.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name, d.name + ".lock"]  # no temp dir left


def test_ensure_embedded_too_few_shards(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need >= 16"):
        ensure_embedded(str(tmp_path), vocab_size=EMB_VOCAB, max_bytes=EMB_MAX_BYTES, docs_per_shard=1000, log=None)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # neither a result nor a temp dir


def test_ensure_embedded_concurrent(tmp_path: Path) -> None:
    code = (
        "import sys; from megagpt.data.embedded import ensure_embedded; "
        f"d = ensure_embedded(sys.argv[1], vocab_size={EMB_VOCAB}, max_bytes={EMB_MAX_BYTES}, "
        f"docs_per_shard={_emb_docs_per_shard()}, log=lambda s: print('LOG', s)); print('RESULT', d)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    results = {line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT ")}
    assert len(results) == 1
    preparers = [out for out, _ in outs if "LOG preparing the embedded" in out]
    assert len(preparers) == 1  # the lock made the other process wait and reuse the result
    d = Path(results.pop())
    m = read_manifest(str(d))
    assert len(m["shards"]) >= 16 and all((d / s["name"]).is_file() for s in m["shards"])
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [d.name]
