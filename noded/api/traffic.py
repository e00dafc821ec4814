"""GET /v1/traffic: rates, the last 24 h by hour, the hour-of-week profile, limits and quiet hours."""

from __future__ import annotations

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.transparency.traffic import TrafficRecorder


async def get_traffic(request: web.Request) -> web.Response:
    rec = request.app[NODE_KEY].get("traffic")
    if not isinstance(rec, TrafficRecorder):
        raise ApiError(503, "traffic recording is not running on this node")
    return web.json_response(await rec.report())


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/traffic", get_traffic)
