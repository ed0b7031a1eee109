"""A packed token stream over webdataset shards whose place is a single number.

The layout that makes resume exact and elastic:

* Each source's shards are dealt into S independent *streams*.  In epoch e the
  shard order is a permutation drawn from (seed, e); stream s takes every S-th
  shard of it, starting at s.  A stream is an endless token sequence
  (documents each followed by an end-of-document token, epoch after epoch)
  cut into windows of seq_len + 1 tokens with stride seq_len, so every token
  is a target exactly once.  Windows are shuffled within blocks of
  `shuffle_buffer` windows by a permutation drawn from (seed, stream, block):
  a bounded shuffle buffer whose state is a function of the position.
* With several sources (a mixture), window k of mixed stream s comes from the
  source a fixed schedule names: in every block of `mix_period` windows each
  source has its weight's share of places, permuted from (seed, stream, block).
* The global sequence g is window g // S of mixed stream g % S.  Global batch
  t is sequences [t * B, (t + 1) * B); rank r of W takes the g with
  g % W == r.  Rank r therefore reads only the streams s with s % W == r
  (W must divide S), and every rank takes the same number of sequences per
  step, for ever.
* The whole position is the number of global sequences consumed (plus the
  shards found bad, under on_error=skip).  From it each stream's window count
  follows, and from the manifest's token counts the shard and offset to start
  at: resuming reads at most one shard per stream and shuffle block, never the
  data before it, and works for any W that divides S.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from megagpt.data.shards import Dataset, DataError, Shard, read_shard

log = logging.getLogger("megagpt")
ShardReader = Callable[[Shard, Dataset], np.ndarray]


def default_reader(shard: Shard, ds: Dataset) -> np.ndarray:
    return read_shard(shard, ds.dtype, ds.vocab_size, ds.eod_id)


def default_num_streams(n_shards: int, world_size: int, preferred: int = 16) -> int:
    """The largest multiple of the world size not above min(preferred, shards)."""
    cap = max(min(preferred, n_shards), world_size)
    return (cap // world_size) * world_size


class ShardStreams:
    """The S streams of one source: which shards each reads in which epoch,
    and the windows each yields from any starting window."""

    def __init__(self, ds: Dataset, num_streams: int, seq_len: int, seed: int, shuffle: bool = True,
                 shuffle_buffer: int = 1, on_error: str = "raise", bad: Sequence[str] = (),
                 reader: ShardReader = default_reader, shards: Sequence[Shard] | None = None,
                 name: str = "data"):
        self.shards = tuple(ds.shards if shards is None else shards)
        if num_streams > len(self.shards):
            raise DataError(
                f"data.num_streams={num_streams} exceeds the number of shards of {name} "
                f"({len(self.shards)}); lower it or write more, smaller shards")
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error: unknown policy {on_error!r}; choose raise or skip")
        self.ds, self.S, self.L, self.seed, self.shuffle = ds, num_streams, seq_len, seed, shuffle
        self.buffer, self.on_error, self.reader, self.name = max(1, shuffle_buffer), on_error, reader, name
        self.bad: set[str] = set(bad)  # shards skipped as bad: they add no tokens
        self.skipped = 0  # shards skipped by this process

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [int(i) for i in order[stream :: self.S]]

    def _tokens(self, shard: Shard) -> int:
        return 0 if shard.url in self.bad else shard.stream_tokens

    def raw_windows(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Unshuffled windows start, start+1, ... of one stream, (seq_len + 1,) each."""
        L = self.L
        skip = start * L  # tokens of this stream before the first window
        buf = None
        epoch = 0
        while True:
            live = 0  # shards of this epoch that add tokens: none would loop for ever
            for idx in self.shards_of(stream, epoch):
                shard = self.shards[idx]
                if skip >= self._tokens(shard):  # skip whole shards by the manifest's counts
                    skip -= self._tokens(shard)
                    live += self._tokens(shard) > 0
                    continue
                tokens = self._read(shard)
                if tokens is None:
                    continue
                live += 1
                tokens = tokens[skip:]
                skip = 0
                buf = tokens if buf is None else np.concatenate([buf, tokens])
                n = (len(buf) - 1) // L  # whole windows available
                for i in range(n):
                    yield buf[i * L : i * L + L + 1]
                buf = buf[n * L :]
            if not live:
                raise DataError(f"{self.name}: every shard of stream {stream} is bad or empty "
                                f"(bad: {sorted(self.bad)[:3]}...)")
            epoch += 1

    def _read(self, shard: Shard) -> np.ndarray | None:
        try:
            return self.reader(shard, self.ds)
        except DataError as e:
            if self.on_error == "raise":
                raise
            self.bad.add(shard.url)
            self.skipped += 1
            log.warning("data.on_error=skip: skipping %s", e)
            return None

    def windows(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... after the bounded shuffle."""
        B = self.buffer
        if B == 1:
            yield from self.raw_windows(stream, start)
            return
        block = start // B
        raw = self.raw_windows(stream, block * B)
        first = start - block * B
        while True:
            items = [next(raw) for _ in range(B)]
            perm = np.random.default_rng([self.seed, stream, block, 0x5EED]).permutation(B)
            for j in range(first, B):
                yield items[perm[j]]
            first, block = 0, block + 1


def mix_counts(weights: Sequence[float], period: int) -> list[int]:
    """Places per source in a block of `period` windows (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise DataError("data.sources: every weight must be positive")
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class Mixture:
    """Several sources' streams interleaved by weight; one source is the plain case."""

    def __init__(self, sources: Sequence[ShardStreams], weights: Sequence[float], period: int = 100,
                 names: Sequence[str] | None = None):
        if len({s.S for s in sources}) != 1 or len({s.L for s in sources}) != 1:
            raise DataError("data.sources: all sources need the same num_streams and seq_len")
        self.sources = list(sources)
        self.names = list(names or [s.name for s in sources])
        self.weights = list(weights)
        self.period = period if len(sources) > 1 else 1
        self.counts = mix_counts(weights, self.period)
        self.S, self.L, self.seed = sources[0].S, sources[0].L, sources[0].seed

    def schedule(self, stream: int, block: int) -> np.ndarray:
        places = np.repeat(np.arange(len(self.sources)), self.counts)
        if len(self.sources) == 1:
            return places
        return np.random.default_rng([self.seed, stream, block, 0x313]).permutation(places)

    def windows(self, stream: int, start: int) -> Iterator[tuple[np.ndarray, int]]:
        """(window, source index) for windows start, start+1, ... of mixed stream `stream`."""
        if len(self.sources) == 1:  # the plain case: no schedule to follow
            for w in self.sources[0].windows(stream, start):
                yield w, 0
            return
        P = self.period
        block, first = divmod(start, P)
        sched = self.schedule(stream, block)
        local = [block * c + int((sched[:first] == i).sum()) for i, c in enumerate(self.counts)]
        its = [src.windows(stream, local[i]) for i, src in enumerate(self.sources)]
        while True:
            for j in range(first, P):
                i = int(sched[j])
                yield next(its[i]), i
            block, first = block + 1, 0
            sched = self.schedule(stream, block)

    @property
    def bad(self) -> list[str]:
        return sorted(set().union(*(s.bad for s in self.sources)))

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    def layout(self) -> dict:
        """What must match for a saved position to mean the same data."""
        s0 = self.sources[0]
        return {"num_streams": self.S, "seq_len": self.L, "seed": self.seed, "shuffle": s0.shuffle,
                "shuffle_buffer": s0.buffer, "mix_period": self.period,
                "sources": [[n, w, s.ds.fingerprint()] for n, w, s in zip(self.names, self.weights, self.sources)]}


def stream_windows_taken(consumed: int, stream: int, num_streams: int) -> int:
    """Windows stream `stream` has given when `consumed` global sequences are
    done: the count of g < consumed with g % S == stream."""
    return max(0, (consumed - stream + num_streams - 1) // num_streams)


def rank_sequences(mix: Mixture, rank: int, world: int, consumed: int) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's (sequence, source) for g = consumed + ..., g % world == rank.
    `consumed` must be a multiple of the world size (a step boundary)."""
    S = mix.S
    if S % world:
        raise DataError(f"data.num_streams={S} is not divisible by the number of ranks ({world})")
    if consumed % world:
        raise DataError(f"data position {consumed} is not a multiple of the number of ranks ({world})")
    its = {s: mix.windows(s, stream_windows_taken(consumed, s, S)) for s in range(rank, S, world)}
    g = consumed + rank
    while True:
        yield next(its[g % S])
        g += world


class Batches:
    """Micro-batches for one rank, loaded ahead in a background thread.

    state_dict() is the position of what the trainer has *taken*, not of what
    the thread has read ahead, so a checkpoint never skips prefetched data.
    """

    def __init__(self, mix: Mixture, rank: int, world: int, micro_batch: int, consumed: int = 0,
                 prefetch: int = 4):
        self.mix, self.rank, self.world, self.micro_batch = mix, rank, world, micro_batch
        self.start = consumed
        self.taken = 0  # sequences this rank has handed to the trainer
        self.wait_time = 0.0  # seconds the trainer spent waiting for data
        self.source_counts = np.zeros(len(mix.sources), dtype=np.int64)  # taken, per source
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="megagpt-data", daemon=True)
        self._thread.start()

    @property
    def consumed(self) -> int:
        return self.start + self.taken * self.world

    def _fill(self) -> None:
        try:
            seqs = rank_sequences(self.mix, self.rank, self.world, self.start)
            while not self._stop.is_set():
                items = [next(seqs) for _ in range(self.micro_batch)]
                batch = np.stack([w for w, _ in items]).astype(np.int64)  # (B, T + 1)
                sources = np.array([i for _, i in items])
                self._put((torch.from_numpy(batch), sources))
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
            self._queue.put(item)  # every later take fails the same way
            raise item
        batch, sources = item
        self.taken += self.micro_batch
        self.source_counts += np.bincount(sources, minlength=len(self.source_counts))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, **self.mix.layout(), "bad_shards": self.mix.bad}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def check_resumable(state: dict, mix: Mixture) -> int:
    """The position to resume at; refuses a state from another data layout."""
    for key, now in mix.layout().items():
        if key in state and _plain(state[key]) != _plain(now):
            raise DataError(f"checkpoint data state has {key}={state[key]!r} but this run has {now!r}; "
                            "the data stream cannot continue in the same place")
    return int(state["consumed"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def val_sequences(ds: Dataset, seq_len: int, rank: int, world: int, count: int,
                  reader: ShardReader = default_reader) -> list[np.ndarray]:
    """The first `count * world` validation windows, in order, this rank's
    share (g % world == rank): the same fixed set at every evaluation."""
    if not ds.val_shards:
        return []
    s = ShardStreams(ds, 1, seq_len, seed=0, shuffle=False, reader=reader, shards=ds.val_shards,
                     name="validation")
    out, it = [], s.raw_windows(0, 0)
    for g in range(count * world):
        w = next(it)
        if g % world == rank:
            out.append(w.astype(np.int64))
    return out
