"""Several sources' streams interleaved by weight (the layout is described in
megagpt.data.loader).

Window k of mixed stream s comes from the source a fixed schedule names: in
every block of `period` windows each source has its weight's share of places,
in an order drawn from (seed, stream, block).  A block is built by scattering
each source's share into the schedule's places with one index array.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from megagpt.data.order import BlockPermutations
from megagpt.data.prefetch import PrefetchPool
from megagpt.data.shards import DataError
from megagpt.data.streams import RowTaker, ShardStreams

SCHEDULE_KEY = 0x313  # the hash key of the schedule's orders


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
        return places[(orders or self._orders(stream))(block)]

    def _orders(self, stream: int) -> BlockPermutations:
        return BlockPermutations(self.period, self.seed, SCHEDULE_KEY, stream)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, self.seq_len + 1), dtype=self.dtype), np.empty(0, dtype=np.int64)

    def _starts(self, stream: int, start: int) -> list[int]:
        """Where each source's windows begin for chunks(stream, start)."""
        if len(self.sources) == 1:
            return [start]
        block, first = divmod(start, self.period)
        schedule = self.schedule(stream, block)
        return [block * n + int((schedule[:first] == i).sum()) for i, n in enumerate(self.counts)]

    def chunks(self, stream: int, start: int,
               pool: PrefetchPool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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

    @property
    def bad(self) -> list[str]:
        return sorted(set().union(*(s.bad for s in self.sources)))

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    def layout(self) -> dict:
        """What must match for a saved position to mean the same data."""
        first = self.sources[0]
        return {"num_streams": self.num_streams, "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": first.settings.shuffle, "shuffle_buffer": first.shuffle_buffer, "mix_period": self.period,
                "sources": [[n, w, s.ds.fingerprint()] for n, w, s in zip(self.names, self.weights, self.sources)]}
