"""A packed token stream over webdataset shards whose place is a single number.

The layout that makes resume exact and elastic:

* The shards are dealt into S independent *streams*.  In epoch e the shard
  order is a permutation drawn from (seed, e); stream s takes every S-th shard
  of it, starting at s.  Each stream is an endless token sequence (documents
  followed by an end-of-document token, epoch after epoch) cut into windows of
  seq_len + 1 tokens with stride seq_len, so every token is a target once.
* The global sequence g is window g // S of stream g % S.  Global batch t is
  sequences [t * B, (t + 1) * B); rank r of W takes the g with g % W == r.
  Rank r therefore reads only the streams s with s % W == r (W must divide S),
  and every rank takes the same number of sequences per step, for ever.
* The whole position is the number of global sequences consumed.  From it
  each stream's window count follows, and from the manifest's token counts the
  shard and offset to start reading at: resuming decodes at most one shard per
  stream, never the data before it, and works for any W that divides S.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


class DataError(RuntimeError):
    """Bad data: names the shard and the position."""


@dataclass(frozen=True)
class Shard:
    url: str
    documents: int
    stored_tokens: int

    @property
    def stream_tokens(self) -> int:  # tokens it adds to a stream: one EOD per document
        return self.stored_tokens + self.documents


@dataclass(frozen=True)
class Dataset:
    shards: tuple[Shard, ...]
    dtype: str
    vocab_size: int
    eod_id: int
    tokenizer_url: str

    def fingerprint(self) -> str:
        names = "\n".join(f"{os.path.basename(s.url)}:{s.stored_tokens}" for s in self.shards)
        return hashlib.sha256(names.encode()).hexdigest()[:16]


def read_text(url: str) -> str:
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read().decode()
    with open(url, encoding="utf-8") as f:
        return f.read()


def _expand(urls) -> list[str]:
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        out.extend(braceexpand.braceexpand(str(item)))
    return out


def open_dataset(urls, manifest: str | None = None) -> Dataset:
    """Resolve shard URLs (a prepared dir, brace patterns or a list) against
    the manifest that gives every shard's counts."""
    expanded = _expand(urls)
    if len(expanded) == 1 and os.path.isdir(expanded[0]):
        base = expanded[0]
        manifest = manifest or os.path.join(base, "manifest.json")
        expanded = []
    elif not expanded:
        raise DataError(f"data.urls: no shards in {urls!r}")
    else:
        missing = [u for u in expanded if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise DataError(f"data.urls: {missing[0]} does not exist"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        base = expanded[0].rsplit("/", 1)[0] if "/" in expanded[0] else "."
        manifest = manifest or f"{base}/manifest.json"
    try:
        man = json.loads(read_text(manifest))
    except (OSError, ValueError) as e:
        raise DataError(f"data.manifest: cannot read {manifest}: {e}") from None
    for key in ("dtype", "vocab_size", "eod_id", "shards"):
        if key not in man:
            raise DataError(f"data.manifest: {manifest} lacks key {key!r}")
    mbase = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    by_name = {s["name"]: s for s in man["shards"]}
    if not expanded:
        expanded = [f"{base}/{s['name']}" for s in man["shards"]]
    shards = []
    for url in expanded:
        name = url.rsplit("/", 1)[-1]
        if name not in by_name:
            raise DataError(f"data.urls: shard {url} is not listed in {manifest}")
        entry = by_name[name]
        shards.append(Shard(url, int(entry["documents"]), int(entry["tokens"])))
    tok = man.get("tokenizer", "tokenizer.json")
    return Dataset(tuple(shards), man["dtype"], int(man["vocab_size"]), int(man["eod_id"]),
                   f"{mbase}/{tok}")


def default_num_streams(n_shards: int, world_size: int, preferred: int = 16) -> int:
    """The largest multiple of the world size not above min(preferred, shards)."""
    cap = max(min(preferred, n_shards), world_size)
    return (cap // world_size) * world_size


class ShardStreams:
    """The S streams of a dataset: which shards each reads in which epoch, and
    the windows each yields from any starting window."""

    def __init__(self, ds: Dataset, num_streams: int, seq_len: int, seed: int, shuffle: bool = True):
        if num_streams > len(ds.shards):
            raise DataError(
                f"data.num_streams={num_streams} exceeds the number of shards ({len(ds.shards)}); "
                "lower it or write more, smaller shards")
        self.ds, self.S, self.L, self.seed, self.shuffle = ds, num_streams, seq_len, seed, shuffle
        self.np_dtype = np.dtype(ds.dtype).newbyteorder("<")

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        n = len(self.ds.shards)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return [int(i) for i in order[stream :: self.S]]

    def windows(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... of one stream, each (seq_len + 1,) int64."""
        L = self.L
        skip = start * L  # tokens of this stream before the first window
        buf = np.empty(0, dtype=np.int64)
        epoch = 0
        while True:
            for idx in self.shards_of(stream, epoch):
                shard = self.ds.shards[idx]
                if skip >= shard.stream_tokens:  # skip whole shards by the manifest's counts
                    skip -= shard.stream_tokens
                    continue
                for tokens in self.read_shard(shard):
                    if skip >= len(tokens):
                        skip -= len(tokens)
                        continue
                    tokens = tokens[skip:]
                    skip = 0
                    buf = np.concatenate([buf, tokens]) if len(buf) else tokens
                    n = (len(buf) - 1) // L  # whole windows available
                    for i in range(n):
                        yield buf[i * L : i * L + L + 1]
                    buf = buf[n * L :]
            epoch += 1

    def read_shard(self, shard: Shard) -> Iterator[np.ndarray]:
        """Documents of a shard, each int64 with the EOD token appended;
        checked against the manifest's counts and the vocabulary."""
        import webdataset as wds

        eod = np.array([self.ds.eod_id], dtype=np.int64)
        docs = toks = 0
        pipeline = wds.WebDataset([shard.url], shardshuffle=False, nodesplitter=None,
                                  workersplitter=None, empty_check=False)
        try:
            for sample in pipeline:
                raw = sample.get("tokens")
                where = f"shard {shard.url}, document {docs} (key {sample.get('__key__')})"
                if raw is None:
                    raise DataError(f"{where}: no 'tokens' field")
                if len(raw) % self.np_dtype.itemsize:
                    raise DataError(f"{where}: {len(raw)} bytes is not a whole number of "
                                    f"{self.ds.dtype} tokens")
                ids = np.frombuffer(raw, dtype=self.np_dtype).astype(np.int64)
                if len(ids) and int(ids.max()) >= self.ds.vocab_size:
                    raise DataError(f"{where}: token id {int(ids.max())} >= vocab_size "
                                    f"{self.ds.vocab_size} (wrong dtype?)")
                docs += 1
                toks += len(ids)
                yield np.concatenate([ids, eod])
        except DataError:
            raise
        except Exception as e:  # tar/IO errors from webdataset
            raise DataError(f"shard {shard.url}, after document {docs}: {type(e).__name__}: {e}") from e
        if (docs, toks) != (shard.documents, shard.stored_tokens):
            raise DataError(f"shard {shard.url}: read {docs} documents / {toks} tokens, manifest says "
                            f"{shard.documents} / {shard.stored_tokens} (truncated or replaced?)")


def stream_windows_taken(consumed: int, stream: int, num_streams: int) -> int:
    """Windows stream `stream` has given when `consumed` global sequences are
    done: the count of g < consumed with g % S == stream."""
    return max(0, (consumed - stream + num_streams - 1) // num_streams)


def rank_sequences(streams: ShardStreams, rank: int, world: int, consumed: int) -> Iterator[np.ndarray]:
    """This rank's sequences g = consumed + ..., g % world == rank, in order.
    `consumed` must be a multiple of the world size (a step boundary)."""
    if streams.S % world:
        raise DataError(f"data.num_streams={streams.S} is not divisible by the number of ranks ({world})")
    if consumed % world:
        raise DataError(f"data position {consumed} is not a multiple of the number of ranks ({world})")
    S = streams.S
    mine = range(rank, S, world)
    its = {s: streams.windows(s, stream_windows_taken(consumed, s, S)) for s in mine}
    g = consumed + rank
    while True:
        yield next(its[g % S])
        g += world


class Batches:
    """Micro-batches for one rank, loaded ahead in a background thread.

    state_dict() is the position of what the trainer has *taken*, not of what
    the thread has read ahead, so a checkpoint never skips prefetched data.
    """

    def __init__(self, streams: ShardStreams, rank: int, world: int, micro_batch: int,
                 consumed: int = 0, prefetch: int = 4):
        self.streams, self.rank, self.world, self.micro_batch = streams, rank, world, micro_batch
        self.start = consumed
        self.taken = 0  # sequences this rank has handed to the trainer
        self.wait_time = 0.0  # seconds the trainer spent waiting for data
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="megagpt-data", daemon=True)
        self._thread.start()

    @property
    def consumed(self) -> int:
        return self.start + self.taken * self.world

    def _fill(self) -> None:
        try:
            seqs = rank_sequences(self.streams, self.rank, self.world, self.start)
            while not self._stop.is_set():
                batch = np.stack([next(seqs) for _ in range(self.micro_batch)])  # (B, T + 1)
                self._put(torch.from_numpy(batch))
        except BaseException as e:  # surfaced to the trainer on its next take
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch, seq_len) int64."""
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_time += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        self.taken += self.micro_batch
        return item[:, :-1], item[:, 1:]

    def state_dict(self) -> dict:
        s = self.streams
        return {"consumed": self.consumed, "num_streams": s.S, "seq_len": s.L, "seed": s.seed,
                "shuffle": s.shuffle, "dataset": s.ds.fingerprint()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def check_resumable(state: dict, streams: ShardStreams) -> int:
    """The position to resume at; refuses a state from another data layout."""
    for key, now in (("num_streams", streams.S), ("seq_len", streams.L), ("seed", streams.seed),
                     ("shuffle", streams.shuffle), ("dataset", streams.ds.fingerprint())):
        if key in state and state[key] != now:
            raise DataError(f"checkpoint data state has {key}={state[key]!r} but this run has {now!r}; "
                            "the data stream cannot continue in the same place")
    return int(state["consumed"])
