"""Datasets added from the public swarm: `noded add MAGNET|INFOHASH|FILE.torrent|URL` (POST /v1/add).

`Swarm` (component "swarm") turns the input into a verified torrent: a .torrent is validated as an
import is; a magnet or a bare infohash has its metadata fetched by libtorrent (upload mode: no
payload) from its trackers, the configured ones, the DHT when it is on and the magnet's x.pe peers,
and the info dict it gets is checked against the infohash by libtorrent. The torrent is stored
(a published one already here is kept) and recorded as a catalog entry of origin "swarm"; the pull
pipeline then fetches it like any other item through `SwarmSource` (the `Source` named "swarm"),
which downloads from the swarm and the torrent's web seeds, with every byte verified (sha1 per
piece, then md5 and sha256) before the item is cached and seeded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.core.model import Item
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine, keep_torrent, split_host_port
from noded.p2p.session import SessionError
from noded.p2p.sync import PeerItem, PeerSource, PeerSync, PeerView, _download_params

log = get_logger("noded.p2p.swarm")

ORIGIN = "swarm"
MAX_HINTS = 10_000  # infohashes whose magnet peers are remembered (until the next restart)


class AddError(ValueError):
    """Input `noded add` refuses, or a torrent whose metadata the swarm did not give; says why."""


def magnet_of(text: str) -> str | None:
    """A magnet link for a bare infohash (40 hex or 32 base32 digits); None for anything else."""
    return f"magnet:?xt=urn:btih:{text.strip()}" if T.bare_infohash(text) else None


class SwarmSource(PeerSource):
    """Fetches a torrent added from the swarm: trackers, DHT, known peers and its web seeds."""

    name = ORIGIN
    needs_endpoints = False  # trackers and the DHT find peers; web seeds serve without any

    def __init__(self, sync: PeerSync, hints: dict[str, list[tuple[str, int]]]) -> None:
        super().__init__(sync)
        self.hints = hints

    async def offers(self, item: Item) -> bool:
        if item.origin != ORIGIN or not item.infohash:
            return False
        path = self.sync.layout.torrent_path(item.infohash)
        return await asyncio.get_running_loop().run_in_executor(None, path.exists)

    def _endpoints(self, item: Item, holders: list[tuple[PeerView, PeerItem]]) -> list[tuple[str, int]]:
        return [*self.hints.get(item.infohash or "", []), *super()._endpoints(item, holders)]

    def _params(self, meta: T.TorrentMeta, partial: Path) -> Any:
        atp = _download_params(meta.data, partial, web_seeds=True)
        atp.trackers = [t for t in (str(u) for u in self.sync.node.cfg.bittorrent.trackers) if t not in meta.trackers]
        return atp


class Swarm:
    name = "swarm"

    def __init__(self, node: Node, engine: P2PEngine, sync: PeerSync, layout: CacheLayout | None = None) -> None:
        self.node = node
        self.engine = engine
        self.sync = sync
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        self.hints: dict[str, list[tuple[str, int]]] = {}  # infohash -> x.pe peers of its magnet
        self.source = SwarmSource(sync, self.hints)
        self.added = 0
        self.rejected = 0
        self.last_error: str | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        f = self.node.cfg.fetch
        timeout = aiohttp.ClientTimeout(total=60, connect=f.connect_timeout, sock_read=f.read_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": f.user_agent})

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def status(self) -> dict[str, Any]:
        return {
            "state": "running" if self._http is not None else "stopped",
            "added": self.added,
            "rejected": self.rejected,
            "last_error": self.last_error,
        }

    # -- adding ---------------------------------------------------------------------------------
    async def add(self, text: str | None = None, torrent: bytes | None = None) -> dict[str, Any]:
        """Record a dataset to fetch from the swarm; raises AddError (or TorrentError) with the reason."""
        try:
            meta = await self._meta(text, torrent)
            if not meta.single_file:
                raise AddError(f"{meta.name}: multi-file torrents cannot be cached as one item")
            loop = asyncio.get_running_loop()
            path = self.layout.torrent_path(meta.infohash)
            await loop.run_in_executor(None, self.layout.ensure)
            await loop.run_in_executor(None, keep_torrent, path, meta.infohash, meta.data)
            store = self.node.store
            item, _ = await store.run(store.upsert_entry, meta.catalog_entry(origin=ORIGIN))
        except (AddError, T.TorrentError) as e:
            self.rejected += 1
            self.last_error = str(e)
            log.warning("swarm.add_rejected", input=(text or "<torrent bytes>")[:120], reason=str(e))
            raise
        self.added += 1
        self.node.notify("wanted")
        log.info("swarm.added", key=item.key, infohash=meta.infohash, size=meta.total_size)
        return {"key": item.key, "infohash": meta.infohash, "size": meta.total_size, "state": item.state.value}

    async def _meta(self, text: str | None, torrent: bytes | None) -> T.TorrentMeta:
        max_total = self.node.cfg.origins.max_item_size
        if torrent is not None:
            return T.parse_torrent(torrent, max_total=max_total)
        if not text or not text.strip():
            raise AddError("expected a magnet link, an infohash, a .torrent or the http(s) URL of one")
        text = text.strip()
        uri = text if text.startswith("magnet:") else magnet_of(text)
        if uri is not None:
            m = T.parse_magnet(uri)
            peers = _peers(uri)
            if peers:
                self.hints[m.infohash] = peers
                while len(self.hints) > MAX_HINTS:
                    self.hints.pop(next(iter(self.hints)))
            known = await self._stored(m.infohash, max_total)
            if known is not None:
                return known
            data = await self._metadata(uri, m, peers)
            return T.parse_torrent(data, max_total=max_total)
        if urlsplit(text).scheme in ("http", "https"):
            return T.parse_torrent(await self._download(text), max_total=max_total)
        raise AddError(f"{text[:80]!r} is not a magnet link, an infohash or an http(s) URL of a .torrent")

    async def _stored(self, infohash: str, max_total: int) -> T.TorrentMeta | None:
        path = self.layout.torrent_path(infohash)
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        except FileNotFoundError:
            return None
        return T.parse_torrent(data, max_total=max_total)

    async def _download(self, url: str) -> bytes:
        if self._http is None:
            raise AddError("the swarm component is not running")
        try:
            async with self._http.get(url) as r:
                if r.status != 200:
                    raise AddError(f"{url}: HTTP {r.status}")
                data = await r.content.read(T.MAX_TORRENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise AddError(f"{url}: {type(e).__name__}: {e}") from None
        return bytes(data)

    async def _metadata(self, uri: str, m: T.MagnetLink, peers: list[tuple[str, int]]) -> bytes:
        """The torrent's info dict from the swarm, as a .torrent with the magnet's trackers and web seeds."""
        session = self.engine.session
        ih = m.infohash
        if ih in session.handles:
            raise AddError(f"torrent {ih} is already in the session")
        atp = lt.parse_magnet_uri(uri)
        atp.save_path = str(self.layout.partial_dir)
        configured = [str(t) for t in self.node.cfg.bittorrent.trackers]
        atp.trackers = list(dict.fromkeys([*atp.trackers, *configured]))
        # Metadata only: in upload mode libtorrent asks for no payload.
        atp.flags |= lt.torrent_flags.upload_mode
        atp.flags &= ~lt.torrent_flags.auto_managed
        atp.flags &= ~lt.torrent_flags.paused
        got = asyncio.Event()
        errors: dict[str, str] = {}

        def on_metadata(a: Any) -> None:
            if session.infohash_of(a.handle) == ih:
                got.set()

        def on_tracker_error(a: Any) -> None:
            if session.infohash_of(a.handle) == ih:
                errors[str(a.tracker_url())] = a.error_message() or a.error.message()

        session.subscribe("metadata_received_alert", on_metadata)
        session.subscribe("tracker_error_alert", on_tracker_error)
        timeout = self.node.cfg.bittorrent.metadata_timeout
        t0 = time.monotonic()
        try:
            try:
                h = await session.add(atp, ih)
            except SessionError as e:
                raise AddError(str(e)) from None
            last_connect = 0.0
            while not got.is_set():
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    raise AddError(_no_metadata(ih, timeout, atp.trackers, peers, errors, self.node.cfg.bittorrent.dht))
                if time.monotonic() - last_connect >= 5:
                    for host, port in peers:
                        session.connect_peer(ih, host, port)
                    last_connect = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got.wait(), min(left, 1.0))
            # torrent_file() waits on libtorrent's network thread: off the loop.
            ti = await asyncio.get_running_loop().run_in_executor(None, h.torrent_file)
            info = bytes(ti.info_section())
        finally:
            session.unsubscribe("metadata_received_alert", on_metadata)
            session.unsubscribe("tracker_error_alert", on_tracker_error)
            await session.remove(ih)
        log.info("swarm.metadata", infohash=ih, seconds=round(time.monotonic() - t0, 3))
        return T.encode_with_info(info, trackers=[*m.trackers], web_seeds=m.web_seeds)


def _peers(uri: str) -> list[tuple[str, int]]:
    """The magnet's x.pe peers (host:port); malformed ones are left out."""
    from urllib.parse import parse_qs

    out = []
    for hp in parse_qs(urlsplit(uri).query).get("x.pe", [])[:50]:
        with contextlib.suppress(ValueError):
            host, port = split_host_port(hp)
            if host and 0 < port < 65536:
                out.append((host, port))
    return out


def _no_metadata(
    ih: str, timeout: float, trackers: list[str], peers: list[tuple[str, int]], errors: dict[str, str], dht: bool
) -> str:
    dht_word = "the DHT" if dht else "no DHT (bittorrent.dht off)"
    where = [f"{len(trackers)} tracker(s)", f"{len(peers)} peer(s)", dht_word]
    msg = f"no metadata for {ih} after {timeout:.0f}s from {', '.join(where)}"
    if errors:
        msg += "; tracker errors: " + "; ".join(f"{u}: {e}" for u, e in list(errors.items())[:5])
    return msg


def torrent_input(body: Any) -> tuple[str | None, bytes | None]:
    """The API body {"source": MAGNET|INFOHASH|URL} or {"torrent": base64 of a .torrent}."""
    if not isinstance(body, dict) or len(body) != 1 or not ({"source", "torrent"} & set(body)):
        raise AddError(
            'expected {"source": "magnet:?xt=...|<infohash>|https://.../x.torrent"} or {"torrent": "<base64>"}'
        )
    if "torrent" in body:
        raw = body["torrent"]
        if not isinstance(raw, str) or len(raw) > T.MAX_TORRENT_BYTES * 4 // 3 + 4:
            raise AddError("torrent must be the base64 of a .torrent file of at most 16 MiB")
        try:
            return None, base64.b64decode(raw, validate=True)
        except ValueError:
            raise AddError("torrent is not valid base64") from None
    src = body["source"]
    if not isinstance(src, str) or len(src) > T.MAX_MAGNET_CHARS:
        raise AddError(f"source must be a string of at most {T.MAX_MAGNET_CHARS} characters")
    return src, None
