"""The `p2p` component: seeds every cached item, keeps resume data, accounts uploads.

Work lives in the store rows: CACHED items without `seeding` get a torrent (built from the piece
hashes stored by the pull pipeline, else hashed in an executor) and are added to the session in seed
mode; under `origins.require_checksum` an item no published checksum vouches for is not. At start,
items already seeding come back from their resume data (no recheck). Payload bytes are read at a
fixed interval from every torrent and connection and reconciled with the session's counters
(noded/p2p/ledger.py); they feed the traffic channels ("peer:<name>", "seed:<name>", "swarm",
"unattributed") and the item's last access (LRU).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout, UnsafePath, atomic_write
from noded.core.component import Node, supervise
from noded.core.logs import get_logger
from noded.core.model import PIECE_LENGTH, Item, State
from noded.core.safefs import DirRealpaths, lstat_regular
from noded.origins.schedule import Schedule
from noded.p2p import torrent as T
from noded.p2p.importer import configured_sources, import_configured, withdraw
from noded.p2p.ledger import SETTLE_AFTER, Charge, Directory, Ledger, PeerReading, TorrentReading, node_fingerprint
from noded.p2p.resume import SeedPlan, load_plan, remove_files, seed_params
from noded.p2p.session import TorrentSession
from noded.p2p.settings import session_settings

log = get_logger("noded.p2p")

UPDATE_INTERVAL = 1.0  # seconds between post_torrent_updates
SEED_SCAN_INTERVAL = 30.0  # fallback when a "cached" hint is lost
SWEEP_INTERVAL = 10.0  # seconds between readings of every torrent (the busy ones are read every round)
TOUCH_MIN_INTERVAL = 60.0  # at most one LRU write per item per minute
PAGE = 500
RESTORE_WINDOW = 2000  # torrents added but not yet confirmed by libtorrent, at most, during a restore
ADD_TIMEOUT = 60.0
CHARGE_SLICE = 500  # torrents' readings charged per turn of the loop


def split_host_port(hp: str) -> tuple[str, int]:
    host, _, port = hp.rpartition(":")
    return host.strip("[]"), int(port)


def keep_torrent(path: Path, infohash: str, data: bytes) -> bytes:
    """Store a .torrent for `infohash` unless a published one is there already: a torrent someone else
    made (its announce, url-list and comment) is kept and served byte for byte; one this node or another
    noded made is brought up to date. Returns the bytes now stored. Blocking."""
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        existing = None
    if existing is not None and existing != data and T.published_elsewhere(existing, infohash):
        return existing
    if existing != data:
        atomic_write(path, data)
    return data


class P2PEngine:
    name = "p2p"

    def __init__(
        self,
        node: Node,
        layout: CacheLayout | None = None,
        schedule: Schedule | None = None,
        *,
        restore_in_background: bool = False,
    ) -> None:
        self.node = node
        # In the background, start() returns once the restore is under way (the daemon: READY need not
        # wait for thousands of torrents); else start() returns with every seeded item back.
        self.restore_in_background = restore_in_background
        self.restore_total: int | None = None  # items marked seeding when the restore began
        self.restoring = False
        self.schedule = schedule
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        settings = session_settings(cfg.bittorrent)
        settings["peer_fingerprint"] = node_fingerprint(cfg.node.name)
        self.session = TorrentSession(settings)
        self._tasks: list[asyncio.Task[None]] = []
        self._item_of: dict[str, int] = {}  # infohash -> item id of torrents we seed
        self._touched: dict[int, float] = {}
        self.ledger = Ledger()
        self.accounting = True  # off only to measure what accounting costs
        self._account_lock = asyncio.Lock()
        self._active: set[str] = set()  # torrents read every round (connections, bytes, state changes)
        self._last_sweep = 0.0
        self.accounting_seconds = 0.0  # time spent reading and charging (status: what accounting costs)
        self.session.before_remove = self._read_one
        self.session.subscribe("peer_disconnected_alert", self._on_disconnect)
        self.session.subscribe("peer_connect_alert", self._on_connect)
        self.session.subscribe("tracker_error_alert", self._on_tracker_error)
        self.session.subscribe("tracker_reply_alert", self._on_tracker_reply)
        self.tracker_errors: dict[str, str] = {}  # tracker URL -> its last error, until it answers again
        self.restored = 0
        self.imported = 0
        # [origins.torrents] inputs imported (path or magnet -> (key, location url)): what a reload withdraws.
        self._sources: dict[str, tuple[str, str]] = {}
        self._offer_now = asyncio.Event()  # a reload wakes the seed-target loop
        self.restore_seconds: float | None = None
        self.seed_errors = 0
        self._started = False
        self.upload_cap = 0  # bytes/s the timetable may lower but never raise (a volunteer's limit); 0: none
        self._seed_lock = asyncio.Lock()  # one scan at a time: the loop and callers never race on a torrent

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.layout.ensure)
        self.ledger.directory = await loop.run_in_executor(None, self._resolve_directory)
        await self.session.start()
        if self.schedule is not None:
            self.schedule.on_change(self._apply_rates)
        self.imported, _ = await import_configured(self.node, self.layout, self._sources)
        self.restoring = True
        if not self.restore_in_background:
            await self._restore_once()
        self._started = True
        self._tasks = [
            supervise(self._updates_loop, "p2p-updates", self.node, self.name),
            supervise(self._seed_loop, "p2p-seed", self.node, self.name),
            supervise(self._resume_loop, "p2p-resume", self.node, self.name),
            supervise(self._targets_loop, "p2p-targets", self.node, self.name),
        ]
        log.info(
            "p2p.started",
            port=self.session.listen_port,
            restored=self.restored,
            seconds=self.restore_seconds,
            restoring=self.restoring,
        )

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.save_all_resume(), 5)
            try:  # the last bytes of this run, before the session goes: two rounds a tick apart
                await asyncio.wait_for(self._account(sweep=True), 5)
                await asyncio.sleep(SETTLE_AFTER)
                await asyncio.wait_for(self._account(sweep=True), 5)
            except Exception as e:
                log.warning("p2p.final_accounting_failed", error=str(e))
        await self.session.stop()
        self._started = False

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for ts in self.session.states.values():
            states[ts.state] = states.get(ts.state, 0) + 1
        state = "stopped"
        if self._started:
            # Torrents still coming back after a restart: the node serves, but does not seed all it holds.
            state = f"restoring {self.restored}/{self.restore_total or 0}" if self.restoring else "running"
        return {
            "state": state,
            "restore": {
                "done": not self.restoring,
                "restored": self.restored,
                "total": self.restore_total,
            },
            "listen_port": self.session.listen_port,
            "torrents": len(self.session.handles),
            "seeding": sum(1 for ts in self.session.states.values() if ts.is_seeding),
            "torrent_states": states,
            "restored": self.restored,
            "imported": self.imported,
            "restore_seconds": self.restore_seconds,
            "checking_seen": len(self.session.checking_seen),
            "seed_errors": self.seed_errors,
            "tracker_errors": dict(self.tracker_errors),
            "accounting_seconds": round(self.accounting_seconds, 3),
            "unattributed_bytes": dict(self.ledger.unattributed),
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
        self.ledger.directory = await asyncio.get_running_loop().run_in_executor(None, self._resolve_directory)
        self.node.notify("cached")  # a scan applies a changed origins.require_checksum at once
        self._offer_now.set()  # new seed targets hear from us now, and a new interval starts now
        await self.reimport()

    async def reimport(self) -> None:
        """[origins.torrents] as configured now: new inputs imported (a changed file re-read), inputs no
        longer configured withdrawn. An input that fails now is reported and keeps what it had."""
        configured = configured_sources(self.node)
        fresh: dict[str, tuple[str, str]] = {}
        self.imported, _ = await import_configured(self.node, self.layout, fresh)
        kept = {s: loc for s, loc in self._sources.items() if s in configured}
        now = {**kept, **fresh}
        still = set(now.values())
        await withdraw(
            self.node, sorted({loc for s, loc in self._sources.items() if s not in now and loc not in still})
        )
        self._sources = now

    def public_endpoint(self) -> str | None:
        """host:port BitTorrent clients reach this node at: the configured public address, else the
        listen address when it names one host (a wildcard says nothing a client could use)."""
        bt = self.node.cfg.bittorrent
        if bt.public_address:
            return bt.public_address
        for part in bt.listen_interfaces.split(","):
            host, port = split_host_port(part.strip())
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:  # an interface name
                continue
            if ip.is_unspecified:
                continue
            port = self.session.listen_port or port
            return f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
        return None

    # -- restore at start ------------------------------------------------------------------
    async def _restore_once(self) -> None:
        """The restore, timed; seed scans wait for it (both add torrents). Run again after a crash, it
        skips what is in the session already."""
        store = self.node.store
        self.restore_total = await store.run(store.count_seeding)
        async with self._seed_lock:
            if not self.restoring:
                return
            t0 = time.monotonic()
            await self._restore()
            self.restore_seconds = round(time.monotonic() - t0, 3)
            self.restoring = False
        log.info("p2p.restored", restored=self.restored, seconds=self.restore_seconds, errors=self.seed_errors)

    async def _restore(self) -> None:
        """Items marked seeding come back with their resume data or in seed mode: no recheck.

        At scale (thousands of items) this is most of a restart: the rows are read page by page, each
        page's files are checked and its add_torrent_params built in an executor while libtorrent adds
        the previous pages; at most `RESTORE_WINDOW` torrents are in flight."""
        loop = asyncio.get_running_loop()
        store = self.node.store
        after = 0
        in_flight: list[list[tuple[asyncio.Future[Any], SeedPlan]]] = []
        next_page = asyncio.ensure_future(store.run(store.items, states=[State.CACHED], after_id=0, limit=PAGE))
        while True:
            page = await next_page
            if not page:
                break
            after = page[-1].id
            next_page = asyncio.ensure_future(store.run(store.items, states=[State.CACHED], after_id=after, limit=PAGE))
            strict = self.node.cfg.origins.require_checksum
            for item in page:
                if item.seeding and item.withheld(strict):
                    log.warning("p2p.unverified_not_seeded", key=item.key, infohash=item.infohash)
                    await store.run(store.update_item, item.id, seeding=False)
            todo = [
                i
                for i in page
                if i.seeding and i.infohash and not i.withheld(strict) and i.infohash not in self.session.handles
            ]
            prepared = await loop.run_in_executor(None, self._prepare, todo)
            batch: list[tuple[asyncio.Future[Any], SeedPlan]] = []
            for item, p in zip(todo, prepared, strict=True):
                if isinstance(p, str):
                    log.warning("p2p.restore_skipped", key=item.key, reason=p)
                    await store.run(store.update_item, item.id, seeding=False)
                    continue
                plan, atp = p
                try:
                    batch.append((self.session.add_nowait(atp, plan.infohash), plan))
                except Exception as e:
                    log.warning("p2p.add_failed", infohash=plan.infohash, error=str(e))
                    self.seed_errors += 1
            in_flight.append(batch)
            while sum(len(b) for b in in_flight) > RESTORE_WINDOW:
                await self._settle_adds(in_flight.pop(0))
        for batch in in_flight:
            await self._settle_adds(batch)

    async def _settle_adds(self, batch: list[tuple[asyncio.Future[Any], SeedPlan]]) -> None:
        if batch:
            await asyncio.wait([f for f, _ in batch], timeout=ADD_TIMEOUT)
        for fut, plan in batch:
            self.session.forget_added(plan.infohash)
            err = (fut.exception() or None) if fut.done() and not fut.cancelled() else "no answer from libtorrent"
            if err is None:
                self._item_of[plan.infohash] = plan.item_id
                self.restored += 1
            else:
                log.warning("p2p.add_failed", infohash=plan.infohash, error=str(err))
                self.seed_errors += 1

    def _prepare(self, items: Iterable[Item]) -> list[tuple[SeedPlan, Any] | str]:
        """Each item's SeedPlan and add_torrent_params (parsing the torrent and resume data), or the
        reason it cannot be seeded as it is. Blocking."""
        out: list[tuple[SeedPlan, Any] | str] = []
        for plan in self._plans(items):
            if isinstance(plan, str):
                out.append(plan)
                continue
            try:
                out.append((plan, seed_params(plan)))
            except Exception as e:
                out.append(f"torrent {plan.infohash} cannot be read: {e}")
        return out

    def _plans(self, items: Iterable[Item]) -> list[SeedPlan | str]:
        out: list[SeedPlan | str] = []
        realpath = DirRealpaths()  # a page's files share a few directories: each is walked once
        for i in items:
            assert i.infohash is not None
            try:
                final = self.layout.final_path(i.key, realpath)
            except UnsafePath as e:
                out.append(str(e))
                continue
            out.append(load_plan(self.layout, i.id, i.infohash, final, i.size, i.mtime_ns, realpath))
        return out

    async def _add_plan(self, plan: SeedPlan) -> bool:
        try:
            atp = seed_params(plan, [str(t) for t in self.node.cfg.bittorrent.trackers])
            await self.session.add(atp, plan.infohash)
        except Exception as e:
            log.warning("p2p.add_failed", infohash=plan.infohash, error=str(e))
            self.seed_errors += 1
            return False
        self._item_of[plan.infohash] = plan.item_id
        return True

    # -- seeding newly cached items ----------------------------------------------------------
    async def _seed_loop(self) -> None:
        await self._restore_once()
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
            strict = self.node.cfg.origins.require_checksum
            for item in page:
                if item.withheld(strict):
                    # Seeded before the rule applied (a reload): offered no longer.
                    if item.infohash and item.infohash in self._item_of:
                        log.warning("p2p.unverified_not_seeded", key=item.key, infohash=item.infohash)
                        await self.remove_torrent(item.infohash)
                    continue
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
        size = lstat_regular(final, self.layout.root).st_size  # never a torrent of a symlink's target
        md5 = item.md5
        if pieces is None or md5 is None or pieces[0] != PIECE_LENGTH:
            raw, md5s = T.hash_files([final])
            pieces = (PIECE_LENGTH, raw)
            md5 = md5s[0]
        info = T.single_file_info(final.name, size, md5, pieces[1], source=bt.source_tag)
        seeds = T.web_seed_urls(item.key, item.urls, bt.web_seed_templates)
        data = T.encode_torrent(info, trackers=bt.trackers, web_seeds=seeds)
        ih = T.infohash_of(info)
        return ih, keep_torrent(self.layout.torrent_path(ih), ih, data)

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
        """Ask libtorrent for the resume data of every seeded torrent whose state changed since it was
        last saved, and write it (tmp + fsync + rename): with thousands of idle seeds, a save (and a
        clean stop) writes only the few that moved."""
        ihs = [ih for ih in self.session.handles if ih in self._item_of]
        blobs = await self.session.resume_data_many(ihs, timeout=5, only_if_modified=True)
        todo = [(self.layout.resume_path(ih), b) for ih, b in blobs.items()]
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

    async def account_now(self) -> None:
        """Read every torrent's and connection's counters now (before a torrent leaves, at shutdown)."""
        await self._account(sweep=True)

    def _on_tracker_error(self, a: Any) -> None:
        url = str(a.tracker_url())
        self.tracker_errors[url] = a.error_message() or a.error.message()
        self._show_tracker_problems()

    def _on_tracker_reply(self, a: Any) -> None:
        if self.tracker_errors.pop(str(a.tracker_url()), None) is not None:
            self._show_tracker_problems()

    def _show_tracker_problems(self) -> None:
        """A tracker that refuses, times out or answers garbage is a problem in /v1/status until it answers."""
        if not self.tracker_errors:
            self.node.problems.pop("trackers", None)
            return
        first = next(iter(self.tracker_errors.items()))
        self.node.problems["trackers"] = (
            f"{len(self.tracker_errors)} tracker(s) failing; {first[0]}: {first[1]}"[:300]
        )

    def _on_connect(self, a: Any) -> None:
        ih = self.session.infohash_of(a.handle)
        if ih is not None:  # read from the next round on, whatever the state updates say
            self._active.add(ih)

    def _on_disconnect(self, a: Any) -> None:
        ih = self.session.infohash_of(a.handle)
        if ih is None:
            return
        self._active.add(ih)
        address, port = a.endpoint
        self.ledger.closed(ih, str(address), int(port), a.pid.to_bytes())

    async def _read_one(self, infohash: str) -> None:
        """The final reading of a torrent about to leave the session."""
        h = self.session.handles.get(infohash)
        if h is None:
            return
        async with self._account_lock:
            readings = await asyncio.get_running_loop().run_in_executor(None, _readings, [(infohash, h)])
            for r in readings:
                self._charge(self.ledger.torrent(r))
            self.ledger.forget(infohash)

    async def _account(self, *, sweep: bool = False) -> None:
        """Payload totals of the torrents and their connections' own counters, then the session's payload
        counters: the channels add up to what libtorrent moved. Each round reads the torrents that had
        connections, moved bytes or changed state since the last; a sweep every `SWEEP_INTERVAL` reads
        them all (nothing is lost in between: the counters are running totals), and only a sweep reads
        the session's counters (a session_stats alert carries every libtorrent metric: not once a second)
        and reconciles the torrents with the previous sweep's reading."""
        if not self.accounting:
            return
        touch: list[int] = []
        now = time.time()
        async with self._account_lock:
            t0 = time.perf_counter()
            sweep = sweep or time.monotonic() - self._last_sweep >= SWEEP_INTERVAL
            self._active |= self.session.take_updated()
            if sweep:
                self._last_sweep = time.monotonic()
                handles = list(self.session.handles.items())
            else:
                handles = [(ih, h) for ih, h in self.session.handles.items() if ih in self._active]
            readings = await asyncio.get_running_loop().run_in_executor(None, _readings, handles) if handles else []
            self._active = set()
            for n, r in enumerate(readings):
                if n and n % CHARGE_SLICE == 0:
                    await asyncio.sleep(0)  # a sweep of thousands of torrents must not hold the loop
                charges = self.ledger.torrent(r)
                if charges or r.peers:
                    self._active.add(r.infohash)
                self._charge(charges)
                item_id = self._item_of.get(r.infohash)
                uploaded = any(d == "out" for _, d, _ in charges)
                if item_id is not None and uploaded and now - self._touched.get(item_id, 0) >= TOUCH_MIN_INTERVAL:
                    touch.append(item_id)
                    self._touched[item_id] = now
            if not sweep:
                self.accounting_seconds += time.perf_counter() - t0
            else:
                # The session reading of the previous sweep against every torrent read now (a sweep or
                # more later, so the torrents have folded its bytes in), then a new one for the next.
                self._charge(self.ledger.settle(time.monotonic()))
                self.accounting_seconds += time.perf_counter() - t0  # the wait for the stats alert is idle
                at = time.monotonic()
                counters = await self.session.payload_counters()
                if counters is not None:
                    self.ledger.session(*counters, at)
        if touch:
            await self.node.store.run(self.node.store.touch, touch, now)

    def _charge(self, charges: list[Charge]) -> None:
        for channel, direction, n in charges:
            self.node.traffic.add(channel, "out" if direction == "out" else "in", n)

    def _resolve_directory(self) -> Directory:
        """Seed targets and peers by endpoint (address and port), peers also by their peer-id prefix.
        Blocking (DNS): run in an executor."""
        d = Directory()
        cfg = self.node.cfg
        pairs = [(p.bittorrent, f"peer:{p.name}") for p in cfg.peers]
        pairs += [(s.bittorrent, f"seed:{s.name}") for s in cfg.seed_targets]
        for hp, channel in pairs:
            host, port = split_host_port(hp)
            try:
                for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP):
                    d.endpoints[(str(info[4][0]), port)] = channel
            except OSError:
                d.endpoints[(host, port)] = channel
        for p in cfg.peers:
            d.fingerprints[node_fingerprint(p.name).encode()] = f"peer:{p.name}"
        return d

    async def _targets_loop(self) -> None:
        while True:
            self._offer_now.clear()
            self.offer_to_targets()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._offer_now.wait(), self.node.cfg.bittorrent.seed_target_interval)

    def offer_to_targets(self) -> int:
        """connect_peer every seeded torrent to every seed target (libtorrent skips live connections)."""
        targets = [split_host_port(s.bittorrent) for s in self.node.cfg.seed_targets]
        n = 0
        for ih in list(self._item_of):
            for host, port in targets:
                n += self.session.connect_peer(ih, host, port)
        return n


def _readings(handles: list[tuple[str, Any]]) -> list[TorrentReading]:
    """Payload totals of each torrent and of each of its BitTorrent connections. Blocking: status() and
    get_peer_info() wait on libtorrent's network thread."""
    out = []
    for ih, h in handles:
        try:
            st = h.status(0)
            infos = h.get_peer_info() if st.num_peers or st.total_payload_upload or st.total_payload_download else []
        except RuntimeError:  # the torrent went away meanwhile
            continue
        peers = []
        for p in infos:
            if p.connection_type != lt.peer_info.standard_bittorrent:  # web seeds: counted by the HTTP side
                continue
            ip, port = p.ip
            peers.append(PeerReading(str(ip), int(port), p.pid.to_bytes(), int(p.total_upload), int(p.total_download)))
        out.append(TorrentReading(ih, int(st.total_payload_upload), int(st.total_payload_download), tuple(peers)))
    return out


def _write_all(todo: list[tuple[Path, bytes]]) -> None:
    for path, data in todo:
        atomic_write(path, data)
