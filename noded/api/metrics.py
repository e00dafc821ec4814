"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.transparency.metrics import Metrics


async def get_metrics(request: web.Request) -> web.Response:
    m = request.app[NODE_KEY].get("metrics")
    if not isinstance(m, Metrics):
        raise ApiError(503, "metrics are not running on this node")
    body = await m.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", get_metrics)
