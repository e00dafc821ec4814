"""Dataset bodies off the event loop: a range GET whose bytes go from the socket to the partial file
in a worker thread.

aiohttp's client parses and copies every byte of a body on the loop thread (about one CPU-second per
GiB here), and the loop that answers the API is held for it. A pull's segments therefore go through
the standard library's `http.client` on a worker thread instead: `readinto` one reused buffer
(recv_into, no object per chunk), `os.pwrite` it in place; both release the GIL. The loop still
decides everything (host caps, pacing, Retry-After, validation of status and headers): it opens a
request, looks at its head, then hands the body to a thread and awaits it.

Only transport failures become `TransportError`; a failed write to the partial file stays an
`OSError`, so a full disk is never retried as if the network had failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

CHUNK = 1024 * 1024  # one recv_into/pwrite unit
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Errors of the connection or of the HTTP framing (a reset, a timeout, a bad status line, a short
# chunked body): the request can be retried.
_NETWORK = (OSError, http.client.HTTPException)


class _SocketFile:
    """A response's socket, unbuffered. A body read returns what one `recv_into` brings, straight into
    the caller's buffer: no byte that arrived before a stall or a reset is held in a buffer that the
    exception throws away, so a retry resumes after it. Heads and chunk-size lines are read a byte at
    a time (a few hundred bytes per request). For a chunked body http.client expects reads that fill
    the buffer, and gets them."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.fill = False

    def readinto(self, b: Any) -> int:
        return _read_full(self._raw, b) if self.fill else int(self._raw.readinto(b))

    def read(self, amt: int | None = None) -> bytes:
        if amt is None:
            return bytes(self._raw.readall())
        buf = bytearray(amt)
        return bytes(buf[: _read_full(self._raw, buf)])

    def readline(self, limit: int = -1) -> bytes:
        return bytes(self._raw.readline(limit))

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:  # flush, closed, fileno...: the socket file's own
        return getattr(self._raw, name)


def _read_full(raw: Any, b: Any) -> int:
    """Read until `b` is full or the stream ends."""
    view = memoryview(b).cast("B")
    got = 0
    while got < len(view):
        n = raw.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class _Response(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the buffered file made by the base class, before it has read anything
        self.fp = cast(Any, _SocketFile(sock.makefile("rb", buffering=0)))  # the typed attribute is buffered

    def begin(self) -> None:
        super().begin()
        if self.chunked and self.fp is not None:
            cast(_SocketFile, self.fp).fill = True


class TransportError(Exception):
    """The connection or the HTTP exchange failed; the request may be retried."""


class Ticket:
    """The abort handle of one request, from before it connects until its body is read: `abort()`
    (from any thread) shuts its socket down, so a thread blocked in connect's aftermath, in reading
    the head or in reading the body returns at once instead of at its timeout."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.aborted.is_set():
                _shutdown(sock)

    def abort(self) -> None:
        with self._lock:
            self.aborted.set()
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Key:
    scheme: str
    netloc: str


class BodyResponse:
    """An open response whose head has been read; the body is poured by `pour()` in a thread."""

    def __init__(
        self,
        transport: BodyTransport,
        key: _Key,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        ticket: Ticket,
    ) -> None:
        self._transport = transport
        self._key = key
        self._conn: http.client.HTTPConnection | None = conn
        # The socket itself: with "Connection: close" the response, not the connection, holds it.
        self._resp = resp
        self._ticket = ticket
        self._aborted = ticket.aborted
        self.status = self._resp.status
        self.headers = self._resp.headers  # case-insensitive, like aiohttp's
        self.received = 0  # body bytes read from the socket so far

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def pour(
        self,
        fd: int,
        pos: int,
        end: Callable[[int], int],
        wrote: Callable[[int, int], None],
        admit: Callable[[int, int], int] | None = None,
    ) -> None:
        """Blocking: write the body into `fd` from `pos` until `end(pos)` (asked before every read;
        below 0: no bound) or until the body ends; `wrote(pos, n)` after each write.

        `admit(pos, n)`, asked after a read brought n bytes, says how many of them to write: fewer when
        the end moved while the read waited (the rest is someone else's); the pour then stops. Only
        the write is ever protected this way, never the wait for bytes that may not come."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while not self._aborted.is_set():
            stop = end(pos)
            want = CHUNK if stop < 0 else min(CHUNK, stop - pos)
            if want <= 0:
                return
            try:
                n = self._resp.readinto(view[:want])
            except _NETWORK as e:
                if self._aborted.is_set():
                    return
                raise TransportError(f"{type(e).__name__}: {e}") from None
            if not n:
                return
            self.received += n
            take = n if admit is None else admit(pos, n)
            if take > 0:
                _pwrite_all(fd, view[:take], pos)  # an OSError here is the disk's: not wrapped
                wrote(pos, take)
                pos += take
            if take < n:
                return

    def hand_over(self, take: Callable[[memoryview], None], batch: int) -> None:
        """Blocking: give the body to `take` in buffers of `batch` bytes (the last one shorter), each
        a new buffer the taker may keep (a hasher holds on to what it was fed)."""
        buf = bytearray(batch)
        fill = 0
        while not self._aborted.is_set():
            try:
                n = self._resp.readinto(memoryview(buf)[fill:])
            except _NETWORK as e:
                if self._aborted.is_set():
                    return
                raise TransportError(f"{type(e).__name__}: {e}") from None
            self.received += n
            fill += n
            if fill == batch or (not n and fill):
                del buf[fill:]
                take(memoryview(buf))
                buf, fill = bytearray(batch), 0
            if not n:
                return

    def pause(self, seconds: float) -> None:
        """Blocking: wait (a bandwidth limit's debt), cut short by `abort()`."""
        self._aborted.wait(seconds)

    def abort(self) -> None:
        """From any thread: make a `pour()` in progress return at once."""
        self._ticket.abort()

    def release(self) -> None:
        """The connection goes back to the pool if its body was read to the end, else it is closed.
        Call only when no `pour()` runs."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._aborted.is_set() and self._resp.isclosed() and not self._resp.will_close:
            self._transport._put_idle(self._key, conn)
        else:
            self._resp.close()
            conn.close()


class BodyTransport:
    """Keep-alive connections per host for the bodies; blocking calls, made from worker threads."""

    def __init__(self, *, user_agent: str, connect_timeout: float, read_timeout: float, max_idle: int) -> None:
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def open(self, url: str, headers: dict[str, str], ticket: Ticket | None = None) -> BodyResponse:
        """Blocking: send a GET and read the head, following redirects; the body is left unread.
        `ticket.abort()` ends the wait for the head (TransportError) and, later, the body's reads."""
        ticket = ticket or Ticket()
        for _ in range(MAX_REDIRECTS + 1):
            if ticket.aborted.is_set():
                raise TransportError("aborted")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise TransportError(f"cannot fetch {url!r}")
            key = _Key(parts.scheme, parts.netloc)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn, reused = self._take(key)
            try:
                resp = self._exchange(conn, target, headers, ticket)
            except _NETWORK as e:
                conn.close()
                if not reused or ticket.aborted.is_set():
                    raise TransportError(f"{type(e).__name__}: {e}") from None
                # A kept-alive connection the server has closed meanwhile: once more on a new one.
                conn = self._connect(key)
                try:
                    resp = self._exchange(conn, target, headers, ticket)
                except _NETWORK as e2:
                    conn.close()
                    raise TransportError(f"{type(e2).__name__}: {e2}") from None
            location = resp.headers.get("Location")
            if resp.status in _REDIRECTS and location:
                resp.close()  # the redirect's own body is not wanted
                conn.close()
                url = urljoin(url, location)
                continue
            return BodyResponse(self, key, conn, resp, ticket)
        raise TransportError(f"more than {MAX_REDIRECTS} redirects")

    def _exchange(
        self, conn: http.client.HTTPConnection, target: str, headers: dict[str, str], ticket: Ticket
    ) -> http.client.HTTPResponse:
        if getattr(conn, "sock", None) is None:  # new, or closed by the server's "Connection: close"
            conn.connect()
            conn.sock.settimeout(self.read_timeout)  # the connect timeout was for connecting only
        # The socket itself: with "Connection: close" the response, not the connection, holds it.
        ticket.attach(conn.sock)
        conn.request("GET", target, headers={"User-Agent": self.user_agent, **headers})
        return conn.getresponse()

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        if key.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                key.netloc, timeout=self.connect_timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(key.netloc, timeout=self.connect_timeout)
        conn.response_class = _Response
        return conn

    def _take(self, key: _Key) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        return self._connect(key), False

    def _put_idle(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if self._closed or len(idle) >= self.max_idle:
                conn.close()
            else:
                idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


async def open_in(
    threads: concurrent.futures.Executor, transport: BodyTransport, url: str, headers: dict[str, str]
) -> BodyResponse:
    """`transport.open` on one of `threads`, awaited without blocking the loop. Cancelled, it aborts
    the request (a host that stopped answering does not hold the thread until its read timeout), and
    a head that arrives after all is given back."""
    ticket = Ticket()
    fut = threads.submit(transport.open, url, headers, ticket)
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        ticket.abort()
        fut.add_done_callback(_release_unclaimed)
        raise


def _release_unclaimed(fut: concurrent.futures.Future[BodyResponse]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().release()


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        pos += n
        data = data[n:]
