"""The input formats of megagpt.data.prepare: Parquet, JSONL.zst, webdataset tar shards of
text, and inputs given as http(s) URLs and pipe: commands (small files, CPU, offline)."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zstandard

import megagpt.data.prep_formats as prep_formats
import megagpt.data.prep_inputs as prep_inputs
from megagpt.data.prep_sources import as_inputs, format_of
from megagpt.data.prepare import main, prepare
from megagpt.data.tokenizer import load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    f"document {i}: "
    + " ".join(f"w{(i * 11 + j) % 37}" for j in range(i % 7 + 2))
    + (" h\u00e9llo \u4f60\u597d \U0001f600\n" if i % 5 == 0 else "")
    for i in range(60)
]
DOCS[7] = ""  # an empty document: every format skips it
TEXTS = [d for d in DOCS if d]


# ---------------------------------------------------------------- writers


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_zst(path: Path, texts: list[str], field: str = "text", frames: int = 3) -> Path:
    """Several zstd frames one after the other, as parallel compressors write them."""
    lines = [json.dumps({field: t}).encode() + b"\n" for t in texts]
    step = -(-len(lines) // frames)
    cz = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(cz.compress(b"".join(lines[i : i + step])) for i in range(0, len(lines), step)))
    return path


def write_parquet(path: Path, texts: list[str | None], field: str = "text", row_group_size: int = 7) -> Path:
    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=row_group_size)
    return path


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, texts: list[str], field: str = "text") -> Path:
    """webdataset samples in three layouts: a .txt member; a .json member holding the text;
    a .json of metadata *before* a .txt (the .txt is the document); and now and then a
    member of neither kind, or a sample of neither kind, which are skipped."""
    with tarfile.open(path, "w:gz" if path.name.endswith((".gz", ".tgz")) else "w") as tar:
        for i, text in enumerate(texts):
            key = f"shard/{i:06d}"
            if i % 3 == 0:
                _member(tar, f"{key}.txt", text.encode())
            elif i % 3 == 1:
                _member(tar, f"{key}.json", json.dumps({field: text, "url": f"u{i}"}).encode())
            else:
                _member(tar, f"{key}.json", json.dumps({"url": f"u{i}"}).encode())
                _member(tar, f"{key}.txt", text.encode())
            if i % 10 == 4:
                _member(tar, f"{key}.jpg", b"\xff\xd8 not text")
                _member(tar, f"shard/{i:06d}x.jpg", b"a sample without text")
    return path


WRITERS = {
    "x.parquet": write_parquet,
    "x.jsonl.zst": write_zst,
    "x.tar": write_tar,
    "x.tar.gz": write_tar,
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXTS, vocab_size=300).save(str(path))
    return str(path)


def _shard_bytes(out: Path, m: dict) -> dict[str, bytes]:
    return {s["name"]: (out / s["name"]).read_bytes() for s in m["shards"] + m["val_shards"]}


def _decoded(out: Path, m: dict) -> list[str]:
    tok = load_tokenizer(str(out / m["tokenizer"]))
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    urls = [str(out / s["name"]) for s in m["shards"]]
    return [
        tok.decode(np.frombuffer(s["tokens"], dtype=dtype).tolist()) for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def _error(inputs: list, **kw) -> str:
    with pytest.raises(ValueError) as e:
        prepare([str(i) for i in inputs], kw.pop("out"), vocab_size=300, log=None, **kw)
    return str(e.value)


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


# ---------------------------------------------------------------- same documents as JSONL


@pytest.mark.parametrize("name", list(WRITERS))
def test_format_gives_the_jsonl_documents(tmp_path: Path, tokenizer: str, name: str) -> None:
    # A field other than "text", so --text-field is followed (the tar's .txt members need none).
    ref_in = write_jsonl(tmp_path / "ref.jsonl", DOCS, field="body")
    path = WRITERS[name](tmp_path / name, DOCS, field="body")
    kw = dict(tokenizer=tokenizer, docs_per_shard=8, text_field="body", log=None)
    ref = prepare([str(ref_in)], str(tmp_path / "ref"), **kw)
    m = prepare([str(path)], str(tmp_path / "out"), **kw)
    assert _decoded(tmp_path / "out", m) == TEXTS  # content and order
    assert m == ref and len(m["shards"]) == 8
    assert _shard_bytes(tmp_path / "out", m) == _shard_bytes(tmp_path / "ref", ref)


def test_tokenizer_trained_on_parquet_is_the_jsonl_one(tmp_path: Path) -> None:
    a = prepare([str(write_parquet(tmp_path / "a.parquet", DOCS))], str(tmp_path / "a"), vocab_size=300, log=None)
    b = prepare([str(write_jsonl(tmp_path / "b.jsonl", DOCS))], str(tmp_path / "b"), vocab_size=300, log=None)
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_parquet_is_read_in_batches_never_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_parquet(tmp_path / "x.parquet", DOCS, row_group_size=7)

    def whole(*a: object, **k: object) -> None:
        raise AssertionError("a whole Parquet file or row group read at once")

    for attr in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, attr, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(prep_formats, "PARQUET_BATCH_ROWS", 5)  # batches that straddle row groups
    units = list(prep_inputs.iter_units(as_inputs([path]), chunk=100))
    assert len(units) > 5 and not any(u.error for u in units)
    rows = [row for u in units for row, _ in u.data]
    assert rows == list(range(len(DOCS)))  # every row once, in order, whatever the cuts
    assert [t for u in units for t in prep_formats.unit_texts(u, "text")] == [(i, d) for i, d in enumerate(DOCS) if d]


# ---------------------------------------------------------------- workers, resume


@pytest.mark.parametrize("name", list(WRITERS))
def test_workers_give_identical_output(
    tmp_path: Path, tokenizer: str, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = WRITERS[name](tmp_path / name, DOCS)
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 200)  # many small tasks, so the pool interleaves them
    monkeypatch.setattr(prep_formats, "PARQUET_BATCH_ROWS", 5)
    assert len(list(prep_inputs.iter_tasks(prep_inputs.iter_units([path])))) > 6
    kw = dict(tokenizer=tokenizer, docs_per_shard=5, val_fraction=0.25, log=None)
    m1 = prepare([str(path)], str(tmp_path / "w1"), workers=1, **kw)
    m2 = prepare([str(path)], str(tmp_path / "w2"), workers=2, **kw)
    assert m1 == m2 and m1["val_shards"] and m1["documents"] + m1["val_documents"] == len(TEXTS)
    for f in ("manifest.json", "tokenizer.json", *_shard_bytes(tmp_path / "w1", m1)):
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f


@pytest.mark.parametrize("name", ["x.parquet", "x.jsonl.zst", "x.tar"])
def test_resume_after_interruption(tmp_path: Path, tokenizer: str, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    path = WRITERS[name](tmp_path / name, DOCS)
    kw = dict(tokenizer=tokenizer, docs_per_shard=4, val_docs=5, workers=1)
    ref = prepare([str(path)], str(tmp_path / "ref"), log=None, **kw)
    ref_bytes = _shard_bytes(tmp_path / "ref", ref)

    out = tmp_path / "o"
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 200)  # small tasks: shards get finished before the stop
    _Counter(monkeypatch, fail_after=25)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(path)], str(out), log=None, **kw)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    written = sorted(p.name for p in out.glob("*.tar"))
    assert 0 < len(written) < len(ref_bytes)
    monkeypatch.undo()

    counter = _Counter(monkeypatch)
    assert prepare([str(path)], str(out), log=None, **kw) == ref
    assert _shard_bytes(out, ref) == ref_bytes
    finished = {s["name"]: s["documents"] for s in ref["shards"] + ref["val_shards"]}
    assert counter.calls == len(TEXTS) - sum(finished[n] for n in written)  # finished shards not redone

    counter.calls = 0
    logs: list[str] = []
    assert prepare([str(path)], str(out), log=logs.append, **kw) == ref
    assert counter.calls == 0 and f"all {len(ref_bytes)} shards already complete in {out}" in logs


# ---------------------------------------------------------------- URLs and commands


@pytest.fixture
def served(tmp_path: Path):
    """A directory served over HTTP on 127.0.0.1 (HEAD gives Content-Length and Last-Modified)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _remote_corpus(root: Path) -> list[str]:
    write_parquet(root / "a.parquet", DOCS[:20])
    write_zst(root / "b.jsonl.zst", DOCS[20:35])
    write_tar(root / "c.tar", DOCS[35:50])
    (root / "d.txt").write_text(DOCS[50])
    with gzip.open(root / "e.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS[51:])
    return ["a.parquet", "b.jsonl.zst", "c.tar", "d.txt", "e.jsonl.gz"]


def test_http_inputs(tmp_path: Path, tokenizer: str, served, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    root, base = served
    names = _remote_corpus(root)
    kw = dict(tokenizer=tokenizer, docs_per_shard=6, val_docs=4, workers=1)
    local = prepare([str(root / n) for n in names], str(tmp_path / "local"), log=None, **kw)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the Parquet download goes
    (tmp_path / "tmp").mkdir()
    urls = [f"{base}/{n}" for n in reversed(names)]  # sorted like files: the order given does not matter
    out = tmp_path / "remote"
    m = prepare(urls, str(out), log=None, **kw)
    assert m == local and m["documents"] + m["val_documents"] == len(TEXTS) and m["val_documents"] == 4
    assert _shard_bytes(out, m) == _shard_bytes(tmp_path / "local", local)
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary copy of a.parquet is gone

    logs: list[str] = []
    assert prepare(urls, str(out), log=logs.append, **kw) == m  # same URLs, same HEAD metadata: nothing to do
    assert any("already complete" in line for line in logs)

    write_zst(root / "b.jsonl.zst", DOCS[20:36])  # the remote file changes: size and Last-Modified
    os.utime(root / "b.jsonl.zst", (1, 1))
    with pytest.raises(ValueError, match=rf"changed input {base}/b.jsonl.zst\); give --overwrite"):
        prepare(urls, str(out), log=None, **kw)
    logs.clear()
    m2 = prepare(urls, str(out), log=logs.append, overwrite=True, **kw)
    assert any(line.startswith(f"replacing the prepared dataset in {out}") for line in logs)
    assert m2["documents"] + m2["val_documents"] == m["documents"] + m["val_documents"] + 1

    missing = f"{base}/nope.jsonl.zst"
    assert _error([missing], out=str(tmp_path / "e1")).startswith(f"cannot read {missing}: HTTP Error 404")


def test_pipe_inputs(tmp_path: Path, tokenizer: str) -> None:
    zst = write_zst(tmp_path / "b.jsonl.zst", DOCS)
    parquet = write_parquet(tmp_path / "my file.parquet", DOCS)
    kw = dict(tokenizer=tokenizer, docs_per_shard=8, log=None)
    ref = prepare([str(write_jsonl(tmp_path / "ref.jsonl", DOCS))], str(tmp_path / "ref"), **kw)
    for i, spec in enumerate([f"pipe:cat {zst}", f"pipe:cat '{parquet}'"]):  # the format: the last word's ending
        m = prepare([spec], str(tmp_path / f"o{i}"), **kw)
        assert m == ref and _shard_bytes(tmp_path / f"o{i}", m) == _shard_bytes(tmp_path / "ref", ref)
    gone = tmp_path / "gone.jsonl.zst"
    assert _error([f"pipe:cat {gone}"], out=str(tmp_path / "e")) == (
        f"cannot read pipe:cat {gone}: the command exited with status 1"
    )


def test_format_of_names() -> None:
    cases = {
        "data/x.parquet": "parquet",
        "x.jsonl": "jsonl",
        "x.jsonl.gz": "jsonl",
        "x.jsonl.zst": "jsonl",
        "x.tar": "tar",
        "x.tar.gz": "tar",
        "x.tgz": "tar",
        "notes.md": "text",
        "X.JSONL": "text",
        "https://host/a/x.parquet?download=1": "parquet",
        "http://host/x.tar": "tar",
        "pipe:curl -s https://host/y.jsonl.zst": "jsonl",
        "pipe:curl -s 'https://host/y.jsonl.zst?sig=a b'": "jsonl",
        "pipe:curl -s https://host/y.jsonl.zst | zstd -d": "text",
        "pipe:cat 'my shard.tar'": "tar",
    }
    assert {spec: format_of(spec) for spec in cases} == cases


# ---------------------------------------------------------------- errors name the input and the position


def test_errors_name_input_and_position(tmp_path: Path, tokenizer: str) -> None:
    def err(path: Path, **kw) -> str:
        return _error([path], out=str(tmp_path / "out"), tokenizer=tokenizer, **kw)

    texts: list[str | None] = list(DOCS[:30])
    texts[17] = None
    p = write_parquet(tmp_path / "null.parquet", texts)
    assert err(p, workers=1) == f"{p}: row 17: field 'text' is null"
    assert err(p, workers=2) == f"{p}: row 17: field 'text' is null"  # the same from a worker process
    p = write_parquet(tmp_path / "body.parquet", DOCS, field="body")
    assert err(p) == f"{p}: no column 'text' (columns: id, body)"
    assert err(p, text_field="id") == f"{p}: column 'id' holds int64, not strings"
    p = tmp_path / "not.parquet"
    p.write_bytes(b"not parquet at all" * 10)
    assert err(p).startswith(f"cannot read {p}: ")

    lines = [json.dumps({"text": t}) + "\n" for t in DOCS]
    lines[41] = '{"text": oops}\n'
    p = tmp_path / "y.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress("".join(lines).encode()))
    assert err(p).startswith(f"{p}:42: malformed JSON line")
    whole = write_zst(tmp_path / "t.jsonl.zst", DOCS, frames=1).read_bytes()
    p.write_bytes(whole[: len(whole) // 2])
    assert err(p) == f"cannot read {p}: zstd data ended inside a frame (truncated file?)"

    p = tmp_path / "z.tar"
    with tarfile.open(p, "w") as tar:
        _member(tar, "000122.txt", b"fine")
        _member(tar, "000123.json", json.dumps({"content": "no text field"}).encode())
    assert err(p) == f"{p}: member 000123.json: missing field 'text'"
    with tarfile.open(p, "w") as tar:
        _member(tar, "000123.json", b"{not json")
    assert err(p).startswith(f"{p}: member 000123.json: malformed JSON")

    # megagpt's own output is a tar too, of .tokens members: not an input.
    shard = tmp_path / "prepared" / "shard-000000.tar"
    prepare([str(write_jsonl(tmp_path / "s.jsonl", DOCS))], str(shard.parent), tokenizer=tokenizer, log=None)
    assert err(shard) == (
        f"{shard}: no .txt or .json members to read text from (megagpt's own prepared "
        "shards hold .tokens: they are output, not input)"
    )


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts: list[str | None] = ["a", None]
    p = write_parquet(tmp_path / "n.parquet", texts)
    with pytest.raises(SystemExit) as e:
        main(["--input", str(p), "--output", str(tmp_path / "o"), "--vocab-size", "300", "--workers", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"megagpt.data.prepare: error: {p}: row 1: field 'text' is null\n"


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    p = write_parquet(tmp_path / "x.parquet", DOCS)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what an install without the extra gives
    with pytest.raises(SystemExit) as e:
        main(["--input", str(p), str(write_jsonl(tmp_path / "y.jsonl", DOCS)), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"megagpt.data.prepare: error: {p} needs pyarrow: pip install 'megagpt[parquet]'\n"
    )
    assert not (tmp_path / "o").exists()  # stopped before anything was written


# ---------------------------------------------------------------- bench


def test_bench_prepare_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.bench", "prepare", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for label in (
        "tokenizers encode_batch, 1 thread",
        "prepare --workers 1 (Parquet -> shards)",
        "prepare --workers 2 (Parquet -> shards)",
        "per worker",
        "vs encode_batch",
    ):
        assert label in r.stdout
    fig = json.loads(out.read_text())
    assert fig["identical_output"] is True and fig["tokens"] > 100_000 and fig["row_groups"] >= 1
    for w in (1, 2):
        rate = fig[f"prepare_w{w}_tokens_per_sec"]
        assert rate > 0 and abs(fig[f"prepare_w{w}_tokens_per_sec_per_worker"] - rate / w) < 1e-6
        assert (
            abs(fig[f"prepare_w{w}_per_worker_vs_encode_batch"] - rate / w / fig["encode_batch_tokens_per_sec"]) < 1e-9
        )
    assert fig["encode_batch_tokens_per_sec"] > 0
