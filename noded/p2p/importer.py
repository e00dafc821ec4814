"""Published .torrent files and magnet links configured as catalog items (origins.torrents).

Each accepted torrent is kept under state/torrents/<infohash>.torrent (so the item seeds under the
published infohash) and recorded as a catalog entry of origin "torrent" with its web seeds as URLs.
A bad input is reported (log + /v1/status problem) and skipped; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from noded.cache.layout import CacheLayout, atomic_write
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.core.model import CatalogEntry
from noded.p2p import torrent as T

log = get_logger("noded.p2p.import")


def configured_sources(node: Node) -> set[str]:
    cfg = node.cfg.origins.torrents
    return {str(p) for p in cfg.files} | set(cfg.magnets)


def _location(e: CatalogEntry) -> tuple[str, str]:
    """(key, url) naming the location an entry records (the store keys locations by their first URL)."""
    return e.key, e.urls[0] if e.urls else ""


async def withdraw(node: Node, gone: list[tuple[str, str]]) -> list[str]:
    """Forget the catalog locations of inputs no longer configured; items and bytes stay, as when any
    origin stops listing a file. Returns the keys."""
    if not gone:
        return []
    keys: list[str] = await node.store.run(node.store.forget_locations, "torrent", gone)
    for key in keys:
        log.info("torrents.withdrawn", key=key)
    return keys


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(T.MAX_TORRENT_BYTES + 1)
    return data


async def import_configured(
    node: Node, layout: CacheLayout, sources: dict[str, tuple[str, str]] | None = None
) -> tuple[int, list[str]]:
    """(number imported, problems). Safe to run at every start and reload: upserts are idempotent.
    `sources`, when given, receives each accepted input (file path or magnet) -> (key, location url)."""
    loop = asyncio.get_running_loop()
    cfg = node.cfg.origins
    entries: list[CatalogEntry] = []
    problems: list[str] = []
    for path in cfg.torrents.files:
        try:
            data = await loop.run_in_executor(None, _read, path)
            meta = T.parse_torrent(data, max_total=cfg.max_item_size)
            target = layout.torrent_path(meta.infohash)
            await loop.run_in_executor(None, atomic_write, target, meta.data)
            entries.append(meta.catalog_entry())
            if sources is not None:
                sources[str(path)] = _location(entries[-1])
        except (OSError, T.TorrentError) as e:
            problems.append(f"{path}: {e}")
    for uri in cfg.torrents.magnets:
        try:
            m = T.parse_magnet(uri)
            if not m.name:
                raise T.TorrentError("magnet link has no dn= (display name), which becomes the item key")
            entries.append(CatalogEntry(origin="torrent", key=m.name, urls=m.web_seeds, infohash=m.infohash))
            if sources is not None:
                sources[uri] = _location(entries[-1])
        except T.TorrentError as e:
            problems.append(f"magnet {uri[:80]}: {e}")
    for entry in entries:
        await node.store.run(node.store.upsert_entry, entry)
    for p in problems:
        log.error("torrents.import_rejected", problem=p)
    if problems:
        node.problems["torrents"] = f"{len(problems)} torrent input(s) rejected; first: {problems[0]}"
    else:
        node.problems.pop("torrents", None)
    if entries:
        node.notify("wanted")
    return len(entries), problems
