"""`python -m megagpt.bench data`: the data loader against raw reads.

    python -m megagpt.bench data [--data DIR] [--seq-len 1024] [--micro-batch 8] [--seconds 5]

`data`: the loader's tokens/s in one process from local shards, next to the
raw read rate of the same files (tokens/s if reading were all there is to
do), and next to what the tiny model consumes in training on this machine.
Both warm (files in the page cache) and cold (evicted with
posix_fadvise(DONTNEED) before each pass); every figure is a median of
several repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _raw_read_rate(paths: list[str], tokens: int, seconds: float, cold: bool = False) -> float:
    """Stream tokens/s of reading the shard files' bytes: from the page cache,
    or (cold) with the files evicted before each pass."""
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        if cold:
            _evict(paths)
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def _evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache, so the next read goes to the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _loader_cold_rate(make_mix, paths: list[str], tokens: int, micro: int, seq_len: int, seconds: float) -> float:
    """Tokens/s of a fresh loader (threads started, nothing read) delivering a
    pass's worth of tokens from files evicted just before: start-up included."""
    from megagpt.data.stream import Batches

    steps = max(1, tokens // (micro * seq_len))
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        _evict(paths)
        t0 = time.perf_counter()
        b = Batches(make_mix(), rank=0, world=1, micro_batch=micro, prefetch=8)
        try:
            for _ in range(steps):
                b.next()
            rates.append(steps * micro * seq_len / (time.perf_counter() - t0))
        finally:
            b.close()
    return statistics.median(rates)


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
    from megagpt.data.stream import Batches

    b = Batches(mix, rank=0, world=1, micro_batch=micro, prefetch=8)
    try:
        for _ in range(4):  # warm up: thread started, first shards read
            b.next()
        rates, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 3:
            t0, n = time.perf_counter(), 0
            while n < 50:
                b.next()
                n += 1
            rates.append(n * micro * seq_len / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        b.close()


def _training_rate(vocab: int, seq_len: int, micro: int, steps: int = 6) -> float:
    """Tokens/s of the tiny model's training step (fp32, AdamW) in this process."""
    import torch

    from megagpt.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=-(-vocab // 64) * 64, max_seq_len=seq_len, n_layer=4, n_head=4, n_embd=128))
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


def bench_data(args) -> dict:
    import torch

    from megagpt.data.shards import open_dataset
    from megagpt.data.source import default_cache_dir
    from megagpt.data.stream import Mixture, ShardStreams

    torch.set_num_threads(1)  # one process, as one rank of a 2-rank job on 2 cores
    if args.data:
        path = args.data
    else:
        from megagpt.data.embedded import ensure_embedded

        path = str(ensure_embedded(default_cache_dir(), log=None))
    ds = open_dataset(path)
    paths = [s.url for s in ds.shards]
    tokens = sum(s.stream_tokens for s in ds.shards)
    nbytes = sum(os.path.getsize(p) for p in paths)

    def make_mix():
        return Mixture([ShardStreams(ds, 1, args.seq_len, seed=0, shuffle=True,
                                     shuffle_buffer=args.shuffle_buffer)], [1.0])

    _raw_read_rate(paths, tokens, 0.5)  # warm the page cache
    raw = _raw_read_rate(paths, tokens, args.seconds)
    wds_rate = _webdataset_rate(paths, tokens, args.seconds)
    loader = _loader_rate(make_mix(), args.micro_batch, args.seq_len, args.seconds)
    raw_cold = _raw_read_rate(paths, tokens, args.seconds, cold=True)
    loader_cold = _loader_cold_rate(make_mix, paths, tokens, args.micro_batch, args.seq_len, args.seconds)
    train = _training_rate(ds.vocab_size, min(args.seq_len, 256), args.micro_batch)
    result = {
        "dataset": path, "shards": len(paths), "tokens": tokens, "bytes": nbytes,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "shuffle_buffer": args.shuffle_buffer,
        "raw_read_tokens_per_sec": raw, "webdataset_tokens_per_sec": wds_rate, "loader_tokens_per_sec": loader,
        "tiny_model_train_tokens_per_sec": train,
        "loader_vs_raw": loader / raw, "loader_vs_training": loader / train,
        "raw_read_cold_tokens_per_sec": raw_cold, "loader_cold_tokens_per_sec": loader_cold,
        "loader_vs_raw_cold": loader_cold / raw_cold, "cold_vs_warm_raw_read": raw_cold / raw,
        "cold_cache": "posix_fadvise(POSIX_FADV_DONTNEED) on every shard file before each pass",
    }
    print(f"dataset: {path} ({len(paths)} shards, {tokens:,} tokens, {nbytes / 2**20:.1f} MiB)")
    print("warm: files in the page cache; cold: evicted before each pass (posix_fadvise DONTNEED), "
          "the loader started fresh each pass; medians")
    print(f"{'what (one process)':<44} {'warm tokens/s':>14} {'ratio':>7} {'cold tokens/s':>14} {'ratio':>7}")
    print(f"{'raw read of the shard files':<44} {raw:>14,.0f} {'1.00':>7} {raw_cold:>14,.0f} {'1.00':>7}")
    print(f"{'webdataset.WebDataset iteration (no decode)':<44} {wds_rate:>14,.0f} {wds_rate / raw:>7.3f}")
    print(f"{'megagpt loader (verify, parse, pack, batch)':<44} {loader:>14,.0f} {loader / raw:>7.3f} "
          f"{loader_cold:>14,.0f} {loader_cold / raw_cold:>7.3f}")
    print(f"{'tiny model training step (fp32, 1 thread)':<44} {train:>14,.0f}")
    print(f"loader / raw read = {loader / raw:.3f} warm, {loader_cold / raw_cold:.3f} cold; "
          f"loader / webdataset = {loader / wds_rate:.2f}; loader / training = {loader / train:,.0f}x; "
          f"cold raw read / warm = {raw_cold / raw:.3f}")
    return result


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="loader throughput vs raw reads and training")
    d.add_argument("--data", help="prepared dataset dir (default: the embedded corpus)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--micro-batch", type=int, default=8)
    d.add_argument("--shuffle-buffer", type=int, default=64)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--json", help="also write the figures to this file")
    d.set_defaults(run=bench_data)
