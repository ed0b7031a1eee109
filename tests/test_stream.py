"""The packed stream: coverage, disjoint ranks, equal steps, resume, bad data.

Ranks are simulated by parameters in one process; test_train_e2e.py runs 2 real ones.
"""

from __future__ import annotations

import json
import shutil
from itertools import islice

import numpy as np
import pytest
from helpers import make_dataset, next_batch, rank_sequences, stream_tokens_of_shard, stream_windows

from megagpt.data.loader import Batches, check_resumable
from megagpt.data.mixture import Mixture
from megagpt.data.order import default_num_streams
from megagpt.data.shards import DataError, open_dataset
from megagpt.data.streams import ShardStreams, StreamSettings

L = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("stream"), n_docs=60, docs_per_shard=6)


def streams(data_dir, S=4, seed=7, shuffle=True, seq_len=L, **kw):
    return ShardStreams(open_dataset(str(data_dir)), StreamSettings(S, seq_len, seed=seed, shuffle=shuffle, **kw))


def mixture(*sources, weights=None, **kw):
    return Mixture(list(sources), weights or [1.0] * len(sources), **kw)


def seqs(it, n):
    return [w.copy() for w, _ in islice(it, n)]


def take(it, n):
    return [w.copy() for w in islice(it, n)]


def test_open_dataset_resolves_dir_and_patterns(data_dir):
    ds = open_dataset(str(data_dir))
    assert len(ds.shards) == 10 and ds.eod_id >= 0 and ds.dtype == "uint16"
    pattern = f"{data_dir}/shard-{{000000..000003}}.tar"
    assert [s.url for s in open_dataset(pattern).shards] == [s.url for s in ds.shards[:4]]
    globbed = open_dataset(f"{data_dir}/shard-00000[0-3].tar").shards
    assert [s.url for s in globbed] == [s.url for s in ds.shards[:4]]
    with pytest.raises(DataError, match="no files match"):
        open_dataset(f"{data_dir}/nothing-*.tar")
    with pytest.raises(DataError, match="shard-000099.tar does not exist"):
        open_dataset([f"{data_dir}/shard-000099.tar"])


def test_shard_missing_from_manifest_is_an_error(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shutil.copy(copy / "shard-000000.tar", copy / "shard-000050.tar")
    with pytest.raises(DataError, match="not listed"):
        open_dataset([f"{copy}/shard-000050.tar"])


def test_each_stream_is_its_shards_tokens_cut_into_windows(data_dir):
    """Windows of stride L, length L+1: consecutive windows overlap by one token,
    and their concatenation is exactly the stream's documents + EODs, so every
    token is a target exactly once."""
    s = streams(data_dir)
    ds = s.ds
    for stream in range(s.num_streams):
        expected = np.concatenate(
            [stream_tokens_of_shard(ds.shards[i].url, ds.dtype, ds.eod_id) for i in s.shards_of(stream, 0)]
        )
        n = (len(expected) - 1) // L
        wins = take(stream_windows(s, stream, 0), n)
        joined = np.concatenate([wins[0]] + [w[1:] for w in wins[1:]])
        assert all(len(w) == L + 1 for w in wins)
        np.testing.assert_array_equal(joined, expected[: len(joined)])
        assert len(expected) - len(joined) <= L  # only the tail that continues into epoch 1


def test_epoch_deals_every_shard_to_exactly_one_stream(data_dir):
    s = streams(data_dir)
    for epoch in range(3):
        dealt = sorted(i for st in range(s.num_streams) for i in s.shards_of(st, epoch))
        assert dealt == list(range(len(s.ds.shards)))
    assert s.shards_of(0, 0) != s.shards_of(0, 1) or s.shards_of(1, 0) != s.shards_of(1, 1)


def test_streams_continue_seamlessly_into_next_epoch(data_dir):
    s = streams(data_dir, S=2)
    ds = s.ds
    epoch_tokens = [
        np.concatenate([stream_tokens_of_shard(ds.shards[i].url, ds.dtype, ds.eod_id) for i in s.shards_of(0, e)])
        for e in range(3)
    ]
    expected = np.concatenate(epoch_tokens)
    n = (len(expected) - 1) // L
    wins = take(stream_windows(s, 0, 0), n)
    joined = np.concatenate([wins[0]] + [w[1:] for w in wins[1:]])
    np.testing.assert_array_equal(joined, expected[: len(joined)])


def global_order(s, n):
    return seqs(rank_sequences(mixture(s), 0, 1, 0), n)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_are_disjoint_cover_everything_and_never_run_dry(data_dir, world):
    s = streams(data_dir)
    total_tokens = sum(sh.stream_tokens for sh in s.ds.shards)
    n = 3 * total_tokens // L  # about three epochs: ranks must keep the same pace past epoch ends
    n -= n % world
    g = global_order(s, n)
    per_rank = [seqs(rank_sequences(mixture(s), r, world, 0), n // world) for r in range(world)]
    assert all(len(p) == n // world for p in per_rank)  # same number of steps on every rank
    for r in range(world):
        for k, w in enumerate(per_rank[r]):
            np.testing.assert_array_equal(w, g[r + k * world])  # rank r gets g % world == r
    # Disjoint and complete: multiset of (rank sequences) == multiset of the global order.
    seen = sorted(w.tobytes() for p in per_rank for w in p)
    assert seen == sorted(w.tobytes() for w in g)


def test_order_is_a_function_of_the_seed(data_dir):
    a = global_order(streams(data_dir, seed=1), 50)
    b = global_order(streams(data_dir, seed=1), 50)
    c = global_order(streams(data_dir, seed=2), 50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2)])
def test_resume_continues_the_same_global_sequence(data_dir, world_before, world_after):
    """Exact (same world size) and elastic (another world size) resume from a position."""
    s = streams(data_dir)
    consumed = 44  # a step boundary for every world size here
    g = global_order(s, consumed + 40)
    after = [seqs(rank_sequences(mixture(s), r, world_after, consumed), 40 // world_after) for r in range(world_after)]
    for r in range(world_after):
        for k, w in enumerate(after[r]):
            np.testing.assert_array_equal(w, g[consumed + r + k * world_after])


def test_resume_skips_shards_without_reading_them(data_dir, tmp_path):
    """A far position must not decode the shards before it: delete them and resume."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    s = streams(copy, S=2, shuffle=False)
    g = global_order(s, 200)
    first = s.shards_of(0, 0)[0]  # stream 0 reads this shard first
    skip = s.ds.shards[first].stream_tokens // L + 2  # stream-0 windows past that shard
    consumed = 2 * skip
    (copy / f"shard-{first:06d}.tar").unlink()
    it = rank_sequences(mixture(s), 0, 1, consumed)
    np.testing.assert_array_equal(next(it)[0], g[consumed])


def test_batches_state_counts_what_was_taken_not_prefetched(data_dir):
    s = streams(data_dir)
    g = global_order(s, 64)
    b = Batches(mixture(s), rank=1, world=2, micro_batch=4, consumed=0, prefetch=4)
    try:
        x, y = next_batch(b)
        assert x.shape == (4, L) and y.shape == (4, L)
        np.testing.assert_array_equal(x[0].numpy(), g[1][:-1])
        np.testing.assert_array_equal(y[0].numpy(), g[1][1:])
        next_batch(b)
        state = b.state_dict()
    finally:
        b.close()
    assert state["consumed"] == 16  # 2 micro-batches x 4 sequences x 2 ranks
    assert check_resumable(state, mixture(s)) == 16
    with pytest.raises(DataError, match="num_streams"):
        check_resumable({**state, "num_streams": 2}, mixture(s))


def test_default_num_streams():
    assert default_num_streams(100, 2) == 16
    assert default_num_streams(10, 4) == 8
    assert default_num_streams(3, 2) == 2
    assert default_num_streams(100, 24) == 24


def test_too_many_streams_is_an_error(data_dir):
    with pytest.raises(DataError, match="exceeds the number of shards"):
        streams(data_dir, S=16)


def test_token_out_of_vocab_names_the_shard(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["vocab_size"] = 10  # every real token id is now out of range: as with a wrong dtype
    (copy / "manifest.json").write_text(json.dumps(man))
    s = streams(copy)
    with pytest.raises(DataError, match=r"shard .*shard-\d+\.tar.*vocab_size"):
        take(stream_windows(s, 0, 0), 5)


def test_truncated_shard_is_an_error_not_a_silent_drop(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    s = streams(copy, S=2, shuffle=False)
    victim = copy / f"shard-{s.shards_of(0, 0)[0]:06d}.tar"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=victim.name):
        take(stream_windows(s, 0, 0), 1000)
