"""The cache component: disk accounting, reservations, eviction (the I/O side), pins, reconciliation.

Accounting counts allocated blocks (not apparent sizes): cached items (their recorded `disk_bytes`),
partial files, and reservations. A fetch reserves its size before it starts, so several fetches cannot
overshoot the budget together; a reservation counts as max(reserved, already written). Crossing the
high watermark evicts down to the low one; when nothing is evictable, new reservations wait and
`node.problems["cache"]` says why.

Eviction order per item: the store row is re-checked and marked EVICTED in one transaction, then the
P2P component drops the torrent, then the file is unlinked. A crash after the store write leaves at
most an orphan file, which startup reconciliation deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noded.cache import db as cachedb
from noded.cache import eviction
from noded.cache.layout import INTERNAL, CacheLayout, UnsafePath, disk_bytes
from noded.cache.verify import Verifier, mismatch
from noded.core.component import Node, cancel_task, supervise
from noded.core.hashing import hash_file
from noded.core.logs import get_logger
from noded.core.model import Item, State
from noded.core.quota import QuotaView
from noded.core.safefs import DirRealpaths, UnsafeFile, lstat_regular

log = get_logger("noded.cache")

TOUCH_FLUSH_INTERVAL = 5.0  # seconds: accesses are batched into one store write
WAIT_POLL = 2.0  # seconds: how often a fetch waiting for room looks again
# Items per eviction plan: a larger need is met in rounds, so no plan holds the store thread for long
# (planning 10,000 takes tens of ms; executing them takes far longer anyway).
PLAN_MAX_ITEMS = 10_000


class CacheFull(Exception):
    """The request can never fit (larger than the high watermark)."""


@dataclass(eq=False)
class Reservation:
    nbytes: int
    item_id: int | None = None
    path: Path | None = None  # the partial file being written, to count what is already on disk
    written: int = 0  # allocated bytes of `path` at the last measurement


@dataclass(frozen=True, slots=True)
class Snapshot:
    cached_items: int
    cached_bytes: int
    partial_bytes: int  # partial files not covered by a live reservation
    reserved_bytes: int  # sum over reservations of max(reserved, written)
    fs_free: int
    fs_pending: int  # what reservations will still write

    @property
    def used_bytes(self) -> int:
        return self.cached_bytes + self.partial_bytes

    @property
    def committed(self) -> int:
        return self.cached_bytes + self.partial_bytes + self.reserved_bytes


def _stat_tree(paths: Iterable[Path]) -> dict[Path, int]:
    out: dict[Path, int] = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            out[p] = disk_bytes(p.stat())
    return out


def _scan_partials(partial_dir: Path) -> dict[Path, int]:
    out: dict[Path, int] = {}
    try:
        with os.scandir(partial_dir) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    if e.is_file(follow_symlinks=False):
                        out[Path(e.path)] = disk_bytes(e.stat(follow_symlinks=False))
    except FileNotFoundError:
        pass
    return out


def _fs_free(path: Path) -> int:
    st = os.statvfs(path)
    return int(st.f_bavail) * int(st.f_frsize)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _rename(src: Path, dst: Path) -> bool:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        return False
    return True


class Cache:
    name = "cache"

    def __init__(self, node: Node, layout: CacheLayout | None = None) -> None:
        self.node = node
        cfg = node.cfg
        self.layout = layout or CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        # Free space is the smaller of the filesystem's and the quota's headroom (a shared host's
        # statvfs shows the whole array, not the user's quota).
        self.quota = QuotaView(self.layout.root, cfg.cache.quota)
        self._reservations: set[Reservation] = set()
        self._held: Counter[int] = Counter()  # item id -> users (pushing, verifying, serving...)
        self._touched: set[int] = set()
        self._admit_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._waiting = 0
        self._waiting_bytes = 0  # reservations queued for admission
        self._waiting_reason: str | None = None
        self._snap: Snapshot | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_flush = time.monotonic()
        self._last_check = time.monotonic()
        self.evicted_total = 0
        self.reconcile_report: dict[str, int] = {}
        # Paths the cache itself is renaming/deleting: the watcher ignores events for them.
        self.own_ops: set[Path] = set()
        # Symlinks and special files found in the inbox or the cache, never read: "inbox/<rel>" or
        # "cache/<key>" -> why. Shown as the problem "unsafe_files" while any is listed.
        self.refused: dict[str, str] = {}

    # -- files refused ------------------------------------------------------------------------
    def refuse(self, name: str, why: str) -> None:
        if self.refused.get(name) != why:
            log.error("cache.unsafe_file", file=name, reason=why)
        self.refused[name] = why
        self._show_refused()

    def unrefuse(self, name: str) -> None:
        if self.refused.pop(name, None) is not None:
            self._show_refused()

    def _show_refused(self) -> None:
        if not self.refused:
            self.node.problems.pop("unsafe_files", None)
            return
        first = ", ".join(f"{n} ({w})" for n, w in list(self.refused.items())[:5])
        more = f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
        self.node.problems["unsafe_files"] = (
            f"{len(self.refused)} symlink(s) or special file(s) refused, never published, served or pushed: "
            f"{first}{more}"
        )

    # -- configuration ----------------------------------------------------------------------
    @property
    def budget(self) -> eviction.Budget:
        c = self.node.cfg.cache
        budget = c.budget if c.quota is None else min(c.budget, c.quota)
        return eviction.Budget(budget, c.high_watermark, c.low_watermark, c.free_space_floor)

    def listed_since(self) -> float:
        return time.time() - self.node.cfg.cache.listing_max_age

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.layout.ensure)
        await self.reconcile()
        await self.evict_if_needed()  # a restart with a smaller budget takes effect at once
        self._task = supervise(self._run, "cache", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await self.flush_touches()

    def status(self) -> dict[str, Any]:
        s = self._snap
        b = self.budget
        return {
            "state": "running" if self._task else "stopped",
            "used_bytes": s.used_bytes if s else 0,
            "reserved_bytes": s.reserved_bytes if s else sum(r.nbytes for r in self._reservations),
            "budget": b.budget,
            "high_bytes": b.high_bytes,
            "low_bytes": b.low_bytes,
            "fs_free_bytes": s.fs_free if s else None,
            "quota": self._quota_status(),
            "cached_items": s.cached_items if s else None,
            "reservations": len(self._reservations),
            "waiting": self._waiting,
            "waiting_bytes": self._waiting_bytes,
            "waiting_reason": self._waiting_reason,
            "evicted_total": self.evicted_total,
        }

    # -- in use / access --------------------------------------------------------------------
    def in_use(self) -> set[int]:
        ids = {i for i, n in self._held.items() if n > 0}
        ids.update(r.item_id for r in self._reservations if r.item_id is not None)
        # Other components (R2 push, P2P) may say which items they are working on.
        for comp in self.node.components.values():
            fn = getattr(comp, "items_in_use", None)
            if comp is not self and callable(fn):
                try:
                    ids.update(fn())
                except Exception as e:
                    log.warning("cache.in_use_failed", component=getattr(comp, "name", "?"), error=str(e))
        return ids

    @contextlib.contextmanager
    def hold(self, item_id: int) -> Iterator[None]:
        """Mark an item in use (never evicted meanwhile): pushing, verifying, serving a read."""
        self._held[item_id] += 1
        try:
            yield
        finally:
            self._held[item_id] -= 1
            if self._held[item_id] <= 0:
                del self._held[item_id]

    def touch(self, item_id: int) -> None:
        """Record an access (BitTorrent upload, HTTP read, API request); flushed in batches."""
        self._touched.add(item_id)

    async def flush_touches(self) -> None:
        if not self._touched:
            return
        ids, self._touched = list(self._touched), set()
        store = self.node.store
        await store.run(store.touch, ids)
        self._last_flush = time.monotonic()

    # -- accounting -------------------------------------------------------------------------
    async def measure(self) -> Snapshot:
        store = self.node.store
        loop = asyncio.get_running_loop()
        n, cached = await store.run(cachedb.cached_bytes, store)
        partials, free = await loop.run_in_executor(None, self._scan_disk, cached)
        reserved = pending = 0
        covered: set[Path] = set()
        for r in self._reservations:
            r.written = partials.get(r.path, 0) if r.path is not None else 0
            if r.path is not None:
                covered.add(r.path)
            reserved += max(r.nbytes, r.written)
            pending += max(0, r.nbytes - r.written)
        orphan = sum(v for p, v in partials.items() if p not in covered)
        self._snap = Snapshot(n, cached, orphan, reserved, free, pending)
        return self._snap

    def _scan_disk(self, cached: int) -> tuple[dict[Path, int], int]:
        partials = _scan_partials(self.layout.partial_dir)
        # A reservation may write outside the partial dir (e.g. a torrent's own staging path).
        extra = [r.path for r in self._reservations if r.path is not None and r.path not in partials]
        partials.update(_stat_tree(extra))
        return partials, self.quota.free(_fs_free(self.layout.root), cached + sum(partials.values()))

    def _quota_status(self) -> dict[str, Any] | None:
        q = self.quota.last
        if q is None:
            return None
        return {"source": q.source, "limit_bytes": q.limit, "used_bytes": q.used, "headroom_bytes": q.headroom}

    async def fix_unaccounted(self) -> int:
        """Record disk_bytes/mtime_ns for cached rows another component published without them."""
        store = self.node.store
        rows = await store.run(cachedb.unaccounted_rows, store)
        if not rows:
            return 0
        updates = await asyncio.get_running_loop().run_in_executor(None, self._stat_rows, rows)
        await store.run(cachedb.record_stat, store, updates)
        return len(updates)

    def _stat_rows(self, rows: list[tuple[int, str]]) -> list[tuple[int, int, int]]:
        out = []
        realpath = DirRealpaths()
        for item_id, key in rows:
            try:
                st = self.layout.final_path(key, realpath).stat()
            except (OSError, UnsafePath):
                continue
            out.append((item_id, disk_bytes(st), st.st_mtime_ns))
        return out

    # -- reservations -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def reserve(
        self, nbytes: int, item_id: int | None = None, path: Path | None = None
    ) -> AsyncIterator[Reservation]:
        """Reserve room for `nbytes` before writing them; waits (evicting first) until they fit.

        Raises CacheFull when the size can never fit under the high watermark.
        """
        r = Reservation(eviction.alloc_estimate(nbytes), item_id, path)
        await self._admit(r)
        try:
            yield r
        finally:
            self._reservations.discard(r)
            self._changed.set()

    async def _admit(self, r: Reservation) -> None:
        b = self.budget
        if r.nbytes > b.high_bytes:
            raise CacheFull(
                f"{r.nbytes} bytes can never fit: the cache's high watermark is {b.high_bytes} bytes "
                f"({b.high_watermark:.0%} of a {b.budget}-byte budget)"
            )
        self._waiting += 1
        self._waiting_bytes += r.nbytes
        try:
            async with self._admit_lock:  # one admission at a time: FIFO, no two see the same free room
                while True:
                    snap = await self.measure()
                    need = eviction.bytes_to_free(b, snap.committed, r.nbytes, snap.fs_free, snap.fs_pending)
                    if need == 0:
                        self._reservations.add(r)
                        self._set_waiting(None)
                        return
                    plan = await self._plan(need)
                    if plan.evict and await self._execute(plan) > 0:
                        continue  # measure again: maybe it fits under the high watermark already
                    self._set_waiting(
                        f"fetches wait for space ({r.nbytes} bytes wanted): {plan.blocked_reason()}"
                        + (
                            f"; filesystem free {snap.fs_free} bytes, floor {b.free_space_floor}"
                            if snap.fs_free - snap.fs_pending - r.nbytes < b.free_space_floor
                            else ""
                        )
                    )
                    await self._wait_for_change()
        finally:
            self._waiting -= 1
            self._waiting_bytes -= r.nbytes

    def _set_waiting(self, reason: str | None) -> None:
        if reason == self._waiting_reason:
            return
        self._waiting_reason = reason
        if reason is None:
            self.node.problems.pop("cache", None)
            log.info("cache.unblocked")
        else:
            self.node.problems["cache"] = reason
            log.warning("cache.blocked", reason=reason)

    async def _wait_for_change(self) -> None:
        """Until a reservation ends or something is unpinned/woken, else a short poll.

        Durability changes (R2 confirms, an origin lists) live in the store; polling finds them without
        consuming the node's shared "pushed"/"cached" hints, which other components wait on.
        """
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), min(self.node.cfg.cache.check_interval, WAIT_POLL))

    def wake(self) -> None:
        """Something changed that may make items evictable (pushed, unpinned, listed): waiting fetches
        look again now instead of at the next poll. The R2 component may call this after a push."""
        self._changed.set()

    # -- eviction ---------------------------------------------------------------------------
    async def _plan(self, need: int) -> eviction.Plan:
        store = self.node.store
        return await store.run(cachedb.plan_eviction, store, need, self.in_use(), self.listed_since(), PLAN_MAX_ITEMS)

    async def _execute(self, plan: eviction.Plan) -> int:
        """Evict the planned items; returns how many were evicted."""
        store = self.node.store
        loop = asyncio.get_running_loop()
        done = 0
        for item_id in plan.evict:
            # Re-checked inside the write: a pin or a new user since the plan wins.
            item = await store.run(cachedb.mark_evicted, store, item_id, self.in_use(), self.listed_since())
            if item is None:
                continue
            await self.drop_torrent(item)
            try:
                path = self.layout.final_path(item.key)
            except UnsafePath:
                continue
            if await store.run(cachedb.path_in_use, store, item.key):
                continue
            self.own_ops.add(path)
            try:
                await loop.run_in_executor(None, _unlink, path)
            finally:
                self.own_ops.discard(path)
            done += 1
            self.evicted_total += 1
            log.info("cache.evicted", key=item.key, version=item.version, last_access=item.last_access)
        if done:
            self.node.notify("evicted")
        return done

    async def evict_if_needed(self) -> eviction.Plan | None:
        """Above the high watermark (or below the free-space floor): evict down to the low one."""
        async with self._admit_lock:
            snap = await self.measure()
            need = eviction.bytes_to_free(self.budget, snap.committed, 0, snap.fs_free, snap.fs_pending)
            if need == 0:
                return None
            target = snap.committed - need  # the level to reach, also across rounds (hysteresis)
            while True:
                plan = await self._plan(need)
                done = await self._execute(plan) if plan.evict else 0
                snap = await self.measure()
                if plan.truncated and done and snap.committed > target:
                    need = snap.committed - target  # a large need is met in bounded rounds
                    continue
                if not plan.sufficient and not plan.truncated:
                    log.warning("cache.over_budget", reason=plan.blocked_reason())
                return plan

    async def _run(self) -> None:
        interval = self.node.cfg.cache.check_interval
        while True:
            try:
                await asyncio.sleep(min(interval, TOUCH_FLUSH_INTERVAL))
                if time.monotonic() - self._last_flush >= TOUCH_FLUSH_INTERVAL:
                    await self.flush_touches()
                if time.monotonic() - self._last_check < interval:
                    continue
                self._last_check = time.monotonic()
                await self.fix_unaccounted()
                await self.evict_if_needed()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("cache.check_failed", error=str(e), exc_info=True)
                await asyncio.sleep(interval)

    async def plan_report(self, limit: int) -> dict[str, Any]:
        """What eviction would do now and why each item (LRU first, up to `limit`) is or is not evictable."""
        store = self.node.store
        snap = await self.measure()
        b = self.budget
        # Fetches waiting for room count: the plan shows what it takes to let them in.
        need = eviction.bytes_to_free(b, snap.committed, self._waiting_bytes, snap.fs_free, snap.fs_pending)
        in_use = self.in_use()
        since = self.listed_since()
        p = await store.run(cachedb.plan_eviction, store, need, in_use, since, max(limit, PLAN_MAX_ITEMS))
        rows = await store.run(cachedb.explain, store, in_use, since, limit)
        chosen = set(p.evict)
        return {
            "budget": b.budget,
            "high_bytes": b.high_bytes,
            "low_bytes": b.low_bytes,
            "used_bytes": snap.used_bytes,
            "reserved_bytes": snap.reserved_bytes,
            "fs_free_bytes": snap.fs_free,
            "cached_items": snap.cached_items,
            "need_bytes": need,
            "waiting_bytes": self._waiting_bytes,
            "plan": {
                "evict": len(p.evict),
                "freed_bytes": p.freed,
                "sufficient": p.sufficient,
                "truncated": p.truncated,
                "kept": p.kept,
            },
            "items": [
                {
                    "key": r.key,
                    "version": r.version,
                    "disk_bytes": r.disk_bytes,
                    "last_access": r.last_access,
                    "evict": r.id in chosen,
                    "evictable": r.reason is None,
                    "reason": r.reason
                    or ("planned: least recently used" if r.id in chosen else "evictable; not needed now"),
                }
                for r in rows
            ],
        }

    # -- pins -------------------------------------------------------------------------------
    async def pin(self, key: str, pinned: bool) -> Item | None:
        store = self.node.store
        item = await store.run(cachedb.set_pinned, store, key, pinned)
        if item is not None and not pinned:
            self.wake()
        return item

    async def reverify(self, key: str) -> dict[str, Any]:
        """Re-hash one item now (e.g. a community "corrupt" report); corrupt -> quarantined -> wanted."""
        return (await Verifier(self).verify_keys([key])).as_dict()

    # -- files changed behind our back --------------------------------------------------------
    async def drop_torrent(self, item: Item) -> None:
        """Take the item's torrent out of the BitTorrent session, if there is one. A failure is logged
        and otherwise ignored: the file goes anyway, and libtorrent reports a missing file itself."""
        p2p = self.node.get("p2p")
        if not item.infohash or p2p is None or not hasattr(p2p, "remove_torrent"):
            return
        try:
            await p2p.remove_torrent(item.infohash)
        except Exception as e:
            log.warning(
                "cache.remove_torrent_failed", key=item.key, version=item.version, infohash=item.infohash, error=str(e)
            )

    async def external_change(self, item_id: int, reason: str, *, changed: bool) -> Item | None:
        """A cached file was deleted (changed=False) or modified (changed=True) outside noded.

        Modified bytes are moved aside to the quarantine area (never served); the row goes back to
        WANTED so the pull pipeline fetches the item again (an older, superseded version is EVICTED).
        """
        store = self.node.store
        item = await store.run(store.get_item, item_id)
        if item is None:
            return None
        loop = asyncio.get_running_loop()
        if changed:
            try:
                src = self.layout.final_path(item.key)
            except UnsafePath:
                return None
            if await store.run(cachedb.is_current, store, item):
                dst = self.layout.quarantine_path(item.id, item.version)
                self.own_ops.add(src)
                try:
                    await loop.run_in_executor(None, _rename, src, dst)
                finally:
                    self.own_ops.discard(src)
        new = await store.run(cachedb.mark_gone, store, item_id, reason, quarantined=changed)
        if new is None:
            return None
        await self.drop_torrent(item)
        log.warning("cache.external_change", key=item.key, version=item.version, reason=reason, state=new.state.value)
        self.node.notify("wanted")
        self._changed.set()
        return new

    async def unsafe_file(self, item_id: int, key: str, e: UnsafeFile) -> Item | None:
        """A cached item's path became a symlink or a special file: never read it; move it aside to the
        quarantine area and fetch the item again."""
        why = e.kind
        self.refuse(f"cache/{key}", f"{why}; moved aside to quarantine")
        return await self.external_change(item_id, f"cached file replaced by {why}", changed=True)

    async def recheck(self, item_id: int, reason: str) -> Item | None:
        """Same size, new mtime: re-hash (the only case where the cache reads a file by itself) and
        keep the copy if its bytes still match the record; otherwise quarantine and fetch again."""
        store = self.node.store
        item = await store.run(store.get_item, item_id)
        if item is None or item.state is not State.CACHED:
            return None
        try:
            path = self.layout.final_path(item.key)
        except UnsafePath:
            return None
        loop = asyncio.get_running_loop()
        try:
            with self.hold(item.id):
                h = await loop.run_in_executor(None, hash_file, path)
                st = await loop.run_in_executor(None, path.stat)
        except FileNotFoundError:
            return await self.external_change(item_id, "file deleted from the cache outside noded", changed=False)
        except UnsafeFile as e:
            return await self.unsafe_file(item_id, item.key, e)
        why = mismatch(item, h, await store.run(store.get_pieces, item.id))
        if why is None and (item.sha256 or item.md5):
            await store.run(cachedb.record_stat, store, [(item.id, disk_bytes(st), st.st_mtime_ns)])
            log.info("cache.recheck_same_bytes", key=item.key, reason=reason)
            return await store.run(store.get_item, item.id)
        return await self.external_change(item_id, f"{reason}; {why or 'no recorded checksum'}", changed=True)

    # -- startup reconciliation ---------------------------------------------------------------
    async def reconcile(self) -> dict[str, int]:
        """Store vs disk by size and mtime_ns: a stat per cached file, no file is read."""
        store = self.node.store
        loop = asyncio.get_running_loop()
        rows = await store.run(cachedb.cached_rows, store)
        verdicts = await loop.run_in_executor(None, self._compare, rows)
        updates = [(i, d, m) for i, kind, d, m in verdicts if kind in ("adopt", "restat")]
        await store.run(cachedb.record_stat, store, updates)
        report: Counter[str] = Counter(kind for _, kind, _, _ in verdicts)
        for item_id, kind, _, _ in verdicts:
            if kind == "missing":
                await self.external_change(
                    item_id, "file missing from the cache (deleted outside noded)", changed=False
                )
            elif kind == "changed":
                await self.external_change(item_id, "file changed outside noded (size differs)", changed=True)
            elif kind.startswith("unsafe:"):
                key = next(k for i, k, *_ in rows if i == item_id)
                await self.unsafe_file(item_id, key, UnsafeFile(key, kind.removeprefix("unsafe:")))
            elif kind == "touched":
                await self.recheck(item_id, "file modified outside noded (mtime differs)")
        leftovers = await store.run(cachedb.evicted_leftovers, store)
        report["leftovers_removed"] = await loop.run_in_executor(None, self._remove_leftovers, leftovers)
        self.reconcile_report = dict(report)
        log.info("cache.reconciled", items=len(rows), **self.reconcile_report)
        return self.reconcile_report

    def _compare(
        self, rows: list[tuple[int, str, int, int | None, int | None, int]]
    ) -> list[tuple[int, str, int, int]]:
        out: list[tuple[int, str, int, int]] = []
        realpath = DirRealpaths()  # thousands of files share a few directories: each is walked once
        for item_id, key, _version, size, mtime_ns, dbytes in rows:
            try:
                st = lstat_regular(self.layout.final_path(key, realpath), self.layout.root, realpath)
            except UnsafePath:
                out.append((item_id, "missing", 0, 0))
                continue
            except UnsafeFile as e:
                out.append((item_id, f"unsafe:{e.kind}", 0, 0))
                continue
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    out.append((item_id, "missing", 0, 0))
                    continue
                raise
            d = disk_bytes(st)
            if size is not None and st.st_size != size:
                out.append((item_id, "changed", d, st.st_mtime_ns))
            elif mtime_ns is None:
                out.append((item_id, "adopt", d, st.st_mtime_ns))  # never recorded: trust the size
            elif st.st_mtime_ns != mtime_ns:
                out.append((item_id, "touched", d, st.st_mtime_ns))
            elif d != dbytes:
                out.append((item_id, "restat", d, st.st_mtime_ns))
            else:
                out.append((item_id, "ok", d, st.st_mtime_ns))
        return out

    def _remove_leftovers(self, rows: list[tuple[int, str]]) -> int:
        n = 0
        realpath = DirRealpaths()
        for _item_id, key in rows:
            try:
                p = self.layout.final_path(key, realpath)
            except UnsafePath:
                continue
            if p.is_file():
                _unlink(p)
                n += 1
        return n

    def is_internal(self, path: Path) -> bool:
        return path.is_relative_to(self.layout.root / INTERNAL)
