"""The validation sequences: a fixed set, the same at every evaluation."""

from __future__ import annotations

import numpy as np

from megagpt.data.prefetch import PrefetchPool
from megagpt.data.shards import Dataset
from megagpt.data.streams import RowTaker, ShardReader, ShardStreams, StreamSettings, default_reader


def val_sequences(
    ds: Dataset, seq_len: int, rank: int, world: int, count: int, reader: ShardReader = default_reader
) -> list[np.ndarray]:
    """The first `count * world` windows of the validation shards, in order
    (one unshuffled stream), this rank's share (g % world == rank)."""
    if not ds.val_shards or count * world <= 0:
        return []
    settings = StreamSettings(num_streams=1, seq_len=seq_len, seed=0, shuffle=False, reader=reader)
    stream = ShardStreams(ds, settings, name="validation", shards=ds.val_shards)
    with PrefetchPool() as pool:  # each next shard read while the current one is cut
        taker = RowTaker(((c,) for c in stream.raw_chunks(0, 0, pool)), (stream.empty(),))
        (windows,) = taker.take(count * world)
    if len(windows) < count * world:
        raise taker.error
    return [w.astype(np.int64) for w in windows[rank::world]]
