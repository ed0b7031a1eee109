"""Shuffle buffer, mixtures, resume once and twice, bad shards under both
policies, streaming over real HTTP, validation sequences."""

from __future__ import annotations

import functools
import http.server
import json
import shlex
import shutil
import threading
from itertools import islice

import numpy as np
import pytest
from helpers import make_dataset, make_two_sources, mixed_windows, next_batch, rank_sequences, stream_windows

from megagpt.data.loader import Batches
from megagpt.data.mixture import Mixture, mix_counts
from megagpt.data.remote import read_bytes
from megagpt.data.shards import DataError, open_dataset, read_shard
from megagpt.data.streams import ShardStreams, StreamSettings
from megagpt.data.validation import val_sequences

L = 16


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("more"))


def mk(path, S=4, name="data", **kw):
    kw.setdefault("seed", 3)
    return ShardStreams(open_dataset(str(path)), StreamSettings(S, L, **kw), name=name)


def order(mix, world, consumed, n):
    """The global sequence order as seen by `world` ranks from `consumed` on: interleave
    the ranks back into g order."""
    per = [
        [(w.copy(), i) for w, i in islice(rank_sequences(mix, r, world, consumed), n // world)] for r in range(world)
    ]
    return [per[k % world][k // world] for k in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(xs, ys))


# -- bounded shuffle -------------------------------------------------------------------------


def test_shuffle_buffer_permutes_within_blocks_and_resumes_exactly(two_sets):
    a, _ = two_sets
    plain = list(islice(stream_windows(mk(a), 1, 0), 64))
    shuffled_stream = mk(a, shuffle_buffer=8)
    shuffled = list(islice(stream_windows(shuffled_stream, 1, 0), 64))
    assert not all(np.array_equal(x, y) for x, y in zip(plain, shuffled))
    for b in range(8):  # each block of 8 is a permutation of the same 8 windows
        assert sorted(w.tobytes() for w in plain[8 * b : 8 * b + 8]) == sorted(
            w.tobytes() for w in shuffled[8 * b : 8 * b + 8]
        )
    for start in (0, 5, 8, 13, 40):  # mid-block and on block boundaries
        again = list(islice(stream_windows(mk(a, shuffle_buffer=8), 1, start), 64 - start))
        assert all(np.array_equal(x, y) for x, y in zip(again, shuffled[start:]))


# -- mixtures -------------------------------------------------------------------------------


def test_mix_counts():
    assert mix_counts([0.7, 0.3], 100) == [70, 30]
    assert mix_counts([1, 1, 1], 100) == [34, 33, 33]
    with pytest.raises(DataError):
        mix_counts([1, 0], 10)


def test_mixture_proportions_determinism_and_elastic_resume(two_sets):
    a, b = two_sets

    def mix(seed=3):
        return Mixture(
            [mk(a, seed=seed, shuffle_buffer=4, name="a"), mk(b, seed=seed, shuffle_buffer=4, name="b")],
            [0.7, 0.3],
            period=20,
        )

    full = order(mix(), 1, 0, 400)
    sources = np.array([i for _, i in full])
    assert abs((sources == 0).mean() - 0.7) < 1e-9  # exact per block of 20 x 4 streams
    assert same(full, order(mix(), 1, 0, 400))
    assert not same(full, order(mix(seed=4), 1, 0, 400))
    for world_before, world_after, at in ((2, 1, 96), (1, 2, 100), (2, 2, 36), (4, 2, 120)):
        assert same(order(mix(), world_after, at, 400 - at), full[at:]), (world_before, world_after, at)
    # The windows of source b in the mixture are exactly source b's own stream, in order.
    b_alone = list(islice(stream_windows(mk(b, shuffle_buffer=4), 0, 0), 30))
    b_in_mix = [w for w, i in islice(mixed_windows(mix(), 0, 0), 200) if i == 1][:30]
    assert all(np.array_equal(x, y) for x, y in zip(b_alone, b_in_mix))


def test_batches_report_realized_proportions(two_sets):
    a, b = two_sets
    mix = Mixture([mk(a, name="a"), mk(b, name="b")], [0.75, 0.25], period=4)
    bt = Batches(mix, rank=0, world=1, micro_batch=8)
    try:
        for _ in range(10):
            next_batch(bt)
    finally:
        bt.close()
    assert bt.source_counts.tolist() == [60, 20]
    state = bt.state_dict()
    assert state["consumed"] == 80 and [s[0] for s in state["sources"]] == ["a", "b"]


# -- resume once and twice through Batches (the trainer's view) --------------------------------


def take_batches(mix, world, consumed, steps, micro=2):
    """Per step, the concatenation over ranks of each rank's micro-batch; and the end state."""
    bts = [Batches(mix, r, world, micro, consumed=consumed) for r in range(world)]
    try:
        out = [[next_batch(bt)[0].numpy() for bt in bts] for _ in range(steps)]
        return out, bts[0].state_dict()
    finally:
        for bt in bts:
            bt.close()


def test_exact_resume_once_and_twice_token_for_token(two_sets):
    a, _ = two_sets

    def mix():
        return Mixture([mk(a, shuffle_buffer=8)], [1.0])

    straight, _ = take_batches(mix(), 2, 0, 30)
    part1, s1 = take_batches(mix(), 2, 0, 10)
    part2, s2 = take_batches(mix(), 2, s1["consumed"], 7)
    part3, _ = take_batches(mix(), 2, s2["consumed"], 13)
    resumed = part1 + part2 + part3
    assert all(np.array_equal(x, y) for sx, sy in zip(straight, resumed) for x, y in zip(sx, sy))


# -- bad data --------------------------------------------------------------------------------


def damage(kind, copy, victim):
    path = copy / victim
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[1500] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif kind == "missing":
        path.unlink()
    elif kind == "dtype":  # the manifest claims another dtype for the same bytes
        man = json.loads((copy / "manifest.json").read_text())
        man["dtype"] = "uint32"
        (copy / "manifest.json").write_text(json.dumps(man))
    return path.name


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "missing", "dtype"])
def test_bad_shard_raise_names_the_shard(two_sets, tmp_path, kind):
    a, _ = two_sets
    copy = tmp_path / "d"
    shutil.copytree(a, copy)
    s = mk(copy, S=2, shuffle=False)
    victim = f"shard-{s.shards_of(0, 0)[1]:06d}.tar"
    damage(kind, copy, victim)
    s = mk(copy, S=2, shuffle=False)  # re-read the manifest (dtype case)
    with pytest.raises(DataError, match="shard-"):
        list(islice(stream_windows(s, 0, 0), 500))
    if kind != "dtype":
        with pytest.raises(DataError, match=victim):
            list(islice(stream_windows(mk(copy, S=2, shuffle=False), 0, 0), 500))


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "missing"])
def test_bad_shard_skip_drops_it_whole_counts_it_and_keeps_ranks_in_step(two_sets, tmp_path, kind):
    a, _ = two_sets
    copy = tmp_path / "d"
    shutil.copytree(a, copy)
    victim_idx = mk(copy, S=2, shuffle=False).shards_of(1, 0)[0]  # read by rank 1 (stream 1)
    damage(kind, copy, f"shard-{victim_idx:06d}.tar")
    good = [i for i in mk(copy, S=2, shuffle=False).shards_of(1, 0) if i != victim_idx]

    def mix():
        return Mixture([mk(copy, S=2, shuffle=False, on_error="skip")], [1.0])

    m = mix()
    per_rank = [list(islice(rank_sequences(m, r, 2, 0), 300)) for r in range(2)]
    assert [len(p) for p in per_rank] == [300, 300]  # same number of sequences on both ranks
    assert m.skipped == 1 and m.bad == [str(copy / f"shard-{victim_idx:06d}.tar")]
    # Stream 1 continues with the next shard: its first window starts with that shard's tokens.
    from megagpt.data.shards import read_shard

    ds = m.sources[0].ds
    first_good = read_shard(ds.shards[good[0]], ds.dtype, ds.vocab_size, ds.eod_id)
    np.testing.assert_array_equal(per_rank[1][0][0], first_good[: L + 1])
    # A resume that knows the bad shard continues the same sequence without reading it.
    m2 = mix()
    m2.sources[0].bad.update(m.bad)
    again = list(islice(rank_sequences(m2, 1, 2, 2 * 120), 100))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(again, per_rank[1][120:220]))


# -- remote shards over real HTTP --------------------------------------------------------------


@pytest.fixture
def http_root(two_sets):
    a, _ = two_sets
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(a))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_streaming_matches_local(two_sets, http_root):
    a, _ = two_sets
    n = len(open_dataset(str(a)).shards)
    url = f"{http_root}/shard-{{000000..{n - 1:06d}}}.tar"
    remote = Mixture([ShardStreams(open_dataset(url), StreamSettings(4, L, seed=3, shuffle_buffer=4))], [1.0])
    local = Mixture([mk(a, shuffle_buffer=4)], [1.0])
    assert same(order(remote, 2, 0, 200), order(local, 2, 0, 200))
    with pytest.raises(DataError, match="cannot read"):  # a missing URL
        ds = open_dataset(url)
        from megagpt.data.shards import Shard, read_shard

        read_shard(Shard(f"{http_root}/nope.tar", 1, 1), ds.dtype, ds.vocab_size, ds.eod_id)


def test_pipe_urls_read_through_a_command(two_sets):
    a, _ = two_sets
    ds = open_dataset(str(a))
    from dataclasses import replace

    from megagpt.data.shards import read_shard

    piped = replace(ds.shards[0], url=f"pipe:cat {ds.shards[0].url}")
    np.testing.assert_array_equal(
        read_shard(piped, ds.dtype, ds.vocab_size, ds.eod_id),
        read_shard(ds.shards[0], ds.dtype, ds.vocab_size, ds.eod_id),
    )


# A stand-in for `aws s3 cp SRC -`: the command's file is not its last word.
FAKE_AWS = """#!/bin/sh
[ "$1" = cp ] && [ "$3" = - ] || { echo "usage: $0 cp SRC -" >&2; exit 2; }
exec cat -- "$2"
"""


@pytest.fixture(scope="module")
def s3_like(tmp_path_factory):
    """(the fake `aws` command, a prepared dataset with validation shards in a
    directory whose name has a space)."""
    root = tmp_path_factory.mktemp("s3")
    data = make_dataset(root, n_docs=30, docs_per_shard=5, seed=5, val_docs=6).rename(root / "my corpus")
    aws = root / "aws"
    aws.write_text(FAKE_AWS)
    aws.chmod(0o755)
    return aws, data


def s3_cp(aws, path) -> str:
    return f"pipe:{aws} cp {shlex.quote(str(path))} -"


def test_pipe_urls_whose_command_goes_on_after_the_shard(s3_like):
    aws, data = s3_like
    local = open_dataset(str(data))
    assert local.val_shards
    n = len(local.shards)
    url = s3_cp(aws, data / f"shard-{{000000..{n - 1:06d}}}.tar")  # the manifest, val shards, tokenizer: beside it
    for ds in (open_dataset(url), open_dataset(url, manifest=s3_cp(aws, data / "manifest.json"))):
        assert [s.url for s in ds.shards] == [s3_cp(aws, s.url) for s in local.shards]
        assert [s.url for s in ds.val_shards] == [s3_cp(aws, s.url) for s in local.val_shards]
        assert ds.tokenizer_url == s3_cp(aws, data / "tokenizer.json")
        assert ds.fingerprint() == local.fingerprint()  # the same shards, fetched another way
        for piped, plain in zip(ds.shards + ds.val_shards, local.shards + local.val_shards):
            np.testing.assert_array_equal(
                read_shard(piped, ds.dtype, ds.vocab_size, ds.eod_id),
                read_shard(plain, ds.dtype, ds.vocab_size, ds.eod_id),
            )
        assert read_bytes(ds.tokenizer_url) == (data / "tokenizer.json").read_bytes()
    remote = Mixture([ShardStreams(open_dataset(url), StreamSettings(4, L, seed=3, shuffle_buffer=4))], [1.0])
    plain = Mixture([ShardStreams(local, StreamSettings(4, L, seed=3, shuffle_buffer=4))], [1.0])
    assert same(order(remote, 2, 0, 120), order(plain, 2, 0, 120))


def test_pipe_url_keeps_what_the_shell_expands(s3_like, monkeypatch):
    aws, data = s3_like
    monkeypatch.setenv("CORPUS", str(data))
    ds = open_dataset(f'pipe:{aws} cp "$CORPUS"/shard-000001.tar - 2>/dev/null')
    assert ds.tokenizer_url == f'pipe:{aws} cp "$CORPUS"/tokenizer.json - 2>/dev/null'
    assert read_bytes(ds.tokenizer_url) == (data / "tokenizer.json").read_bytes()


def test_pipe_url_without_a_tar_word_is_a_one_line_error(s3_like):
    aws, data = s3_like
    url = s3_cp(aws, data / "latest")
    with pytest.raises(DataError) as e:
        open_dataset(url)
    assert str(e.value) == f"data.urls: {url} has no word ending in .tar, so the shard it fetches is unknown"


# -- validation ------------------------------------------------------------------------------


def test_val_sequences_fixed_disjoint_and_equal_per_rank(tmp_path):
    out = make_dataset(tmp_path, n_docs=50, docs_per_shard=5, seed=5, val_docs=10)
    ds = open_dataset(str(out))
    assert ds.val_shards
    r0 = val_sequences(ds, L, 0, 2, 6)
    r1 = val_sequences(ds, L, 1, 2, 6)
    assert len(r0) == len(r1) == 6
    assert all(np.array_equal(x, y) for x, y in zip(r0, val_sequences(ds, L, 0, 2, 6)))
    one = val_sequences(ds, L, 0, 1, 12)
    assert all(np.array_equal(one[2 * k], r0[k]) and np.array_equal(one[2 * k + 1], r1[k]) for k in range(6))
    unshuffled = ShardStreams(ds, StreamSettings(1, L, seed=0, shuffle=False))
    train_tokens = {w.tobytes() for w in islice(stream_windows(unshuffled, 0, 0, raw=True), 200)}
    assert not any(w.astype(np.uint16).tobytes() in train_tokens for w in one)
