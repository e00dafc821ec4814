"""Magnet links as this node hands them out (locate, the datasets table, the RSS feed): every tracker
it announces to (the configured ones and the torrent's own), this node's BitTorrent endpoint and the
other Smart Nodes' as x.pe=, and the working HTTP locations as ws=."""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.transparency.locate import magnet


def mirror_base(node: Node, request: web.Request) -> str | None:
    """This node's HTTP mirror as a client sees it (None when off)."""
    hm = node.cfg.http_mirror
    if not hm.enabled:
        return None
    host = hm.bind
    if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere: reachable under the name the client used
        host = request.url.host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{hm.port}"


def _torrent_trackers(node: Node, infohash: str) -> list[str]:
    """Blocking: the trackers of the stored .torrent (none when it is not built yet)."""
    from noded.p2p.torrent import announce_urls  # libtorrent is loaded only where BitTorrent runs

    paths = node.cfg.paths
    try:
        data = CacheLayout(paths.cache_dir, paths.state_dir).torrent_path(infohash).read_bytes()
    except OSError:
        return []
    return announce_urls(data)


def endpoints(node: Node) -> list[str]:
    """x.pe= peers: this node first (when it seeds), then the other Smart Nodes."""
    out: list[str] = []
    engine: Any = node.components.get("p2p")
    mine = engine.public_endpoint() if engine is not None else None
    if mine:
        out.append(mine)
    out += [p.bittorrent for p in node.cfg.peers]
    return out


async def node_magnets(node: Node, wanted: Sequence[tuple[str, str, Iterable[str]]]) -> list[str]:
    """Magnets of (infohash, key, web seeds), the stored torrents read in one executor call."""
    own = await asyncio.get_running_loop().run_in_executor(
        None, lambda: [_torrent_trackers(node, ih) for ih, _, _ in wanted]
    )
    configured = [str(t) for t in node.cfg.bittorrent.trackers]
    peers = endpoints(node)
    return [
        magnet(ih, posixpath.basename(key), seeds, peers, [*configured, *trackers])
        for (ih, key, seeds), trackers in zip(wanted, own, strict=True)
    ]


async def node_magnet(node: Node, infohash: str, key: str, web_seeds: Iterable[str]) -> str:
    return (await node_magnets(node, [(infohash, key, web_seeds)]))[0]
