"""Several sources' streams interleaved by weight (the layout is described in
megagpt.data.loader).

Window k of mixed stream s comes from the source a fixed schedule names: in
every block of `period` windows each source has its weight's share of places,
in an order drawn from (seed, stream, block).  A block is built by scattering
each source's share into the schedule's places with one index array.

A source's data epoch at a position (`epochs`): counting from 1, the furthest
pass over its shards that any of its streams has handed out a window of.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from megagpt.data.order import BlockPermutations, permutation
from megagpt.data.prefetch import PrefetchPool
from megagpt.data.shards import DataError
from megagpt.data.streams import RowTaker, ShardStreams

SCHEDULE_KEY = 0x313  # the hash key of the schedule's orders


def stream_windows_taken(consumed: int, stream: int, num_streams: int) -> int:
    """Windows stream `stream` has given when `consumed` global sequences are
    done: the count of g < consumed with g % num_streams == stream."""
    return max(0, (consumed - stream + num_streams - 1) // num_streams)


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

    def __init__(
        self,
        sources: Sequence[ShardStreams],
        weights: Sequence[float],
        period: int = 100,
        names: Sequence[str] | None = None,
    ):
        if len({s.num_streams for s in sources}) != 1 or len({s.seq_len for s in sources}) != 1:
            raise DataError("data.sources: all sources need the same num_streams and seq_len")
        self.sources = list(sources)
        self.names = list(names or [s.name for s in sources])
        self.weights = list(weights)
        self.period = period if len(sources) > 1 else 1
        self.counts = mix_counts(weights, self.period)
        first = sources[0]
        self.num_streams, self.seq_len, self.seed = first.num_streams, first.seq_len, first.settings.seed
        self.dtype = np.result_type(*(s.dtype for s in self.sources))

    def schedule(self, stream: int, block: int, orders: BlockPermutations | None = None) -> np.ndarray:
        """Which source each window of mixing block `block` of `stream` comes from."""
        places = np.repeat(np.arange(len(self.sources)), self.counts)
        if len(self.sources) == 1:
            return places
        if orders is None:  # one block: its order alone, not the next 64 of BlockPermutations
            return places[permutation(self.period, self.seed, SCHEDULE_KEY, stream, block)]
        return places[orders(block)]

    def _orders(self, stream: int) -> BlockPermutations:
        return BlockPermutations(self.period, self.seed, SCHEDULE_KEY, stream)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, self.seq_len + 1), dtype=self.dtype), np.empty(0, dtype=np.int64)

    def _starts(self, stream: int, start: int) -> list[int]:
        """Where each source's windows begin for chunks(stream, start): how many
        of them the first `start` windows of mixed stream `stream` hold."""
        if len(self.sources) == 1:
            return [start]
        block, first = divmod(start, self.period)
        schedule = self.schedule(stream, block)
        return [block * n + int((schedule[:first] == i).sum()) for i, n in enumerate(self.counts)]

    def chunks(
        self, stream: int, start: int, pool: PrefetchPool | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(windows, source indices) for windows start, start+1, ... of mixed stream
        `stream`, as (n, seq_len + 1) and (n,) arrays.  With a pool, every
        source's first shard read starts now (see ShardStreams.chunks)."""
        sources = [src.chunks(stream, at, pool) for src, at in zip(self.sources, self._starts(stream, start))]
        if len(self.sources) == 1:  # the plain case: no schedule to follow
            return ((c, np.zeros(len(c), dtype=np.int64)) for c in sources[0])
        takers = [RowTaker(((c,) for c in chunks), (src.empty(),)) for src, chunks in zip(self.sources, sources)]
        return self._mixed(stream, start, takers)

    def _mixed(self, stream: int, start: int, takers: list[RowTaker]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        block, first = divmod(start, self.period)
        orders = self._orders(stream)
        schedule = self.schedule(stream, block, orders)
        while True:
            places = schedule[first:].astype(np.int64)
            out = np.empty((len(places), self.seq_len + 1), dtype=self.dtype)
            end, error = len(places), None  # where the first failed read stops this block
            for i, taker in enumerate(takers):
                where = np.flatnonzero(places == i)
                (got,) = taker.take(len(where))
                out[where[: len(got)]] = got
                if len(got) < len(where) and where[len(got)] < end:  # this source failed first, here
                    end, error = int(where[len(got)]), taker.error
            if error is not None:
                if end:
                    yield out[:end], places[:end]
                raise error
            yield out, places
            block, first = block + 1, 0
            schedule = self.schedule(stream, block, orders)

    def epochs(self, consumed: int) -> list[int]:
        """Each source's data epoch once `consumed` global sequences are taken:
        1 + the furthest pass over its shards that any of its streams' windows
        taken so far reads (1 before any).  A function of the position alone."""
        epochs = [1] * len(self.sources)
        for stream in range(self.num_streams):
            taken = self._starts(stream, stream_windows_taken(consumed, stream, self.num_streams))
            for i, (source, windows) in enumerate(zip(self.sources, taken)):
                epochs[i] = max(epochs[i], 1 + source.epoch_of(stream, windows))
        return epochs

    def reaches(self, source: int, epoch: int) -> int | None:
        """The least position (global sequences consumed) at which source
        `source`'s data epoch is `epoch` (>= 2) or more; None if the schedule
        never takes from it."""
        if self.counts[source] == 0:
            return None
        first = None
        for stream in range(self.num_streams):
            windows = self.sources[source].windows_to_reach(stream, epoch - 1)
            mixed = self._mixed_windows(stream, source, windows)
            at = (mixed - 1) * self.num_streams + stream + 1  # the position once sequence `mixed - 1` of it is taken
            first = at if first is None else min(first, at)
        return first

    def _mixed_windows(self, stream: int, source: int, windows: int) -> int:
        """The fewest windows of mixed stream `stream` that hold `windows` (>= 1)
        of source `source`: the inverse of _starts."""
        if len(self.sources) == 1:
            return windows
        block, place = divmod(windows - 1, self.counts[source])
        where = np.flatnonzero(self.schedule(stream, block) == source)[place]
        return block * self.period + int(where) + 1

    @property
    def bad(self) -> list[str]:
        return sorted(set().union(*(s.bad for s in self.sources)))

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    def layout(self) -> dict:
        """What must match for a saved position to mean the same data."""
        first = self.sources[0]
        return {
            "num_streams": self.num_streams,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": first.settings.shuffle,
            "shuffle_buffer": first.shuffle_buffer,
            "mix_period": self.period,
            "sources": [[n, w, s.ds.fingerprint()] for n, w, s in zip(self.names, self.weights, self.sources)],
        }


class EpochSpans:
    """Mixture.epochs(consumed) for a position that mostly moves on a step at a
    time: each source's epoch is kept with the span of positions it holds for
    (Mixture.reaches), and worked out again (about a millisecond per stream)
    only when the position leaves that span or a shard is found bad."""

    def __init__(self, mix: Mixture):
        self.mix = mix
        self._spans = [(0, 0, 1)] * len(mix.sources)  # (first, end, epoch): epoch for first <= position < end
        self._bad = 0  # shards found bad when the spans were worked out: a bad shard moves them

    def at(self, consumed: int) -> list[int]:
        bad = sum(len(source.bad) for source in self.mix.sources)
        if bad != self._bad:
            self._bad, self._spans = bad, [(0, 0, 1)] * len(self.mix.sources)
        stale = [i for i, (first, end, _) in enumerate(self._spans) if not first <= consumed < end]
        if stale:
            epochs = self.mix.epochs(consumed)
            for i in stale:
                first = self.mix.reaches(i, epochs[i]) if epochs[i] > 1 else 0
                end = self.mix.reaches(i, epochs[i] + 1)
                self._spans[i] = (first, end if end is not None else float("inf"), epochs[i])
        return [epoch for _, _, epoch in self._spans]
