"""Batches.load_state_dict (resume and rollback through one Stateful
interface) and the lifetime of the prefetch pool's reader threads."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
from helpers import make_two_sources, wait_for

from megagpt.data.loader import Batches
from megagpt.data.mixture import Mixture
from megagpt.data.prefetch import PoolClosed, PrefetchPool
from megagpt.data.shards import DataError, open_dataset
from megagpt.data.streams import ShardStreams, StreamSettings

L = 16
MICRO = 3
GROUP_TOKENS = 2 * MICRO * (L + 1)  # two micro-batches a group, so that a state falls inside one


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    return make_two_sources(tmp_path_factory.mktemp("loader"))


def make_mix(paths, weights=None, **settings):
    settings = StreamSettings(4, L, **{"seed": 5, "shuffle_buffer": 4, **settings})
    return Mixture(
        [ShardStreams(open_dataset(str(p)), settings, name=f"s{i}") for i, p in enumerate(paths)],
        weights or [1.0] * len(paths),
        period=7,
    )


def batches(mix, rank=0, world=1, consumed=0):
    return Batches(mix, rank, world, MICRO, consumed=consumed, prefetch=6, group_tokens=GROUP_TOKENS)


def take(b, n):
    return [b.next_windows().numpy().copy() for _ in range(n)]


def wait_until_read_ahead(b):
    """Until the background thread has filled its queue: the state taken next is
    behind what was read."""
    wait_for(lambda: b._producer.queue.full(), 10, what="the loader to read ahead", poll=0.01)


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for k, (x, y) in enumerate(zip(xs, ys)):
        np.testing.assert_array_equal(x, y, err_msg=f"micro-batch {k}")


# -- load_state_dict -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", ["one", "mixture"])
def test_load_state_dict_continues_token_for_token(two_sets, kind, world):
    """A state taken mid-stream (inside a group, with the queue full ahead of
    it), loaded into a Batches elsewhere in the stream, gives exactly the
    micro-batches the uninterrupted one gives from there; and loaded back into
    the uninterrupted one (a rollback), the same again."""
    paths, weights = ([two_sets[0]], None) if kind == "one" else (list(two_sets), [0.6, 0.4])
    for rank in range(world):
        straight = batches(make_mix(paths, weights), rank, world)
        try:
            take(straight, 5)
            wait_until_read_ahead(straight)
            state = straight.state_dict()
            assert state["consumed"] == 5 * MICRO * world
            expected = take(straight, 40)  # past the read-ahead, into shards read after the state
            end_state = straight.state_dict()
            straight.load_state_dict(state)  # back, as a rollback goes
            assert straight.consumed == state["consumed"]
            assert_same(take(straight, 40), expected)
            assert straight.state_dict() == end_state
        finally:
            straight.close()

        resumed = batches(make_mix(paths, weights), rank, world, consumed=world * MICRO * 12)
        try:
            take(resumed, 3)  # elsewhere, and read ahead from there
            wait_until_read_ahead(resumed)
            resumed.load_state_dict(state)
            assert_same(take(resumed, 40), expected)
            assert resumed.state_dict() == end_state
        finally:
            resumed.close()


def test_load_state_dict_before_anything_is_taken_equals_starting_there(two_sets):
    paths, weights = list(two_sets), [0.6, 0.4]
    start = batches(make_mix(paths, weights), consumed=9)
    other = batches(make_mix(paths, weights))
    try:
        other.load_state_dict(start.state_dict())
        assert_same(take(other, 30), take(start, 30))
    finally:
        start.close()
        other.close()


def test_load_state_dict_refuses_another_layout_and_keeps_its_place(two_sets):
    a, b = two_sets
    reference = batches(make_mix([a]))
    loader = batches(make_mix([a]))
    try:
        expected = take(reference, 8)
        assert_same(take(loader, 4), expected[:4])
        state = loader.state_dict()
        for key, value in (("num_streams", 8), ("seq_len", 32), ("seed", 6), ("shuffle_buffer", 1)):
            with pytest.raises(DataError, match=f"checkpoint data state has {key}="):
                loader.load_state_dict({**state, key: value})
        other_data = make_mix([b]).layout()["sources"]
        with pytest.raises(DataError, match="checkpoint data state has sources="):
            loader.load_state_dict({**state, "sources": other_data})
        assert_same(take(loader, 4), expected[4:])  # a refused state changes nothing
    finally:
        reference.close()
        loader.close()


def test_load_state_dict_restores_the_bad_shards(two_sets, tmp_path):
    """Under on_error=skip the state names the shards found bad; a fresh mixture
    that loads it knows them before reading, and continues the same way."""
    copy = tmp_path / "d"
    shutil.copytree(two_sets[0], copy)
    probe = make_mix([copy]).sources[0]
    victim = copy / f"shard-{probe.shards_of(1, 0)[0]:06d}.tar"
    victim.write_bytes(victim.read_bytes()[:2000])

    straight = batches(make_mix([copy], on_error="skip"))
    try:
        take(straight, 30)
        state = straight.state_dict()
        assert state["bad_shards"] == [str(victim)]
        expected = take(straight, 30)
    finally:
        straight.close()
    mix = make_mix([copy], on_error="skip")
    resumed = batches(mix)
    try:
        resumed.load_state_dict(state)
        assert mix.sources[0].bad == {str(victim)}
        assert_same(take(resumed, 30), expected)
    finally:
        resumed.close()


# -- the prefetch pool's threads ---------------------------------------------------------------


def readers_started_since(before):
    return {t for t in set(threading.enumerate()) - before if t.name == PrefetchPool.THREAD_NAME}


def test_prefetch_pool_reads_hands_on_errors_and_ends_its_threads_on_close():
    before = set(threading.enumerate())
    pool = PrefetchPool()
    assert not readers_started_since(before)  # nothing started until something is read
    started, release = [threading.Event() for _ in range(2)], threading.Event()

    def blocked(i):
        started[i].set()
        release.wait(10)
        return i

    def fails():
        raise DataError("bad shard")

    running = [pool.submit(blocked, i) for i in range(2)]
    for event in started:
        assert event.wait(10)  # both threads busy
    queued_ok, queued_error = pool.submit(lambda: 7), pool.submit(fails)
    readers = readers_started_since(before)
    assert len(readers) == PrefetchPool.THREADS == 2
    closer = threading.Thread(target=pool.close)
    closer.start()
    with pytest.raises(PoolClosed):  # not started when the pool closed: fails, nobody waits for ever
        queued_ok.result()
    with pytest.raises(PoolClosed):
        queued_error.result()
    release.set()
    closer.join(10)
    assert [job.result() for job in running] == [0, 1]  # reads under way finish
    assert not any(t.is_alive() for t in readers)
    assert not readers & set(threading.enumerate())
    with pytest.raises(PoolClosed):
        pool.submit(lambda: 1)

    before = set(threading.enumerate())
    with PrefetchPool() as pool:
        assert pool.submit(lambda: 7).result() == 7
        with pytest.raises(DataError, match="bad shard"):
            pool.submit(fails).result()
        readers = readers_started_since(before)
        assert len(readers) == 2
    assert not any(t.is_alive() for t in readers)


def test_batches_close_ends_its_reader_threads(two_sets):
    before = set(threading.enumerate())
    b = batches(make_mix(list(two_sets), [0.6, 0.4]))
    take(b, 3)
    wait_until_read_ahead(b)
    started = set(threading.enumerate()) - before
    assert sorted(t.name for t in started) == ["megagpt-data"] + [PrefetchPool.THREAD_NAME] * 2
    b.load_state_dict(b.state_dict())  # a restart: the old threads end, new ones start
    take(b, 1)
    assert not any(t.is_alive() for t in started)
    restarted = set(threading.enumerate()) - before
    b.close()
    assert not any(t.is_alive() for t in restarted)
