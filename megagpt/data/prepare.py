"""Turn text / JSONL / Parquet / webdataset tar files into webdataset tar shards of pre-tokenized documents.

    python -m megagpt.data.prepare --input corpus/ more.jsonl.gz --output data/mycorpus --val-fraction 0.01
    python -m megagpt.data.prepare --input https://host/fineweb-000.parquet 'pipe:curl -s https://host/x.jsonl.zst' ...

Inputs are read by their name's ending: ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (a
document per line: ``--text-field`` of its object), ``.parquet`` (a document per row:
the ``--text-field`` column; needs pyarrow), ``.tar`` / ``.tar.gz`` / ``.tgz``
(webdataset samples: the ``.txt`` member, else the ``--text-field`` of the ``.json``
member), anything else a whole file as one document. An input may be an ``http(s)://``
URL or a ``pipe:COMMAND`` (its format: the ending of the command's last word); see
``prep_formats`` and ``prep_sources``.

Each sample holds one document's token ids (no EOD; the reader appends it). The
directory is complete once ``manifest.json`` exists: it is written last, and every
shard is written under a ``.tmp`` name first, so an interrupted run never leaves
output that looks finished. Running the same command again keeps the shards that
are finished (``.prepare_state.jsonl`` records them) and continues after them.

The output folder is prepare's alone: it refuses one that holds a dataset made from
other inputs or settings (finished, or with finished shards or a trained tokenizer, or
one whose inputs are not recorded), or other files, unless ``--overwrite`` is given; even
then only prepare's own files there (``manifest.json``, ``.prepare_state.jsonl``,
``tokenizer.json``, ``shard-NNNNNN.tar``, ``val-NNNNNN.tar``) are replaced or removed,
never anything else. A run that stopped before making either is simply started over.
It refuses an output folder inside an input folder and an input inside the output
folder, flag or not.

Inputs that are not UTF-8 text are skipped with a warning, and bytes that are not UTF-8
in the text kept are replaced and counted per input (see ``prep_formats``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from megagpt.atomic import sha256_file, write_text
from megagpt.data.prep_inputs import (
    CHUNK_BYTES,
    Job,
    Pool,
    check_apart,
    cpu_count,
    find_inputs,
    iter_documents,
    val_threshold,
)
from megagpt.data.prep_progress import Progress, clearing
from megagpt.data.prep_sources import Input, as_inputs, check_readers, identity
from megagpt.data.shards import DATASET_MANIFEST, FORMAT, VERSION, check_manifest
from megagpt.data.shardwriter import (
    SPLITS,
    STATE_FILE,
    State,
    Tally,
    manifest_entry,
    other_entries,
    plural,
    remove_outputs,
    shard_ok,
    write_shards,
)
from megagpt.data.tokenizer import TOKENIZER_FILE, eod_id, load_tokenizer, token_dtype, train_bpe

__all__ = ["DATASET_MANIFEST", "find_inputs", "iter_documents", "main", "prepare", "read_manifest"]

STATE_VERSION = 1  # of .prepare_state.jsonl; part of the fingerprint, so a change means starting over
DEFAULT_DOCS_PER_SHARD = 2000
DEFAULT_SHARD_BYTES = 64 << 20
PROG = "megagpt.data.prepare"

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# An input of unknown size (a pipe:, a URL without Content-Length) counts as this much
# when picking the number of workers: corpora are big, so all cores.
UNKNOWN_INPUT_BYTES = 1 << 30


def _fingerprint(files: Sequence[Input], options: dict) -> tuple[str, int, list[list[str]]]:
    """Hash of the options and every input's identity (a file's path, size and mtime; a
    URL's metadata; a command's text: see prep_sources.identity); the total input size; and
    each input's name with a digest of its identity, recorded to say what changed."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    total = 0
    record = []
    for inp in files:
        line, size = identity(inp)
        h.update(line.encode())
        total += UNKNOWN_INPUT_BYTES if size is None else size
        record.append([line.split("\0")[0].rstrip("\n"), hashlib.sha256(line.encode()).hexdigest()[:16]])
    return h.hexdigest(), total, record


def _save_tokenizer(tok: Tokenizer, out: Path) -> str:
    tmp = out / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out / TOKENIZER_FILE)
    return sha256_file(out / TOKENIZER_FILE)[1]


def _saved_tokenizer(out: Path, state: State) -> Tokenizer | None:
    """The tokenizer an earlier run trained and saved, if it is still the one it recorded."""
    path = out / TOKENIZER_FILE
    try:
        if sha256_file(path)[1] != state.header.get("tokenizer_sha256"):
            return None
        return load_tokenizer(str(path))
    except (OSError, ValueError):
        return None


def _complete(out: Path, state: State) -> dict | None:
    """The manifest, if the directory holds exactly the finished run ``state`` records."""
    try:
        m = read_manifest(str(out))
    except ValueError:
        return None
    if m["shards"] != [manifest_entry(s) for s in state.shards["train"]]:
        return None
    if m.get("val_shards", []) != [manifest_entry(s) for s in state.shards["val"]]:
        return None
    try:
        if sha256_file(out / TOKENIZER_FILE)[1] != state.header.get("tokenizer_sha256"):
            return None
    except OSError:
        return None
    return m if all(shard_ok(out, s) for shards in state.shards.values() for s in shards) else None


def _claim(
    out: Path, state: State | None, fingerprint: str, options: dict, inputs: list[list[str]], overwrite: bool, say: Log
) -> State | None:
    """The earlier run of this very call to continue, or None to start afresh. What is in
    ``out`` otherwise is refused unless ``overwrite``: a dataset made from other inputs or
    settings, one whose inputs are not recorded, or files of someone else's."""
    if state is not None and state.header.get("fingerprint") == fingerprint:
        return state
    kind = "prepared dataset" if (out / DATASET_MANIFEST).is_file() else "partly prepared dataset"
    if state is not None and kind != "prepared dataset" and _nothing_made(state):
        say(
            f"the unfinished run in {out} wrote no shards (other inputs or settings: "
            f"{state.differences(options, inputs)}): starting over"
        )
        return None
    if state is not None:
        why = f"made from other inputs or settings ({state.differences(options, inputs)})"
        refusal, action = f"holds a {kind} {why}", "replace it"
        done = f"replacing the {kind} in {out} ({why.replace(' (', ': ', 1)}"
    elif (out / DATASET_MANIFEST).exists() or (out / STATE_FILE).exists():
        refusal, action = f"holds a {kind} whose inputs are not recorded (no readable {STATE_FILE})", "replace it"
        done = f"replacing the {kind} in {out} (its inputs are not recorded)"
    elif names := other_entries(out):
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        refusal = f"is not empty and holds no megagpt dataset ({listed})"
        action = "write into it (only prepare's own files there are replaced)"
        done = f"writing into {out} beside other files (only prepare's own files there are replaced)"
    else:
        return None
    if not overwrite:
        raise ValueError(f"{out} {refusal}; give --overwrite (overwrite=True) to {action}")
    say(done)
    return None


def _nothing_made(state: State) -> bool:
    """A run that stopped (an input error, Ctrl-C) before its first shard, and before it
    trained a tokenizer (a given one is only a copy): replacing it loses nothing."""
    trained = isinstance(state.header.get("options", {}).get("tokenizer"), dict)
    made_tokenizer = trained and state.header.get("tokenizer_sha256") is not None
    return not made_tokenizer and not any(state.shards.values())


def _clear(out: Path) -> None:
    # The manifest goes first: from here until the new one is written the directory reads as incomplete.
    (out / DATASET_MANIFEST).unlink(missing_ok=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    remove_outputs(out)


def prepare(
    inputs: list[str],
    output: str,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    text_field: str = "text",
    log: Log | None = print,
    workers: int | None = None,
    val_fraction: float = 0.0,
    val_docs: int = 0,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into shards under ``output``; returns the manifest.

    ``workers`` processes read, parse and tokenize (default: one per core, fewer for small
    inputs); the output does not depend on it. ``val_fraction`` (about that share) or
    ``val_docs`` (exactly that many) documents, picked by a hash of their position and
    ``seed``, go to ``val-NNNNNN.tar`` shards instead. A re-run with the same inputs and
    options keeps the finished shards and continues after them. ``overwrite`` lets it
    replace what ``output`` holds otherwise (see the module docstring); without it that
    is a ValueError, as is an output inside the inputs.
    """
    say = log or _quiet
    if docs_per_shard < 1 or shard_bytes < 1:
        raise ValueError("docs_per_shard and shard_bytes must be positive")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= val_fraction < 1.0 or val_docs < 0:
        raise ValueError(f"need 0 <= val_fraction < 1 and val_docs >= 0, got {val_fraction} and {val_docs}")
    if val_fraction and val_docs:
        raise ValueError("give val_fraction or val_docs, not both")
    files = as_inputs(find_inputs(inputs), text_field)
    check_apart(inputs, [f.name for f in files], output)
    check_readers(files)
    say(f"{len(files)} input files")
    out = Path(output)

    given = load_tokenizer(tokenizer) if tokenizer else None
    options = {
        "format": [FORMAT, VERSION, STATE_VERSION],
        "text_field": text_field,
        "docs_per_shard": docs_per_shard,
        "shard_bytes": shard_bytes,
        "val_fraction": val_fraction,
        "val_docs": val_docs,
        "seed": seed,
        # A given tokenizer by content; a trained one by its recipe (its file is checked separately).
        "tokenizer": hashlib.sha256(given.to_str().encode()).hexdigest() if given else {"train_vocab": vocab_size},
    }
    fingerprint, input_bytes, input_record = _fingerprint(files, options)

    state = _claim(out, State.load(out), fingerprint, options, input_record, overwrite, say)
    out.mkdir(parents=True, exist_ok=True)
    if state is not None and (done := _complete(out, state)) is not None:
        say(f"all {len(done['shards']) + len(done.get('val_shards', []))} shards already complete in {out}")
        return done
    tok = given
    if state is not None and given is None:
        tok = _saved_tokenizer(out, state)
        if tok is None:
            say(f"{TOKENIZER_FILE} of the earlier run is missing or changed: starting over")
            state = None
        else:
            say(f"reusing {TOKENIZER_FILE} trained by the earlier run")
    if state is None:
        _clear(out)
        header = {"fingerprint": fingerprint, "options": options, "inputs": input_record, "val_below": None}
        # Written first, so a run stopped while the tokenizer trains is known as this call's.
        State({**header, "tokenizer_sha256": None}).rewrite(out)
        if tok is None:
            say(f"training byte-level BPE tokenizer (vocab_size={vocab_size}) on the inputs")
            tok = train_bpe((text for _, text in iter_documents(files, text_field)), vocab_size)
        # Saved before any shard, so a resumed run encodes with the very same tokenizer.
        tok_sha = _save_tokenizer(tok, out)
        state = State({**header, "tokenizer_sha256": tok_sha})
        state.rewrite(out)
    else:
        (out / DATASET_MANIFEST).unlink(missing_ok=True)
        if given is not None:
            state.header["tokenizer_sha256"] = _save_tokenizer(given, out)
        for split in SPLITS:
            state.shards[split] = state.verified_prefix(out, split)
        state.rewrite(out)
        remove_outputs(out, keep=[s["name"] for shards in state.shards.values() for s in shards])
        say(f"resuming after {len(state.shards['train'])} finished shards, {len(state.shards['val'])} validation")
    assert tok is not None
    eod = eod_id(tok, tokenizer)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    n_workers = workers or max(1, min(cpu_count(), -(-input_bytes // CHUNK_BYTES)))

    prog = Progress(progress, len(files))
    if prog.tty:
        say = clearing(prog, say)
    with Pool(n_workers, (out / TOKENIZER_FILE).read_text(), dtype) as pool:
        val_below = state.header["val_below"]
        if val_below is None:
            if val_docs:
                val_below = val_threshold(pool, files, val_docs, Job(text_field, seed, 0), prog)
            else:
                val_below = int(val_fraction * 2**64)
            state.header["val_below"] = val_below
            state.rewrite(out)
        manifest, tally = write_shards(
            out, files, state, pool, Job(text_field, seed, val_below), docs_per_shard, shard_bytes, say, prog
        )
    prog.clear()
    if manifest["documents"] == 0:
        where = f" ({tally.skipped} skipped as not UTF-8 text)" if tally.skipped else ""
        where += "; all went to the validation split" if manifest["val_documents"] else ""
        raise ValueError(f"no non-empty documents in inputs{where}: {' '.join(inputs)}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype,
        "vocab_size": vocab,
        "eod_id": eod,
        "tokenizer": TOKENIZER_FILE,
        **manifest,
    }
    write_text(out / DATASET_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    say(
        f"done: {len(manifest['shards'])} shards, {manifest['documents']:,} documents, {manifest['tokens']:,} tokens"
        f" + validation {len(manifest['val_shards'])} shards, {manifest['val_documents']:,} documents"
        f" ({dtype}) in {out}{_not_text(tally)}"
    )
    return manifest


def _not_text(t: Tally) -> str:
    said = f"; {plural(t.skipped, 'document')} skipped as not UTF-8 text" if t.skipped else ""
    if t.replaced:
        said += f"; {plural(t.replaced, 'invalid UTF-8 sequence')} replaced in {plural(t.replaced_files, 'file')}"
    return said


def read_manifest(dir_or_file: str) -> dict:
    """Load and validate the manifest of a prepared dataset (its directory or the file itself)."""
    p = Path(dir_or_file)
    path = p / DATASET_MANIFEST if p.is_dir() else p
    if not path.is_file():
        raise ValueError(f"no dataset manifest at {path} (run `python -m {PROG}` to create one)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from e
    return check_manifest(m, str(path))


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories, globs, http(s):// URLs or 'pipe:COMMAND' (format: by the name's ending)",
    )
    ap.add_argument("--output", required=True, metavar="DIR")
    ap.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or HF tokenizer folder (default: train BPE)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size when training (default 8192)")
    ap.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD)
    ap.add_argument(
        "--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="max token bytes per shard (default 64 MiB)"
    )
    ap.add_argument("--text-field", default="text", help="JSON field or Parquet column of the text (default 'text')")
    ap.add_argument(
        "--workers", type=int, help="processes reading and tokenizing (default: all cores; fewer for small inputs)"
    )
    split = ap.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for validation (about)")
    split.add_argument("--val-docs", type=int, default=0, help="number of documents for validation (exactly)")
    ap.add_argument("--seed", type=int, default=0, help="picks the validation documents (default 0)")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset in --output made from other inputs or settings, or write into a folder "
        "holding other files (only prepare's own files there are replaced)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.workers is not None:
        if args.workers < 1:
            ap.error("--workers must be >= 1")
        # Caps the tokenizer trainer's threads too; its pool reads this on first use, after this point.
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
            workers=args.workers,
            val_fraction=args.val_fraction,
            val_docs=args.val_docs,
            seed=args.seed,
            progress=True,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split())  # one line, even for multi-line library errors
        ap.exit(2, f"{PROG}: error: {msg}\n")
    except KeyboardInterrupt:
        ap.exit(130, f"{PROG}: interrupted; run the same command again to continue\n")


if __name__ == "__main__":
    main(sys.argv[1:])
