"""Test servers for the transparency tests: a Zenodo-shaped origin and a peer's /readyz, each an aiohttp
app on its own thread and loop (so blocking test code and a `noded` subprocess can both talk to it),
whose behaviour a test switches while it runs: ok, error (503), missing (404), wrong bytes, slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web

from noded.core.model import CatalogEntry, State
from noded.core.store import Store

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class ThreadedServer:
    """An aiohttp app on a fixed loopback port that can stop listening and come back on the same port."""

    def __init__(self, app: web.Application, port: int) -> None:
        self.app = app
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._call(self._setup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    async def _setup(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def _unlisten(self) -> None:
        assert self._runner is not None
        for site in list(self._runner.sites):
            await site.stop()

    def start(self) -> ThreadedServer:
        self._call(self._listen())
        return self

    def stop_listening(self) -> None:
        """Connections are refused from now on (the mirror is gone)."""
        self._call(self._unlisten())

    def close(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class ZenodoOrigin:
    """Zenodo's record JSON and file-content URLs, with Range and ETag like the real service."""

    def __init__(self, port: int, record_id: int = 1234, files: dict[str, bytes] | None = None) -> None:
        self.record_id = record_id
        self.files: dict[str, bytes] = files or {}
        self.mode = "ok"  # ok | error | missing | wrong | slow
        self.delay = 0.0
        self.requests = 0
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/records/{rid}", self._record)
        app.router.add_get("/api/records/{rid}/files/{name}/content", self._content)
        # Path-style S3 object GETs (Source Cooperative's shape): same Range/ETag semantics.
        app.router.add_get("/{account}/{repo}/{name}", self._content)
        self.server = ThreadedServer(app, port).start()

    @property
    def base_url(self) -> str:
        return self.server.url

    def file_url(self, name: str) -> str:
        return f"{self.base_url}/api/records/{self.record_id}/files/{name}/content"

    def s3_url(self, name: str) -> str:
        return f"{self.base_url}/dataforcanada/d4c/{name}"

    @staticmethod
    def etag(data: bytes) -> str:
        return hashlib.md5(data).hexdigest()

    async def _gate(self) -> web.Response | None:
        self.requests += 1
        if self.mode == "slow" or self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "error":
            return web.json_response({"status": 503, "message": "maintenance"}, status=503)
        return None

    async def _root(self, request: web.Request) -> web.Response:
        return await self._gate() or web.json_response({"links": {"records": f"{self.base_url}/api/records"}})

    async def _record(self, request: web.Request) -> web.Response:
        gated = await self._gate()
        if gated:
            return gated
        if request.match_info["rid"] != str(self.record_id):
            return web.json_response({"status": 404, "message": "PID does not exist."}, status=404)
        files = [
            {
                "id": hashlib.sha1(n.encode()).hexdigest(),
                "key": n,
                "size": len(b),
                "checksum": f"md5:{self.etag(b)}",
                "links": {"self": self.file_url(n)},
            }
            for n, b in self.files.items()
        ]
        return web.json_response(
            {
                "id": self.record_id,
                "recid": str(self.record_id),
                "metadata": {"title": "test record", "publication_date": "2025-01-01"},
                "files": files,
                "links": {"self": f"{self.base_url}/api/records/{self.record_id}"},
            }
        )

    async def _content(self, request: web.Request) -> web.Response:
        gated = await self._gate()
        if gated:
            return gated
        name = request.match_info["name"]
        data = self.files.get(name)
        if data is None or self.mode == "missing":
            return web.json_response({"status": 404, "message": "The requested URL was not found."}, status=404)
        etag = f'"md5:{self.etag(data)}"'
        if self.mode == "wrong":
            data = bytes(b ^ 0xFF for b in data)
        m = _RANGE.match(request.headers.get("Range", ""))
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            return web.Response(
                status=206,
                body=data[a : b + 1],
                headers={"Content-Range": f"bytes {a}-{b}/{len(data)}", "ETag": etag, "Accept-Ranges": "bytes"},
                content_type="application/octet-stream",
            )
        return web.Response(body=data, headers={"ETag": etag}, content_type="application/octet-stream")

    def close(self) -> None:
        self.server.close()


READYZ = {"ready": True, "node": "amsterdam", "components": {"store": "running", "api": "running"}}


class PeerReadyz:
    """A peer node's /readyz (the shape noded answers), switchable between ready and not ready."""

    def __init__(self, port: int) -> None:
        self.ready = True
        # Every byte served to the node, whatever it asked (the P2P sync polls /v1/inventory here too).
        self.served = 0
        app = web.Application()
        app.router.add_get("/readyz", self._readyz)
        app.on_response_prepare.append(self._count)
        self.server = ThreadedServer(app, port).start()

    async def _count(self, request: web.Request, response: web.StreamResponse) -> None:
        self.served += response.content_length or 0

    def body(self) -> bytes:
        return json.dumps({**READYZ, "ready": self.ready}).encode()

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.Response(body=self.body(), status=200 if self.ready else 503, content_type="application/json")

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.close()


def seed_item(
    state_dir: Path,
    cache_dir: Path | None,
    origin: str,
    key: str,
    data: bytes,
    urls: list[str],
    *,
    etag: str | None = None,
    cached: bool = True,
    infohash: str | None = None,
    extra_locations: tuple[str, ...] = (),
) -> int:
    """Put an item into a node's store before it starts (as the catalog and the pull pipeline would)."""
    store = Store(state_dir / "noded.sqlite3")
    store.open_sync()
    try:
        md5 = hashlib.md5(data).hexdigest()
        item, _ = store.upsert_entry(
            CatalogEntry(
                origin=origin, key=key, urls=tuple(urls), size=len(data), md5=md5, etag=etag, infohash=infohash
            )
        )
        for loc in extra_locations:
            store.upsert_entry(CatalogEntry(origin=loc, key=key, urls=(), size=len(data), md5=md5))
        if cached and cache_dir is not None:
            path = cache_dir / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            store.set_state(item.id, State.CACHED, disk_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        return item.id
    finally:
        store.close_sync()


def query(state_dir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read a node's store from outside (WAL allows a reader beside the running daemon)."""
    conn = sqlite3.connect(f"file:{state_dir / 'noded.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_for(pred: Any, timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}; last value {last!r}")
