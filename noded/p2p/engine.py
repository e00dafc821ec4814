"""The `p2p` component: seeds every cached item, keeps resume data, accounts uploads.

Work lives in the store rows: CACHED items without `seeding` get a torrent (built from the piece
hashes stored by the pull pipeline, else hashed in an executor) and are added to the session in seed
mode. At start, items already seeding come back from their resume data (no recheck). Uploads per
torrent come from state updates; per-peer splits from peer_info alerts; both feed the traffic
channels ("peer:<name>", "seed:<name>", "swarm") and the item's last access (LRU).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout, UnsafePath, atomic_write
from noded.core.component import Node
from noded.core.logs import get_logger
from noded.core.model import PIECE_LENGTH, Item, State
from noded.origins.schedule import Schedule
from noded.p2p import torrent as T
from noded.p2p.importer import import_configured
from noded.p2p.resume import SeedPlan, load_plan, remove_files, seed_params
from noded.p2p.session import TorrentSession
from noded.p2p.settings import session_settings

log = get_logger("noded.p2p")

UPDATE_INTERVAL = 1.0  # seconds between post_torrent_updates
SEED_SCAN_INTERVAL = 30.0  # fallback when a "cached" hint is lost
TOUCH_MIN_INTERVAL = 60.0  # at most one LRU write per item per minute
PAGE = 500


def split_host_port(hp: str) -> tuple[str, int]:
    host, _, port = hp.rpartition(":")
    return host.strip("[]"), int(port)


class P2PEngine:
    name = "p2p"

    def __init__(self, node: Node, layout: CacheLayout | None = None, schedule: Schedule | None = None) -> None:
        self.node = node
        self.schedule = schedule
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        self.session = TorrentSession(session_settings(cfg.bittorrent))
        self._tasks: list[asyncio.Task[None]] = []
        self._item_of: dict[str, int] = {}  # infohash -> item id of torrents we seed
        self._last_up: dict[str, int] = {}
        self._last_down: dict[str, int] = {}
        self._peer_totals: dict[tuple[str, str], tuple[int, int]] = {}
        self._touched: dict[int, float] = {}
        self._last_channel: dict[str, str] = {}
        self._channels: dict[str, str] = {}  # peer ip -> traffic channel
        self.restored = 0
        self.imported = 0
        self.restore_seconds: float | None = None
        self.seed_errors = 0
        self._started = False
        self.upload_cap = 0  # bytes/s the timetable may lower but never raise (a volunteer's limit); 0: none
        self._seed_lock = asyncio.Lock()  # one scan at a time: the loop and callers never race on a torrent

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.layout.ensure)
        self._channels = await loop.run_in_executor(None, self._resolve_channels)
        await self.session.start()
        if self.schedule is not None:
            self.schedule.on_change(self._apply_rates)
        self.imported, _ = await import_configured(self.node, self.layout)
        t0 = time.monotonic()
        await self._restore()
        self.restore_seconds = round(time.monotonic() - t0, 3)
        self._started = True
        self._tasks = [
            asyncio.create_task(self._updates_loop(), name="p2p-updates"),
            asyncio.create_task(self._seed_loop(), name="p2p-seed"),
            asyncio.create_task(self._resume_loop(), name="p2p-resume"),
            asyncio.create_task(self._targets_loop(), name="p2p-targets"),
        ]
        log.info(
            "p2p.started",
            port=self.session.listen_port,
            restored=self.restored,
            seconds=self.restore_seconds,
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.save_all_resume(), 5)
        await self.session.stop()
        self._started = False

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for ts in self.session.states.values():
            states[ts.state] = states.get(ts.state, 0) + 1
        return {
            "state": "running" if self._started else "stopped",
            "listen_port": self.session.listen_port,
            "torrents": len(self.session.handles),
            "seeding": sum(1 for ts in self.session.states.values() if ts.is_seeding),
            "torrent_states": states,
            "restored": self.restored,
            "imported": self.imported,
            "restore_seconds": self.restore_seconds,
            "checking_seen": len(self.session.checking_seen),
            "seed_errors": self.seed_errors,
            "rate_limits": {
                "down": self.schedule.down.rate if self.schedule else None,
                "up": self.schedule.up.rate if self.schedule else None,
            },
        }

    def _apply_rates(self, down: int | None, up: int | None) -> None:
        """The bandwidth timetable for BitTorrent: libtorrent's own limiter (0 = unlimited). As libtorrent
        does by default, peers on the local network are not limited."""
        if self.upload_cap:
            up = min(up, self.upload_cap) if up else self.upload_cap
        self.session.apply_settings({"download_rate_limit": down or 0, "upload_rate_limit": up or 0})

    async def reload(self, cfg: Any) -> None:
        self._channels = await asyncio.get_running_loop().run_in_executor(None, self._resolve_channels)

    # -- restore at start ------------------------------------------------------------------
    async def _restore(self) -> None:
        """Items marked seeding come back with their resume data or in seed mode: no recheck."""
        loop = asyncio.get_running_loop()
        store = self.node.store
        after = 0
        while True:
            page = await store.run(store.items, states=[State.CACHED], after_id=after, limit=PAGE)
            if not page:
                break
            after = page[-1].id
            todo = [i for i in page if i.seeding and i.infohash]
            plans = await loop.run_in_executor(None, self._plans, todo)
            adds = []
            for item, plan in zip(todo, plans, strict=True):
                if isinstance(plan, str):
                    log.warning("p2p.restore_skipped", key=item.key, reason=plan)
                    await store.run(store.update_item, item.id, seeding=False)
                    continue
                adds.append(self._add_plan(plan))
            results = await asyncio.gather(*adds, return_exceptions=True)
            self.restored += sum(1 for r in results if r is True)

    def _plans(self, items: Iterable[Item]) -> list[SeedPlan | str]:
        out: list[SeedPlan | str] = []
        for i in items:
            assert i.infohash is not None
            try:
                final = self.layout.final_path(i.key)
            except UnsafePath as e:
                out.append(str(e))
                continue
            out.append(load_plan(self.layout, i.id, i.infohash, final, i.size, i.mtime_ns))
        return out

    async def _add_plan(self, plan: SeedPlan) -> bool:
        try:
            atp = seed_params(plan)
            await self.session.add(atp, plan.infohash)
        except Exception as e:
            log.warning("p2p.add_failed", infohash=plan.infohash, error=str(e))
            self.seed_errors += 1
            return False
        self._item_of[plan.infohash] = plan.item_id
        return True

    # -- seeding newly cached items ----------------------------------------------------------
    async def _seed_loop(self) -> None:
        while True:
            try:
                await self.seed_pending()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("p2p.seed_scan_failed", error=str(e), exc_info=True)
            await self.node.wait("cached", SEED_SCAN_INTERVAL)

    async def seed_pending(self) -> int:
        """Seed every CACHED item that is not seeding yet. Returns how many were added."""
        async with self._seed_lock:
            return await self._seed_pending()

    async def _seed_pending(self) -> int:
        store = self.node.store
        after, added = 0, 0
        while True:
            page = await store.run(store.items, states=[State.CACHED], after_id=after, limit=PAGE)
            if not page:
                return added
            after = page[-1].id
            for item in page:
                if item.seeding and item.infohash in self.session.handles:
                    continue
                try:
                    if await self.seed_item(item):
                        added += 1
                except Exception as e:
                    self.seed_errors += 1
                    log.warning("p2p.seed_failed", key=item.key, error=str(e))

    async def seed_item(self, item: Item) -> bool:
        loop = asyncio.get_running_loop()
        store = self.node.store
        final = self.layout.final_path(item.key)
        pieces = await store.run(store.get_pieces, item.id)
        infohash, _ = await loop.run_in_executor(None, self._torrent_for, item, final, pieces)
        plan = await loop.run_in_executor(
            None, load_plan, self.layout, item.id, infohash, final, item.size, item.mtime_ns
        )
        if isinstance(plan, str):
            raise RuntimeError(plan)
        if not await self._add_plan(plan):
            return False
        await store.run(store.update_item, item.id, infohash=infohash, seeding=True)
        log.info("p2p.seeding", key=item.key, infohash=infohash)
        return True

    def _torrent_for(self, item: Item, final: Path, pieces: tuple[int, bytes] | None) -> tuple[str, bytes]:
        """The item's .torrent (kept under state/torrents). Blocking: hashes only when no pieces are stored."""
        bt = self.node.cfg.bittorrent
        if item.infohash:
            existing = self.layout.torrent_path(item.infohash)
            if existing.exists():  # an imported, published torrent is authoritative
                return item.infohash, existing.read_bytes()
        size = final.stat().st_size
        md5 = item.md5
        if pieces is None or md5 is None or pieces[0] != PIECE_LENGTH:
            raw, md5s = T.hash_files([final])
            pieces = (PIECE_LENGTH, raw)
            md5 = md5s[0]
        info = T.single_file_info(final.name, size, md5, pieces[1], source=bt.source_tag)
        seeds = T.web_seed_urls(item.key, item.urls, bt.web_seed_templates)
        data = T.encode_torrent(info, trackers=bt.trackers, web_seeds=seeds)
        ih = T.infohash_of(info)
        path = self.layout.torrent_path(ih)
        if not path.exists() or path.read_bytes() != data:
            atomic_write(path, data)
        return ih, data

    async def remove_torrent(self, infohash: str) -> bool:
        """Stop seeding (eviction calls this before deleting the file). Keeps the .torrent file."""
        infohash = infohash.lower()
        removed = await self.session.remove(infohash)
        item_id = self._item_of.pop(infohash, None)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: remove_files(self.layout, infohash, torrent_too=False)
        )
        if item_id is not None:
            await self.node.store.run(self.node.store.update_item, item_id, seeding=False)
        return removed

    # -- resume data ---------------------------------------------------------------------------
    async def _resume_loop(self) -> None:
        while True:
            await asyncio.sleep(self.node.cfg.bittorrent.resume_save_interval)
            try:
                await self.save_all_resume()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("p2p.resume_save_failed", error=str(e))

    async def save_all_resume(self) -> int:
        """Ask libtorrent for every seeded torrent's resume data and write it (tmp + fsync + rename)."""
        ihs = [ih for ih in self.session.handles if ih in self._item_of]
        blobs = await asyncio.gather(*(self.session.resume_data(ih, timeout=5) for ih in ihs))
        todo = [(self.layout.resume_path(ih), b) for ih, b in zip(ihs, blobs, strict=True) if b]
        await asyncio.get_running_loop().run_in_executor(None, _write_all, todo)
        return len(todo)

    # -- status, accounting, seed targets ---------------------------------------------------------
    async def _updates_loop(self) -> None:
        while True:
            self.session.post_updates()
            await asyncio.sleep(UPDATE_INTERVAL)
            try:
                await self._account()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("p2p.accounting_failed", error=str(e))

    def hint_channel(self, infohash: str, channel: str) -> None:
        """The channel to charge when a torrent's bytes cannot be tied to a live connection."""
        self._last_channel[infohash] = channel

    async def account_now(self) -> None:
        """Account what the last state update says (a download about to leave the session)."""
        await self._account()

    async def _account(self) -> None:
        """Per-torrent byte deltas (exact, from state updates) split across peers by their own counters;
        bytes of connections that closed before we looked go to the torrent's last seen channel."""
        now = time.time()
        touch: list[int] = []
        moved: dict[str, tuple[int, int]] = {}
        for ih, ts in list(self.session.states.items()):
            d_up = max(0, ts.uploaded - self._last_up.get(ih, 0))
            d_down = max(0, ts.downloaded - self._last_down.get(ih, 0))
            self._last_up[ih], self._last_down[ih] = ts.uploaded, ts.downloaded
            if d_up or d_down:
                moved[ih] = (d_up, d_down)
            if d_up:
                item_id = self._item_of.get(ih)
                if item_id is not None and now - self._touched.get(item_id, 0) >= TOUCH_MIN_INTERVAL:
                    touch.append(item_id)
                    self._touched[item_id] = now
        if moved:
            handles = [(ih, self.session.handles[ih]) for ih in moved if ih in self.session.handles]
            # peer_info_alert's list has no Python converter in 2.1.1; get_peer_info() waits on
            # libtorrent's network thread, so it runs in an executor, only for torrents that moved bytes.
            infos = dict(await asyncio.get_running_loop().run_in_executor(None, _peer_infos, handles))
            for ih, (d_up, d_down) in moved.items():
                self._split_per_peer(ih, d_up, d_down, infos.get(ih, []))
        if touch:
            await self.node.store.run(self.node.store.touch, touch, now)

    def _split_per_peer(self, ih: str, d_up: int, d_down: int, peers: list[tuple[str, int, int, int]]) -> None:
        left_up, left_down = d_up, d_down
        for ip, port, up, down in peers:
            key = (ih, f"{ip}:{port}")
            last_up, last_down = self._peer_totals.get(key, (0, 0))
            if up < last_up or down < last_down:  # a new connection from the same endpoint
                last_up, last_down = 0, 0
            channel = self._channels.get(ip, "swarm")
            self._last_channel[ih] = channel
            pu, pd = min(up - last_up, left_up), min(down - last_down, left_down)
            if pu > 0:
                self.node.traffic.add(channel, "out", pu)
                left_up -= pu
            if pd > 0:
                self.node.traffic.add(channel, "in", pd)
                left_down -= pd
            self._peer_totals[key] = (up, down)
        channel = self._last_channel.get(ih, "swarm")
        if left_up:
            self.node.traffic.add(channel, "out", left_up)
        if left_down:
            self.node.traffic.add(channel, "in", left_down)

    def _resolve_channels(self) -> dict[str, str]:
        """Peer and seed-target IPs -> traffic channel. Blocking (DNS): run in an executor."""
        out: dict[str, str] = {}
        cfg = self.node.cfg
        pairs = [(p.bittorrent, f"peer:{p.name}") for p in cfg.peers]
        pairs += [(s.bittorrent, f"seed:{s.name}") for s in cfg.seed_targets]
        for hp, channel in pairs:
            host, port = split_host_port(hp)
            try:
                for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
                    out[str(info[4][0])] = channel
            except OSError:
                out[host] = channel
        return out

    async def _targets_loop(self) -> None:
        while True:
            self.offer_to_targets()
            await asyncio.sleep(self.node.cfg.bittorrent.seed_target_interval)

    def offer_to_targets(self) -> int:
        """connect_peer every seeded torrent to every seed target (libtorrent skips live connections)."""
        targets = [split_host_port(s.bittorrent) for s in self.node.cfg.seed_targets]
        n = 0
        for ih in list(self._item_of):
            for host, port in targets:
                n += self.session.connect_peer(ih, host, port)
        return n


def _peer_infos(moved: list[tuple[str, Any]]) -> list[tuple[str, list[tuple[str, int, int, int]]]]:
    """(infohash, [(ip, port, total_upload, total_download)]) for BitTorrent peers. Blocking."""
    out = []
    for ih, h in moved:
        peers = []
        try:
            infos = h.get_peer_info()
        except RuntimeError:  # the torrent went away meanwhile
            continue
        for p in infos:
            if p.connection_type != lt.peer_info.standard_bittorrent:  # web seeds: counted by the HTTP side
                continue
            ip, port = p.ip
            peers.append((str(ip), int(port), int(p.total_upload), int(p.total_download)))
        out.append((ih, peers))
    return out


def _write_all(todo: list[tuple[Path, bytes]]) -> None:
    for path, data in todo:
        atomic_write(path, data)
