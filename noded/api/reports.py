"""Community reports: POST /v1/reports (open), GET /v1/reports (filters), moderation with the token."""

from __future__ import annotations

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.auth import require_token
from noded.api.errors import ApiError, read_json
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.transparency.probe import Prober, targets_from_config
from noded.transparency.reports import (
    KINDS,
    STATUSES,
    RateLimited,
    ReportInvalid,
    TooManyOpen,
    get_report,
    insert_report,
    list_reports,
    moderate,
    validate_report,
)

log = get_logger("noded.reports")
MAX_LIST = 500


def known_mirrors(node: Node) -> set[str]:
    """Mirrors a report may name: every probed mirror, and this node itself."""
    prober = node.get("probe")
    names = prober.mirror_names() if isinstance(prober, Prober) else [t.name for t in targets_from_config(node.cfg)]
    return {*names, node.cfg.node.name}


async def post_report(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body = await read_json(request)
    try:
        rep = validate_report(body, known_mirrors(node))
    except ReportInvalid as e:
        raise ApiError(422 if isinstance(body, dict) else 400, str(e)) from None
    client = request.remote or "unknown"
    store = node.store
    rc = node.cfg.reports
    try:
        rid, verify_item = await store.run(
            insert_report,
            store,
            rep,
            client,
            per_hour=rc.per_client_per_hour,
            max_open=rc.max_open,
            per_hour_total=rc.per_hour_total,
        )
    except RateLimited as e:
        raise ApiError(429, str(e), retry_after=e.retry_after) from None
    except TooManyOpen as e:
        raise ApiError(503, str(e)) from None
    log.info("report.opened", id=rid, mirror=rep.mirror, kind=rep.kind, item=rep.item)
    if verify_item is not None:
        log.info("report.verify_requested", id=rid, item_id=verify_item)
        node.notify("verify")
    node.notify("reports")
    return web.json_response(
        {"id": rid, "status": "open", "verify_queued": verify_item is not None},
        status=201,
        headers={"Location": f"/v1/reports/{rid}"},
    )


def _int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}")
    return v


async def get_reports(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    q = request.query
    status = q.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, f"status must be one of {list(STATUSES)}")
    kind = q.get("kind")
    if kind is not None and kind not in KINDS:
        raise ApiError(400, f"kind must be one of {list(KINDS)}")
    limit = _int_param(request, "limit", 100, 1, MAX_LIST)
    before = _int_param(request, "before", None, 1, 2**62)
    assert limit is not None
    rows = await node.store.run(
        list_reports,
        node.store,
        mirror=q.get("mirror"),
        status=status,
        kind=kind,
        item=q.get("item"),
        before_id=before,
        limit=limit,
    )
    return web.json_response({"reports": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None})


async def get_one(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    rid = _report_id(request)
    row = await node.store.run(get_report, node.store, rid)
    if row is None:
        raise ApiError(404, f"no report {rid}")
    return web.json_response(row)


def _report_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, f"report id must be a positive integer, got {raw!r}")
    return int(raw)


async def _moderate(request: web.Request, status: str) -> web.Response:
    require_token(request)
    node = request.app[NODE_KEY]
    rid = _report_id(request)
    body = await read_json(request) if request.can_read_body else None
    resolution = ""
    if body is not None:
        if not isinstance(body, dict) or set(body) - {"resolution"}:
            raise ApiError(400, 'expected an optional JSON object {"resolution": "..."}')
        resolution = body.get("resolution", "")
        if not isinstance(resolution, str) or len(resolution) > 1024:
            raise ApiError(422, "resolution must be a string of at most 1024 characters")
    row = await node.store.run(moderate, node.store, rid, status, resolution)
    if row is None:
        raise ApiError(404, f"no report {rid}")
    log.info("report.moderated", id=rid, status=status)
    node.notify("reports")
    return web.json_response(row)


async def resolve(request: web.Request) -> web.Response:
    return await _moderate(request, "resolved")


async def dismiss(request: web.Request) -> web.Response:
    return await _moderate(request, "dismissed")


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/reports", post_report)
    app.router.add_get("/v1/reports", get_reports)
    app.router.add_get("/v1/reports/{id}", get_one)
    app.router.add_post("/v1/reports/{id}/resolve", resolve)
    app.router.add_post("/v1/reports/{id}/dismiss", dismiss)
