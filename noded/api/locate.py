"""GET /v1/locate/{key}: every place that can serve an item, best first, with the reason for each rank."""

from __future__ import annotations

import posixpath
from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.api.mirrors import mirror_list
from noded.core.component import Node
from noded.core.model import Item, State
from noded.transparency.locate import Candidate, cache_url, magnet, origin_of, places, rank
from noded.transparency.mirror_state import MirrorStatus
from noded.transparency.probe import r2_public_object_url, targets_from_config
from noded.transparency.reports import open_counts


def _origin_bases(node: Node) -> dict[str, str]:
    return {t.name: t.url for t in targets_from_config(node.cfg) if t.kind == "origin" and t.url}


def _http_mirror_base(node: Node, request: web.Request) -> str | None:
    hm = node.cfg.http_mirror
    if not hm.enabled:
        return None
    host = hm.bind
    if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere: reachable under the name the client used
        host = request.url.host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{hm.port}"


def candidates(
    node: Node, request: web.Request, item: Item, replicas: list[dict[str, Any]], mirrors: list[dict[str, Any]]
) -> list[Candidate]:
    by_name = {m["name"]: m for m in mirrors}
    counts = {m["name"]: m["open_reports"] for m in mirrors}
    locations = {r["location"] for r in replicas}

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
            **kw,
        )

    out: list[Candidate] = []
    base = _http_mirror_base(node, request)
    if item.state is State.CACHED and base:
        out.append(
            Candidate(
                kind="node",
                mirror=node.cfg.node.name,
                url=cache_url(base, item.key),
                status=MirrorStatus.UP,
                open_reports=counts.get(node.cfg.node.name, 0),
                latency_ms=0.0,
                local=True,
            )
        )
    for p in node.cfg.peers:
        if p.name in locations or f"peer:{p.name}" in locations:
            out.append(cand("peer", p.name, None, bittorrent=p.bittorrent))
    if item.pushed or "r2" in locations:
        url = r2_public_object_url(node.cfg, item.key)
        if url:
            out.append(cand("r2", "r2", url))
    bases = _origin_bases(node)
    seen: set[str] = set()
    for u in item.urls:
        name = origin_of(u, bases) or item.origin
        if name in ("inbox", "torrent", "torrents") or u in seen:
            continue
        seen.add(u)
        out.append(cand("origin", name, u))
    return out


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
        raise ApiError(400, "expected an item key such as census/2021/da.parquet")
    store = node.store
    item = await store.run(store.get_current, key)
    if item is None:
        raise ApiError(404, f"no item with key {key!r} is known to this node")
    replicas = await store.run(store.replicas, key)
    mirrors = await mirror_list(node)
    if not mirrors:  # probing off: still rank by reports
        counts = await store.run(open_counts, store)
        mirrors = [
            {"name": n, "status": "unknown", "latency_ms": None, "reason": "not probed", "open_reports": c}
            for n, c in counts.items()
        ]
    ranked = rank(candidates(node, request, item, replicas, mirrors))
    partial = partial_holders(node, item)
    body: dict[str, Any] = {
        "key": item.key,
        "version": item.version,
        "state_here": item.state.value,
        "size": item.size,
        "md5": item.md5,
        "sha256": item.sha256,
        "infohash": item.infohash,
        "places": places(ranked),
        "partial_holders": partial,
        "magnet": None,
        "torrent_url": None,
    }
    if item.infohash:
        web_seeds = [r.candidate.url for r in ranked if r.candidate.url and r.candidate.kind in ("r2", "node")]
        peers = [p.bittorrent for p in node.cfg.peers]
        body["magnet"] = magnet(item.infohash, posixpath.basename(item.key), web_seeds, peers)
        body["torrent_url"] = str(request.url.with_path(f"/v1/torrents/{item.infohash}.torrent").with_query(None))
    return web.json_response(body)


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/locate/{key:.+}", locate)
