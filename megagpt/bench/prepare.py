"""`python -m megagpt.bench prepare`: the prepare step on a Parquet corpus against the tokenizer alone.

    python -m megagpt.bench prepare [--corpus-mib 32] [--vocab-size 8192] [--quick] [--json FILE]

The corpus is a Parquet file laid out as FineWeb's are (a `text` column, row groups
of 1,000 rows) holding about `--corpus-mib` MiB of text: the standard library's
source files (the embedded corpus's documents) cut at line ends into documents of
about 3 KB, FineWeb's mean, and repeated in a seeded order.  A byte-level BPE
tokenizer is trained on its first 2 MiB.  Then, one after the other on the same
machine and the same texts:

  - tokenizers' `encode_batch` over all the texts, a row group's 1,000 at a time,
    in one thread (RAYON_NUM_THREADS=1): what tokenizing costs with nothing around it;
  - `prepare --workers 1` and `--workers 2` on the Parquet file, end to end (read
    the row groups, tokenize, write and checksum the shards; the worker processes'
    start included): tokens/s, and tokens/s per worker.

`per worker / encode_batch` is the share of a core's tokenizing speed each worker
keeps.  The two prepare runs must write identical shards; the bench checks it.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

DOC_CHARS = 3000  # about FineWeb's mean document
ROWS_PER_GROUP = 1000
TOKENIZER_SAMPLE = 2 << 20  # characters the tokenizer is trained on


def _documents(mib: int, seed: int = 0) -> list[str]:
    """About ``mib`` MiB of stdlib source, cut at line ends into ~DOC_CHARS documents, in a seeded order."""
    import numpy as np

    from megagpt.data.embedded import stdlib_files

    pieces: list[str] = []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        while text:
            cut = text.find("\n", DOC_CHARS) + 1 or len(text)
            pieces.append(text[:cut])
            text = text[cut:]
    rng, docs, size = np.random.default_rng(seed), [], 0
    while size < mib << 20:
        for i in rng.permutation(len(pieces)):
            docs.append(pieces[i])
            size += len(pieces[i])
            if size >= mib << 20:
                break
    return docs


def write_parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(str(path), pa.schema([("text", pa.string())]), compression="zstd") as w:
        for start in range(0, len(docs), ROWS_PER_GROUP):
            w.write_table(pa.table({"text": docs[start : start + ROWS_PER_GROUP]}))


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (prepare's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _encode_batch_rate(tok_path: Path, docs: list[str]) -> tuple[float, int, float]:
    """(seconds, tokens, cpu seconds) of encode_batch over all documents, a row group's at a
    time (one call for everything would hold every Encoding at once), encoded as prepare does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True  # as prepare does: special-token strings in documents are text
    cpu, t0, tokens = _cpu_seconds(), time.perf_counter(), 0
    for start in range(0, len(docs), ROWS_PER_GROUP):
        tokens += sum(
            len(e.ids) for e in tok.encode_batch(docs[start : start + ROWS_PER_GROUP], add_special_tokens=False)
        )
    return time.perf_counter() - t0, tokens, _cpu_seconds() - cpu


def _prepare_run(parquet: Path, tok_path: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    """(seconds, cpu seconds, manifest) of one prepare run; the workers are joined when it returns."""
    from megagpt.data.prepare import prepare

    cpu, t0 = _cpu_seconds(), time.perf_counter()
    manifest = prepare([str(parquet)], str(out), tokenizer=str(tok_path), workers=workers, log=None)
    return time.perf_counter() - t0, _cpu_seconds() - cpu, manifest


def _same_shards(a: Path, b: Path, manifest: dict) -> bool:
    return all((a / s["name"]).read_bytes() == (b / s["name"]).read_bytes() for s in manifest["shards"])


def bench_prepare(args) -> dict:
    # Before anything tokenizes: rayon reads it once, when its thread pool starts.
    os.environ["RAYON_NUM_THREADS"] = "1"
    from megagpt.data.tokenizer import train_bpe

    mib, vocab = (1, 512) if args.quick else (args.corpus_mib, args.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="megagpt-bench-prepare-"))
    try:
        docs = _documents(mib)
        parquet = tmp / "corpus.parquet"
        write_parquet(parquet, docs)
        sample, size = [], 0
        for d in docs:
            sample.append(d)
            size += len(d)
            if size >= TOKENIZER_SAMPLE:
                break
        tok_path = tmp / "tokenizer.json"
        train_bpe(sample, vocab).save(str(tok_path))

        enc_s, enc_tokens, enc_cpu = _encode_batch_rate(tok_path, docs)
        runs = {w: _prepare_run(parquet, tok_path, tmp / f"out-{w}", w) for w in (1, 2)}
        m1 = runs[1][2]
        if m1["tokens"] != enc_tokens:
            raise RuntimeError(f"prepare wrote {m1['tokens']} tokens, encode_batch made {enc_tokens}")
        identical = runs[2][2] == m1 and _same_shards(tmp / "out-1", tmp / "out-2", m1)
        result = _figures(mib, vocab, docs, parquet, enc_s, enc_tokens, enc_cpu, runs, identical)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(result)
    return result


def _figures(mib, vocab, docs, parquet, enc_s, enc_tokens, enc_cpu, runs, identical) -> dict:
    enc_rate = enc_tokens / enc_s
    result = {
        "corpus_mib": mib,
        "text_bytes": sum(len(d.encode()) for d in docs),
        "documents": len(docs),
        "row_groups": -(-len(docs) // ROWS_PER_GROUP),
        "parquet_bytes": parquet.stat().st_size,
        "vocab_size": vocab,
        "tokens": enc_tokens,
        "cpu_cores": os.cpu_count(),
        "encode_batch_sec": enc_s,
        "encode_batch_cpu_sec": enc_cpu,
        "encode_batch_tokens_per_sec": enc_rate,
        "identical_output": identical,
    }
    for workers, (sec, cpu, _) in runs.items():
        rate = enc_tokens / sec
        result[f"prepare_w{workers}_sec"] = sec
        result[f"prepare_w{workers}_cpu_sec"] = cpu
        result[f"prepare_w{workers}_tokens_per_sec"] = rate
        result[f"prepare_w{workers}_tokens_per_sec_per_worker"] = rate / workers
        result[f"prepare_w{workers}_per_worker_vs_encode_batch"] = rate / workers / enc_rate
    return result


def _print(r: dict) -> None:
    print(
        f"corpus: {r['text_bytes'] / 2**20:.1f} MiB of text, {r['documents']:,} documents, {r['row_groups']} row "
        f"groups ({r['parquet_bytes'] / 2**20:.1f} MiB Parquet, zstd); BPE vocab {r['vocab_size']}; "
        f"{r['tokens']:,} tokens; {r['cpu_cores']} cores"
    )
    print(
        f"{'what':<42} {'wall s':>7} {'cpu s':>7} {'tokens/s':>11} {'per worker':>11} {'vs encode_batch':>16} "
        f"{'tokens/cpu s':>13}"
    )
    enc, tokens = r["encode_batch_tokens_per_sec"], r["tokens"]
    print(
        f"{'tokenizers encode_batch, 1 thread':<42} {r['encode_batch_sec']:>7.2f} {r['encode_batch_cpu_sec']:>7.2f} "
        f"{enc:>11,.0f} {enc:>11,.0f} {1.0:>16.2f} {tokens / r['encode_batch_cpu_sec']:>13,.0f}"
    )
    for w in (1, 2):
        per, cpu = r[f"prepare_w{w}_tokens_per_sec_per_worker"], r[f"prepare_w{w}_cpu_sec"]
        print(
            f"{f'prepare --workers {w} (Parquet -> shards)':<42} {r[f'prepare_w{w}_sec']:>7.2f} {cpu:>7.2f} "
            f"{r[f'prepare_w{w}_tokens_per_sec']:>11,.0f} {per:>11,.0f} {per / enc:>16.2f} {tokens / cpu:>13,.0f}"
        )
    print(
        "cpu s: this process and prepare's workers; per worker below tokens/cpu s: the workers did not run all "
        "the time (start-up, waiting for input, or cores busy elsewhere)"
    )
    print(f"shards identical for 1 and 2 workers: {r['identical_output']}")


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="prepare's tokens/s on Parquet (1 and 2 workers) vs tokenizers' encode_batch")
    p.add_argument("--corpus-mib", type=int, default=32, help="MiB of text in the Parquet corpus (default 32)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="1 MiB corpus, vocab 512: a few seconds (tests)")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=bench_prepare)
