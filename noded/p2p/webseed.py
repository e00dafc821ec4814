"""The node as a BEP 19 web seed: cached items served read-only over HTTP on their own listener.

GET and HEAD, Range, ETag/Last-Modified and sendfile all come from aiohttp's FileResponse. Only rows
in state CACHED are served, from their final path (never the partial or quarantine areas, which
`final_path` refuses). Bytes sent count on the "webseed" traffic channel, and a request counts as an
access for LRU (at most one store write per item per minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path, PosixPath
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.core.model import State
from noded.core.safefs import UnsafeFile, lstat_regular, open_regular

log = get_logger("noded.p2p.webseed")

TOUCH_MIN_INTERVAL = 60.0
MAX_KEY_CHARS = 1024


def key_from_path(path: str, strip_prefix: str) -> str | None:
    """The item key a request path names, or None when it names nothing we could serve."""
    if strip_prefix:
        if not path.startswith(strip_prefix + "/"):
            return None
        path = path[len(strip_prefix) :]
    key = path.lstrip("/")
    if not key or len(key) > MAX_KEY_CHARS or "\0" in key:
        return None
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return key


class WebSeedServer:
    name = "webseed"

    def __init__(self, node: Node, layout: CacheLayout | None = None) -> None:
        self.node = node
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self._touched: dict[int, float] = {}
        self.served = 0
        self.app = web.Application(handler_args={"max_line_size": 8190, "max_field_size": 8190})
        self.app.router.add_get("/{tail:.*}", self.handle)  # add_get also answers HEAD

    async def start(self) -> None:
        cfg = self.node.cfg.http_mirror
        if not cfg.enabled:
            return
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.bind, cfg.port, reuse_address=True)
        await site.start()
        socks = getattr(site._server, "sockets", None) or []
        self.port = socks[0].getsockname()[1] if socks else cfg.port
        log.info("webseed.listening", bind=cfg.bind, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def status(self) -> dict[str, Any]:
        return {"state": "running" if self._runner else "stopped", "port": self.port, "served": self.served}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = key_from_path(request.path, self.node.cfg.http_mirror.strip_prefix)
        if key is None:
            raise web.HTTPNotFound(text="not found\n")
        store = self.node.store
        item = await store.run(store.get_current, key)
        if item is None or item.state != State.CACHED:
            # A newer version may be in flight while the old one is still cached: serve the cached one.
            item = await store.run(_cached_version, store, key)
        if item is None:
            raise web.HTTPNotFound(text="not cached here\n")
        if self.node.cfg.origins.require_checksum and item.verification == "unverified":
            raise web.HTTPNotFound(text="no published checksum to verify this copy against\n")
        try:
            path = self.layout.final_path(item.key)
        except UnsafePath:
            raise web.HTTPNotFound(text="not found\n") from None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lstat_regular, path, self.layout.root)
        except UnsafeFile as e:
            log.error("webseed.refused", key=item.key, error=str(e))
            raise web.HTTPNotFound(text="not cached here\n") from None
        except OSError:
            raise web.HTTPNotFound(text="not cached here\n") from None
        resp = _CountingFileResponse(path, self._count, chunk_size=1024 * 1024)
        resp.headers["Cache-Control"] = "public, max-age=3600"
        self.served += 1
        now = time.time()
        if now - self._touched.get(item.id, 0) >= TOUCH_MIN_INTERVAL:
            self._touched[item.id] = now
            await store.run(store.touch, [item.id], now)
        return resp

    def _count(self, request: web.BaseRequest, resp: _CountingFileResponse, aborted: bool) -> None:
        errors = int(resp.status >= 400 or aborted)
        self.node.traffic.add("webseed", "out", resp.body_sent, requests=1, errors=errors)


class _NoFollowPath(PosixPath):
    """A path whose `open` is `noded.core.safefs.open_regular` (what FileResponse opens the file with)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        return os.fdopen(open_regular(self), "rb")


class _CountingFileResponse(web.FileResponse):
    """FileResponse (Range, ETag, sendfile) that reports the body bytes it actually handed to the socket,
    also when the client went away mid-body."""

    def __init__(
        self, path: Path, on_sent: Callable[[web.BaseRequest, _CountingFileResponse, bool], None], chunk_size: int
    ) -> None:
        super().__init__(path, chunk_size=chunk_size)
        self._on_sent = on_sent
        self.body_sent = 0

    def _get_file_path_stat_encoding(self, accept_encoding: str) -> tuple[Path | None, os.stat_result, str | None]:
        # Only the item's own file, never a ".gz"/".br" sibling someone put beside it, and never through
        # a symlink (None: aiohttp answers 403 for anything but a regular file). The path returned opens
        # with O_NOFOLLOW too, so a symlink swapped in after this lstat is refused (404), not followed.
        st = os.lstat(self._path)
        return (_NoFollowPath(self._path) if stat.S_ISREG(st.st_mode) else None), st, None

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        try:
            return await super()._sendfile(request, fobj, offset, count)
        finally:
            # asyncio's sendfile leaves the file offset just past what the kernel took, even when it
            # fails midway; the chunked fallback leaves it past what it read (at most one chunk more).
            with contextlib.suppress(OSError, ValueError):
                self.body_sent = max(0, min(count, fobj.tell() - offset))

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        aborted = True
        try:
            writer = await super().prepare(request)
            aborted = False
            return writer
        finally:
            self._on_sent(request, self, aborted)


def _cached_version(store: Any, key: str) -> Any:
    for it in store.conn.execute("SELECT id FROM items WHERE key=? AND state=? ORDER BY version DESC", (key, "cached")):
        return store.get_item(it[0])
    return None
