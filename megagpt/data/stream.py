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

How it is computed: every layer hands on 2-D arrays of whole windows, never
one window at a time.  A stream's windows over one contiguous token buffer are
a strided view (stride seq_len, length seq_len + 1); a shuffle block is one
fancy index with its permutation; a mixture block scatters each source's share
with the schedule's index arrays; a rank's sequences interleave its streams by
strided slices, cast to int32 in the same copy.  Each stream reads its next
shard (fetch, checksum, index, pack, check) in a background thread while the
current one is cut into windows, and a rank's streams start their first reads
together; a read's error surfaces only where the stream reaches that shard, so
what is yielded, and when an error stops it, is exactly as if every shard
were read on demand.  The permutations are SplitMix64 hash orders
(`permutation`), made 64 blocks at a time.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from megagpt.data.buffers import BufferPool
from megagpt.data.shards import VERIFY, Dataset, DataError, Shard, advise, read_shard

log = logging.getLogger("megagpt")
ShardReader = Callable[[Shard, Dataset], np.ndarray]


def make_reader(verify: str = "fast") -> ShardReader:
    """The reader of prepared shards, checking each against the manifest's
    xxh3_128 ("fast", sha256 where the manifest has no xxh3_128) or sha256."""
    if verify not in VERIFY:
        raise DataError(f"data.verify: unknown check {verify!r}; choose one of {', '.join(VERIFY)}")

    def reader(shard: Shard, ds: Dataset) -> np.ndarray:
        return read_shard(shard, ds.dtype, ds.vocab_size, ds.eod_id, verify)

    return reader


default_reader = make_reader()


_GOLDEN, _MUL1, _MUL2, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1
_U = {k: np.uint64(v) for k, v in (("golden", _GOLDEN), ("m1", _MUL1), ("m2", _MUL2), (30, 30), (27, 27), (31, 31))}


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array, in place (wrapping arithmetic)."""
    x ^= x >> _U[30]
    x *= _U["m1"]
    x ^= x >> _U[27]
    x *= _U["m2"]
    x ^= x >> _U[31]
    return x


def _key_hash(key) -> int:
    h = np.zeros(1, dtype=np.uint64)
    for k in key:
        h = _splitmix((h ^ np.uint64(k & _MASK)) + _U["golden"])
    return int(h[0])


def permutations(n: int, key: Sequence[int], last: Sequence[int]) -> np.ndarray:
    """Row j: a permutation of range(n) that is a fixed function of the
    integers (*key, last[j]): the order of n SplitMix64 hashes of (key, last[j], i).
    Many at once (one call per 64 shuffle blocks, ~1 us a block, where seeding
    a numpy Generator per block cost ~50 us)."""
    h = _splitmix((np.asarray(last, dtype=np.int64).astype(np.uint64) ^ np.uint64(_key_hash(key))) + _U["golden"])
    x = h[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _U["golden"]
    return np.argsort(_splitmix(x), axis=1, kind="stable")


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) that is a fixed function of the integers in `key`."""
    return permutations(n, key[:-1], [key[-1]])[0]


class _Blocks:
    """permutation(n, *key, block) for increasing blocks, made 64 at a time."""

    def __init__(self, n: int, *key: int):
        self.n, self.key, self.first, self.rows = n, key, 0, np.empty((0, n), dtype=np.int64)

    def __call__(self, block: int) -> np.ndarray:
        if not self.first <= block < self.first + len(self.rows):
            self.first, self.rows = block, permutations(self.n, self.key, np.arange(block, block + 64))
        return self.rows[block - self.first]


def default_num_streams(n_shards: int, world_size: int, preferred: int = 16) -> int:
    """The largest multiple of the world size not above min(preferred, shards)."""
    cap = max(min(preferred, n_shards), world_size)
    return (cap // world_size) * world_size


class _Prefetch:
    """fn(*args) run by a background reader thread; result() gives its value
    or raises its error.  The readers are a few daemon threads shared by every
    stream of the process (started on first use), so a read ahead costs no
    thread start and a stuck fetch never holds up the interpreter's exit."""

    _jobs: queue.SimpleQueue = queue.SimpleQueue()
    _threads: list[threading.Thread] = []
    _lock = threading.Lock()
    THREADS = 2

    def __init__(self, fn: Callable, *args):
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None
        self._job: tuple | None = (fn, args)
        with _Prefetch._lock:
            while len(_Prefetch._threads) < _Prefetch.THREADS:
                t = threading.Thread(target=_Prefetch._serve, name="megagpt-shard-reader", daemon=True)
                t.start()
                _Prefetch._threads.append(t)
        _Prefetch._jobs.put(self)

    @staticmethod
    def _serve() -> None:
        while True:
            job = _Prefetch._jobs.get()
            fn, args = job._job
            try:
                job._value = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the stream where it reaches the shard
                job._error = e
            finally:
                job._job = None
                job._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Taker:
    """The next n rows of a generator of chunks (tuples of equal-length arrays).

    take(n) returns fewer than n rows only when the generator raised; that
    error is then in `error` and raised by the next take."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, ...]], empty: tuple[np.ndarray, ...]):
        self._chunks, self._empty = chunks, empty
        self._cur: tuple[np.ndarray, ...] = empty
        self._pos = 0
        self.error: BaseException | None = None

    def pieces(self, n: int) -> list[tuple[np.ndarray, ...]]:
        """The next n rows as consecutive pieces (views where possible)."""
        if self.error is not None:
            raise self.error
        pieces, got = [], 0
        while got < n:
            avail = len(self._cur[0]) - self._pos
            if avail <= 0:
                try:
                    self._cur, self._pos = next(self._chunks), 0
                except BaseException as e:  # noqa: BLE001 - kept for the caller, raised on the next take
                    self.error = e if not isinstance(e, StopIteration) else RuntimeError("window stream ended")
                    break
                continue
            k = min(n - got, avail)
            pieces.append(tuple(a[self._pos : self._pos + k] for a in self._cur))
            self._pos += k
            got += k
        return pieces

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        pieces = self.pieces(n)
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return self._empty
        return tuple(np.concatenate(parts) for parts in zip(*pieces))


def _windows_of(buf: np.ndarray, n: int, L: int) -> np.ndarray:
    """The n windows buf[i*L : i*L + L + 1] as one (n, L + 1) read-only view."""
    s = buf.strides[0]
    view = np.ndarray((n, L + 1), dtype=buf.dtype, buffer=buf, strides=(L * s, s))
    view.flags.writeable = False
    return view


class ShardStreams:
    """The S streams of one source: which shards each reads in which epoch,
    and the windows each yields from any starting window."""

    def __init__(self, ds: Dataset, num_streams: int, seq_len: int, seed: int, shuffle: bool = True,
                 shuffle_buffer: int = 1, on_error: str = "raise", bad: Sequence[str] = (),
                 reader: ShardReader = default_reader, shards: Sequence[Shard] | None = None,
                 name: str = "data", read_ahead: bool = True):
        self.shards = tuple(ds.shards if shards is None else shards)
        if num_streams > len(self.shards):
            raise DataError(
                f"data.num_streams={num_streams} exceeds the number of shards of {name} "
                f"({len(self.shards)}); lower it or write more, smaller shards")
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error: unknown policy {on_error!r}; choose raise or skip")
        self.ds, self.S, self.L, self.seed, self.shuffle = ds, num_streams, seq_len, seed, shuffle
        self.buffer, self.on_error, self.reader, self.name = max(1, shuffle_buffer), on_error, reader, name
        self.read_ahead = read_ahead  # read each stream's next shard in a background thread
        self.bad: set[str] = set(bad)  # shards skipped as bad: they add no tokens
        self.skipped = 0  # shards skipped by this process
        self._primed: dict[tuple[int, int, int], _Prefetch] = {}  # (stream, epoch, place): first reads
        self.dtype = np.dtype(ds.dtype).newbyteorder("<")

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        n = len(self.shards)
        order = permutation(n, self.seed, 0x5A4D, epoch) if self.shuffle else np.arange(n)
        return [int(i) for i in order[stream :: self.S]]

    def _tokens(self, shard: Shard) -> int:
        return 0 if shard.url in self.bad else shard.stream_tokens

    def empty(self) -> np.ndarray:
        return np.empty((0, self.L + 1), dtype=self.dtype)

    def raw_chunks(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Unshuffled windows start, start+1, ... of one stream, as (n, seq_len + 1)
        arrays of consecutive windows (one per shard read, views of its tokens)."""
        L = self.L
        skip = start * L  # tokens of this stream before the first window
        rest = None  # the tokens after the last whole window: the next window's start
        epoch = 0
        ahead = None  # ((epoch, place), read in flight) of the next shard to read
        while True:
            live = 0  # shards of this epoch that add tokens: none would loop for ever
            order = self.shards_of(stream, epoch)
            for place, idx in enumerate(order):
                shard = self.shards[idx]
                if skip >= self._tokens(shard):  # skip whole shards by the manifest's counts
                    skip -= self._tokens(shard)
                    live += self._tokens(shard) > 0
                    continue
                job = ahead[1] if ahead is not None and ahead[0] == (epoch, place) else None
                job = job or self._primed.pop((stream, epoch, place), None)
                ahead = self._read_next(stream, epoch, order, place) if self.read_ahead else None
                tokens = self._read(shard, job)
                if tokens is None:
                    continue
                live += 1
                tokens = tokens[skip:]
                skip = 0
                if rest is None:
                    buf = tokens
                elif len(tokens) >= L + 1 - len(rest):  # the window that starts in `rest`, then on in `tokens`
                    need = L + 1 - len(rest)
                    yield np.concatenate([rest, tokens[:need]])[None]
                    buf = tokens[need - 1 :]  # (the next window starts L after that one)
                else:
                    buf = np.concatenate([rest, tokens])
                n = (len(buf) - 1) // L  # whole windows available
                if n > 0:
                    yield _windows_of(buf, n, L)
                    rest = buf[n * L :]
                else:
                    rest = buf
            if not live:
                raise DataError(f"{self.name}: every shard of stream {stream} is bad or empty "
                                f"(bad: {sorted(self.bad)[:3]}...)")
            epoch += 1

    def prime(self, stream: int, start: int) -> None:
        """Start reading, in the background, the shard where chunks(stream,
        start) will begin, so that a rank's streams fetch their first shards
        together rather than one after another when it starts or resumes."""
        if not self.read_ahead:
            return
        skip, epoch = (start - start % self.buffer) * self.L, 0  # chunks() starts at its block's first window
        while True:
            live = False
            for place, idx in enumerate(self.shards_of(stream, epoch)):
                tokens = self._tokens(self.shards[idx])
                live = live or tokens > 0
                if skip >= tokens:
                    skip -= tokens
                    continue
                if (stream, epoch, place) not in self._primed:
                    self._primed[(stream, epoch, place)] = _Prefetch(self.reader, self.shards[idx], self.ds)
                return
            if not live:
                return  # chunks() reports it
            epoch += 1

    def _read_next(self, stream: int, epoch: int, order: list[int], place: int):
        """Start reading the shard this stream will read after order[place]
        (fetch, checksum, index, compact and check: mostly I/O and numpy, which
        leave the GIL free for the thread that cuts and batches windows)."""
        job = None
        for e, later in ((epoch, order[place + 1 :]), (epoch + 1, self.shards_of(stream, epoch + 1))):
            first = place + 1 if e == epoch else 0
            for p, idx in enumerate(later, start=first):
                shard = self.shards[idx]
                if self._tokens(shard) > 0:
                    if job is not None:  # and the one after it: the kernel reads it meanwhile
                        advise(shard)
                        return job
                    job = (e, p), _Prefetch(self.reader, shard, self.ds)
        return job

    def _read(self, shard: Shard, job: _Prefetch | None = None) -> np.ndarray | None:
        try:
            return self.reader(shard, self.ds) if job is None else job.result()
        except DataError as e:
            if self.on_error == "raise":
                raise
            self.bad.add(shard.url)
            self.skipped += 1
            log.warning("data.on_error=skip: skipping %s", e)
            return None

    def chunks(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... after the bounded shuffle, as (n, seq_len + 1) arrays."""
        B = self.buffer
        if B == 1:
            yield from self.raw_chunks(stream, start)
            return
        block = start // B
        perms = _Blocks(B, self.seed, 0x5EED, stream)
        raw = _Taker(((c,) for c in self.raw_chunks(stream, block * B)), (self.empty(),))
        first = start - block * B
        while True:
            (items,) = raw.take(B)
            if len(items) < B:  # a read failed inside this block: nothing of it is yielded
                raise raw.error
            perm = perms(block)
            yield items[perm[first:]]
            first, block = 0, block + 1

    def raw_windows(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Unshuffled windows start, start+1, ... of one stream, (seq_len + 1,) each."""
        for c in self.raw_chunks(stream, start):
            yield from c

    def windows(self, stream: int, start: int) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... after the bounded shuffle."""
        for c in self.chunks(stream, start):
            yield from c


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
        self.dtype = np.result_type(*(s.dtype for s in self.sources))

    def schedule(self, stream: int, block: int, orders: _Blocks | None = None) -> np.ndarray:
        """Which source each window of mixing block `block` of `stream` comes from."""
        places = np.repeat(np.arange(len(self.sources)), self.counts)
        if len(self.sources) == 1:
            return places
        return places[(orders or _Blocks(len(places), self.seed, 0x313, stream))(block)]

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, self.L + 1), dtype=self.dtype), np.empty(0, dtype=np.int64)

    def _starts(self, stream: int, start: int) -> list[int]:
        """Where each source's chunks begin for chunks(stream, start)."""
        if len(self.sources) == 1:
            return [start]
        block, first = divmod(start, self.period)
        sched = self.schedule(stream, block)
        return [block * n + int((sched[:first] == i).sum()) for i, n in enumerate(self.counts)]

    def prime(self, stream: int, start: int) -> None:
        """Start the first shard reads of chunks(stream, start) in the background."""
        for src, at in zip(self.sources, self._starts(stream, start)):
            src.prime(stream, at)

    def chunks(self, stream: int, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(windows, source indices) for windows start, start+1, ... of mixed stream
        `stream`, as (n, seq_len + 1) and (n,) arrays."""
        if len(self.sources) == 1:  # the plain case: no schedule to follow
            for c in self.sources[0].chunks(stream, start):
                yield c, np.zeros(len(c), dtype=np.int64)
            return
        P = self.period
        block, first = divmod(start, P)
        orders = _Blocks(P, self.seed, 0x313, stream)
        sched = self.schedule(stream, block, orders)
        its = [_Taker(((c,) for c in src.chunks(stream, at)), (src.empty(),))
               for src, at in zip(self.sources, self._starts(stream, start))]
        while True:
            places = sched[first:].astype(np.int64)
            out = np.empty((len(places), self.L + 1), dtype=self.dtype)
            end, error = len(places), None
            for i, it in enumerate(its):
                where = np.flatnonzero(places == i)
                (got,) = it.take(len(where))
                out[where[: len(got)]] = got
                if len(got) < len(where) and where[len(got)] < end:  # this source failed first, here
                    end, error = int(where[len(got)]), it.error
            if error is not None:
                if end:
                    yield out[:end], places[:end]
                raise error
            yield out, places
            block, first = block + 1, 0
            sched = self.schedule(stream, block, orders)

    def windows(self, stream: int, start: int) -> Iterator[tuple[np.ndarray, int]]:
        """(window, source index) for windows start, start+1, ... of mixed stream `stream`."""
        for wins, srcs in self.chunks(stream, start):
            yield from zip(wins, srcs.tolist())

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


class RankReader:
    """This rank's sequences g = consumed + rank + k * world, many at a time.

    take(n) gives the next n as a (n, seq_len + 1) array and their sources; it
    returns fewer only when a read failed, and that error is in `error`."""

    def __init__(self, mix: Mixture, rank: int, world: int, consumed: int):
        S = mix.S
        if S % world:
            raise DataError(f"data.num_streams={S} is not divisible by the number of ranks ({world})")
        if consumed % world:
            raise DataError(f"data position {consumed} is not a multiple of the number of ranks ({world})")
        self.mix, self.rank, self.world = mix, rank, world
        self.streams = list(range(rank, S, world))  # sequence g comes from stream g % S
        for s in self.streams:  # every stream's first shard read at once, in the background
            mix.prime(s, stream_windows_taken(consumed, s, S))
        self.its = [_Taker(mix.chunks(s, stream_windows_taken(consumed, s, S)), mix.empty()) for s in self.streams]
        self.g = consumed + rank  # the next global sequence of this rank
        self.error: BaseException | None = None
        self._pool = BufferPool(keep=6)  # the arrays take() fills, used again once released

    def take(self, n: int, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        if self.error is not None:
            raise self.error
        m = len(self.its)
        j0 = (self.g % self.mix.S - self.rank) // self.world  # stream index of the first one
        out = self._pool.empty((n, self.mix.L + 1), dtype or self.mix.dtype)
        src = np.empty(n, dtype=np.int64)
        end = n
        for j, it in enumerate(self.its):
            k0 = (j - j0) % m  # its sequences sit at k0, k0 + m, ...
            want = len(range(k0, n, m))
            if not want:
                continue
            at = k0
            for got, got_src in it.pieces(want):  # each piece straight to its rows, cast in the copy
                out[at : at + len(got) * m : m] = got
                src[at : at + len(got) * m : m] = got_src
                at += len(got) * m
            if at < k0 + want * m and at < end:  # this stream failed first, here
                end, self.error = at, it.error
        self.g += end * self.world
        return (out, src) if end == n else (out[:end], src[:end])


def rank_sequences(mix: Mixture, rank: int, world: int, consumed: int) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's (sequence, source) for g = consumed + ..., g % world == rank.
    `consumed` must be a multiple of the world size (a step boundary)."""
    reader = RankReader(mix, rank, world, consumed)
    n = 8 * len(reader.streams)
    while True:
        wins, srcs = reader.take(n)
        yield from zip(wins, srcs.tolist())
        if len(wins) < n:
            raise reader.error


class Batches:
    """Micro-batches for one rank, loaded ahead in a background thread.

    The thread makes `group` micro-batches at a time (about `group_tokens`
    tokens) and queues them together; `prefetch` micro-batches (rounded up to
    whole groups) wait ahead.  A micro-batch is one (micro_batch, seq_len + 1)
    int32 tensor of windows: inputs are [:, :-1], targets [:, 1:], so that a
    host-to-device copy moves one contiguous block of half the bytes of
    int64; the trainer widens it to int64 on the device (cross-entropy's
    targets must be int64).  state_dict() is the
    position of what the trainer has *taken*, not of what the thread has read
    ahead, so a checkpoint never skips prefetched data.
    """

    def __init__(self, mix: Mixture, rank: int, world: int, micro_batch: int, consumed: int = 0,
                 prefetch: int = 4, group_tokens: int = 1 << 19):
        self.mix, self.rank, self.world, self.micro_batch = mix, rank, world, micro_batch
        self.start = consumed
        self.taken = 0  # sequences this rank has handed to the trainer
        self.wait_time = 0.0  # seconds the trainer spent waiting for data
        self.group = max(1, min(64, group_tokens // (micro_batch * (mix.L + 1))))
        n_src = len(mix.sources)
        self._blocks: Sequence[torch.Tensor] = ()  # the group being handed out
        self._counts = np.zeros((1, n_src), dtype=np.int64)  # its sources, cumulative per micro-batch
        self._at = 0  # micro-batches of it handed out
        self._before = np.zeros(n_src, dtype=np.int64)  # sources taken in earlier groups
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, -(-prefetch // self.group)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="megagpt-data", daemon=True)
        self._thread.start()

    @property
    def consumed(self) -> int:
        return self.start + self.taken * self.world

    @property
    def source_counts(self) -> np.ndarray:
        """Sequences taken so far from each source."""
        return self._before + (self._counts[self._at - 1] if self._at else 0)

    def _fill(self) -> None:
        try:
            reader = RankReader(self.mix, self.rank, self.world, self.start)
            M, n, n_src = self.micro_batch, self.group * self.micro_batch, len(self.mix.sources)
            while not self._stop.is_set():
                wins, srcs = reader.take(n, np.int32)  # (n, T + 1), cast in the gather's copy
                full = len(wins) // M  # a failed read: the micro-batches before it, then the error
                if full:
                    which = np.arange(full * M) // M * n_src + srcs[: full * M]
                    counts = np.bincount(which, minlength=full * n_src).reshape(full, n_src).cumsum(axis=0)
                    self._put((torch.from_numpy(wins[: full * M]).split(M), counts))
                if len(wins) < n:
                    raise reader.error
        except BaseException as e:  # surfaced to the trainer on its next take
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_windows(self) -> torch.Tensor:
        """The next micro-batch: (micro_batch, seq_len + 1) int32 windows."""
        if self._at == len(self._blocks):
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_time += time.perf_counter() - t0
            if isinstance(item, BaseException):
                self._queue.put(item)  # every later take fails the same way
                raise item
            self._before = self.source_counts
            (self._blocks, self._counts), self._at = item, 0
        self._at += 1
        self.taken += self.micro_batch
        return self._blocks[self._at - 1]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the next micro-batch, each (micro_batch, seq_len) int32."""
        t = self.next_windows()
        return t[:, :-1], t[:, 1:]

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
    if not ds.val_shards or count * world <= 0:
        return []
    s = ShardStreams(ds, 1, seq_len, seed=0, shuffle=False, reader=reader, shards=ds.val_shards,
                     name="validation")
    it = _Taker(((c,) for c in s.raw_chunks(0, 0)), (s.empty(),))
    (wins,) = it.take(count * world)
    if len(wins) < count * world:
        raise it.error
    return [w.astype(np.int64) for w in wins[rank::world]]
