"""From `cfg.data` to the mixture of streams a run reads, and its validation sets."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from megagpt.data.mixture import Mixture
from megagpt.data.order import default_num_streams
from megagpt.data.remote import read_bytes
from megagpt.data.shards import DataError, Dataset, open_dataset
from megagpt.data.streams import ShardStreams, StreamSettings, make_reader


@dataclass
class TrainingData:
    mix: Mixture
    val: list[tuple[str, Dataset]]  # (source name, dataset with val_shards)

    @property
    def vocab_size(self) -> int:
        return self.mix.sources[0].ds.vocab_size

    @property
    def eod_id(self) -> int:
        return self.mix.sources[0].ds.eod_id

    @property
    def tokenizer_url(self) -> str:
        return self.mix.sources[0].ds.tokenizer_url


def default_cache_dir() -> str:
    return os.environ.get("MEGAGPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megagpt"))


def _datasets(cfg, env, barrier) -> list[tuple[str, float, Dataset]]:
    d = cfg.data
    if d.source == "embedded":
        from megagpt.data.embedded import ensure_embedded
        from megagpt.metrics import console

        cache = d.cache_dir or default_cache_dir()
        kwargs = dict(vocab_size=d.embedded_vocab_size, max_bytes=d.embedded_max_bytes)
        # The first rank of each node prepares the corpus while the others wait; a file
        # lock keeps nodes that share a filesystem from preparing it twice.
        if env.local_rank == 0:
            ensure_embedded(cache, log=console if env.rank == 0 else None, **kwargs)
        if barrier is not None:
            barrier()
        path = str(ensure_embedded(cache, log=None, **kwargs))
        return [("embedded", 1.0, open_dataset(path))]
    if d.source == "webdataset":
        urls = d.urls if isinstance(d.urls, str) else list(d.urls)
        return [("data", 1.0, open_dataset(urls, d.manifest))]
    out = []
    for s in d.sources:
        urls = s.urls if isinstance(s.urls, str) else list(s.urls)
        out.append((s.name, float(s.weight), open_dataset(urls, s.manifest)))
    return out


def _check_compatible(sets: Sequence[tuple[str, float, Dataset]]) -> None:
    """All sources must share one tokenizer: the same vocabulary and EOD id, and
    the same tokenizer.json wherever a source has one (two tokenizers of one
    size still give their ids different meanings)."""
    first_name, _, first = sets[0]
    for name, _, ds in sets[1:]:
        if (ds.vocab_size, ds.eod_id) != (first.vocab_size, first.eod_id):
            raise DataError(
                f"data.sources: {name} was tokenized differently from {first_name} "
                f"(vocab {ds.vocab_size} vs {first.vocab_size}); use one tokenizer for all"
            )
    if len(sets) > 1:
        _check_same_tokenizer_file(sets)


def _check_same_tokenizer_file(sets: Sequence[tuple[str, float, Dataset]]) -> None:
    """Compare each source's tokenizer.json with the first one that can be read;
    a source without one is left to the vocabulary check.  Each file is read
    once, however many sources share it (it may be a remote fetch)."""
    digests: dict[str, str | None] = {}
    first: tuple[str, str, str] | None = None  # (source name, url, digest) of the first tokenizer found
    for name, _, ds in sets:
        if ds.tokenizer_url not in digests:
            digests[ds.tokenizer_url] = _tokenizer_digest(ds.tokenizer_url)
        digest = digests[ds.tokenizer_url]
        if digest is None:
            continue
        if first is None:
            first = (name, ds.tokenizer_url, digest)
        elif digest != first[2]:
            raise DataError(
                f"data.sources: {name} and {first[0]} were prepared with different tokenizers "
                f"({ds.tokenizer_url} and {first[1]} differ); prepare every source with one --tokenizer"
            )


def _tokenizer_digest(url: str) -> str | None:
    """sha256 of a tokenizer.json as canonical JSON (key order and whitespace do
    not change what it encodes), or None if there is none to read."""
    try:
        raw = read_bytes(url)
    except Exception:  # noqa: BLE001 - missing file, HTTP 404, failed pipe command: no tokenizer to compare
        return None
    try:
        raw = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        pass  # not JSON: compare the bytes as they are
    return hashlib.sha256(raw).hexdigest()


def open_training_data(cfg, env, barrier: Callable[[], None] | None = None) -> TrainingData:
    d = cfg.data
    sets = _datasets(cfg, env, barrier)
    _check_compatible(sets)
    fewest = min(len(ds.shards) for _, _, ds in sets)
    if fewest < env.world_size:
        raise DataError(
            f"data.urls: {fewest} shard(s) cannot feed {env.world_size} ranks; "
            "prepare more, smaller shards (--docs-per-shard)"
        )
    n = d.num_streams or default_num_streams(fewest, env.world_size)
    if n % env.world_size:
        raise DataError(f"data.num_streams={n} is not divisible by the number of ranks ({env.world_size})")
    settings = StreamSettings(
        num_streams=n,
        seq_len=d.seq_len,
        seed=cfg.trainer.seed,
        shuffle=d.shuffle_shards,
        shuffle_buffer=d.shuffle_buffer,
        on_error=d.on_error,
        reader=make_reader(d.verify),
    )
    streams = [ShardStreams(ds, settings, name=name) for name, _, ds in sets]
    mix = Mixture(streams, [w for _, w, _ in sets], period=d.mix_period, names=[n for n, _, _ in sets])
    return TrainingData(mix, [(name, ds) for name, _, ds in sets if ds.val_shards])
