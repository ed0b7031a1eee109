"""http(s) reads tried again: a real HTTP server on 127.0.0.1 that drops the
connection partway through a file a set number of times, with and without
Range support.  The data read equals the data on disk, every retry is logged,
and after the last try the shard's error stops the stream or is skipped, as
data.on_error says."""

from __future__ import annotations

import http.server
import logging
import re
import threading
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset, stream_windows

from megagpt.data import remote as reading
from megagpt.data.loader import Batches
from megagpt.data.mixture import Mixture
from megagpt.data.remote import read_bytes
from megagpt.data.shards import DataError, Shard, fetch_shard, open_dataset
from megagpt.data.streams import ShardStreams, StreamSettings

L = 16
TRIES = 4


class FlakyServer:
    """Serves the files of `root`.  The first drops[name] GETs of a file send the
    headers and a third of the body, then close the connection.  With
    ranges=False, Range requests are ignored (200 and the whole file), as a
    plain file server does."""

    def __init__(self, root: Path, ranges: bool):
        self.root, self.ranges = root, ranges
        self.drops: Counter = Counter()
        self.requests: list[tuple[str, str | None, int]] = []  # (file, Range asked, status answered)
        self.sent: Counter = Counter()  # body bytes sent, per file
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.flaky = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def asked(self, name: str) -> list[tuple[str | None, int]]:
        return [(r, status) for n, r, status in self.requests if n == name]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        flaky: FlakyServer = self.server.flaky
        name = self.path.lstrip("/")
        path = flaky.root / name
        if not path.is_file():
            with flaky.lock:
                flaky.requests.append((name, None, 404))
            self.send_error(404)
            return
        data = path.read_bytes()
        asked = self.headers.get("Range")
        start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1]) if asked and flaky.ranges else 0
        body = data[start:]
        with flaky.lock:
            drop = flaky.drops[name] > 0
            flaky.drops[name] -= drop
            flaky.requests.append((name, asked, 206 if start else 200))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        part = body[: len(body) // 3] if drop else body
        with flaky.lock:  # counted first: the client may have it all before this thread runs again
            flaky.sent[name] += len(part)
        self.wfile.write(part)  # then the connection closes: HTTP/1.0, one answer per connection


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("http"), n_docs=40, docs_per_shard=5)


@pytest.fixture
def serve(data_dir):
    servers = []

    def start(ranges: bool = True) -> FlakyServer:
        flaky = FlakyServer(data_dir, ranges)
        flaky.thread.start()
        servers.append(flaky)
        return flaky

    yield start
    for flaky in servers:
        flaky.server.shutdown()
        flaky.server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Waits of 10 and 20 ms, not seconds."""
    monkeypatch.setattr(reading, "HTTP_RETRIES", reading.Retries(tries=TRIES, base=0.01, cap=0.02))


def remote(flaky: FlakyServer, n: int) -> str:
    return f"{flaky.url}/shard-{{000000..{n - 1:06d}}}.tar"


def retries_logged(caplog, url: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"data: reading {url} failed")
    ]


def test_dropped_reads_go_on_from_the_byte_they_stopped_at(data_dir, serve, caplog):
    flaky = serve(ranges=True)
    local = open_dataset(str(data_dir))
    ds = open_dataset(remote(flaky, len(local.shards)))
    name = "shard-000001.tar"
    flaky.drops[name] = 2
    with caplog.at_level(logging.WARNING, logger="megagpt"):
        got = fetch_shard(ds.shards[1])  # checked against the manifest's checksum as reassembled
    raw = (data_dir / name).read_bytes()
    assert bytes(got) == raw
    size = len(raw)
    first, second = size // 3, size // 3 + (size - size // 3) // 3
    assert flaky.asked(name) == [(None, 200), (f"bytes={first}-", 206), (f"bytes={second}-", 206)]
    assert flaky.sent[name] == size  # no byte sent twice
    logged = retries_logged(caplog, ds.shards[1].url)
    assert len(logged) == 2
    assert (
        f"failed after {first} bytes: ConnectionError: the connection closed after {first} of {size} bytes; "
        f"trying again in 0.01s (attempt 2 of {TRIES})" in logged[0]
    )
    assert f"failed after {second} bytes" in logged[1] and f"in 0.02s (attempt 3 of {TRIES})" in logged[1]


def test_without_range_support_a_retry_starts_over(data_dir, serve, caplog):
    flaky = serve(ranges=False)
    local = open_dataset(str(data_dir))
    ds = open_dataset(remote(flaky, len(local.shards)))
    name = "shard-000002.tar"
    flaky.drops[name] = 3
    with caplog.at_level(logging.WARNING, logger="megagpt"):
        got = fetch_shard(ds.shards[2], "sha256")
    raw = (data_dir / name).read_bytes()
    assert bytes(got) == raw
    size = len(raw)
    asked = flaky.asked(name)
    assert [status for _, status in asked] == [200] * 4  # the whole file each time
    assert [r for r, _ in asked] == [None] + [f"bytes={size // 3}-"] * 3  # it asked for the rest every time
    assert flaky.sent[name] == size + 3 * (size // 3)
    assert len(retries_logged(caplog, ds.shards[2].url)) == 3


def test_flaky_server_streams_the_same_batches_as_disk(data_dir, serve, caplog):
    """The manifest, the tokenizer and several shards each dropped once or twice: the
    micro-batches of a Batches over HTTP are those read from disk."""
    flaky = serve(ranges=True)
    n = len(open_dataset(str(data_dir)).shards)
    flaky.drops.update(
        {
            "manifest.json": 1,
            "tokenizer.json": 2,
            "shard-000000.tar": 1,
            "shard-000003.tar": 2,
            "shard-000005.tar": 1,
            "shard-000007.tar": 1,
        }
    )

    def mix(ds):
        return Mixture([ShardStreams(ds, StreamSettings(4, L, seed=3, shuffle_buffer=4))], [1.0])

    def batches(ds):
        b = Batches(mix(ds), 0, 1, micro_batch=3, prefetch=4, group_tokens=6 * (L + 1))
        count = 2 * sum(s.stream_tokens for s in ds.shards) // L // 3  # about two passes: every shard is read
        try:
            return [b.next_windows().numpy().copy() for _ in range(count)]
        finally:
            b.close()

    with caplog.at_level(logging.WARNING, logger="megagpt"):
        ds = open_dataset(remote(flaky, n))
        assert read_bytes(ds.tokenizer_url) == (data_dir / "tokenizer.json").read_bytes()
        over_http = batches(ds)
    from_disk = batches(open_dataset(str(data_dir)))
    for k, (x, y) in enumerate(zip(over_http, from_disk)):
        np.testing.assert_array_equal(x, y, err_msg=f"micro-batch {k}")
    assert not +flaky.drops  # every planned drop happened
    for name, drops in (("manifest.json", 1), ("tokenizer.json", 2), ("shard-000003.tar", 2)):
        assert len(retries_logged(caplog, f"{flaky.url}/{name}")) == drops, name
    # An answer that a retry would not change (404) fails at once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megagpt"), pytest.raises(DataError, match="HTTP Error 404"):
        fetch_shard(Shard(f"{flaky.url}/nope.tar", 1, 1))
    assert flaky.asked("nope.tar") == [(None, 404)] and not caplog.records


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_more_drops_than_tries_stop_or_skip_as_configured(data_dir, serve, caplog, on_error):
    flaky = serve(ranges=True)
    n = len(open_dataset(str(data_dir)).shards)
    ds = open_dataset(remote(flaky, n))
    streams = ShardStreams(ds, StreamSettings(2, L, seed=1, shuffle=False, on_error=on_error))
    victim = ds.shards[0]  # stream 0 reads it first (no shuffle)
    flaky.drops["shard-000000.tar"] = TRIES + 5
    with caplog.at_level(logging.WARNING, logger="megagpt"):
        if on_error == "raise":
            with pytest.raises(DataError) as failed:
                list(islice(stream_windows(streams, 0, 0), 5))
            one_line = (
                rf"shard {re.escape(victim.url)}: cannot read: ConnectionError: the connection closed "
                rf"after \d+ of {victim.nbytes} bytes \(tried {TRIES} times\)"
            )
            assert re.fullmatch(one_line, str(failed.value))
        else:
            windows = list(islice(stream_windows(streams, 0, 0), 40))
            assert streams.bad == {victim.url} and streams.skipped == 1
            # The stream goes on as if the shard held no tokens: as a local stream that knows it is bad.
            local = ShardStreams(open_dataset(str(data_dir)), StreamSettings(2, L, seed=1, shuffle=False))
            local.bad.add(str(data_dir / "shard-000000.tar"))
            for k, (x, y) in enumerate(zip(windows, stream_windows(local, 0, 0))):
                np.testing.assert_array_equal(x, y, err_msg=f"window {k}")
            assert any(
                r.getMessage().startswith(f"data.on_error=skip: skipping shard {victim.url}: cannot read")
                for r in caplog.records
            )
    assert len(flaky.asked("shard-000000.tar")) == TRIES
    assert len(retries_logged(caplog, victim.url)) == TRIES - 1
