"""A real HTTP origin for tests: ranges, ETag/If-Range, injected faults, and a server-side request log.

Serves blobs (bytes in memory or a file on disk) at any path, the way S3, Zenodo's file links and
archive.org's /download/ do, and counts what it did: every request with its Range header, status,
bytes sent and timestamps, and the highest number of requests in flight at once. API routes (S3
listings, Zenodo JSON, IA metadata) are added by the tests to the same aiohttp app.

Runs either in the test's own loop (`aiohttp_server`) or in a background thread (`ThreadedOrigin`)
when a daemon subprocess is the client.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

Fault = Callable[["Blob", web.Request, int], str | None]
CHUNK = 256 * 1024


@dataclass
class Blob:
    data: bytes | None = None
    path: Path | None = None
    etag: str | None = None
    last_modified: str = "Wed, 01 Jan 2025 00:00:00 GMT"
    ranges: bool = True
    # Called per request with (blob, request, n-th request for this blob): returns an action or None.
    fault: Fault | None = None
    rate: float | None = None  # bytes/s per response, to make a pull slow enough to interrupt
    # Like many CDNs: a client that accepts gzip gets the whole body gzipped (ranges ignored).
    gzip_when_asked: bool = False
    requests: int = 0

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def md5(self) -> str:
        h = hashlib.md5()
        if self.data is not None:
            h.update(self.data)
        else:
            assert self.path is not None
            with open(self.path, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
        return h.hexdigest()


@dataclass
class LogEntry:
    path: str
    method: str
    range: str | None
    if_range: str | None
    status: int
    start: float
    end: float = 0.0
    sent: int = 0
    user_agent: str | None = None
    accept_encoding: str | None = None


@dataclass
class Origin:
    blobs: dict[str, Blob] = field(default_factory=dict)
    log: list[LogEntry] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by_path: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, data: bytes | None = None, *, file: Path | None = None, **kw: Any) -> Blob:
        blob = Blob(data=data, path=file, **kw)
        if blob.etag is None:
            blob.etag = '"' + (hashlib.md5(data).hexdigest() if data is not None else f"f{blob.size:x}") + '"'
        self.blobs[path] = blob
        return blob

    def sent(self, path: str) -> int:
        return sum(e.sent for e in self.log if e.path == path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        blob = self.blobs.get(request.path)
        if blob is None:
            raise web.HTTPNotFound()
        blob.requests += 1
        entry = LogEntry(
            request.path,
            request.method,
            request.headers.get("Range"),
            request.headers.get("If-Range"),
            0,
            time.monotonic(),
            user_agent=request.headers.get("User-Agent"),
            accept_encoding=request.headers.get("Accept-Encoding"),
        )
        self.log.append(entry)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._serve(blob, request, entry)
        finally:
            self.in_flight -= 1
            entry.end = time.monotonic()

    async def _serve(self, blob: Blob, request: web.Request, entry: LogEntry) -> web.StreamResponse:
        action = blob.fault(blob, request, blob.requests) if blob.fault else None
        if action and action.startswith("status:"):
            _, code, *retry = action.split(":")
            entry.status = int(code)
            headers = {"Retry-After": retry[0]} if retry else {}
            return web.Response(status=int(code), headers=headers, text="try later")
        if blob.gzip_when_asked and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(blob.read(0, blob.size))
            entry.status = 200
            entry.sent = len(body)
            return web.Response(body=body, headers={"Content-Encoding": "gzip", "ETag": blob.etag or ""})
        size = blob.size
        start, end, status = 0, size, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and blob.ranges and (if_range is None or if_range in (blob.etag, blob.last_modified)):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            if not m or int(m.group(1)) >= size:
                entry.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        headers = {
            "Content-Length": str(end - start),
            "Last-Modified": blob.last_modified,
            "Content-Type": "application/octet-stream",
        }
        if blob.etag:
            headers["ETag"] = blob.etag
        if blob.ranges:
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        entry.status = status
        await resp.prepare(request)
        limit = None
        if action and action.split(":")[0] in ("truncate", "reset", "stall"):
            limit = int(action.split(":")[1])
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if limit is not None:
                n = min(n, max(0, limit - entry.sent))
            if n == 0:
                break
            data = blob.read(pos, pos + n)
            if action == "corrupt":
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            await resp.write(data)
            entry.sent += len(data)
            pos += n
            if blob.rate:
                await asyncio.sleep(n / blob.rate)
        if limit is not None and pos < end:
            kind = action.split(":")[0] if action else ""
            if kind == "stall":
                await asyncio.sleep(3600)
            transport = request.transport
            if transport is not None:
                if kind == "reset":
                    transport.abort()
                else:
                    transport.close()
            return resp
        await resp.write_eof()
        return resp


class ThreadedOrigin:
    """An aiohttp app served on 127.0.0.1 from its own thread and loop."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> ThreadedOrigin:
        self._thread.start()
        self._ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ConnectionCountingProxy:
    """A TCP relay in front of an origin that counts open TCP connections (not just requests)."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.open = 0
        self.max_open = 0
        self.total = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> ConnectionCountingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.total += 1
        self.max_open = max(self.max_open, self.open)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(1 << 16):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, asyncio.CancelledError):
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def cancel_when(task: asyncio.Task[Any], reached: Callable[[], bool], within: float = 10) -> None:
    """Once `reached()` (give up waiting after 5 s), cancel `task`: it must end within `within` seconds,
    so a thread blocked in a read has to be aborted, not waited for until its read timeout."""
    for _ in range(250):
        if reached():
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    task.cancel()
    t0 = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, within)  # TimeoutError, not CancelledError, if it took longer
    assert time.monotonic() - t0 < within

