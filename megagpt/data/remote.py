"""Reading a URL: a local file, an http(s) URL, or a `pipe:` command and the
other schemes webdataset's `gopen` knows.

An http(s) read that fails or stops short (a dropped connection, a timeout, a
5xx answer) is tried again, `HTTP_RETRIES` times in all with waits doubling up
to a cap, each retry logged; where the server answers a Range request with 206
the read goes on from the first byte it lacks, else it starts over.  Only the
last failure is an error (a shard's DataError, which `data.on_error` turns into
a stop or a skip).  Checksums are checked on the bytes as reassembled.

`pipe:` URLs run shell commands: trusted operator input, like the rest of the
config.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger("megagpt")


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


class _Command:
    """The output of a ``pipe:`` command (webdataset's ``Pipe``); a failed command reads
    as an ``OSError`` that says its exit status, rather than webdataset's internals."""

    def __init__(self, pipe):
        self._pipe = pipe

    def read(self, n: int = -1) -> bytes:
        try:
            return self._pipe.read(n)
        except OSError:
            raise OSError(f"the command exited with status {self._pipe.status}") from None

    def close(self) -> None:
        try:
            self._pipe.close()
        except OSError:
            raise OSError(f"the command exited with status {self._pipe.status}") from None


@contextlib.contextmanager
def open_url(url: str, timeout: float = 120) -> Iterator[BinaryIO]:
    """A binary stream of a local file, an http(s) URL (urllib; `timeout` seconds
    without data fail the read) or a ``pipe:`` command and the other schemes
    webdataset's ``gopen`` knows.  Closing a ``pipe:`` stream checks the
    command's exit status, except when the reading stopped early: a command cut
    off mid-write may exit non-zero, and that must not hide what stopped it."""
    if is_local(url):
        stream = open(url, "rb")
    elif is_http(url):
        stream = urllib.request.urlopen(url, timeout=timeout)
    else:
        from webdataset import gopen

        stream = _Command(gopen(url))
    try:
        yield stream  # type: ignore[misc]
    except BaseException:
        with contextlib.suppress(Exception):
            stream.close()
        raise
    stream.close()


@dataclass(frozen=True)
class Retries:
    """How an http(s) read that fails or stops short is tried again: `tries`
    reads in all, waiting base, 2 * base, 4 * base ... seconds (at most `cap`)
    before each new one."""

    tries: int = 5
    base: float = 1.0
    cap: float = 8.0

    def wait(self, attempt: int) -> float:
        """Seconds to wait before try `attempt` (2, 3, ...)."""
        return min(self.cap, self.base * 2 ** (attempt - 2))


# Waits of 1, 2, 4, 8 s: about 15 s for a dropped connection or a restarting server to come back.
HTTP_RETRIES = Retries()
HTTP_TIMEOUT = 120.0  # seconds without data that fail one try
# Answers that asking again does not change: every 4xx but Request Timeout, Too Early, Too Many Requests.
_RETRIED_4XX = (408, 425, 429)


class ReadFailed(OSError):
    """An http(s) read that failed on every try; its message says the last failure and how many tries."""


def describe(error: BaseException) -> str:
    """An error for a one-line message: its type and text (ReadFailed's text says both)."""
    return str(error) if isinstance(error, ReadFailed) else f"{type(error).__name__}: {error}"


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def read_bytes(url: str, retries: Retries | None = None) -> bytes:
    """The whole file at `url`; an http(s) read is tried again (see read_http)."""
    if is_http(url):
        return bytes(read_http(url, retries=retries))
    with open_url(url) as f:
        return f.read()


def read_http(
    url: str, size: int | None = None, retries: Retries | None = None, timeout: float = HTTP_TIMEOUT
) -> bytearray:
    """The body at `url`, tried again after a failure or a short read (`retries`,
    HTTP_RETRIES unless given), each retry logged.  A short read is a body
    shorter than its Content-Length or, where the server sends none, than
    `size` when given.  Raises ReadFailed after the last try, and the
    HTTPError at once for an answer that asking again will not change (404)."""
    retries = retries or HTTP_RETRIES
    download = _Download(url, size, timeout)
    for attempt in range(1, retries.tries + 1):
        try:
            download.go_on()
            return download.body
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in _RETRIED_4XX:
                raise
            e.close()  # its answer's body is not wanted
            error: BaseException = e
        except (OSError, http.client.HTTPException) as e:  # dropped, reset, refused, timed out, a broken answer
            error = e
        if attempt == retries.tries:
            raise ReadFailed(f"{describe(error)} (tried {retries.tries} times)") from None
        wait = retries.wait(attempt + 1)
        log.warning(
            "data: reading %s failed after %d bytes: %s; trying again in %gs (attempt %d of %d)",
            url,
            len(download.body),
            describe(error),
            wait,
            attempt + 1,
            retries.tries,
        )
        time.sleep(wait)
    raise AssertionError("unreachable")  # the last try returns or raises


class _Download:
    """One http(s) file read over as many connections as it takes: the bytes so
    far, and the first answer's ETag, which a resumed read asks to match."""

    def __init__(self, url: str, size: int | None, timeout: float):
        self.url, self.size, self.timeout = url, size, timeout
        self.body = bytearray()
        self.etag: str | None = None

    def go_on(self) -> None:
        """Read the rest of the file: from the first byte not yet read where the
        server answers the Range with 206, else all of it again.  Raises
        ConnectionError if the answer stops short."""
        start = len(self.body)
        headers = {"Range": f"bytes={start}-"} if start else {}
        if start and self.etag:
            headers["If-Range"] = self.etag  # a file changed since is sent whole (200)
        request = urllib.request.Request(self.url, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:
            resumed = start and answer.status == 206
            if resumed and not (answer.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
                del self.body[:]  # the next try asks for the whole file
                raise ConnectionError(f"asked for bytes {start}- but got {answer.headers.get('Content-Range')!r}")
            if not resumed:
                del self.body[:]
                tag = answer.headers.get("ETag")
                self.etag = tag if tag and not tag.startswith("W/") else None  # If-Range takes strong ETags only
            length = answer.headers.get("Content-Length")
            expected = len(self.body) + int(length) if length and length.isdigit() else self.size
            while chunk := answer.read(1 << 20):
                self.body += chunk
        if expected is not None and len(self.body) < expected:
            raise ConnectionError(f"the connection closed after {len(self.body)} of {expected} bytes")
