"""GET /v1/locate/{key}: every place that can serve an item, best first, with the reason for each rank."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.api.magnets import mirror_base, node_magnet, node_magnets
from noded.api.mirrors import mirror_list
from noded.core.component import Node
from noded.core.model import Item, State
from noded.core.store import Store
from noded.origins.pipeline import suspects
from noded.transparency.locate import Candidate, cache_url, origin_of, places, rank
from noded.transparency.mirror_state import MirrorStatus
from noded.transparency.probe import r2_public_object_url, targets_from_config
from noded.transparency.reports import open_counts


def _origin_bases(node: Node) -> dict[str, str]:
    return {t.name: t.url for t in targets_from_config(node.cfg) if t.kind == "origin" and t.url}


def _copy_match(item: Item, loc: dict[str, Any], suspect: dict[str, str]) -> tuple[str, str]:
    """Whether a location's copy is known to match the item's trusted values, and why not."""
    if loc["conflict"]:
        return "conflict", str(loc["conflict"])
    if loc.get("superseded"):
        return "superseded", str(loc["superseded"])
    if loc["origin"] in suspect:
        return "suspect", suspect[loc["origin"]]
    for mine, theirs in ((item.md5, loc["md5"]), (item.sha256, loc["sha256"]), (item.sha1, loc["sha1"])):
        if mine and theirs and mine.lower() == theirs.lower():
            return "match", ""
    if loc["infohash"] and item.infohash and loc["infohash"] == item.infohash:
        return "match", ""
    if item.verification != "unverified" and (item.md5 or item.sha256):
        # No checksum of its own (a multipart ETag): checked against the others' when pulled.
        return "unknown", "no checksum of its own; verified against the others' when fetched"
    return "unknown", ""


def candidates(
    node: Node,
    request: web.Request,
    item: Item,
    replicas: list[dict[str, Any]],
    mirrors: list[dict[str, Any]],
    locations: list[dict[str, Any]] | None = None,
    suspect: dict[str, str] | None = None,
    item_reports: dict[str, int] | None = None,
) -> list[Candidate]:
    by_name = {m["name"]: m for m in mirrors}
    counts = {m["name"]: m["open_reports"] for m in mirrors}
    held = {r["location"] for r in replicas}
    suspect = suspect or {}
    item_reports = item_reports or {}

    def cand(kind: str, mirror: str, url: str | None, **kw: Any) -> Candidate:
        m = by_name.get(mirror)
        return Candidate(
            kind=kind,
            mirror=mirror,
            url=url,
            status=MirrorStatus(m["status"]) if m else MirrorStatus.UNKNOWN,
            open_reports=counts.get(mirror, 0),
            latency_ms=m["latency_ms"] if m else None,
            status_reason=m["reason"] if m else "not probed",
            item_reports=item_reports.get(mirror, 0),
            **kw,
        )

    out: list[Candidate] = []
    base = mirror_base(node, request)
    # A copy no published checksum vouches for is not offered under require_checksum (the web seed
    # refuses it), and is never called a verified one.
    if item.state is State.CACHED and base and not item.withheld(node.cfg.origins.require_checksum):
        out.append(
            Candidate(
                kind="node",
                mirror=node.cfg.node.name,
                url=cache_url(base + node.cfg.http_mirror.strip_prefix, item.key),
                status=MirrorStatus.UP,
                open_reports=counts.get(node.cfg.node.name, 0),
                latency_ms=0.0,
                local=True,
                match="unknown" if item.verification == "unverified" else "match",
                item_reports=item_reports.get(node.cfg.node.name, 0),
            )
        )
    for p in node.cfg.peers:
        if p.name in held or f"peer:{p.name}" in held:
            out.append(cand("peer", p.name, None, bittorrent=p.bittorrent))
    if item.pushed or "r2" in held:
        url = r2_public_object_url(node.cfg, item.key)
        if url:
            out.append(cand("r2", "r2", url, match="match" if item.pushed else "unknown"))
    bases = _origin_bases(node)
    seen: set[str] = set()
    # The item's URLs that no location row names (an entry's further URLs, rows from before locations).
    named = {str(loc["url"]) for loc in locations or []}
    extra = [
        {"origin": "", "url": u, "md5": None, "sha1": None, "sha256": None, "infohash": None, "conflict": None,
         "superseded": None}
        for u in item.urls
        if u not in named
    ]
    # An origin's own rows first: a torrent's web seed at an origin's URL is that origin's location.
    rows = sorted([*(locations or []), *extra], key=lambda loc: loc["origin"] in ("torrent", "torrents"))
    for loc in rows:
        u = str(loc["url"])
        if not u.startswith(("http://", "https://")) or u in seen or loc["origin"] == "inbox":
            continue
        seen.add(u)
        name = loc["origin"] if loc["origin"] in bases else origin_of(u, bases)
        match, note = _copy_match(item, loc, suspect)
        if name is None:
            # A URL no configured origin owns: a published torrent's web seed (a seed target).
            out.append(cand("webseed", urlsplit(u).netloc, u, match=match, note=note))
        else:
            out.append(cand("origin", name, u, match=match, note=note))
    return out


def _find(store: Store, ident: str) -> Item | None:
    """The item a key, an md5 or an infohash names."""
    item = store.get_current(ident)
    if item is not None:
        return item
    low = ident.lower()
    if len(low) == 40 and all(c in "0123456789abcdef" for c in low):
        item = store.get_by_infohash(low)
        if item is None:
            r = store.conn.execute("SELECT key FROM published_pieces WHERE infohash=?", (low,)).fetchone()
            item = store.get_current(str(r[0])) if r else None
        return item
    if len(low) == 32 and all(c in "0123456789abcdef" for c in low):
        r = store.conn.execute(
            "SELECT key FROM items WHERE md5=? UNION SELECT key FROM locations WHERE md5=? AND conflict IS NULL",
            (low, low),
        ).fetchone()
        return store.get_current(str(r[0])) if r else None
    return None


def _item_reports(store: Store, key: str) -> dict[str, int]:
    """Open reports against (mirror, this item) filed after the mirror's last clean probe."""
    rows = store.conn.execute(
        "SELECT r.mirror, COUNT(*) FROM reports r WHERE r.status='open' AND r.item_key=? AND r.created_at > "
        "COALESCE((SELECT MAX(p.ts) FROM probes p WHERE p.mirror=r.mirror AND p.ok=1), 0) GROUP BY r.mirror",
        (key,),
    )
    return {str(m): int(n) for m, n in rows}


def partial_holders(node: Node, item: Item) -> list[dict[str, Any]]:
    """Volunteers holding some of the item's pieces (this node and peers): BitTorrent clients get them there."""
    out: list[dict[str, Any]] = []
    vol: Any = node.components.get("volunteer")
    if vol is not None and item.infohash:
        for ih, _key, pieces in vol.partial_holdings():
            if ih == item.infohash:
                out.append({"node": node.cfg.node.name, "pieces": len(pieces), "local": True})
    sync: Any = node.components.get("sync")
    addrs = {p.name: p.bittorrent for p in node.cfg.peers}
    for view in getattr(sync, "peers", {}).values():
        held = view.partial.get(item.key) if view.up else None
        if held is not None and (not item.infohash or held[0] == item.infohash):
            out.append({"node": view.name, "pieces": len(held[1]), "bittorrent": addrs.get(view.name)})
    return out


async def locate(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    key = request.match_info["key"].lstrip("/")
    if not key or len(key) > 1024 or ".." in key.split("/"):
        raise ApiError(400, "expected an item key (census/2021/da.parquet), an md5 or an infohash")
    store = node.store
    item = await store.run(_find, store, key)
    if item is None:
        raise ApiError(404, f"no item with key, md5 or infohash {key!r} is known to this node")
    replicas = await store.run(store.replicas, item.key)
    locations = await store.run(store.locations, item.key)
    bad = await store.run(suspects, store, item.key, item.version, time.time() - node.cfg.origins.failed_retry_after)
    reports = await store.run(_item_reports, store, item.key)
    mirrors = await mirror_list(node)
    if not mirrors:  # probing off: still rank by reports
        counts = await store.run(open_counts, store)
        mirrors = [
            {"name": n, "status": "unknown", "latency_ms": None, "reason": "not probed", "open_reports": c}
            for n, c in counts.items()
        ]
    ranked = rank(candidates(node, request, item, replicas, mirrors, locations or None, bad, reports))
    partial = partial_holders(node, item)
    body: dict[str, Any] = {
        "key": item.key,
        "version": item.version,
        "state_here": item.state.value,
        "size": item.size,
        "md5": item.md5,
        "sha256": item.sha256,
        "infohash": item.infohash,
        "verification": item.verification,
        "conflict": item.conflict,
        "places": places(ranked),
        "partial_holders": partial,
        "magnet": None,
        "torrent_url": None,
    }
    if item.infohash:
        # Every working HTTP location is a web seed (BEP 19): this node, R2, the origins, seed targets.
        web_seeds = [r.candidate.url for r in ranked if r.candidate.url and r.candidate.working]
        body["magnet"] = await node_magnet(node, item.infohash, item.key, web_seeds)
        body["torrent_url"] = str(request.url.with_path(f"/v1/torrents/{item.infohash}.torrent").with_query(None))
    return web.json_response(body)


DATASETS_MAX = 200


def _datasets(store: Store, after: int, limit: int, suspect_since: float) -> list[dict[str, Any]]:
    """Current items with where they live: each location's origin, URL and whether its copy matches."""
    rows = store.conn.execute(
        "SELECT id FROM items i WHERE id > ? AND version = (SELECT MAX(version) FROM items j WHERE j.key = i.key)"
        " ORDER BY id LIMIT ?",
        (after, limit),
    ).fetchall()
    out = []
    for (item_id,) in rows:
        item = store.get_item(int(item_id))
        if item is None:
            continue
        bad = suspects(store, item.key, item.version, suspect_since)
        locs = []
        for loc in store.locations(item.key):
            if not str(loc["url"]).startswith(("http://", "https://")):
                continue
            match, note = _copy_match(item, loc, bad)
            locs.append({"origin": loc["origin"], "url": loc["url"], "match": match, "note": note})
        out.append(
            {
                "id": item.id,
                "key": item.key,
                "state_here": item.state.value,
                "size": item.size,
                "infohash": item.infohash,
                "verification": item.verification,
                "conflict": item.conflict,
                "locations": locs,
            }
        )
    return out


async def datasets(request: web.Request) -> web.Response:
    """Per dataset: where it lives and which copies are known to work (the dashboard's table)."""
    node = request.app[NODE_KEY]
    raw_after, raw_limit = request.query.get("after", "0"), request.query.get("limit", "100")
    if not raw_after.isdigit() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= DATASETS_MAX:
        raise ApiError(400, f"after must be an id and limit an integer from 1 to {DATASETS_MAX}")
    store = node.store
    since = time.time() - node.cfg.origins.failed_retry_after
    rows = await store.run(_datasets, store, int(raw_after), int(raw_limit) + 1, since)
    more = len(rows) > int(raw_limit)
    rows = rows[: int(raw_limit)]
    mirrors = {m["name"]: m["status"] for m in await mirror_list(node)}
    for d in rows:
        for loc in d["locations"]:
            loc["status"] = mirrors.get(loc["origin"], "unknown")
            loc["working"] = loc["status"] != "down" and loc["match"] not in ("conflict", "suspect", "superseded")
    # Web seeds: this node's copy when it holds one, then every working location.
    base = mirror_base(node, request)
    mine = base + node.cfg.http_mirror.strip_prefix if base else None
    with_torrent = [d for d in rows if d["infohash"]]
    wanted = [
        (
            d["infohash"],
            d["key"],
            ([cache_url(mine, d["key"])] if mine and d["state_here"] == State.CACHED.value else [])
            + [loc["url"] for loc in d["locations"] if loc["working"]],
        )
        for d in with_torrent
    ]
    for d, m in zip(with_torrent, await node_magnets(node, wanted), strict=True):
        d["magnet"] = m
    return web.json_response({"datasets": rows, "next": rows[-1]["id"] if more and rows else None})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/locate/{key:.+}", locate)
    app.router.add_get("/v1/datasets", datasets)
