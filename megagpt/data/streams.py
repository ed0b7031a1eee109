"""One source's shards dealt into streams of windows (the layout is described
in megagpt.data.loader).

A stream is an endless token sequence, each epoch's shards one after another,
cut into windows of seq_len + 1 tokens with stride seq_len and shuffled within
blocks.  It is handed on as 2-D arrays of whole windows: the windows over one
contiguous token buffer are a strided view, a shuffle block one fancy index.
Given a PrefetchPool, a stream reads its next shard in the background while the
current one is cut, and starts reading its first shard as soon as it is asked
for its windows; a read's error surfaces only where the stream reaches that
shard, so what is yielded, and where an error stops it, is exactly as if every
shard were read on demand.

The epoch a stream has reached is a function of how many windows it has
handed out (epoch_of), worked out from the manifest's token counts alone, so
it is the same on every rank and exact on resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from megagpt.data.order import BlockPermutations, permutation, permutations
from megagpt.data.prefetch import Pending, PrefetchPool
from megagpt.data.shards import VERIFY, DataError, Dataset, Shard, advise, read_shard

log = logging.getLogger("megagpt")
ShardReader = Callable[[Shard, Dataset], np.ndarray]

# Keys of the hash orders, so that the shard order, the window shuffle and a
# mixture's schedule drawn from the same seed are unrelated.
SHARD_ORDER_KEY, WINDOW_SHUFFLE_KEY = 0x5A4D, 0x5EED


def make_reader(verify: str = "fast") -> ShardReader:
    """The reader of prepared shards, checking each against the manifest's
    xxh3_128 ("fast", sha256 where the manifest has no xxh3_128) or sha256."""
    if verify not in VERIFY:
        raise DataError(f"data.verify: unknown check {verify!r}; choose one of {', '.join(VERIFY)}")

    def reader(shard: Shard, ds: Dataset) -> np.ndarray:
        return read_shard(shard, ds.dtype, ds.vocab_size, ds.eod_id, verify)

    return reader


default_reader = make_reader()


class RowTaker:
    """The next n rows of a generator of chunks (tuples of equal-length arrays).

    take(n) returns fewer than n rows only when the generator raised; that
    error is then in `error` and raised by the next take."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, ...]], empty: tuple[np.ndarray, ...]):
        self._chunks, self._empty = chunks, empty
        self._current: tuple[np.ndarray, ...] = empty
        self._pos = 0  # rows of _current already taken
        self.error: BaseException | None = None

    def pieces(self, n: int) -> list[tuple[np.ndarray, ...]]:
        """The next n rows as consecutive pieces (views where possible)."""
        if self.error is not None:
            raise self.error
        pieces, got = [], 0
        while got < n:
            available = len(self._current[0]) - self._pos
            if available <= 0:
                try:
                    self._current, self._pos = next(self._chunks), 0
                except BaseException as e:  # noqa: BLE001 - kept for the caller, raised on the next take
                    self.error = e if not isinstance(e, StopIteration) else RuntimeError("window stream ended")
                    break
                continue
            k = min(n - got, available)
            pieces.append(tuple(a[self._pos : self._pos + k] for a in self._current))
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


def _windows_of(buf: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """The n windows buf[i*seq_len : i*seq_len + seq_len + 1] as one (n, seq_len + 1) read-only view."""
    step = buf.strides[0]
    view = np.ndarray((n, seq_len + 1), dtype=buf.dtype, buffer=buf, strides=(seq_len * step, step))
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class StreamSettings:
    """How a source is dealt into streams and cut into windows."""

    num_streams: int
    seq_len: int
    seed: int
    shuffle: bool = True  # a new shard order every epoch, else the manifest's order
    shuffle_buffer: int = 1  # windows shuffled together in a block (1: none)
    on_error: str = "raise"  # or "skip": a shard that cannot be read adds no tokens
    reader: ShardReader = default_reader


class ShardStreams:
    """The streams of one source: which shards each reads in which epoch,
    and the windows each yields from any starting window."""

    def __init__(
        self, ds: Dataset, settings: StreamSettings, name: str = "data", shards: Sequence[Shard] | None = None
    ):
        """`shards`: the dataset's training shards unless given (validation reads its own)."""
        self.shards = tuple(ds.shards if shards is None else shards)
        if settings.num_streams > len(self.shards):
            raise DataError(
                f"data.num_streams={settings.num_streams} exceeds the number of shards of {name} "
                f"({len(self.shards)}); lower it or write more, smaller shards"
            )
        if settings.on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error: unknown policy {settings.on_error!r}; choose raise or skip")
        self.ds, self.settings, self.name = ds, settings, name
        self.num_streams, self.seq_len = settings.num_streams, settings.seq_len
        self.shuffle_buffer = max(1, settings.shuffle_buffer)
        self.bad: set[str] = set()  # shards skipped as bad: they add no tokens
        self.skipped = 0  # shards skipped by this process
        self.dtype = np.dtype(ds.dtype).newbyteorder("<")
        self._epoch_starts = np.zeros((1, self.num_streams), dtype=np.int64)  # see epoch_starts
        self._epoch_starts_bad = 0  # len(self.bad) they were worked out with: bad shards only ever get added

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        """The shards stream `stream` reads in `epoch`, in order: every
        num_streams-th of the epoch's order, starting at the stream's number."""
        n = len(self.shards)
        order = permutation(n, self.settings.seed, SHARD_ORDER_KEY, epoch) if self.settings.shuffle else np.arange(n)
        return [int(i) for i in order[stream :: self.num_streams]]

    def _tokens(self, shard: Shard) -> int:
        return 0 if shard.url in self.bad else shard.stream_tokens

    def empty(self) -> np.ndarray:
        return np.empty((0, self.seq_len + 1), dtype=self.dtype)

    def chunks(self, stream: int, start: int, pool: PrefetchPool | None = None) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... after the bounded shuffle, as (n, seq_len + 1) arrays.

        With a pool, the shard they begin in is read in the background from
        this call on, so that a rank's streams fetch their first shards
        together, not one after another, when it starts or resumes."""
        block_size = self.shuffle_buffer
        block_start = start - start % block_size  # a shuffle block is read whole
        first = self._start_first_read(stream, block_start, pool) if pool is not None else None
        raw = self.raw_chunks(stream, block_start, pool, first)
        if block_size == 1:
            return raw
        return self._shuffled(raw, stream, start)

    def _shuffled(self, raw: Iterator[np.ndarray], stream: int, start: int) -> Iterator[np.ndarray]:
        """Windows start, start+1, ... of the shuffle blocks of `raw`, which
        starts at the first window of start's block."""
        block_size = self.shuffle_buffer
        block, first = divmod(start, block_size)
        orders = BlockPermutations(block_size, self.settings.seed, WINDOW_SHUFFLE_KEY, stream)
        unshuffled = RowTaker(((c,) for c in raw), (self.empty(),))
        while True:
            (windows,) = unshuffled.take(block_size)
            if len(windows) < block_size:  # a read failed inside this block: nothing of it is yielded
                raise unshuffled.error
            yield windows[orders(block)[first:]]
            first, block = 0, block + 1

    def raw_chunks(
        self,
        stream: int,
        start: int,
        pool: PrefetchPool | None = None,
        first: tuple[tuple[int, int], Pending] | None = None,
    ) -> Iterator[np.ndarray]:
        """Unshuffled windows start, start+1, ... of one stream, as (n, seq_len + 1)
        arrays of consecutive windows (one per shard read, views of its tokens).
        `first`: ((epoch, place), read) of the first shard to read, already under way."""
        seq_len = self.seq_len
        skip = start * seq_len  # tokens of this stream before the first window
        rest = None  # the tokens after the last whole window: the next window's start
        epoch = 0
        ahead = first  # ((epoch, place), read in flight) of the next shard to read
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
                ahead = self._read_next(stream, epoch, order, place, pool) if pool is not None else None
                tokens = self._read(shard, job)
                if tokens is None:
                    continue
                live += 1
                tokens = tokens[skip:]
                skip = 0
                if rest is None:
                    buf = tokens
                elif len(tokens) >= seq_len + 1 - len(rest):  # the window that starts in `rest`, then on in `tokens`
                    need = seq_len + 1 - len(rest)
                    yield np.concatenate([rest, tokens[:need]])[None]
                    buf = tokens[need - 1 :]  # (the next window starts seq_len after that one)
                else:
                    buf = np.concatenate([rest, tokens])
                n = (len(buf) - 1) // seq_len  # whole windows available
                if n > 0:
                    yield _windows_of(buf, n, seq_len)
                    rest = buf[n * seq_len :]
                else:
                    rest = buf
            if not live:
                raise DataError(
                    f"{self.name}: every shard of stream {stream} is bad or empty (bad: {sorted(self.bad)[:3]}...)"
                )
            epoch += 1

    def _start_first_read(self, stream: int, start: int, pool: PrefetchPool) -> tuple[tuple[int, int], Pending] | None:
        """((epoch, place), read started) of the shard raw_chunks(stream, start)
        reads first; None if every shard is bad or empty (raw_chunks reports it)."""
        skip, epoch = start * self.seq_len, 0
        while True:
            live = False
            for place, idx in enumerate(self.shards_of(stream, epoch)):
                tokens = self._tokens(self.shards[idx])
                live = live or tokens > 0
                if skip >= tokens:
                    skip -= tokens
                    continue
                return (epoch, place), pool.submit(self.settings.reader, self.shards[idx], self.ds)
            if not live:
                return None
            epoch += 1

    def _read_next(self, stream: int, epoch: int, order: list[int], place: int, pool: PrefetchPool):
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
                    job = (e, p), pool.submit(self.settings.reader, shard, self.ds)
        return job

    # -- epochs: which pass over the shards a stream's windows read -------------------------

    def pass_tokens(self) -> int:
        """Tokens one pass over the shards adds to the streams together (a bad shard adds none)."""
        return sum(self._tokens(shard) for shard in self.shards)

    def epoch_of(self, stream: int, windows: int) -> int:
        """The epoch (0: the first pass over the shards) of the furthest token of
        the first `windows` windows stream `stream` hands out; 0 before any."""
        if windows <= 0:
            return 0
        end = self._furthest(stream, windows) * self.seq_len  # the last token of the furthest window
        starts = self.epoch_starts(stream, end)
        if end < starts[-1]:
            return int(np.searchsorted(starts, end, side="right")) - 1
        return len(starts) - 1 + (end - int(starts[-1])) // self._mean_pass(starts)

    def windows_to_reach(self, stream: int, epoch: int) -> int:
        """The fewest windows stream `stream` hands out that hold a token of `epoch`:
        the least n with epoch_of(stream, n) >= epoch (for epoch >= 1)."""
        window = max(0, -(-self._epoch_begins(stream, epoch) // self.seq_len) - 1)  # the first to end there or later
        if self.shuffle_buffer == 1:
            return window + 1
        block, offset = divmod(window, self.shuffle_buffer)
        order = permutation(self.shuffle_buffer, self.settings.seed, WINDOW_SHUFFLE_KEY, stream, block)
        return block * self.shuffle_buffer + int(np.argmax(order >= offset)) + 1

    def _epoch_begins(self, stream: int, epoch: int) -> int:
        """The index of the first token of `epoch` in stream `stream`."""
        starts = self.epoch_starts(stream, 0, epoch)
        known = len(starts) - 1
        if epoch <= known:
            return int(starts[epoch])
        return int(starts[-1]) + (epoch - known) * self._mean_pass(starts)

    def _furthest(self, stream: int, windows: int) -> int:
        """1 + the unshuffled index of the furthest of the first `windows` windows
        handed out: a shuffle block hands its windows out in a permuted order."""
        block, into = divmod(windows, self.shuffle_buffer)
        if into == 0:
            return windows
        order = permutation(self.shuffle_buffer, self.settings.seed, WINDOW_SHUFFLE_KEY, stream, block)
        return block * self.shuffle_buffer + int(order[:into].max()) + 1

    def epoch_starts(self, stream: int, token: int, epochs: int = 0) -> np.ndarray:
        """Where stream `stream`'s epochs begin, as indices of its tokens ([0] is 0),
        known at least past token index `token` and for `epochs` epochs, or for
        the most epochs kept (`_kept_epochs`).  Worked out for every stream at
        once, many epochs per call, and kept."""
        if len(self.bad) != self._epoch_starts_bad:  # a shard found bad since: its epochs are shorter
            self._epoch_starts_bad = len(self.bad)
            self._epoch_starts = self._epoch_starts[:1]
        while (self._epoch_starts[-1, stream] <= token or len(self._epoch_starts) <= epochs) and len(
            self._epoch_starts
        ) <= self._kept_epochs():
            before = self._epoch_starts[-1, stream]
            self._more_epoch_starts()
            if self._epoch_starts[-1, stream] == before:
                raise DataError(f"{self.name}: every shard of stream {stream} is bad or empty")
        return self._epoch_starts[:, stream]

    def _kept_epochs(self) -> int:
        """Epochs whose starts are kept: about a million numbers over all streams.
        Past them epochs are counted in passes of the mean length: exact where
        every pass of a stream is alike (no shard shuffle, or one stream); a
        shuffled corpus gets there only when repeated ~65,000 times at 16 streams."""
        return max(64, (1 << 20) // self.num_streams)

    @staticmethod
    def _mean_pass(starts: np.ndarray) -> int:
        return max(1, int(starts[-1]) // (len(starts) - 1))

    def _more_epoch_starts(self) -> None:
        """Extend the epoch starts by as many epochs as are known already (at
        least one), in one permutation call: the orders of shards_of."""
        n, known = len(self.shards), len(self._epoch_starts) - 1
        count = max(1, min(known, self._kept_epochs() - known, (1 << 20) // n))  # ~1M shard places at a time
        epochs = np.arange(known, known + count)
        if self.settings.shuffle:
            orders = permutations(n, (self.settings.seed, SHARD_ORDER_KEY), epochs)
        else:
            orders = np.broadcast_to(np.arange(n), (count, n))
        tokens = np.array([self._tokens(shard) for shard in self.shards], dtype=np.int64)
        dealt = np.zeros((count, -(-n // self.num_streams) * self.num_streams), dtype=np.int64)
        dealt[:, :n] = tokens[orders]  # place p of an epoch's order goes to stream p % num_streams
        per_stream = dealt.reshape(count, -1, self.num_streams).sum(axis=1)  # (count, num_streams)
        self._epoch_starts = np.concatenate([self._epoch_starts, self._epoch_starts[-1] + per_stream.cumsum(axis=0)])

    def _read(self, shard: Shard, job: Pending | None = None) -> np.ndarray | None:
        """The shard's tokens (from `job` where it was read ahead); None if it
        is bad and on_error is skip."""
        try:
            return self.settings.reader(shard, self.ds) if job is None else job.result()
        except DataError as e:
            if self.settings.on_error == "raise":
                raise
            self.bad.add(shard.url)
            self.skipped += 1
            log.warning("data.on_error=skip: skipping %s", e)
            return None
