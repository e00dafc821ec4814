"""Cache endpoints: pin/unpin and re-verify an item (bearer token), the eviction plan (read-only).

POST   /v1/items/{key}/pin      pin the current version (never evicted; counts as an access)
DELETE /v1/items/{key}/pin      unpin
POST   /v1/items/{key}/verify   re-hash now; a corrupt copy is quarantined and fetched again
GET    /v1/cache/plan?limit=N   what eviction would do now and why each item is (not) evictable
"""

from __future__ import annotations

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.auth import require_token
from noded.api.errors import ApiError
from noded.cache.accounting import Cache
from noded.cache.layout import UnsafePath

MAX_KEY = 1024


def _cache(request: web.Request) -> Cache:
    cache = request.app[NODE_KEY].get("cache")
    if not isinstance(cache, Cache):
        raise ApiError(503, "the cache component is not running")
    return cache


def _key(request: web.Request, cache: Cache) -> str:
    key = request.match_info["key"]
    if len(key) > MAX_KEY:
        raise ApiError(400, f"key longer than {MAX_KEY} characters")
    try:
        cache.layout.final_path(key)
    except UnsafePath as e:
        raise ApiError(400, str(e)) from None
    return key


async def _set_pin(request: web.Request, pinned: bool) -> web.Response:
    require_token(request)
    cache = _cache(request)
    key = _key(request, cache)
    item = await cache.pin(key, pinned)
    if item is None:
        raise ApiError(404, f"no item with key {key!r}")
    return web.json_response(item.public())


async def pin(request: web.Request) -> web.Response:
    return await _set_pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pin(request, False)


async def verify(request: web.Request) -> web.Response:
    require_token(request)
    cache = _cache(request)
    key = _key(request, cache)
    report = await cache.reverify(key)
    if report["unknown"]:
        raise ApiError(404, f"no item with key {key!r}")
    if report["not_cached"]:
        raise ApiError(409, f"item {key!r} is not cached on this node")
    return web.json_response(report)


async def plan(request: web.Request) -> web.Response:
    cache = _cache(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "limit must be an integer") from None
    if not 0 < limit <= 10_000:
        raise ApiError(400, "limit must be between 1 and 10000")
    return web.json_response(await cache.plan_report(limit))


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/items/{key:.+}/pin", pin)
    app.router.add_delete("/v1/items/{key:.+}/pin", unpin)
    app.router.add_post("/v1/items/{key:.+}/verify", verify)
    app.router.add_get("/v1/cache/plan", plan)
