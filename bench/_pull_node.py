"""A real noded daemon (bench helper) with one extra component: an HTTP pull of one big file that runs on
the daemon's own event loop the way the pull pipeline does (streamed reads, hashing and writes in an
executor, bytes counted on the origin's channel). Used by bench/api.py while the origins pull pipeline
is not on this branch. Routes: POST /bench/pull starts it; GET /bench/lag?seconds=N reads loop lag."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from noded.api.app import NODE_KEY
from noded.component import Node
from noded.config import load_config
from noded.daemon import Daemon
from noded.logs import configure
from noded.metrics import Metrics

CHUNK = 8 * 1024 * 1024


class BenchPull:
    name = "benchpull"

    def __init__(self, node: Node, url: str, dest: Path) -> None:
        self.node, self.url, self.dest = node, url, dest
        self.bytes = 0
        self.seconds: float | None = None
        self.md5: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-hash")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=False)

    def status(self) -> dict[str, Any]:
        return {
            "state": "done" if self.seconds else ("pulling" if self.task else "idle"),
            "bytes": self.bytes,
            "seconds": self.seconds,
            "md5": self.md5,
        }

    async def pull(self) -> None:
        loop = asyncio.get_running_loop()
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        f = await loop.run_in_executor(self.pool, open, self.dest, "wb")

        def work(buf: bytes) -> None:
            md5.update(buf)
            sha256.update(buf)
            f.write(buf)

        t0 = time.monotonic()
        try:
            async with aiohttp.ClientSession() as s, s.get(self.url) as r:
                r.raise_for_status()
                buf = bytearray()
                async for chunk in r.content.iter_chunked(1 << 20):
                    buf += chunk
                    self.node.traffic.add("zenodo", "in", len(chunk))
                    if len(buf) >= CHUNK:
                        await loop.run_in_executor(self.pool, work, bytes(buf))
                        self.bytes += len(buf)
                        buf.clear()
                if buf:
                    await loop.run_in_executor(self.pool, work, bytes(buf))
                    self.bytes += len(buf)
        finally:
            await loop.run_in_executor(self.pool, f.close)
        self.md5 = md5.hexdigest()
        self.seconds = time.monotonic() - t0


def main() -> int:
    cfg_path, url, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    cfg = load_config(cfg_path)
    configure("json", "warning")
    daemon = Daemon(cfg, cfg_path)
    pull = BenchPull(daemon.node, url, dest)
    daemon.components.insert(len(daemon.components) - 1, pull)

    async def start_pull(request: web.Request) -> web.Response:
        pull.task = asyncio.create_task(pull.pull())
        return web.json_response({"started": True})

    async def lag(request: web.Request) -> web.Response:
        m = request.app[NODE_KEY].get("metrics")
        assert isinstance(m, Metrics)
        return web.json_response(m.lag_percentiles(float(request.query.get("seconds", "60"))))

    def routes(app: web.Application) -> None:
        app.router.add_post("/bench/pull", start_pull)
        app.router.add_get("/bench/lag", lag)

    # The API component was built with daemon.routes; add ours to its app before it starts.
    api = daemon.components[-1]
    routes(api.app)  # type: ignore[attr-defined]
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    raise SystemExit(main())
