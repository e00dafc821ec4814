"""Node-to-node sync: poll each peer's /v1/inventory, and fetch wanted items from peers over BitTorrent.

`PeerSync` (component "sync") keeps, per peer, the set of items it holds (cached, with an infohash),
from its paginated inventory; a peer that fails a poll is down and offers nothing until it answers
again. `PeerSource` (the `Source` named "peer") downloads a wanted item from the peers that hold it
(and from the seed targets, which may seed published torrents) by connecting libtorrent straight to
their BitTorrent endpoints, into the item's partial path. A stalled transfer is abandoned so the
pipeline falls back to the origins. Every byte is verified: sha1 per piece by libtorrent, then md5
(the published checksum) and sha256 in one pass off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core import jsonread
from noded.core.component import Node, cancel_task, supervise
from noded.core.httpread import BodyTooLarge, read_capped, response_json
from noded.core.logs import get_logger
from noded.core.model import CatalogEntry, HashResult, Item
from noded.core.priority import idle_thread
from noded.origins.catalog.base import is_hex
from noded.origins.catalog.keys import normalise_key
from noded.origins.sources import FetchError
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine, keep_torrent, split_host_port
from noded.p2p.follow import FollowHasher
from noded.p2p.session import PieceFollower

log = get_logger("noded.p2p.sync")

PAGE_LIMIT = 1000
# A page of PAGE_LIMIT items with 1 KiB keys is about 1.3 MB; the pieces list of a volunteer can be longer.
PAGE_JSON = jsonread.JsonLimits(max_bytes=8 * 1024 * 1024, max_depth=16)
PIECES_JSON = jsonread.JsonLimits(max_bytes=32 * 1024 * 1024, max_depth=16)
RECONNECT_INTERVAL = 5.0
HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PeerItem:
    key: str
    infohash: str
    size: int | None
    md5: str | None
    sha256: str | None = None


@dataclass
class PeerView:
    name: str
    api_url: str
    bt: tuple[str, int]
    up: bool = False
    last_ok: float | None = None
    error: str | None = None
    items: dict[str, PeerItem] = field(default_factory=dict)
    # cursor -> (etag, the page's valid items, next cursor): an unchanged page is not parsed again.
    pages: dict[int, tuple[str, list[PeerItem], int | None]] = field(default_factory=dict)
    adopted: set[str] = field(default_factory=set)  # peer keys already considered (adoption is once per key)
    down_since: float | None = None  # first failed poll of the current outage
    partial: dict[str, tuple[str, frozenset[int]]] = field(default_factory=dict)  # key -> (infohash, pieces held)


class InventoryError(ValueError):
    pass


def parse_inventory_page(body: Any, max_items: int) -> tuple[list[PeerItem], int | None]:
    """Validate one page from a peer (untrusted): cached items with an infohash, and the next cursor."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise InventoryError("inventory must be an object with an 'items' list")
    nxt = body.get("next")
    if nxt is not None and (not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 0):
        raise InventoryError(f"inventory 'next' must be a non-negative integer or null, got {nxt!r}")
    if len(body["items"]) > max_items:
        raise InventoryError(f"inventory page has {len(body['items'])} items, more than {max_items}")
    out = []
    for e in body["items"]:
        if not isinstance(e, dict) or e.get("state") != "cached":
            continue
        key, ih, size, md5 = e.get("key"), e.get("infohash"), e.get("size"), e.get("md5")
        if not isinstance(key, str) or not key or len(key) > 1024 or "\0" in key:
            continue
        if not isinstance(ih, str) or not is_hex(ih, 40):
            continue
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            continue
        if md5 is not None and (not isinstance(md5, str) or not is_hex(md5, 32)):
            continue
        sha256 = e.get("sha256")
        if sha256 is not None and (not isinstance(sha256, str) or not is_hex(sha256, 64)):
            continue
        out.append(PeerItem(key, ih, size, md5, sha256))
    return out, nxt


MAX_PARTIAL_ITEMS = 100_000


def parse_pieces_page(body: Any) -> dict[str, tuple[str, frozenset[int]]]:
    """Validate a peer's partial holdings (untrusted); a bad entry is skipped, the rest kept."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise InventoryError("piece inventory must be an object with an 'items' list")
    if len(body["items"]) > MAX_PARTIAL_ITEMS:
        raise InventoryError(f"piece inventory lists more than {MAX_PARTIAL_ITEMS} items")
    out: dict[str, tuple[str, frozenset[int]]] = {}
    for e in body["items"]:
        if not isinstance(e, dict):
            continue
        key, ih, pieces = e.get("key"), e.get("infohash"), e.get("pieces")
        if not isinstance(key, str) or not key or len(key) > 1024 or "\0" in key:
            continue
        if (
            not isinstance(ih, str)
            or not is_hex(ih.lower(), 40)
            or not isinstance(pieces, list)
            or len(pieces) > 1_000_000
        ):
            continue
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in pieces):
            continue
        out[key] = (ih.lower(), frozenset(pieces))
    return out


def matches(item: Item, p: PeerItem) -> bool:
    """The peer holds the same content we want (same published checksum and size, where known)."""
    if item.md5 and p.md5 and item.md5.lower() != p.md5:
        return False
    if item.size is not None and p.size is not None and item.size != p.size:
        return False
    return not (item.infohash and item.infohash != p.infohash)


class PeerSync:
    name = "sync"

    def __init__(self, node: Node, engine: P2PEngine, layout: CacheLayout | None = None) -> None:
        self.node = node
        self.engine = engine
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        self.peers: dict[str, PeerView] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}  # one polling loop per peer
        self._wakes: dict[str, asyncio.Event] = {}
        self._started = False
        self._set_peers()
        self.source = PeerSource(self)

    def _set_peers(self) -> None:
        old = self.peers
        self.peers = {}
        for p in self.node.cfg.peers:
            view = old.get(p.name) or PeerView(p.name, p.api_url, split_host_port(p.bittorrent))
            view.api_url, view.bt = p.api_url, split_host_port(p.bittorrent)
            self.peers[p.name] = view

    async def start(self) -> None:
        f = self.node.cfg.fetch
        timeout = aiohttp.ClientTimeout(total=None, connect=f.connect_timeout, sock_read=f.read_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": f.user_agent})
        self._started = True
        self._start_loops()

    def _start_loops(self) -> None:
        """One supervised loop per configured peer; loops of peers no longer configured end."""
        for name in list(self._tasks):
            if name not in self.peers:
                self._tasks.pop(name).cancel()
                self._wakes.pop(name, None)
        for name in self.peers:
            if name not in self._tasks:
                self._wakes[name] = asyncio.Event()
                self._tasks[name] = supervise(
                    functools.partial(self._poll_loop, name), f"peer-poll:{name}", self.node, self.name
                )

    async def stop(self) -> None:
        self._started = False
        for t in list(self._tasks.values()):
            await cancel_task(t)
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def reload(self, cfg: Any) -> None:
        self._set_peers()
        if self._started:
            self._start_loops()
        for ev in self._wakes.values():
            ev.set()

    def status(self) -> dict[str, Any]:
        return {
            "state": "running" if self._started else "stopped",
            "peers_up": sum(1 for p in self.peers.values() if p.up),
            "peers": {
                n: {"up": p.up, "items": len(p.items), "last_ok": p.last_ok, "error": p.error}
                for n, p in self.peers.items()
            },
        }

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("sync is not started")
        return self._http

    async def _poll_loop(self, name: str) -> None:
        wake = self._wakes[name]
        while True:
            peer = self.peers.get(name)
            if peer is None:
                return
            await self.poll(peer)
            self._show_down()
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.node.cfg.bittorrent.peer_poll_interval)

    async def poll_all(self) -> None:
        """Poll every peer once, together (each within its own deadline)."""
        await asyncio.gather(*(self.poll(p) for p in list(self.peers.values())))
        self._show_down()

    def _show_down(self) -> None:
        down = sorted(n for n, p in self.peers.items() if not p.up and p.error is not None)
        if down:
            self.node.problems["peers"] = "peer(s) down: " + "; ".join(
                f"{n} ({(self.peers[n].error or '')[:200]})" for n in down
            )
        else:
            self.node.problems.pop("peers", None)

    async def poll(self, peer: PeerView) -> None:
        """Read the peer's whole inventory (page by page, reusing unchanged pages via ETag), within
        `peer_poll_timeout` for all pages together: a peer that answers a byte at a time fails the poll."""
        items: dict[str, PeerItem] = {}
        limit = self.node.cfg.origins.max_items_per_origin
        deadline = self.node.cfg.bittorrent.peer_poll_timeout
        try:
            async with asyncio.timeout(deadline):
                await self._read_inventory(peer, items, limit)
        except TimeoutError:
            self._failed(peer, f"poll did not finish within {deadline:.0f}s")
            return
        except (aiohttp.ClientError, InventoryError, ValueError) as e:
            # ValueError covers what the bounded JSON reader refuses (JsonInputError, BodyTooLarge).
            self._failed(peer, str(e) or type(e).__name__)
            return
        try:
            async with asyncio.timeout(deadline):
                peer.partial = await self._poll_pieces(peer)
        except TimeoutError:
            peer.partial = {}
        if not peer.up:
            log.info("sync.peer_up", peer=peer.name, items=len(items))
        peer.up, peer.error, peer.items, peer.last_ok = True, None, items, time.time()
        peer.down_since = None
        if self.node.cfg.bittorrent.mirror_peers and items:
            await self._adopt(peer, items)

    def _failed(self, peer: PeerView, error: str) -> None:
        if peer.up or peer.error is None:
            log.warning("sync.peer_down", peer=peer.name, error=error)
        peer.up, peer.error, peer.items = False, error, {}
        if peer.down_since is None:
            peer.down_since = time.time()
        self.node.traffic.add(f"peer:{peer.name}", "in", errors=1)

    async def _read_inventory(self, peer: PeerView, items: dict[str, PeerItem], limit: int) -> None:
        cursor = 0
        for _ in range(10_000):
            url = f"{peer.api_url}/v1/inventory"
            params = {"state": "cached", "limit": str(PAGE_LIMIT), "after": str(cursor)}
            headers = {}
            cached = peer.pages.get(cursor)
            if cached:
                headers["If-None-Match"] = cached[0]
            async with self.http.get(url, params=params, headers=headers) as r:
                self.node.traffic.add(f"peer:{peer.name}", "in", r.content_length or 0, requests=1)
                if r.status == 304 and cached:
                    _, page, nxt = cached
                elif r.status == 200:
                    body = await response_json(r, PAGE_JSON, f"inventory page from {peer.name}")
                    page, nxt = parse_inventory_page(body, PAGE_LIMIT * 5)
                    if r.headers.get("ETag"):
                        peer.pages[cursor] = (r.headers["ETag"], page, nxt)
                else:
                    raise InventoryError(f"HTTP {r.status} from {url}")
            for p in page:
                items[p.key] = p
            if len(items) > limit:
                raise InventoryError(f"inventory larger than {limit} items")
            if nxt is None:
                return
            if nxt <= cursor:
                raise InventoryError("inventory cursor does not advance")
            cursor = nxt
        raise InventoryError("inventory has more than 10000 pages")

    async def _poll_pieces(self, peer: PeerView) -> dict[str, tuple[str, frozenset[int]]]:
        """The peer's partial holdings (volunteers); a peer without them (404, bad body) holds none."""
        url = f"{peer.api_url}/v1/inventory/pieces"
        try:
            async with self.http.get(url) as r:
                self.node.traffic.add(f"peer:{peer.name}", "in", r.content_length or 0, requests=1)
                if r.status != 200:
                    return {}
                return parse_pieces_page(await response_json(r, PIECES_JSON, f"piece inventory from {peer.name}"))
        except (aiohttp.ClientError, TimeoutError, InventoryError, ValueError) as e:
            log.debug("sync.pieces_unavailable", peer=peer.name, error=str(e) or type(e).__name__)
            return {}

    async def _adopt(self, peer: PeerView, items: dict[str, PeerItem]) -> None:
        """Keep the nodes' caches in sync: what a peer holds and this node does not know becomes wanted here.

        Only keys never seen here are adopted, so an item this node evicted (or that failed here) is not
        pulled again just because the peer still holds it. Keys are untrusted and normalised like any
        origin listing, and bounded like one: the inventory by `max_items_per_origin` (when it is read), each
        item by `max_item_size`. The new rows' source of bytes is the peer (the pipeline tries it first).
        """
        store = self.node.store
        max_size = self.node.cfg.origins.max_item_size
        entries: list[CatalogEntry] = []
        too_big = 0
        for p in items.values():
            if p.key in peer.adopted:
                continue
            if p.size is not None and p.size > max_size:
                too_big += 1
                peer.adopted.add(p.key)
                continue
            try:
                key = normalise_key(p.key)
            except ValueError as e:
                log.warning("sync.peer_key_rejected", peer=peer.name, key=p.key[:200], error=str(e))
                peer.adopted.add(p.key)
                continue
            entries.append(
                CatalogEntry(
                    origin=f"peer:{peer.name}",
                    key=key,
                    urls=(),
                    size=p.size,
                    md5=p.md5,
                    sha256=p.sha256,
                    infohash=p.infohash,
                )
            )

        def adopt_batch() -> int:
            new = 0
            with store.tx():
                for e in entries:
                    if store.get_current(e.key) is None:
                        store.upsert_entry(e)
                        new += 1
            return new

        if too_big:
            log.warning("sync.peer_items_too_large", peer=peer.name, items=too_big, max_item_size=max_size)
        if not entries:
            return
        new = await store.run(adopt_batch)
        peer.adopted.update(p.key for p in items.values())
        if new:
            log.info("sync.adopted", peer=peer.name, items=new)
            self.node.notify("wanted")

    def holders(self, item: Item) -> list[tuple[PeerView, PeerItem]]:
        out = []
        for p in self.peers.values():
            pi = p.items.get(item.key)
            if p.up and pi is not None and matches(item, pi):
                out.append((p, pi))
        return out


class PeerSource:
    """The `Source` named "peer": a wanted item from the other Smart Node(s) over BitTorrent."""

    name = "peer"

    def __init__(self, sync: PeerSync) -> None:
        self.sync = sync
        self.last_timing: dict[str, float] = {}

    async def offers(self, item: Item) -> bool:
        if self.sync.holders(item):
            return True
        # A published torrent we imported can come from the seed targets (they may seed it).
        if item.infohash and self.sync.node.cfg.seed_targets:
            path = self.sync.layout.torrent_path(item.infohash)
            return await asyncio.get_running_loop().run_in_executor(None, path.exists)
        return False

    async def fetch(self, item: Item, partial: Path) -> HashResult:
        sync, engine = self.sync, self.sync.engine
        holders = sync.holders(item)
        meta = await self._torrent(item, holders)
        if not meta.single_file:
            raise FetchError(f"{item.key}: the peer's torrent is not a single file", retryable=False)
        if item.size is not None and meta.total_size != item.size:
            raise FetchError(
                f"{item.key}: peer's torrent has {meta.total_size} bytes, expected {item.size}", suspect=True
            )
        if item.md5 and meta.md5 and meta.md5 != item.md5.lower():
            raise FetchError(f"{item.key}: peer's torrent has md5 {meta.md5}, expected {item.md5}", suspect=True)
        ih = meta.infohash
        if ih in engine.session.handles:
            raise FetchError(f"{item.key}: torrent {ih} is already in the session", retryable=True)
        endpoints = self._endpoints(item, holders)
        if not endpoints and self.needs_endpoints:
            raise FetchError(f"{item.key}: no peer holds it", retryable=True)
        atp = self._params(meta, partial)
        # md5/sha256 follow the download piece by piece (noded/p2p/follow.py): at idle priority on a
        # thread of its own while the transfer runs, the rest at normal priority once it is complete.
        follower = PieceFollower(meta.num_pieces)
        cancel = threading.Event()
        engine.session.followers[ih] = follower
        loop = asyncio.get_running_loop()
        hasher = FollowHasher(partial, meta.piece_length, meta.total_size, follower, cancel, meta.pieces)
        idle = ThreadPoolExecutor(max_workers=1, thread_name_prefix="follow", initializer=idle_thread)
        early = loop.run_in_executor(idle, functools.partial(hasher.run, until_transferred=True))
        ok = stopping = False
        t0 = time.monotonic()
        try:
            await engine.session.add(atp, ih)
            await self._wait_complete(item, ih, endpoints)
            transfer = time.monotonic() - t0
            follower.complete()
            ok = True
            await engine.account_now()  # count the last bytes per peer before the torrent goes
        except asyncio.CancelledError:
            stopping = True
            raise
        finally:
            engine.session.followers.pop(ih, None)
            # Leave the session before the file is published. A failed transfer drops the partial bytes,
            # so an HTTP fetch starts from a clean file; a stop keeps them: libtorrent checks the file
            # when the torrent is added again and asks peers only for the pieces it lacks.
            await engine.session.remove(ih)
            follower.set_flushed()
            if not ok:
                cancel.set()
                with contextlib.suppress(Exception):
                    await early
                idle.shutdown(wait=False)
                # The daemon stops the BitTorrent engine before the pull pipeline: the transfer then
                # ends as "left the session", not as a cancellation.
                if stopping or sync.node.stopping:
                    log.info("sync.partial_kept", key=item.key, infohash=ih)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        await loop.run_in_executor(None, partial.unlink)
        try:
            await early
        finally:
            idle.shutdown(wait=False)
        result = await loop.run_in_executor(None, hasher.finish)
        tail = time.monotonic() - t0 - transfer
        self.last_timing = {"transfer_seconds": round(transfer, 3), "verify_tail_seconds": round(tail, 3)}
        if result.size != meta.total_size or result.pieces != meta.pieces:
            got, want = result.pieces, meta.pieces
            bad = [i for i in range(meta.num_pieces) if got[i * 20 : i * 20 + 20] != want[i * 20 : i * 20 + 20]]
            raise FetchError(
                f"{item.key}: bytes from peer do not match the torrent's piece hashes "
                f"(size {result.size}/{meta.total_size}, pieces {bad[:10]} of {meta.num_pieces})",
                suspect=True,
            )
        if item.md5 and result.md5 != item.md5.lower():
            raise FetchError(f"{item.key}: md5 {result.md5} from peer, expected {item.md5}", suspect=True)
        # Keep the torrent: the item will seed under the same infohash as the peer's copy.
        path = sync.layout.torrent_path(ih)
        await asyncio.get_running_loop().run_in_executor(None, keep_torrent, path, ih, meta.data)
        await sync.node.store.run(sync.node.store.update_item, item.id, infohash=ih)
        log.info("sync.fetched", key=item.key, infohash=ih, peers=[p.name for p, _ in holders], **self.last_timing)
        return result

    # Peers are asked by address; the swarm source (noded/p2p/swarm.py) also finds them itself.
    needs_endpoints = True

    def _endpoints(self, item: Item, holders: list[tuple[PeerView, PeerItem]]) -> list[tuple[str, int]]:
        return [p.bt for p, _ in holders] + [split_host_port(s.bittorrent) for s in self.sync.node.cfg.seed_targets]

    def _params(self, meta: T.TorrentMeta, partial: Path) -> Any:
        return _download_params(meta.data, partial)

    async def _torrent(self, item: Item, holders: list[tuple[PeerView, PeerItem]]) -> T.TorrentMeta:
        loop = asyncio.get_running_loop()
        max_total = self.sync.node.cfg.origins.max_item_size
        if item.infohash:
            path = self.sync.layout.torrent_path(item.infohash)
            with contextlib.suppress(FileNotFoundError):
                data = await loop.run_in_executor(None, path.read_bytes)
                return T.parse_torrent(data, max_total=max_total)
        errors = []
        deadline = self.sync.node.cfg.bittorrent.peer_poll_timeout
        for peer, pi in holders:
            url = f"{peer.api_url}/v1/torrents/{pi.infohash}.torrent"
            try:
                # The same total deadline as a poll: a peer trickling its torrent holds up this pull only so long.
                async with asyncio.timeout(deadline), self.sync.http.get(url) as r:
                    if r.status != 200:
                        raise FetchError(f"HTTP {r.status}")
                    # Whole, up to the cap: a read() would stop at what happens to be buffered.
                    data = await read_capped(r.content, T.MAX_TORRENT_BYTES, r.content_length, "torrent")
                meta = T.parse_torrent(data, max_total=max_total)
            except TimeoutError:
                errors.append(f"{peer.name}: torrent not received within {deadline:.0f}s")
                continue
            except (aiohttp.ClientError, FetchError, T.TorrentError, BodyTooLarge) as e:
                errors.append(f"{peer.name}: {e}")
                continue
            if meta.infohash != pi.infohash:
                errors.append(f"{peer.name}: torrent infohash {meta.infohash} differs from its inventory")
                continue
            return meta
        raise FetchError(f"{item.key}: no usable torrent from peers ({'; '.join(errors) or 'none hold it'})")

    async def _wait_complete(self, item: Item, ih: str, endpoints: list[tuple[str, int]]) -> None:
        session = self.sync.engine.session
        stall = self.sync.node.cfg.bittorrent.peer_stall_timeout
        last_progress, last_bytes, last_connect = time.monotonic(), -1, 0.0
        wake = asyncio.Event()
        finished = False

        def on_finished(a: Any) -> None:
            # Ask for the final status at once and look at it as soon as it lands, rather than at the
            # next 0.1 s poll (polling stays the cadence while the download runs).
            nonlocal finished
            if session.infohash_of(a.handle) == ih:
                finished = True
                session.post_updates()

        def on_update(_: Any) -> None:
            # Only the update that ends the wait: an earlier one would make the loop post and wake
            # at alert speed instead of every 0.1 s.
            ts = session.states.get(ih)
            if finished and ts is not None and (ts.is_seeding or ts.error):
                wake.set()

        session.subscribe("torrent_finished_alert", on_finished)
        session.subscribe("state_update_alert", on_update)
        try:
            while True:
                now = time.monotonic()
                if now - last_connect >= RECONNECT_INTERVAL:
                    for host, port in endpoints:
                        session.connect_peer(ih, host, port)
                    last_connect = now
                session.post_updates()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.1)
                wake.clear()
                ts = session.states.get(ih)
                if ts is None:
                    if ih not in session.handles:
                        raise FetchError(f"{item.key}: torrent left the session", retryable=True)
                    continue
                if ts.error:
                    raise FetchError(f"{item.key}: {ts.error}", retryable=True)
                # Decided on a state update (not a state-change alert), so the byte counters are final too.
                if ts.is_seeding and ts.progress >= 1.0:
                    return
                if ts.downloaded > last_bytes:
                    last_bytes, last_progress = ts.downloaded, time.monotonic()
                elif time.monotonic() - last_progress > stall:
                    raise FetchError(f"{item.key}: no progress from peers for {stall:.0f}s", retryable=True)
        finally:
            session.unsubscribe("torrent_finished_alert", on_finished)
            session.unsubscribe("state_update_alert", on_update)


def _download_params(data: bytes, partial: Path, *, web_seeds: bool = False) -> Any:
    ti = lt.torrent_info(data)
    if not web_seeds:
        # Peers only: the url-list names origins, whose bytes the HTTP pipeline fetches and counts.
        # set_web_seeds is deprecated in 2.1 but is the one call that drops a torrent_info's url-list.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ti.set_web_seeds([])
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(partial.parent)
    atp.renamed_files = {0: partial.name}
    atp.flags &= ~lt.torrent_flags.auto_managed
    atp.flags &= ~lt.torrent_flags.paused
    atp.flags |= lt.torrent_flags.sequential_download  # lets verification follow the download
    return atp
