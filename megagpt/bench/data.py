"""`python -m megagpt.bench data`: the data loader against raw reads.

    python -m megagpt.bench data [--data DIR] [--corpus-mib 256] [--streams 8]
                                 [--seq-len 1024] [--micro-batch 8] [--seconds 5]

One process, steady state, medians of 50-micro-batch windows.  Side by side:
the raw read rate of the same shard files (tokens/s if reading their bytes
were all there is to do), plain webdataset iteration over them, and the
loader (read, checksum, index, pack, shuffle, batch into int32 tensors);
warm (files in the page cache) and cold (every file evicted with
posix_fadvise(DONTNEED) before each raw read, and after each loader read, so
that every epoch comes from the disk again).  Beside them, what the tiny
model consumes in training, and two floors the loader cannot go below: one
int32 copy of the tokens, and the checksum.

The default dataset is a bench corpus of `--corpus-mib` MiB: the embedded
corpus's documents repeated in a seeded order and written by the prepare
step's own shard writer with its default limits (2,000 documents or 64 MiB a
shard), so that shards have the size and the document count a real prepared
corpus has.  `--streams 8` is one rank's share of the default 16 streams on
a 2-rank job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _raw_read_rate(paths: list[str], tokens: int, seconds: float, cold: bool = False) -> float:
    """Stream tokens/s of reading the shard files' bytes (4 MiB reads): from
    the page cache, or (cold) each file evicted just before it is read."""
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        elapsed = 0.0
        for p in paths:
            if cold:
                _evict([p])
            t0 = time.perf_counter()
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
            elapsed += time.perf_counter() - t0
        rates.append(tokens / elapsed)
    return statistics.median(rates)


def _evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache, so the next read goes to the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _webdataset_rate(paths: list[str], tokens: int, seconds: float) -> float:
    """Stream tokens/s of plain webdataset iteration over the same shards
    (samples out, nothing decoded, checked or packed): the peer's floor."""
    import webdataset as wds

    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        t0 = time.perf_counter()
        for _ in wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None):
            pass
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def _loader_rate(mix, micro: int, seq_len: int, seconds: float) -> float:
    """Steady-state tokens/s of the trainer's side of the loader (next_windows)."""
    from megagpt.data.loader import Batches

    b = Batches(mix, rank=0, world=1, micro_batch=micro, prefetch=8)
    try:
        for _ in range(50):  # warm up: threads started, every stream's first shards read
            b.next_windows()
        rates, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 3:
            t0 = time.perf_counter()
            for _ in range(50):
                b.next_windows()
            rates.append(50 * micro * seq_len / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        b.close()


def _floor_rates(ds, seconds: float) -> tuple[float, float, float]:
    """Tokens/s of one int32 copy of a shard's tokens, of xxh3_128 and of sha256 over its bytes."""
    import hashlib as hl

    import numpy as np

    from megagpt.data.shards import read_shard, xxh3_hex

    shard = ds.shards[0]
    tokens = read_shard(shard, ds.dtype, ds.vocab_size, ds.eod_id).copy()
    raw = open(shard.url, "rb").read()
    out = np.empty(len(tokens), dtype=np.int32)

    def rate(fn) -> float:
        times, deadline = [], time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return len(tokens) / statistics.median(times)

    return (rate(lambda: np.copyto(out, tokens)), rate(lambda: xxh3_hex(raw)), rate(lambda: hl.sha256(raw).hexdigest()))


def _training_rate(vocab: int, seq_len: int, micro: int, steps: int = 6) -> float:
    """Tokens/s of the tiny model's training step (fp32, AdamW) in this process."""
    import torch

    from megagpt.config import ModelConfig
    from megagpt.model.gpt import GPT, GPTConfig

    model = GPT(
        GPTConfig.from_settings(
            ModelConfig(n_layer=4, n_head=4, n_embd=128), vocab_size=vocab, seq_len=seq_len, attention="sdpa"
        )
    )
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (micro, seq_len + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return micro * seq_len / statistics.median(times[1:])


BENCH_CORPUS_VERSION = 1


def bench_corpus(cache_dir: str, mib: int, log=print) -> Path:
    """A prepared dataset of about `mib` MiB made from the embedded corpus's
    documents (repeated in a seeded order) by the prepare step's shard writer,
    with prepare's default shard limits; made once and cached."""
    import numpy as np

    from megagpt.data.embedded import ensure_embedded
    from megagpt.data.prepare import DATASET_MANIFEST, DEFAULT_DOCS_PER_SHARD, DEFAULT_SHARD_BYTES
    from megagpt.data.shards import open_dataset, read_shard
    from megagpt.data.shardwriter import ShardSink, manifest_entry

    src_dir = ensure_embedded(cache_dir, log=log)
    key = hashlib.sha256(json.dumps([str(src_dir), mib, BENCH_CORPUS_VERSION]).encode()).hexdigest()[:12]
    final = Path(cache_dir) / f"bench-corpus-{key}"
    if (final / DATASET_MANIFEST).is_file():
        return final
    src = open_dataset(str(src_dir))
    docs = []
    for shard in src.shards:
        tokens = read_shard(shard, src.dtype, src.vocab_size, src.eod_id)
        docs.extend(np.split(tokens, np.flatnonzero(tokens == src.eod_id) + 1)[:-1])  # each with its EOD
    log(f"writing a {mib} MiB bench corpus from {len(docs)} embedded documents into {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".bench-corpus-{key}.", dir=cache_dir))
    try:
        shards: list[dict] = []
        sink = ShardSink(tmp, "shard", DEFAULT_DOCS_PER_SHARD, DEFAULT_SHARD_BYTES, shards.append)
        rng, written = np.random.default_rng(0), 0
        while written < mib << 20:
            for i in rng.permutation(len(docs)):
                data = docs[i][:-1].astype(src.dtype).tobytes()
                sink.add(data, len(docs[i]) - 1, (0, 0))
                written += len(data)
                if written >= mib << 20:
                    break
        sink.close()
        manifest = json.loads((src_dir / DATASET_MANIFEST).read_text())
        manifest.update(
            shards=[manifest_entry(s) for s in shards],
            val_shards=[],
            documents=sum(s["documents"] for s in shards),
            tokens=sum(s["tokens"] for s in shards),
        )
        (tmp / DATASET_MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.copy(src_dir / manifest["tokenizer"], tmp / manifest["tokenizer"])
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bench_data(args) -> dict:
    import torch

    from megagpt.data.mixture import Mixture
    from megagpt.data.shards import open_dataset
    from megagpt.data.source import default_cache_dir
    from megagpt.data.streams import ShardStreams, StreamSettings, default_reader

    torch.set_num_threads(1)  # one process, as one rank of a 2-rank job on 2 cores
    path = args.data or str(bench_corpus(default_cache_dir(), args.corpus_mib))
    ds = open_dataset(path)
    paths = [s.url for s in ds.shards]
    tokens = sum(s.stream_tokens for s in ds.shards)
    nbytes = sum(os.path.getsize(p) for p in paths)
    streams = min(args.streams, len(paths))

    def cold_reader(shard, ds):
        try:
            return default_reader(shard, ds)
        finally:
            _evict([shard.url])  # so that the next epoch reads it from the disk again

    def mix(reader):
        settings = StreamSettings(
            num_streams=streams,
            seq_len=args.seq_len,
            seed=0,
            shuffle=True,
            shuffle_buffer=args.shuffle_buffer,
            reader=reader,
        )
        return Mixture([ShardStreams(ds, settings)], [1.0])

    _raw_read_rate(paths, tokens, 0.5)  # warm the page cache
    raw = _raw_read_rate(paths, tokens, args.seconds)
    wds_rate = _webdataset_rate(paths, tokens, args.seconds)
    loader = _loader_rate(mix(default_reader), args.micro_batch, args.seq_len, args.seconds)
    raw_cold = _raw_read_rate(paths, tokens, args.seconds, cold=True)
    loader_cold = _loader_rate(mix(cold_reader), args.micro_batch, args.seq_len, args.seconds)
    copy, xxh3, sha = _floor_rates(ds, args.seconds)
    train = _training_rate(ds.vocab_size, min(args.seq_len, 256), args.micro_batch)
    result = {
        "dataset": path,
        "shards": len(paths),
        "tokens": tokens,
        "bytes": nbytes,
        "streams": streams,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "shuffle_buffer": args.shuffle_buffer,
        "raw_read_tokens_per_sec": raw,
        "webdataset_tokens_per_sec": wds_rate,
        "loader_tokens_per_sec": loader,
        "tiny_model_train_tokens_per_sec": train,
        "loader_vs_raw": loader / raw,
        "loader_vs_training": loader / train,
        "raw_read_cold_tokens_per_sec": raw_cold,
        "loader_cold_tokens_per_sec": loader_cold,
        "loader_vs_raw_cold": loader_cold / raw_cold,
        "cold_vs_warm_raw_read": raw_cold / raw,
        "int32_copy_tokens_per_sec": copy,
        "xxh3_tokens_per_sec": xxh3,
        "sha256_tokens_per_sec": sha,
        "cold_cache": "posix_fadvise(POSIX_FADV_DONTNEED) on each file before each raw read and after each loader read",
    }
    print(
        f"dataset: {path} ({len(paths)} shards, {tokens:,} tokens, {nbytes / 2**20:.1f} MiB); "
        f"{streams} streams, seq_len {args.seq_len}, micro-batch {args.micro_batch}"
    )
    print(
        "warm: files in the page cache; cold: every read from the disk (posix_fadvise DONTNEED); steady state, medians"
    )
    print(f"{'what (one process)':<46} {'warm tokens/s':>14} {'ratio':>7} {'cold tokens/s':>14} {'ratio':>7}")
    print(f"{'raw read of the shard files':<46} {raw:>14,.0f} {'1.00':>7} {raw_cold:>14,.0f} {'1.00':>7}")
    print(f"{'webdataset.WebDataset iteration (no decode)':<46} {wds_rate:>14,.0f} {wds_rate / raw:>7.3f}")
    print(
        f"{'megagpt loader (verify, index, pack, batch)':<46} {loader:>14,.0f} {loader / raw:>7.3f} "
        f"{loader_cold:>14,.0f} {loader_cold / raw_cold:>7.3f}"
    )
    print(f"{'floor: one int32 copy of the tokens':<46} {copy:>14,.0f} {copy / raw:>7.3f}")
    print(f"{'floor: xxh3_128 of the bytes (data.verify=fast)':<46} {xxh3:>14,.0f} {xxh3 / raw:>7.3f}")
    print(f"{'floor: sha256 of the bytes (data.verify=sha256)':<46} {sha:>14,.0f} {sha / raw:>7.3f}")
    print(f"{'tiny model training step (fp32, 1 thread)':<46} {train:>14,.0f}")
    print(
        f"loader / raw read = {loader / raw:.3f} warm, {loader_cold / raw_cold:.3f} cold; "
        f"loader / webdataset = {loader / wds_rate:.2f}; loader / training = {loader / train:,.0f}x; "
        f"cold raw read / warm = {raw_cold / raw:.3f}"
    )
    return result


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="loader throughput vs raw reads and training")
    d.add_argument("--data", help="prepared dataset dir (default: a bench corpus made from the embedded one)")
    d.add_argument("--corpus-mib", type=int, default=256, help="size of the default bench corpus")
    d.add_argument("--streams", type=int, default=8, help="streams the process reads (capped at the shards)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--micro-batch", type=int, default=8)
    d.add_argument("--shuffle-buffer", type=int, default=64)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--json", help="also write the figures to this file")
    d.set_defaults(run=bench_data)
