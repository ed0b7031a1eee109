"""A rank's training data: a packed token stream over webdataset shards whose
place is a single number.

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
* A source's *data epoch* at a position is 1 + the furthest pass over its
  shards that the windows taken so far reach into, in any of its streams
  (Mixture.epochs): 2 from the first sequence holding a token of a second
  pass.  Like everything else it follows from the position and the manifest's
  counts, so it is exact on resume and the same on every rank (but for shards
  a rank found bad since the last checkpoint, under on_error=skip).

How it is computed: every layer hands on 2-D arrays of whole windows, never
one window at a time.  The layers, each importing only those before it:
`order` (the hash permutations), `prefetch` (the reader threads), `streams`
(one source's streams: strided window views, shuffle blocks), `mixture` (the
schedule's scatter), and here a rank's sequences, which interleave its
streams by strided slices, cast to int32 in the same copy, and the batches a
background thread makes of them.  The reader threads belong to the Batches
and end with its close().
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Sequence

import numpy as np
import torch

from megagpt.data.buffers import BufferPool
from megagpt.data.mixture import EpochSpans, Mixture, stream_windows_taken
from megagpt.data.prefetch import PrefetchPool
from megagpt.data.shards import DataError
from megagpt.data.streams import RowTaker

log = logging.getLogger("megagpt")


class RankReader:
    """This rank's sequences g = consumed + rank + k * world, many at a time.

    take(n) gives the next n as a (n, seq_len + 1) array and their sources; it
    returns fewer only when a read failed, and that error is in `error`.
    Without a pool every shard is read on demand."""

    def __init__(self, mix: Mixture, rank: int, world: int, consumed: int, pool: PrefetchPool | None = None):
        num_streams = mix.num_streams
        if num_streams % world:
            raise DataError(f"data.num_streams={num_streams} is not divisible by the number of ranks ({world})")
        if consumed % world:
            raise DataError(f"data position {consumed} is not a multiple of the number of ranks ({world})")
        self.mix, self.rank, self.world = mix, rank, world
        self.streams = list(range(rank, num_streams, world))  # sequence g comes from stream g % num_streams
        # Every stream's first shard read starts here, all at once, in the background.
        self.takers = [
            RowTaker(mix.chunks(s, stream_windows_taken(consumed, s, num_streams), pool), mix.empty())
            for s in self.streams
        ]
        self.next_sequence = consumed + rank  # the global number of this rank's next sequence
        self.error: BaseException | None = None
        self._buffers = BufferPool(keep=6)  # the arrays take() fills, used again once released

    def take(self, n: int, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        if self.error is not None:
            raise self.error
        n_streams = len(self.takers)
        # The index in self.streams of the stream the next sequence comes from.
        first_stream = (self.next_sequence % self.mix.num_streams - self.rank) // self.world
        out = self._buffers.empty((n, self.mix.seq_len + 1), dtype or self.mix.dtype)
        sources = np.empty(n, dtype=np.int64)
        end = n
        for j, taker in enumerate(self.takers):
            first_row = (j - first_stream) % n_streams  # its sequences sit at rows first_row + k * n_streams
            want = len(range(first_row, n, n_streams))
            if not want:
                continue
            row = first_row
            for got, got_sources in taker.pieces(want):  # each piece straight to its rows, cast in the copy
                out[row : row + len(got) * n_streams : n_streams] = got
                sources[row : row + len(got) * n_streams : n_streams] = got_sources
                row += len(got) * n_streams
            if row < first_row + want * n_streams and row < end:  # this stream failed first, here
                end, self.error = row, taker.error
        self.next_sequence += end * self.world
        return (out, sources) if end == n else (out[:end], sources[:end])


class _Producer:
    """One run of the background thread that makes micro-batches from
    `consumed` on and queues them `group` at a time, with the reader threads
    it reads through.  stop() ends both; a restart is a new _Producer, with
    its own queue, so nothing a stopped one still puts can be taken."""

    def __init__(
        self, mix: Mixture, rank: int, world: int, micro_batch: int, group: int, queue_size: int, consumed: int
    ):
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stopped = threading.Event()
        self._pool = PrefetchPool()
        self._thread = threading.Thread(
            target=self._fill, args=(mix, rank, world, micro_batch, group, consumed), name="megagpt-data", daemon=True
        )
        self._thread.start()

    def _fill(self, mix: Mixture, rank: int, world: int, micro_batch: int, group: int, consumed: int) -> None:
        try:
            reader = RankReader(mix, rank, world, consumed, self._pool)
            n, n_sources = group * micro_batch, len(mix.sources)
            while not self._stopped.is_set():
                windows, sources = reader.take(n, np.int32)  # (n, seq_len + 1), cast in the gather's copy
                full = len(windows) // micro_batch  # a failed read: the micro-batches before it, then the error
                if full:
                    rows = full * micro_batch
                    which = np.arange(rows) // micro_batch * n_sources + sources[:rows]
                    counts = np.bincount(which, minlength=full * n_sources).reshape(full, n_sources).cumsum(axis=0)
                    self._put((torch.from_numpy(windows[:rows]).split(micro_batch), counts))
                if len(windows) < n:
                    raise reader.error
        except BaseException as e:  # noqa: BLE001 - surfaced to the trainer on its next take
            self._put(e)

    def _put(self, item) -> None:
        while not self._stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self._stopped.set()
        self._pool.close()  # reads not started fail, so the thread is not left waiting on them
        self._thread.join(timeout=5)


class Batches:
    """Micro-batches for one rank, loaded ahead in a background thread.

    The thread makes `group` micro-batches at a time (about `group_tokens`
    tokens) and queues them together; `prefetch` micro-batches (rounded up to
    whole groups) wait ahead.  A micro-batch is one (micro_batch, seq_len + 1)
    int32 tensor of windows: inputs are [:, :-1], targets [:, 1:], so that a
    host-to-device copy moves one contiguous block of half the bytes of
    int64; the trainer widens it to int64 on the device (cross-entropy's
    targets must be int64).  state_dict() is the position of what the trainer
    has *taken*, not of what the thread has read ahead, so a checkpoint never
    skips prefetched data; load_state_dict() goes back (or on) to such a
    position.  close() stops the thread and its shard readers.

    data_epochs are the sources' epochs at that position (Mixture.epochs).
    Rank 0 warns once per source when the micro-batch it hands out is the
    first to hold a token of that source's second pass (`sequences_per_step`,
    where given, lets the warning say the step and the steps one pass lasts).
    """

    def __init__(
        self,
        mix: Mixture,
        rank: int,
        world: int,
        micro_batch: int,
        consumed: int = 0,
        prefetch: int = 4,
        group_tokens: int = 1 << 19,
        sequences_per_step: int | None = None,
    ):
        self.mix, self.rank, self.world, self.micro_batch = mix, rank, world, micro_batch
        self.wait_time = 0.0  # seconds the trainer spent waiting for data
        self.group = max(1, min(64, group_tokens // (micro_batch * (mix.seq_len + 1))))
        self._queue_size = max(1, -(-prefetch // self.group))
        self._before = np.zeros(len(mix.sources), dtype=np.int64)  # sources taken in earlier groups
        self._epochs = EpochSpans(mix)
        self._wraps = _WrapWarnings(mix, sequences_per_step) if rank == 0 else None
        self._start(consumed)

    def _start(self, consumed: int) -> None:
        self.start = consumed
        self.taken = 0  # sequences this rank has handed to the trainer since `start`
        self._blocks: Sequence[torch.Tensor] = ()  # the group being handed out
        self._counts = np.zeros((1, len(self.mix.sources)), dtype=np.int64)  # its sources, cumulative per micro-batch
        self._at = 0  # micro-batches of it handed out
        self._producer: _Producer | None = None  # started at the first take: a resume moves the start first

    def _started(self) -> _Producer:
        if self._producer is None:
            self._producer = _Producer(
                self.mix, self.rank, self.world, self.micro_batch, self.group, self._queue_size, self.start
            )
        return self._producer

    @property
    def consumed(self) -> int:
        return self.start + self.taken * self.world

    @property
    def data_epochs(self) -> dict[str, int]:
        """Each source's data epoch at the position taken (Mixture.epochs)."""
        return dict(zip(self.mix.names, self._epochs.at(self.consumed)))

    @property
    def data_epoch(self) -> int:
        """The furthest data epoch of any source."""
        return max(self.data_epochs.values())

    @property
    def source_counts(self) -> np.ndarray:
        """Sequences this process has taken from each source."""
        return self._before + (self._counts[self._at - 1] if self._at else 0)

    @property
    def source_names(self) -> list[str]:
        """The sources' names, in the order of source_counts."""
        return list(self.mix.names)

    @property
    def skipped_shards(self) -> int:
        """Shards this process's readers skipped (data.on_error=skip)."""
        return self.mix.skipped

    def next_windows(self) -> torch.Tensor:
        """The next micro-batch: (micro_batch, seq_len + 1) int32 windows."""
        if self._at == len(self._blocks):
            producer = self._started()
            t0 = time.perf_counter()
            item = producer.queue.get()
            self.wait_time += time.perf_counter() - t0
            if isinstance(item, BaseException):
                producer.queue.put(item)  # every later take fails the same way
                raise item
            self._before = self.source_counts
            (self._blocks, self._counts), self._at = item, 0
        self._at += 1
        self.taken += self.micro_batch
        if self._wraps is not None:
            self._wraps.check(self._epochs, self.consumed)
        return self._blocks[self._at - 1]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, **self.mix.layout(), "bad_shards": self.mix.bad}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a state_dict() of this data layout, else
        check_resumable's DataError): its position and the shards it found
        bad.  What was read ahead is dropped and the thread starts again from
        there.  wait_time and source_counts go on counting for this process."""
        consumed = check_resumable(state, self.mix)
        if self._producer is not None:
            self._producer.stop()
        for source in self.mix.sources:  # shards found bad before add no tokens
            source.bad.update(state.get("bad_shards", []))
        self._before = self.source_counts
        self._start(consumed)

    def stand_in(self) -> torch.Tensor:
        """Windows of the shape next_windows() hands out, all token 0: what a rank
        whose data failed passes to the step so that every rank still meets in
        the step's collectives (the step is then skipped everywhere)."""
        return torch.zeros((self.micro_batch, self.mix.seq_len + 1), dtype=torch.int32)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.stop()


class _WrapWarnings:
    """The warning, once per source and process, that a source's stream has
    wrapped around: the position taken has reached its second pass over the
    shards, which most runs do not mean to do."""

    def __init__(self, mix: Mixture, sequences_per_step: int | None):
        self.mix, self.sequences_per_step = mix, sequences_per_step
        self.unreported = set(range(len(mix.sources)))

    def check(self, epochs: EpochSpans, consumed: int) -> None:
        if not self.unreported:
            return
        now = epochs.at(consumed)
        for i in sorted(self.unreported):
            if now[i] >= 2:
                self.unreported.discard(i)
                log.warning(self._message(i, self.mix.reaches(i, 2), now[i]))

    def _message(self, i: int, at: int, epoch: int) -> str:
        mix = self.mix
        name, one_pass, window = mix.names[i], mix.sources[i].pass_tokens(), mix.seq_len + 1
        where = f"sequence {at - 1:,}"  # the first sequence that holds a token of the second pass
        if self.sequences_per_step:
            where += f" (step {(at - 1) // self.sequences_per_step + 1:,})"
        if one_pass < window:
            size = (
                f"one pass is {one_pass:,} tokens, shorter than one window of {window:,}: "
                f"each window repeats this tiny corpus about {window / one_pass:,.0f} times"
            )
        else:
            sequences = one_pass / mix.seq_len * mix.period / mix.counts[i]  # its share of the mixed windows
            per_step = self.sequences_per_step or 1
            size = (
                f"one pass is {one_pass:,} tokens, about {_about(sequences / per_step)} "
                f"{'steps' if self.sequences_per_step else 'sequences'}"
            )
        now = "epoch 2 starts" if epoch == 2 else f"now in epoch {epoch}"
        return f"data: source {name!r} wrapped around at {where}: {size}; {now}"


def _about(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def check_resumable(state: dict, mix: Mixture) -> int:
    """The position to resume at; refuses a state from another data layout."""
    for key, now in mix.layout().items():
        if key in state and _plain(state[key]) != _plain(now):
            raise DataError(
                f"checkpoint data state has {key}={state[key]!r} but this run has {now!r}; "
                "the data stream cannot continue in the same place"
            )
    return int(state["consumed"])


def _plain(x):
    """Lists for tuples, at every depth: a state read back from JSON or a
    checkpoint compares equal to the layout it was saved from."""
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x
