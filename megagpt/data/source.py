"""From `cfg.data` to the streams a run reads."""

from __future__ import annotations

import os
from typing import Callable

from megagpt.data.stream import DataError, ShardStreams, default_num_streams, open_dataset


def default_cache_dir() -> str:
    return os.environ.get("MEGAGPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megagpt"))


def open_training_data(cfg, env, barrier: Callable[[], None] | None = None) -> ShardStreams:
    """Resolve cfg.data into ShardStreams. For the embedded corpus, the first
    rank of each node prepares the cache (a file lock keeps nodes sharing a
    filesystem from doing it twice) while the other ranks wait."""
    d = cfg.data
    if d.source == "embedded":
        from megagpt.data.embedded import ensure_embedded

        cache = d.cache_dir or default_cache_dir()
        kwargs = dict(vocab_size=d.embedded_vocab_size, max_bytes=d.embedded_max_bytes)
        if env.local_rank == 0:
            ensure_embedded(cache, log=print if env.rank == 0 else (lambda *_: None), **kwargs)
        if barrier is not None:
            barrier()
        urls, manifest = str(ensure_embedded(cache, log=lambda *_: None, **kwargs)), None
    else:
        urls, manifest = d.urls, d.manifest
        if not isinstance(urls, str):
            urls = list(urls)
    ds = open_dataset(urls, manifest)
    n = d.num_streams or default_num_streams(len(ds.shards), env.world_size)
    if n % env.world_size:
        raise DataError(f"data.num_streams={n} is not divisible by the number of ranks ({env.world_size})")
    if len(ds.shards) < env.world_size:
        raise DataError(f"data.urls: {len(ds.shards)} shard(s) cannot feed {env.world_size} ranks; "
                        "prepare more, smaller shards (--docs-per-shard)")
    return ShardStreams(ds, n, d.seq_len, seed=cfg.trainer.seed, shuffle=d.shuffle_shards)
