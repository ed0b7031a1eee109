"""Export and generate never damage a checkpoint, read only checkpoints that
verify, and say what they cut: on the checkpoints of one real 2-process
ZeRO-3 run (steps 5 and 10, exported at the end), copied per test and then
damaged by truncating a file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import make_dataset, torchrun
from test_export import RUNS, rehash

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

MODEL_SHARD = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_safety")
    data = make_dataset(root, n_docs=160, docs_per_shard=8)
    run_dir = root / "run"
    r = torchrun(
        [
            f"run.dir={run_dir}",
            "data=webdataset",
            f"data.urls={data}",
            "data.seq_len=32",
            "trainer.micro_batch_size=4",
            "trainer.max_steps=10",
            "trainer.save_every=5",
            "trainer.log_every=5",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "logger=none",
            "trainer.peak_flops=1e11",
            "export.at_end=true",
            *RUNS["gpt2"],
        ],
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"exported to {run_dir}/hf" in r.stdout  # Run.finish's export, through the temporary folder
    return run_dir


@pytest.fixture
def own_run(run, tmp_path):
    """A copy of the run for one test to damage."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"megagpt.{module}", *map(str, args)], capture_output=True, text=True, timeout=180
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def exported(folder) -> dict[str, bytes]:
    """The files of an export but its record (which names the checkpoint's path)."""
    return {k: v for k, v in files_of(folder).items() if k != "megagpt_export.json"}


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_export_never_writes_into_a_checkpoint_or_the_checkpoints_folder(own_run):
    from megagpt.checkpoint import verify

    checkpoints = own_run / "checkpoints"
    ck = checkpoints / "step_10"
    before = files_of(own_run)
    # The command, verbatim: it truncated tokenizer.json to 0 bytes and exited 0.
    r = cli("export", "--checkpoint", ck, "--out", ck)
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_line(r.stderr)
    assert line == (
        f"megagpt.export: error: cannot export to {ck}: it is the megagpt checkpoint {ck}; "
        "an export is a folder of its own (e.g. <run.dir>/hf)"
    ), line
    refused = {
        ck / "hf": f"it is inside the megagpt checkpoint {ck}",
        checkpoints / "step_5": f"it is the megagpt checkpoint {checkpoints / 'step_5'}",
        checkpoints: f"it is the run's checkpoints folder {checkpoints}",
        checkpoints / "hf": f"it is inside the run's checkpoints folder {checkpoints}",
        checkpoints / "step_20": f"it is inside the run's checkpoints folder {checkpoints}",
        own_run: f"it holds the run's checkpoints folder {checkpoints}",
    }
    from megagpt.export import main

    for source in (ck, own_run):
        for out, why in refused.items():
            for overwrite in ([], ["--overwrite"]):  # --overwrite never replaces checkpoints
                r = _in_process(main, ["--checkpoint", str(source), "--out", str(out), *overwrite])
                assert r.returncode == 2, (source, out, r.stdout, r.stderr)
                line = one_line(r.stderr)
                assert line.startswith(f"megagpt.export: error: cannot export to {out}: ") and why in line, line
    assert files_of(own_run) == before  # nothing written, nothing changed
    assert verify(str(ck)) is None and leftovers(checkpoints) == [] and leftovers(own_run) == []


def _in_process(main, argv) -> subprocess.CompletedProcess:
    """main() in this process (a refusal loads nothing: seconds saved per case), its output captured."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def test_export_replaces_an_earlier_export_but_nothing_else(own_run, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(own_run / "hf", out)
    (out / "stale.txt").write_text("from an earlier export")  # a file this export does not write
    r = cli("export", "--checkpoint", own_run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert not (out / "stale.txt").exists()  # replaced whole, not written over
    assert exported(out) == exported(own_run / "hf")
    assert leftovers(tmp_path) == []

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = cli("export", "--checkpoint", own_run, "--out", mine)
    assert r.returncode == 2
    assert one_line(r.stderr) == (
        f"megagpt.export: error: cannot export to {mine}: it exists and is not a megagpt "
        "export (no megagpt_export.json); give a new or empty folder, or --overwrite "
        "to replace it"
    )
    assert files_of(mine) == {"notes.txt": b"keep me"}
    r = cli("export", "--checkpoint", own_run, "--out", mine, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert exported(mine) == exported(own_run / "hf")

    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    from megagpt.export import main

    assert _in_process(main, ["--checkpoint", str(own_run), "--out", str(empty)]).returncode == 0
    assert exported(empty) == exported(own_run / "hf")
    r = _in_process(main, ["--checkpoint", str(own_run), "--out", str(a_file), "--overwrite"])
    assert r.returncode == 2 and one_line(r.stderr).endswith(
        f"cannot export to {a_file}: it exists and is not a folder"
    )
    assert a_file.read_text() == "x" and leftovers(tmp_path) == []


def test_a_failed_export_leaves_the_existing_folder_untouched(own_run, tmp_path):
    out = tmp_path / "hf"
    r = cli("export", "--checkpoint", own_run / "checkpoints" / "step_5", "--out", out)
    assert r.returncode == 0, r.stderr
    before = files_of(out)
    # A checkpoint whose tokenizer is broken, its manifest made to agree (so that
    # it verifies): the export fails after the weights are written.
    old = tmp_path / "old" / "step_10"
    shutil.copytree(own_run / "checkpoints" / "step_10", old)
    (old / "tokenizer.json").write_text("{")
    rehash(old)
    r = cli("export", "--checkpoint", old, "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert one_line(r.stderr).startswith(f"megagpt.export: error: checkpoint {old}: cannot read tokenizer.json")
    assert files_of(out) == before and leftovers(tmp_path) == []


def test_a_damaged_newest_checkpoint_is_skipped_saying_why(own_run, tmp_path):
    checkpoints = own_run / "checkpoints"
    shard = checkpoints / "step_10" / MODEL_SHARD
    size = shard.stat().st_size
    truncate(shard, size * 2 // 3)  # torch.load: "OSError: [Errno 22] Invalid argument"
    before = files_of(checkpoints)
    said = (
        f"megagpt: checkpoint {checkpoints / 'step_10'} is damaged ({MODEL_SHARD} has {size * 2 // 3} bytes, "
        f"the manifest says {size} (truncated?)); using step_5"
    )
    for i, source in enumerate((own_run, checkpoints)):
        out = tmp_path / f"hf{i}"
        r = cli("export", "--checkpoint", source, "--out", out)
        assert r.returncode == 0, r.stderr
        assert one_line(r.stderr) == said
        assert r.stdout.strip() == f"exported {checkpoints / 'step_5'} to {out}"
        assert json.loads((out / "megagpt_export.json").read_text())["step"] == 5
    r = cli("generate", "--model", own_run, "--prompt", "doc 1: alpha", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert one_line(r.stderr) == said and r.stdout.startswith("doc 1: alpha")
    assert files_of(checkpoints) == before  # only read: setting it aside is training's job


def test_a_damaged_checkpoint_named_explicitly_stops_with_the_reason(own_run, tmp_path):
    ck = own_run / "checkpoints" / "step_10"
    truncate(ck / "rng_rank0.pt", 100)  # the weights are whole; the checkpoint is not
    r = cli("export", "--checkpoint", ck, "--out", tmp_path / "hf")
    assert r.returncode == 2, r.stdout + r.stderr
    assert one_line(r.stderr).startswith(
        f"megagpt.export: error: checkpoint {ck} is damaged: rng_rank0.pt has 100 bytes"
    )
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []
    r = cli("generate", "--model", ck, "--prompt", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert one_line(r.stderr).startswith(f"megagpt.generate: error: checkpoint {ck} is damaged: rng_rank0.pt")


def test_no_checkpoint_verifies_one_line_naming_each(own_run, tmp_path):
    checkpoints = own_run / "checkpoints"
    truncate(checkpoints / "step_10" / MODEL_SHARD, 0)
    truncate(checkpoints / "step_5" / "tokenizer.json", 0)
    for module, args in (("export", ["--out", tmp_path / "hf"]), ("generate", ["--prompt", "x"])):
        flag = "--checkpoint" if module == "export" else "--model"
        r = cli(module, flag, own_run, *args)
        assert r.returncode == 2, r.stdout + r.stderr
        line = one_line(r.stderr)
        assert line.startswith(
            f"megagpt.{module}: error: checkpoint {checkpoints}: no checkpoint here verifies "
            f"(step_10: {MODEL_SHARD} has 0 bytes"
        ), line
        assert "; step_5: tokenizer.json has 0 bytes" in line, line
    assert not (tmp_path / "hf").exists()


def test_generate_says_what_the_context_cuts(run):
    from megagpt.generate import generate, load

    model, tok, eod = load(str(run))
    assert model.cfg.max_seq_len == 32
    long_prompt = " ".join(["alpha beta gamma"] * 20)
    ids = tok.encode(long_prompt).ids
    assert len(ids) > 32
    r = cli("generate", "--model", run, "--prompt", long_prompt, "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert one_line(r.stderr) == (
        f"megagpt.generate: the prompt's {len(ids)} tokens leave no room in the model's "
        f"context of 32: dropped its first {len(ids) - 24} of {len(ids)}, kept the last "
        "24 (room for 8 new)"
    )
    shown = json.loads(one_line(r.stdout))
    assert shown["prompt_ids"] == ids[-24:] and shown["prompt_tokens_dropped"] == len(ids) - 24
    assert shown["ids"] == generate(model, ids[-24:], 8, stop=eod)

    # A prompt that fits, but not with all the new tokens asked for: the
    # generation ends where the context is full (it does not slide), and says so.
    short = tok.encode("the of").ids
    new = generate(model, short, 100, stop=eod)
    assert len(new) == 32 - len(short) and new[-1] != eod  # this prompt fills the context
    r = cli("generate", "--model", run, "--prompt", "the of", "--max-new-tokens", "100")
    assert r.returncode == 0, r.stderr
    assert one_line(r.stderr) == (
        f"megagpt.generate: stopped after {len(new)} of 100 new tokens: the model's context of 32 is full"
    )
