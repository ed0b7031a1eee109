"""The array-at-a-time loader against a straightforward reference: the
window-at-a-time generators megagpt shipped before (kept here verbatim in
spirit, reading every shard on demand), compared token for token across
shuffle buffers, mixtures, resume points, world sizes and bad shards."""

from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from helpers import make_two_sources, mixed_windows, next_batch, rank_sequences, stream_windows

from megagpt.data.loader import Batches, stream_windows_taken
from megagpt.data.mixture import Mixture
from megagpt.data.order import permutation
from megagpt.data.shards import DataError, open_dataset
from megagpt.data.streams import ShardStreams, StreamSettings

L = 16


# -- the reference: one window at a time, exactly the documented layout -----------------------


def ref_raw_windows(s: ShardStreams, stream: int, start: int):
    skip, buf, epoch = start * s.seq_len, None, 0
    tokens_of = lambda sh: 0 if sh.url in s.bad else sh.stream_tokens  # noqa: E731
    while True:
        live = 0
        for idx in s.shards_of(stream, epoch):
            shard = s.shards[idx]
            if skip >= tokens_of(shard):
                skip -= tokens_of(shard)
                live += tokens_of(shard) > 0
                continue
            try:
                tokens = s.settings.reader(shard, s.ds)
            except DataError:
                if s.settings.on_error == "raise":
                    raise
                s.bad.add(shard.url)
                continue
            live += 1
            tokens = tokens[skip:]
            skip = 0
            buf = tokens if buf is None else np.concatenate([buf, tokens])
            n = (len(buf) - 1) // s.seq_len
            for i in range(n):
                yield buf[i * s.seq_len : i * s.seq_len + s.seq_len + 1]
            buf = buf[n * s.seq_len :]
        if not live:
            raise DataError("every shard bad")
        epoch += 1


def ref_windows(s: ShardStreams, stream: int, start: int):
    B = s.shuffle_buffer
    if B == 1:
        yield from ref_raw_windows(s, stream, start)
        return
    block = start // B
    raw = ref_raw_windows(s, stream, block * B)
    first = start - block * B
    while True:
        items = [next(raw) for _ in range(B)]
        perm = permutation(B, s.settings.seed, 0x5EED, stream, block)
        for j in range(first, B):
            yield items[perm[j]]
        first, block = 0, block + 1


def ref_mixed(mix: Mixture, stream: int, start: int):
    if len(mix.sources) == 1:
        for w in ref_windows(mix.sources[0], stream, start):
            yield w, 0
        return
    P = mix.period
    block, first = divmod(start, P)
    sched = mix.schedule(stream, block)
    local = [block * c + int((sched[:first] == i).sum()) for i, c in enumerate(mix.counts)]
    its = [ref_windows(src, stream, local[i]) for i, src in enumerate(mix.sources)]
    while True:
        for j in range(first, P):
            i = int(sched[j])
            yield next(its[i]), i
        block, first = block + 1, 0
        sched = mix.schedule(stream, block)


def ref_rank(mix: Mixture, rank: int, world: int, consumed: int):
    S = mix.num_streams
    its = {s: ref_mixed(mix, s, stream_windows_taken(consumed, s, S)) for s in range(rank, S, world)}
    g = consumed + rank
    while True:
        yield next(its[g % S])
        g += world


def ref_batches(mix: Mixture, rank: int, world: int, micro: int, consumed: int, steps: int):
    seqs, out = ref_rank(mix, rank, world, consumed), []
    for _ in range(steps):
        items = [next(seqs) for _ in range(micro)]
        out.append((np.stack([w for w, _ in items]).astype(np.int64), [i for _, i in items]))
    return out


# -- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("ref"))


def make_mix(paths, weights, buffer, period=7, S=4, seed=5, seq_len=L, **kw):
    settings = StreamSettings(S, seq_len, seed=seed, shuffle_buffer=buffer, **kw)
    srcs = [ShardStreams(open_dataset(str(p)), settings, name=f"s{i}") for i, p in enumerate(paths)]
    return Mixture(srcs, weights, period=period)


MIXES = {"one": [1.0], "two": [0.6, 0.4], "three": [0.5, 0.3, 0.2]}


def paths_for(sets, kind):
    a, b = sets
    return {"one": [a], "two": [a, b], "three": [a, b, a]}[kind]


def assert_same(new, ref):
    assert len(new) == len(ref)
    for k, ((w, i), (rw, ri)) in enumerate(zip(new, ref)):
        assert i == ri, k
        np.testing.assert_array_equal(w, rw, err_msg=f"sequence {k}")


# -- the comparisons -------------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [1, 3, 8])
@pytest.mark.parametrize("kind", ["one", "two", "three"])
def test_stream_layers_match_the_reference(sets, kind, buffer):
    paths, weights = paths_for(sets, kind), MIXES[kind]
    for stream in (0, 3):
        for start in (0, 1, 5, 24, 137):
            s_new, s_ref = (make_mix(paths[:1], [1.0], buffer).sources[0] for _ in range(2))
            new = [w.copy() for w in islice(stream_windows(s_new, stream, start), 150)]
            ref = [w.copy() for w in islice(ref_windows(s_ref, stream, start), 150)]
            assert_same([(w, 0) for w in new], [(w, 0) for w in ref])
            m_new, m_ref = make_mix(paths, weights, buffer), make_mix(paths, weights, buffer)
            assert_same(
                [(w.copy(), i) for w, i in islice(mixed_windows(m_new, stream, start), 150)],
                [(w.copy(), i) for w, i in islice(ref_mixed(m_ref, stream, start), 150)],
            )


@pytest.mark.parametrize("seq_len", [1, 3, 900])  # 900: windows longer than a shard
@pytest.mark.parametrize("buffer", [1, 5])
def test_window_lengths_short_and_longer_than_shards(sets, seq_len, buffer):
    paths, weights = paths_for(sets, "two"), MIXES["two"]
    for consumed in (0, 8, 36):
        new = [
            (w.copy(), i)
            for w, i in islice(rank_sequences(make_mix(paths, weights, buffer, seq_len=seq_len), 1, 2, consumed), 120)
        ]
        ref = [
            (w.copy(), i)
            for w, i in islice(ref_rank(make_mix(paths, weights, buffer, seq_len=seq_len), 1, 2, consumed), 120)
        ]
        assert_same(new, ref)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("buffer", [1, 8])
@pytest.mark.parametrize("kind", ["one", "two"])
def test_rank_sequences_match_the_reference(sets, kind, buffer, world):
    paths, weights = paths_for(sets, kind), MIXES[kind]
    for consumed in (0, 4 * world, 52 * world):
        n = 700 // world  # past an epoch of every stream
        new = [
            (w.copy(), i)
            for w, i in islice(rank_sequences(make_mix(paths, weights, buffer), world - 1, world, consumed), n)
        ]
        ref = [
            (w.copy(), i) for w, i in islice(ref_rank(make_mix(paths, weights, buffer), world - 1, world, consumed), n)
        ]
        assert_same(new, ref)


@pytest.mark.parametrize("world,micro,group_tokens", [(1, 3, 200), (2, 4, 1 << 17), (4, 5, 10)])
@pytest.mark.parametrize("kind", ["one", "two"])
def test_batches_match_the_reference(sets, kind, world, micro, group_tokens):
    paths, weights = paths_for(sets, kind), MIXES[kind]
    consumed = 12 * world
    for rank in range(world):
        steps = 90
        ref = ref_batches(make_mix(paths, weights, 8), rank, world, micro, consumed, steps)
        b = Batches(
            make_mix(paths, weights, 8), rank, world, micro, consumed=consumed, prefetch=3, group_tokens=group_tokens
        )
        try:
            for step, (batch, _sources) in enumerate(ref):
                x, y = next_batch(b)
                assert x.dtype == y.dtype == torch.int32
                assert tuple(x.shape) == tuple(y.shape) == (micro, L)
                np.testing.assert_array_equal(x.numpy(), batch[:, :-1], err_msg=f"step {step}")
                np.testing.assert_array_equal(y.numpy(), batch[:, 1:], err_msg=f"step {step}")
            counts = np.bincount([i for _, srcs in ref for i in srcs], minlength=len(paths))
            assert b.source_counts.tolist() == counts.tolist()
            assert b.state_dict()["consumed"] == consumed + steps * micro * world
        finally:
            b.close()


def damaged(sets, tmp_path, victim_of_stream=1):
    a, _ = sets
    copy = tmp_path / "d"
    shutil.copytree(a, copy)
    s = ShardStreams(open_dataset(str(copy)), StreamSettings(4, L, seed=5))
    idx = s.shards_of(victim_of_stream, 0)[1]
    path = copy / f"shard-{idx:06d}.tar"
    path.write_bytes(path.read_bytes()[:2000])
    return copy, path


def test_bad_shard_skip_matches_the_reference(sets, tmp_path):
    copy, victim = damaged(sets, tmp_path)
    for world in (1, 2):
        seen = set()  # the ranks that read the victim's stream find it bad
        for rank in range(world):
            mk = lambda: make_mix([copy], [1.0], 3, on_error="skip")  # noqa: E731
            m_new, m_ref = mk(), mk()
            new = [(w.copy(), i) for w, i in islice(rank_sequences(m_new, rank, world, 0), 400 // world)]
            ref = [(w.copy(), i) for w, i in islice(ref_rank(m_ref, rank, world, 0), 400 // world)]
            assert_same(new, ref)
            assert m_new.bad == m_ref.bad
            seen.update(m_new.bad)
        assert seen == {str(victim)}


@pytest.mark.parametrize("buffer", [1, 3])
@pytest.mark.parametrize("kind", ["one", "two"])
def test_bad_shard_raise_stops_at_the_same_sequence(sets, tmp_path, buffer, kind):
    """Reading ahead must not move the error: every sequence before it comes out, then the error."""
    copy, victim = damaged(sets, tmp_path)
    paths, weights = [copy, sets[1]][: len(MIXES[kind])], MIXES[kind]
    ref, ref_error = [], None
    try:
        for w, i in ref_rank(make_mix(paths, weights, buffer), 0, 1, 0):
            ref.append((w.copy(), i))
    except DataError as e:
        ref_error = e
    assert ref_error is not None and victim.name in str(ref_error)
    new = []
    with pytest.raises(DataError, match=victim.name):
        for w, i in rank_sequences(make_mix(paths, weights, buffer), 0, 1, 0):
            new.append((w.copy(), i))
    assert_same(new, ref)
    # Batches: the whole micro-batches before the failing sequence, then the error on every take,
    # wherever the failure falls in a group of micro-batches.
    micro = 3
    for group_tokens in (1, 250, 500, 1000):
        b = Batches(make_mix(paths, weights, buffer), 0, 1, micro, group_tokens=group_tokens)
        try:
            for k in range(len(ref) // micro):
                x, _ = next_batch(b)
                np.testing.assert_array_equal(
                    x.numpy(), np.stack([w[:-1] for w, _ in ref[k * micro : (k + 1) * micro]])
                )
            for _ in range(2):
                with pytest.raises(DataError, match=victim.name):
                    next_batch(b)
        finally:
            b.close()
