"""The node as a BEP 19 web seed: cached items served read-only over HTTP on their own listener.

GET and HEAD with validators, conditional requests, single and multiple byte ranges and sendfile
(`noded.core.httpserve`). Only rows
in state CACHED are served, from their final path (never the partial or quarantine areas, which
`final_path` refuses). Bytes sent count on the "webseed" traffic channel, and a request counts as an
access for LRU (at most one store write per item per minute).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core.component import Node
from noded.core.httpserve import serve_file
from noded.core.logs import get_logger
from noded.core.model import State
from noded.core.safefs import UnsafeFile, lstat_regular

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
        if item.withheld(self.node.cfg.origins.require_checksum):
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
        self.served += 1
        now = time.time()
        if now - self._touched.get(item.id, 0) >= TOUCH_MIN_INTERVAL:
            self._touched[item.id] = now
            await store.run(store.touch, [item.id], now)
        return await serve_file(request, path, headers={"Cache-Control": "public, max-age=3600"}, on_sent=self._count)

    def _count(self, status: int, sent: int, aborted: bool) -> None:
        errors = int(status >= 400 or aborted)
        self.node.traffic.add("webseed", "out", sent, requests=1, errors=errors)


def _cached_version(store: Any, key: str) -> Any:
    for it in store.conn.execute("SELECT id FROM items WHERE key=? AND state=? ORDER BY version DESC", (key, "cached")):
        return store.get_item(it[0])
    return None
