"""The aiohttp application and the component that serves it.

Route modules each expose `setup(app)`; the daemon passes the list, so a feature adds its endpoints
without touching this file.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from noded import __version__
from noded.api.auth import TOKEN_KEY
from noded.api.errors import error_middleware
from noded.core.component import Node
from noded.core.logs import get_logger

NODE_KEY = web.AppKey("node", Node)
log = get_logger("noded.api")

RouteSetup = Callable[[web.Application], None]


@web.middleware
async def cors_and_count(request: web.Request, handler: Any) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    if request.method == "OPTIONS":
        resp: web.StreamResponse = web.Response(status=204)
    else:
        resp = await handler(request)
    origins = node.cfg.api.cors_origins
    if origins and request.method in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if "*" in origins:
            resp.headers["Access-Control-Allow-Origin"] = "*"
        elif origin and origin in origins:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        resp.headers["Access-Control-Allow-Methods"] = "GET, HEAD, OPTIONS"
    node.traffic.add("api", "in", request.content_length or 0, requests=1)
    # A streamed download (noded/core/httpserve.py) counts the bytes that went out itself.
    if isinstance(resp, web.Response) and isinstance(resp.body, bytes) and request.method != "HEAD":
        node.traffic.add("api", "out", len(resp.body))
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its loop answer (with the instance id, so tools can tell it is us)."""
    return web.json_response({"status": "ok", "instance": request.app[NODE_KEY].instance})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    ok = node.ready and not node.stopping and node.store.is_open
    body = {
        "ready": ok,
        "node": node.cfg.node.name,
        "components": {
            n: node.component_state(n, c.status().get("state", "unknown")) for n, c in node.components.items()
        },
    }
    return web.json_response(body, status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response(await build_status(node))


def path_labels(node: Node) -> tuple[tuple[bytes, bytes], ...]:
    """The machine's directories an answer may mention (in an error text), as they appear in JSON, each
    with the name it is shown by instead, longest first. Any web page may read the API (CORS); where the
    node keeps its database or its credentials is not for it to know."""
    cfg = node.cfg
    return _labels(
        (
            ("<cache_dir>", str(cfg.paths.cache_dir)),
            ("<state_dir>", str(cfg.paths.state_dir)),
            ("<inbox>", str(cfg.origins.inbox.dir)),
            ("<credentials>", os.environ.get("CREDENTIALS_DIRECTORY", "")),
        )
    )


@functools.lru_cache(maxsize=8)
def _labels(named: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    # Cached: every JSON answer passes here, and resolving the paths costs an lstat per component.
    out: dict[bytes, bytes] = {}
    for label, p in named:
        if not p:
            continue
        for form in {p, os.path.realpath(p)}:
            if len(form) > 1:
                out[json.dumps(form)[1:-1].encode()] = label.encode()
    return tuple(sorted(out.items(), key=lambda kv: -len(kv[0])))


@web.middleware
async def redact_paths(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every JSON answer, errors included, with the node's directories replaced by their labels."""
    resp: web.StreamResponse = await handler(request)
    if isinstance(resp, web.Response) and resp.content_type == "application/json" and isinstance(resp.body, bytes):
        body = resp.body
        for path, label in path_labels(request.app[NODE_KEY]):
            if path in body:
                body = body.replace(path, label)
        if body is not resp.body:
            resp.body = body
    return resp


async def build_status(node: Node) -> dict[str, Any]:
    counts = await node.store.run(node.store.counts_by_state)
    summary = await node.store.run(node.store.cache_summary)
    comps: dict[str, Any] = {}
    for name, c in node.components.items():
        try:
            st = dict(c.status())
            st["state"] = node.component_state(name, st.get("state", "unknown"))
            comps[name] = st
        except Exception as e:  # a broken status() must not break /v1/status
            comps[name] = {"state": "error", "error": str(e)}
    cache = comps.get("cache", {})
    extra: dict[str, Any] = {}
    # Mirrors and quiet hours, when the transparency components run (`noded status` prints them).
    prober, recorder = node.get("probe"), node.get("traffic")
    if prober is not None and hasattr(prober, "mirrors"):
        extra["mirrors"] = prober.mirrors()
    if recorder is not None and hasattr(recorder, "quiet_hours_of_day"):
        extra["quiet_hours"] = recorder.quiet_hours_of_day()
    # Copies per item, where a volunteer counts them: "N items have fewer than k copies".
    vol = comps.get("volunteer")
    if isinstance(vol, dict) and "replicas" in vol:
        extra["replicas"] = vol["replicas"]
    return {
        "node": node.cfg.node.name,
        "region": node.cfg.node.region,
        "version": __version__,
        "uptime_seconds": round(time.time() - node.started_at, 3),
        "ready": node.ready,
        "cache": {
            "budget_bytes": node.cfg.cache.budget,
            "used_bytes": cache.get("used_bytes", summary["cached_disk_bytes"]),
            "reserved_bytes": cache.get("reserved_bytes", 0),
            "high_watermark": node.cfg.cache.high_watermark,
            "low_watermark": node.cfg.cache.low_watermark,
            "cached_items": summary["cached_items"],
            "pinned_items": summary["pinned_items"],
        },
        "push_backlog": {"items": summary["unpushed_items"], "bytes": summary["unpushed_bytes"]},
        "items": counts,
        "seeding_items": summary["seeding_items"],
        "rates": node.traffic.rates(),
        "problems": dict(node.problems),
        "loop_lag_ms": round(node.loop_lag * 1000, 3),
        "reload": node.reload,
        "components": comps,
        # Every supervised background loop: crashes since start, and whether it is waiting to restart.
        "loops": {
            n: {"component": h.component, "state": h.state, "crashes": h.crashes, "last_error": h.last_error}
            for n, h in sorted(node.loops.items())
        },
        **extra,
    }


def create_app(node: Node, extra_routes: Iterable[RouteSetup] = (), token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[redact_paths, error_middleware, cors_and_count],
        client_max_size=node.cfg.api.max_body_bytes,
        handler_args={"max_line_size": 8190, "max_field_size": 8190},
    )
    app[NODE_KEY] = node
    if token:
        app[TOKEN_KEY] = token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    for setup in extra_routes:
        setup(app)
    return app


class ApiServer:
    """Serves the API with AppRunner; stopped gracefully (in-flight requests get a short grace)."""

    name = "api"

    def __init__(self, node: Node, routes: Iterable[RouteSetup] = (), token: str | None = None) -> None:
        self.node = node
        self.app = create_app(node, routes, token)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        cfg = self.node.cfg.api
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.bind, cfg.port, reuse_address=True)
        await site.start()
        server = site._server  # the bound port when 0 was asked (tests)
        socks = getattr(server, "sockets", None) or []
        self.port = socks[0].getsockname()[1] if socks else cfg.port
        log.info("api.listening", bind=cfg.bind, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def status(self) -> dict[str, Any]:
        return {"state": "running" if self._runner else "stopped", "port": self.port}
