"""GET /v1/mirrors and /v1/mirrors/{name}: status, reason, latency, uptime and open reports."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.core.component import Node
from noded.transparency.probe import Prober
from noded.transparency.reports import open_counts


def prober_of(node: Node) -> Prober:
    p = node.get("probe")
    if not isinstance(p, Prober):
        raise ApiError(503, "mirror probing is not running on this node")
    return p


async def mirror_list(node: Node) -> list[dict[str, Any]]:
    """Every configured mirror with its open report count (also used by /v1/status and locate)."""
    prober = node.get("probe")
    if not isinstance(prober, Prober):
        return []
    counts = await node.store.run(open_counts, node.store)
    return [{**m, "open_reports": counts.get(m["name"], 0)} for m in prober.mirrors()]


async def list_mirrors(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    prober = prober_of(node)
    return web.json_response(
        {
            "mirrors": await mirror_list(node),
            "probe": {
                "interval_seconds": node.cfg.probe.interval,
                "fail_threshold": node.cfg.probe.fail_threshold,
                "success_threshold": node.cfg.probe.success_threshold,
                "rounds": prober.rounds,
            },
        }
    )


async def one_mirror(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    name = request.match_info["name"]
    prober = prober_of(node)
    if prober.target(name) is None:
        raise ApiError(404, f"no mirror named {name!r}", known=prober.mirror_names())
    for m in await mirror_list(node):
        if m["name"] == name:
            return web.json_response(m)
    raise ApiError(404, f"no mirror named {name!r}")


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/mirrors", list_mirrors)
    app.router.add_get("/v1/mirrors/{name}", one_mirror)
