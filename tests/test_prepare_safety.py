"""megagpt.data.prepare keeps its hands off what it did not make, and says what it did to
inputs that are not UTF-8 text: an output folder holding another dataset or other files,
an output inside the inputs (or inputs inside the output), binary and mis-encoded inputs."""

from __future__ import annotations

import gzip
import io
import py_compile
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import megagpt.data.prep_inputs as prep_inputs
import megagpt.data.prepare as prepare_mod
from megagpt.data.prepare import main, prepare, read_manifest
from megagpt.data.tokenizer import load_tokenizer

KW = dict(vocab_size=300, docs_per_shard=2, workers=1)


def _texts(root: Path, word: str, n: int = 6) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    texts = [f"{word} document {i}: " + f"{word} " * (i + 2) for i in range(n)]
    for i, t in enumerate(texts):
        (root / f"{i}.txt").write_text(t)
    return texts


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _decoded(out: Path, m: dict) -> list[str]:
    tok = load_tokenizer(str(out / m["tokenizer"]))
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    urls = [str(out / s["name"]) for s in m["shards"] + m["val_shards"]]
    return [
        tok.decode(np.frombuffer(s["tokens"], dtype=dtype).tolist()) for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def _refused(inputs: list, out: Path, **kw) -> str:
    with pytest.raises(ValueError) as e:
        prepare([str(i) for i in inputs], str(out), log=None, **{**KW, **kw})
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------- another dataset in the output folder


def test_dataset_from_other_inputs_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_texts = _texts(tmp_path / "a", "alpha")
    b_texts = _texts(tmp_path / "b", "beta", n=3)
    out = tmp_path / "out"
    prepare([str(tmp_path / "a")], str(out), log=None, **KW)
    before = _files(out)

    msg = _refused([tmp_path / "b"], out)
    assert msg.startswith(f"{out} holds a prepared dataset made from other inputs or settings (")
    assert f"3 new inputs (first: {tmp_path / 'b' / '0.txt'}), 6 inputs gone (first: " in msg and msg.endswith(
        "; give --overwrite (overwrite=True) to replace it"
    )
    a_texts[3] = "an edited document"
    (tmp_path / "a" / "3.txt").write_text(a_texts[3])
    assert "changed input " + str(tmp_path / "a" / "3.txt") in _refused([tmp_path / "a"], out)
    assert "docs_per_shard 2 -> 3" in _refused([tmp_path / "a"], out, docs_per_shard=3)
    assert "vocab_size 300 -> 400" in _refused([tmp_path / "a"], out, vocab_size=400)
    assert _files(out) == before  # nothing deleted, nothing rewritten

    # An unfinished one (no manifest yet) is kept just the same.
    (out / "manifest.json").unlink()
    before = _files(out)
    assert _refused([tmp_path / "b"], out).startswith(f"{out} holds a partly prepared dataset made from other")

    code, err = _cli(["--input", str(tmp_path / "b"), "--output", str(out), "--vocab-size", "300"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert (
        err.startswith(f"megagpt.data.prepare: error: {out} holds a partly prepared dataset") and "--overwrite" in err
    )
    assert _files(out) == before

    # With the flag it is replaced, and the log says so.
    logs: list[str] = []
    m = prepare([str(tmp_path / "b")], str(out), log=logs.append, overwrite=True, **KW)
    assert any(
        line.startswith(
            f"replacing the partly prepared dataset in {out} (made from other inputs or settings: 3 new inputs"
        )
        for line in logs
    ), logs
    assert sorted(_decoded(out, m)) == sorted(b_texts) and m == read_manifest(str(out))
    assert not (out / "shard-000002.tar").exists()  # the old run's third shard is gone, not left beside

    main(["--input", str(tmp_path / "a"), "--output", str(out), "--vocab-size", "300", "--overwrite"])
    assert sorted(_decoded(out, read_manifest(str(out)))) == sorted(a_texts)


def test_unrecorded_dataset_and_other_files_are_kept(tmp_path: Path) -> None:
    _texts(tmp_path / "a", "alpha")
    out = tmp_path / "out"
    prepare([str(tmp_path / "a")], str(out), log=None, **KW)
    (out / ".prepare_state.jsonl").unlink()  # e.g. copied without its hidden files
    before = _files(out)
    assert _refused([tmp_path / "a"], out) == (
        f"{out} holds a prepared dataset whose inputs are not recorded (no readable .prepare_state.jsonl); "
        "give --overwrite (overwrite=True) to replace it"
    )
    assert _files(out) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "val-000000.tar").write_text("not written by prepare, but named as if")
    assert _refused([tmp_path / "a"], mine) == (
        f"{mine} is not empty and holds no megagpt dataset (notes.txt, val-000000.tar); give --overwrite "
        "(overwrite=True) to write into it (only prepare's own files there are replaced)"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "val-000000.tar"]  # refused: nothing touched

    logs: list[str] = []
    m = prepare([str(tmp_path / "a")], str(mine), log=logs.append, overwrite=True, **KW)
    assert f"writing into {mine} beside other files (only prepare's own files there are replaced)" in logs
    assert (mine / "notes.txt").read_text() == "my notes" and m == read_manifest(str(mine))
    assert not (mine / "val-000000.tar").exists()  # prepare's own name: with the flag, replaced (no val split here)
    # A re-run of the same inputs is no longer a stranger's folder: nothing to do.
    logs.clear()
    assert prepare([str(tmp_path / "a")], str(mine), log=logs.append, **KW) == m
    assert any("already complete" in line for line in logs)


def test_unfinished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after some shards, or after training its tokenizer: other inputs are
    refused, the same ones continue. A run stopped before either (while the tokenizer
    trains, or on a bad input) holds nothing to lose: other inputs start over."""
    texts = _texts(tmp_path / "a", "alpha")
    b_texts = _texts(tmp_path / "b", "beta")
    out = tmp_path / "out"
    real, calls = prep_inputs.encode, [0]

    def encode(text: str) -> list[int]:
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt  # Ctrl-C after the first shard
        return real(text)

    monkeypatch.setattr(prep_inputs, "encode", encode)
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 30)  # a task a file: shards finish before the stop
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a")], str(out), log=None, **KW)
    monkeypatch.undo()
    assert (out / "shard-000000.tar").exists()
    before = _files(out)
    assert _refused([tmp_path / "b"], out).startswith(f"{out} holds a partly prepared dataset made from other")
    assert _files(out) == before
    logs: list[str] = []
    m = prepare([str(tmp_path / "a")], str(out), log=logs.append, **KW)
    assert "resuming after 1 finished shards, 0 validation" in logs and sorted(_decoded(out, m)) == sorted(texts)

    out = tmp_path / "trained"
    calls[0] = 3  # the next encode stops it: Ctrl-C once the tokenizer is trained, before the first shard
    monkeypatch.setattr(prep_inputs, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a")], str(out), log=None, **KW)
    monkeypatch.undo()
    assert (out / "tokenizer.json").exists() and not list(out.glob("*.tar"))
    assert _refused([tmp_path / "b"], out).startswith(f"{out} holds a partly prepared dataset made from other")

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the tokenizer trains: before any shard

    out = tmp_path / "out2"
    monkeypatch.setattr(prepare_mod, "train_bpe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "a")], str(out), log=None, **KW)
    monkeypatch.undo()
    logs.clear()
    m = prepare([str(tmp_path / "b")], str(out), log=logs.append, **KW)
    assert any(
        line.startswith(f"the unfinished run in {out} wrote no shards (other inputs or settings: ")
        and line.endswith("): starting over")
        for line in logs
    ), logs
    assert sorted(_decoded(out, m)) == sorted(b_texts)


# ---------------------------------------------------------------- output and inputs apart


def test_output_inside_inputs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    _texts(src, "alpha")
    inner = src / "prepared"
    assert _refused([src], inner) == (
        f"the output folder {inner} is inside the input folder {src}; choose an output folder outside the inputs"
    )
    assert not inner.exists()
    assert _refused([src], src) == (
        f"the output folder {src} is the input folder {src}; choose an output folder outside the inputs"
    )
    # A glob whose folders would be walked: refused on the first run already, not only once the output exists.
    pattern = str(tmp_path / "*")
    assert _refused([pattern], tmp_path / "prepared") == (
        f"the input {pattern} reaches into the output folder {tmp_path / 'prepared'}; "
        "choose an output folder outside the inputs"
    )
    assert not (tmp_path / "prepared").exists()
    assert sorted(p.name for p in src.iterdir()) == sorted(f"{i}.txt" for i in range(6))

    # An input inside the output folder: the output's own shards as input.
    out = tmp_path / "out"
    prepare([str(src)], str(out), log=None, **KW)
    before = _files(out)
    shard = out / "shard-000000.tar"
    assert _refused([src, shard], out) == (
        f"the input {shard} is inside the output folder {out}; choose an output folder outside the inputs"
    )
    assert _files(out) == before

    code, err = _cli(["--input", str(src), "--output", str(inner)], capsys)
    assert code == 2 and err == (
        f"megagpt.data.prepare: error: the output folder {inner} is inside the input "
        f"folder {src}; choose an output folder outside the inputs\n"
    )


# ---------------------------------------------------------------- inputs that are not text

LATIN1 = "Latin-1 text: caf\u00e9 and na\u00efve; the rest is plain ASCII. " + "words " * 40


def _pyc(tmp_path: Path) -> bytes:
    src = tmp_path / "mod.py"
    src.write_text("def f(x):\n    return x * 2\n")
    return Path(py_compile.compile(str(src), cfile=str(tmp_path / "mod.pyc"))).read_bytes()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _mixed_corpus(root: Path, pyc: bytes) -> list[str]:
    """Text and non-text inputs; returns the documents expected in the shards."""
    root.mkdir()
    (root / "good.txt").write_text("a plain text document")
    noise = random.Random(0).randbytes(4096)
    assert b"\0" in noise
    (root / "random.bin").write_bytes(noise)
    (root / "module.txt").write_bytes(pyc)  # a .pyc named .txt
    (root / "latin1.txt").write_bytes(LATIN1.encode("latin-1"))  # 2 bytes that are not UTF-8
    (root / "cyrillic.txt").write_bytes(("\u041f\u0440\u0438\u0432\u0435\u0442 " * 30).encode("cp1251"))
    (root / "d.jsonl").write_bytes(b'{"text": "fine json"}\n{"text": "a stray \xff byte"}\n')
    with tarfile.open(root / "t.tar", "w") as tar:
        _member(tar, "000000.txt", pyc)
        _member(tar, "000001.txt", b"a tar member of text")
        _member(tar, "000002.txt", "member caf\u00e9 ".encode("latin-1") + b"more words " * 5)
    return [
        "a plain text document",
        LATIN1.replace("\u00e9", "\ufffd").replace("\u00ef", "\ufffd"),
        "fine json",
        "a stray \ufffd byte",
        "a tar member of text",
        "member caf\ufffd " + "more words " * 5,
    ]


def test_non_text_inputs_are_skipped_and_replacements_counted(tmp_path: Path) -> None:
    src = tmp_path / "in"
    expected = _mixed_corpus(src, _pyc(tmp_path))
    logs: list[str] = []
    m = prepare([str(src)], str(tmp_path / "out"), log=logs.append, **KW)
    assert sorted(_decoded(tmp_path / "out", m)) == sorted(expected)

    warnings = [line for line in logs if line.startswith("warning: ")]
    skipped = {
        line.removeprefix("warning: skipping ").split(": ")[0]
        for line in warnings
        if line.startswith("warning: skipping ")
    }
    assert skipped == {str(src / "random.bin"), str(src / "module.txt"), str(src / "cyrillic.txt"), str(src / "t.tar")}
    assert f"warning: skipping {src / 'random.bin'}: not UTF-8 text (a NUL byte in its first 8 KiB)" in warnings
    assert (
        f"warning: skipping {src / 't.tar'}: member 000000.txt: not UTF-8 text (a NUL byte in its first 8 KiB)"
        in warnings
    )
    assert any(
        line.startswith(f"warning: skipping {src / 'cyrillic.txt'}: not UTF-8 text (")
        and "invalid UTF-8 sequences in its first 210 bytes)" in line
        for line in warnings
    ), warnings
    for name, n in (("latin1.txt", 2), ("d.jsonl", 1), ("t.tar", 1)):
        assert [w for w in warnings if w.startswith(f"warning: {src / name}: ")] == [
            f"warning: {src / name}: {n} invalid UTF-8 sequence{'s' if n > 1 else ''} replaced with U+FFFD"
        ]
    assert len(warnings) == 4 + 3
    done = next(line for line in logs if line.startswith("done: "))
    assert "; 4 documents skipped as not UTF-8 text; 4 invalid UTF-8 sequences replaced in 3 files" in done
    assert m["skipped_not_text"] == 4 and m["replaced_chars"] == 4

    # Only non-text inputs: the error says why there is nothing.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(_pyc(tmp_path))
    assert _refused([bad], tmp_path / "o2") == f"no non-empty documents in inputs (1 skipped as not UTF-8 text): {bad}"


# Stops in the text files, inside the JSONL (a unit straddles the resume point), and with a
# validation split that has a finished shard (the resume point is the lower of the two).
@pytest.mark.parametrize(("fail_after", "val_docs"), [(5, 0), (13, 0), (19, 3)])
def test_counts_survive_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_after: int, val_docs: int
) -> None:
    """A resumed run reports the same counts as an uninterrupted one: none lost, none counted twice."""
    src = tmp_path / "in"
    src.mkdir()
    pyc = _pyc(tmp_path)
    for i in range(6):
        (src / f"{i}-a.txt").write_bytes(f"text {i} caf\u00e9 ".encode("latin-1") + b"plain words " * 4)
        (src / f"{i}-b.txt").write_bytes(pyc)
    with gzip.open(src / "z.jsonl.gz", "wb") as f:  # several units, so one straddles the resume point
        f.writelines(b'{"text": "line %d caf\xe9 and words"}\n' % i for i in range(16))
    kw = dict(vocab_size=300, docs_per_shard=2, val_docs=val_docs, workers=1)
    ref = prepare([str(src)], str(tmp_path / "ref"), log=None, **kw)
    assert ref["skipped_not_text"] == 6 and ref["replaced_chars"] == 22

    out = tmp_path / "o"
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 60)
    real, calls = prep_inputs.encode, [0]

    def encode(text: str) -> list[int]:
        calls[0] += 1
        if calls[0] > fail_after:
            raise KeyboardInterrupt
        return real(text)

    monkeypatch.setattr(prep_inputs, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], str(out), log=None, **kw)
    assert list(out.glob("*.tar"))
    monkeypatch.undo()
    monkeypatch.setattr(prep_inputs, "CHUNK_BYTES", 120)  # other cuts: 4 lines a unit, so one straddles
    logs: list[str] = []
    assert prepare([str(src)], str(out), log=logs.append, **kw) == ref
    assert any(line.startswith("resuming after") for line in logs)
    assert len([w for w in logs if w.startswith(f"warning: {src / 'z.jsonl.gz'}: ")]) == 1
    assert f"warning: {src / 'z.jsonl.gz'}: 16 invalid UTF-8 sequences replaced with U+FFFD" in logs
