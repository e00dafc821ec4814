"""API endpoints of the P2P side: the inventory peers poll, .torrent files, and the RSS feed.

A .torrent counts on the "api" channel the bytes the connection took, also when the client leaves midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.api.magnets import mirror_base, node_magnets
from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.httpcond import Validators
from noded.core.httpserve import OnSent, serve_bytes, serve_file
from noded.core.model import Item, State
from noded.origins.catalog.base import is_hex
from noded.p2p.rss import FeedItem, render_feed
from noded.transparency.locate import cache_url

INVENTORY_MAX_LIMIT = 5000
INVENTORY_DEFAULT_LIMIT = 1000


class FeedSeen:
    """The feed's last digest and when this process first served it: Last-Modified moves when, and only
    when, the bytes change."""

    digest = ""
    since = 0


FEED_SEEN_KEY = web.AppKey("torrents_feed_seen", FeedSeen)


def inventory_entry(i: Item) -> dict[str, Any]:
    return {
        "key": i.key,
        "version": i.version,
        "state": i.state.value,
        "size": i.size,
        "md5": i.md5,
        "sha256": i.sha256,
        "infohash": i.infohash,
        "seeding": i.seeding,
        "verification": i.verification,
        "conflict": i.conflict,
    }


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(400, f"query parameter {name!r} must be an integer from {lo} to {hi}, got {raw[:40]!r}")
    return int(raw)


async def inventory(request: web.Request) -> web.StreamResponse:
    """Items and their states, paginated by id (`after`, `limit`); `next` is the cursor of the next page."""
    node = request.app[NODE_KEY]
    after = _int_param(request, "after", 0, 0, 2**62)
    limit = _int_param(request, "limit", INVENTORY_DEFAULT_LIMIT, 1, INVENTORY_MAX_LIMIT)
    states = None
    if "state" in request.query:
        try:
            states = [State(s) for s in request.query["state"].split(",")]
        except ValueError:
            raise ApiError(
                400, f"unknown state in {request.query['state'][:80]!r}; known: {[s.value for s in State]}"
            ) from None
    rows = await node.store.run(node.store.items, states=states, after_id=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    body = {
        "node": node.cfg.node.name,
        "items": [inventory_entry(i) for i in rows],
        "next": rows[-1].id if more else None,
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'
    if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=raw, content_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})


async def inventory_pieces(request: web.Request) -> web.Response:
    """Partial holdings of a volunteer node: item key, infohash and the pieces it holds and seeds."""
    node = request.app[NODE_KEY]
    vol: Any = node.components.get("volunteer")
    items: list[dict[str, Any]] = []
    if vol is not None:
        for ih, key, pieces in vol.partial_holdings():
            items.append({"key": key, "infohash": ih, "pieces": pieces})
    return web.json_response({"node": node.cfg.node.name, "items": items})


async def torrent_file(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    ih = request.match_info["infohash"].lower()
    if not is_hex(ih, 40):
        raise ApiError(400, "expected a 40-hex-digit v1 infohash")
    item = await node.store.run(node.store.get_by_infohash, ih)
    if item is None:
        raise ApiError(404, f"no torrent {ih} on this node")
    paths = node.cfg.paths

    def locate() -> Path:  # CacheLayout resolves its directories on disk: off the loop
        return CacheLayout(paths.cache_dir, paths.state_dir).torrent_path(ih)

    path = await asyncio.get_running_loop().run_in_executor(None, locate)
    name = item.key.rsplit("/", 1)[-1]
    headers = {"Content-Disposition": f'attachment; filename="{_quote(name)}.torrent"', "Cache-Control": "no-cache"}
    try:
        return await serve_file(
            request, path, content_type="application/x-bittorrent", headers=headers, on_sent=_api_bytes(node)
        )
    except web.HTTPNotFound:
        raise ApiError(404, f"torrent {ih} is known but its .torrent file is not built yet") from None


def _api_bytes(node: Node) -> OnSent:
    """Streamed answers count their body bytes on the api channel themselves (the middleware counts
    only in-memory bodies)."""

    def count(status: int, sent: int, aborted: bool) -> None:
        node.traffic.add("api", "out", sent, errors=int(aborted))

    return count


def _quote(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


async def torrents_rss(request: web.Request) -> web.StreamResponse:
    """The RSS feed, with an entity tag of its bytes and, as Last-Modified, when this process first
    served those bytes (never earlier than any dataset in it), so both kinds of conditional GET work."""
    node = request.app[NODE_KEY]
    base = f"{request.scheme}://{request.host}"
    rows: list[Item] = []
    after = 0
    while True:
        page = await node.store.run(node.store.items, states=[State.CACHED], after_id=after, limit=1000)
        if not page:
            break
        after = page[-1].id
        rows += [i for i in page if i.seeding and i.infohash]
    paths = node.cfg.paths

    def torrent_sizes() -> dict[str, int]:
        layout = CacheLayout(paths.cache_dir, paths.state_dir)
        out: dict[str, int] = {}
        for i in rows:
            assert i.infohash is not None
            with contextlib.suppress(OSError):
                out[i.infohash] = layout.torrent_path(i.infohash).stat().st_size
        return out

    sizes = await asyncio.get_running_loop().run_in_executor(None, torrent_sizes)
    # An enclosure's length is the size of the .torrent it links to; one not built yet is left out.
    feed = [
        FeedItem(i.key, i.infohash, sizes[i.infohash], i.updated_at, f"{base}/v1/torrents/{i.infohash}.torrent")
        for i in rows
        if i.infohash in sizes
    ]
    feed.sort(key=lambda f: f.updated, reverse=True)
    # The magnet's web seed is this node's copy (every item in the feed is cached here).
    mirror = mirror_base(node, request)
    prefix = node.cfg.http_mirror.strip_prefix
    wanted = [(f.infohash, f.title, [cache_url(mirror + prefix, f.title)] if mirror else []) for f in feed]
    feed = [dataclasses.replace(f, magnet=m) for f, m in zip(feed, await node_magnets(node, wanted), strict=True)]
    body = render_feed(node.cfg.node.name, base + "/v1/torrents.rss", feed)
    digest = hashlib.sha256(body).hexdigest()[:32]
    seen = request.app[FEED_SEEN_KEY]
    if seen.digest != digest:
        seen.digest, seen.since = digest, int(time.time())
    validators = Validators(f'"{digest}"', seen.since)
    return await serve_bytes(
        request,
        body,
        validators,
        content_type="application/rss+xml; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
        on_sent=_api_bytes(node),
    )


def setup(app: web.Application) -> None:
    app[FEED_SEEN_KEY] = FeedSeen()
    app.router.add_get("/v1/inventory", inventory)
    app.router.add_get("/v1/inventory/pieces", inventory_pieces)
    app.router.add_get("/v1/torrents.rss", torrents_rss)
    app.router.add_get("/v1/torrents/{infohash}.torrent", torrent_file)
