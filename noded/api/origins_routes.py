"""API of the origins issue: the bandwidth timetable (read, temporary override) and catalog refresh.

GET    /v1/schedule                 rates in force, the override if any, the configured timetable
PUT    /v1/schedule                 {"down": "10MB/s"|null, "up": ..., "seconds": 3600}  (token)
DELETE /v1/schedule                 drop the override, back to the timetable                 (token)
POST   /v1/catalog/refresh          refresh every origin's catalog now                      (token)
GET    /v1/items?state=failed,wanted&limit=100&after=0
                                    items by state, paged by id: reason, cause, next attempt, per-location errors
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.auth import require_token
from noded.api.errors import ApiError, read_json
from noded.core.model import State
from noded.core.units import parse_rate
from noded.origins.schedule import Schedule

MAX_OVERRIDE_SECONDS = 7 * 86400


def _schedule(request: web.Request) -> Schedule:
    sched = request.app[NODE_KEY].get("schedule")
    if not isinstance(sched, Schedule):
        raise ApiError(503, "the schedule component is not running")
    return sched


def _rate(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if (value is not None and not isinstance(value, str | int)) or isinstance(value, bool):
        raise ApiError(400, f'{key} must be a rate such as "10MB/s", a number of bytes per second, or null')
    try:
        return parse_rate(value)
    except ValueError as e:
        raise ApiError(400, f"{key}: {e}") from None


async def get_schedule(request: web.Request) -> web.Response:
    sched = _schedule(request)
    return web.json_response({**sched.status(), "timetable": sched.cfg.model_dump()})


async def put_schedule(request: web.Request) -> web.Response:
    require_token(request)
    sched = _schedule(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, 'expected a JSON object like {"down": "10MB/s", "up": null, "seconds": 3600}')
    unknown = set(body) - {"down", "up", "seconds"}
    if unknown:
        raise ApiError(400, f"unknown fields {sorted(unknown)}; expected down, up, seconds")
    seconds = body.get("seconds", 3600)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_OVERRIDE_SECONDS:
        raise ApiError(400, f"seconds must be a number in (0, {MAX_OVERRIDE_SECONDS}]")
    sched.set_override(_rate(body, "down"), _rate(body, "up"), float(seconds))
    return web.json_response(sched.status())


async def delete_schedule(request: web.Request) -> web.Response:
    require_token(request)
    sched = _schedule(request)
    sched.clear_override()
    return web.json_response(sched.status())


async def refresh_catalog(request: web.Request) -> web.Response:
    require_token(request)
    origins = request.app[NODE_KEY].get("origins")
    if origins is None:
        raise ApiError(503, "the origins component is not running")
    origins.refresh_soon()
    return web.json_response({"refresh": "started"}, status=202)


MAX_ITEMS_PAGE = 1000


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}]")
    return int(raw)


async def list_items(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    states: list[State] = []
    for name in filter(None, request.query.get("state", "").split(",")):
        try:
            states.append(State(name.strip()))
        except ValueError:
            raise ApiError(400, f"unknown state {name[:40]!r}; known: {[s.value for s in State]}") from None
    limit = _int_query(request, "limit", 100, 1, MAX_ITEMS_PAGE)
    after = _int_query(request, "after", 0, 0, 2**62)
    rows = await node.store.run(node.store.items, states=states or None, after_id=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    origins = node.get("origins")
    detail = getattr(origins, "item_detail", None)
    out = []
    for it in rows:
        d: dict[str, Any] = {
            "id": it.id,
            "key": it.key,
            "version": it.version,
            "origin": it.origin,
            "state": it.state.value,
            "reason": it.error,
            "size": it.size,
            "updated_at": it.updated_at,
        }
        if callable(detail):
            d.update(detail(it))
        out.append(d)
    return web.json_response({"items": out, "next_after": rows[-1].id if more and rows else None})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/items", list_items)
    app.router.add_get("/v1/schedule", get_schedule)
    app.router.add_put("/v1/schedule", put_schedule)
    app.router.add_delete("/v1/schedule", delete_schedule)
    app.router.add_post("/v1/catalog/refresh", refresh_catalog)
