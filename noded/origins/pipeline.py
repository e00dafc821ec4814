"""Component "origins": periodic catalog refresh into the store, and the pull pipeline.

Refresh: each enabled adapter lists its origin; every valid entry goes through `store.upsert_entry`
(a changed checksum becomes a new version, nothing is ever deleted by a refresh), rejected entries and
failed pages are logged per origin and leave what was known untouched.

Pull: WANTED rows (and FETCHING rows left by a crash) are taken under a global cap; each tries its
sources in order (`sources_first`, e.g. the peer over BitTorrent; then the HTTP origins by configured
preference, healthy hosts first; then `sources_last`, e.g. R2), each source under a per-origin cap.
An item at two or more HTTP locations with a published checksum, and no peer offering it, is first
pulled from all of those locations at once (`multisource`); the sources one by one are the fallback.
Bytes are verified against every checksum the origins published, then renamed into place, and the
row becomes CACHED (with piece hashes, disk bytes and mtime) in the same transaction. Bytes that do
not verify go to quarantine, that origin's copy of this version is marked suspect, and the next
source is tried. When none succeeds the row is FAILED with the reasons, and tried again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from noded.cache.layout import CacheLayout, UnsafePath, disk_bytes, publish
from noded.core.component import Node, supervise
from noded.core.config import Config
from noded.core.hashing import hash_file
from noded.core.logs import get_logger
from noded.core.model import CatalogEntry, HashResult, Item, State
from noded.core.safefs import lstat_regular
from noded.core.store import Store
from noded.origins.catalog.base import Adapter, CatalogError, Limits
from noded.origins.catalog.ia import InternetArchiveAdapter
from noded.origins.catalog.sourcecoop import SourceCoopAdapter
from noded.origins.catalog.stac import StacAdapter
from noded.origins.catalog.zenodo import ZenodoAdapter
from noded.origins.fetch import HttpClient, state_path
from noded.origins.multisource import MultiPull
from noded.origins.rendezvous import decide
from noded.origins.schedule import TokenBucket
from noded.origins.sources import FetchError, HostWaiting, OriginExtension, Source

log = get_logger("noded.origins")

UPSERT_BATCH = 500  # entries per store transaction: keeps the store thread responsive for others
POLL_SECONDS = 30.0  # pull loop wake-up when nobody notifies
DEFER_RECHECK = 10.0  # how often an item left to its rendezvous owner is looked at again
NO_SOURCE_RECHECK = 60.0  # how often an item nothing can serve is looked at again
CAUSE_RECHECK = 2.0  # how often a failure's cause (disk space, a host) is looked at again
MAX_RETRY_GROWTH = 16  # a failed item's retry interval grows up to this many times failed_retry_after
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


# -- pure policy ---------------------------------------------------------------------------------
def mismatch(item: Item, got: HashResult) -> str | None:
    """Why the bytes do not match what the origins published, or None when they do."""
    if item.size is not None and got.size != item.size:
        return f"size {got.size} != published {item.size}"
    if item.md5 and got.md5 != item.md5.lower():
        return f"md5 {got.md5} != published {item.md5}"
    if item.sha256 and got.sha256 != item.sha256.lower():
        return f"sha256 {got.sha256} != published {item.sha256}"
    if item.sha1 and got.sha1 and got.sha1 != item.sha1.lower():
        return f"sha1 {got.sha1} != published {item.sha1}"
    return None


def order_sources(
    first: Sequence[Source],
    middle: Sequence[Source],
    last: Sequence[Source],
    preference: Sequence[str],
    healthy: Callable[[Source], bool],
) -> list[Source]:
    """`first` as given; then the configured preference, healthy ones ahead; then `last` as given."""

    def rank(s: Source) -> tuple[int, int]:
        pos = preference.index(s.name) if s.name in preference else len(preference)
        return (0 if healthy(s) else 1, pos)

    return [*first, *sorted(middle, key=rank), *last]


def retry_delay(base: float, failures: int) -> float:
    """Seconds before a failed item is tried again: `base`, doubling per consecutive failure, bounded."""
    return base * float(min(MAX_RETRY_GROWTH, 1 << max(0, min(failures - 1, 30))))


@dataclass
class Failure:
    """Why an item is FAILED and when it is tried again (kept in memory; after a restart the
    store's updated_at + failed_retry_after stands in for the first retry)."""

    count: int
    at: float  # wall time of the failure
    next_at: float  # wall time of the next attempt
    cause: str  # "disk", "host", "checksum", "upstream", "internal"
    origin: str = ""
    hosts: frozenset[str] = frozenset()  # the hosts whose failure it was (retried when one is back)
    need_bytes: int = 0  # for "disk": room that must be free before trying again
    locations: dict[str, str] = field(default_factory=dict)  # source -> its error


# -- suspect copies (migration 7) ----------------------------------------------------------------
def mark_suspect(store: Store, key: str, version: int, location: str, reason: str) -> None:
    with store.tx() as c:
        c.execute(
            "INSERT INTO suspects(key, version, location, reason, at) VALUES(?,?,?,?,?) "
            "ON CONFLICT(key, version, location) DO UPDATE SET reason=excluded.reason, at=excluded.at",
            (key, version, location, reason[:500], time.time()),
        )


def suspects(store: Store, key: str, version: int, since: float = 0.0) -> dict[str, str]:
    """Origins whose copy of this version did not verify since `since` (older marks have expired)."""
    rows = store.conn.execute(
        "SELECT location, reason FROM suspects WHERE key=? AND version=? AND at>=?", (key, version, since)
    )
    return {str(r[0]): str(r[1]) for r in rows}


def other_version_cached(store: Store, item: Item) -> bool:
    row = store.conn.execute(
        "SELECT 1 FROM items WHERE key=? AND id<>? AND state=? LIMIT 1", (item.key, item.id, State.CACHED.value)
    ).fetchone()
    return row is not None


# -- the HTTP origins as pull sources --------------------------------------------------------------
class HttpOriginSource:
    """Fetches an item from the URLs an origin's listing gave for it."""

    def __init__(self, name: str, client: HttpClient, owns: Callable[[str], bool]) -> None:
        self.name = name
        self.client = client
        self.owns = owns
        self._hosts: dict[str, str] = {}  # netloc -> a URL on it, for each host this origin served from

    def urls(self, item: Item) -> list[str]:
        return [u for u in item.urls if self.owns(u)]

    async def offers(self, item: Item) -> bool:
        return bool(self.urls(item))

    def healthy(self) -> bool:
        """False while one of its hosts is backed off (failing, or asked us to wait)."""
        now = time.monotonic()
        return all(self.client.host(u).not_before <= now for u in self._hosts.values())

    async def fetch(self, item: Item, partial: Path) -> HashResult:
        last: FetchError | None = None
        waiting: HostWaiting | None = None
        for url in self.urls(item):
            self._hosts[urlsplit(url).netloc] = url
            try:
                return await self.client.download(
                    url,
                    partial,
                    channel=self.name,
                    expected_size=item.size,
                    want_sha1=bool(item.sha1),
                    # The bytes are checked against a published checksum at the end, so a partial left by
                    # another location of the same content may be continued from where it stopped.
                    any_location=bool(item.size and (item.md5 or item.sha256 or item.sha1)),
                )
            except HostWaiting as e:
                waiting = e if waiting is None or e.until < waiting.until else waiting
            except FetchError as e:
                last = e
        # A host that only asks for time serves the item later: that beats a hard failure elsewhere.
        raise waiting or last or FetchError(f"{self.name} lists no URL for {item.key}", retryable=False)


@dataclass
class MultiOutcome:
    """How a pull from every location at once ended."""

    done: bool  # cached, or failed for a reason no single location would change (the disk)
    bad: set[str] = field(default_factory=set)  # locations whose bytes did not match
    reasons: list[str] = field(default_factory=list)
    locations: dict[str, str] = field(default_factory=dict)  # location -> why it was dropped


def limits_of(cfg: Config) -> Limits:
    o = cfg.origins
    return Limits(max_entries=o.max_items_per_origin, max_item_size=o.max_item_size, max_page_bytes=o.max_page_bytes)


def build_adapters(cfg: Config, client: HttpClient) -> list[Adapter]:
    o = cfg.origins
    limits = limits_of(cfg)
    out: list[Adapter] = []
    if o.sourcecoop.enabled:
        out.append(SourceCoopAdapter(o.sourcecoop, client, limits, cfg.fetch))
    if o.zenodo.enabled:
        client.pace_host(o.zenodo.base_url, o.zenodo.requests_per_minute)
        client.limit_host(o.zenodo.base_url, o.zenodo.max_connections_per_host)
        out.append(ZenodoAdapter(o.zenodo, client, limits))
    if o.ia.enabled:
        client.pace_host(o.ia.base_url, o.ia.requests_per_minute)
        out.append(InternetArchiveAdapter(o.ia, client, limits))
    if o.stac.enabled:
        out.append(StacAdapter(o.stac, client, limits))
    return out


class Origins:
    name = "origins"

    def __init__(
        self,
        node: Node,
        *,
        down: TokenBucket | None = None,
        sources_first: list[Source] | None = None,
        sources_last: list[Source] | None = None,
    ) -> None:
        self.node = node
        # Other components add their sources here before start (the peer first, R2 last).
        self.sources_first: list[Source] = sources_first if sources_first is not None else []
        self.sources_last: list[Source] = sources_last if sources_last is not None else []
        # Catalog adapters other components provide (the inbox, R2 as an origin) join here before start.
        self.extra_adapters: list[Adapter] = []
        # Is this peer up? The P2P component replaces this; until then every peer counts as up.
        self.peer_up: Callable[[str], bool] = lambda name: True
        # Has every peer's inventory been asked for at least once? (P2P sets it.) Until then nothing is
        # pulled from an origin, or a restarting node would fetch what its peer already holds.
        self.peers_ready: Callable[[], bool] = lambda: True
        # May this wanted item be pulled whole? A volunteer node answers no: it holds pieces from the swarm.
        self.may_pull: Callable[[Item], bool] = lambda item: True
        self._started_at = time.time()
        # Origins other stages provide (R2), plugged in by the composition root; opened with open().
        self.extensions: list[OriginExtension] = []
        self._opened: list[tuple[OriginExtension, Source | None, Adapter | None]] = []
        self._deferred: dict[int, float] = {}  # item id -> wall time until which its owner is awaited
        self.failures: dict[int, Failure] = {}  # FAILED items: cause and next attempt
        self._failed_loaded = False
        self._fail_counts: dict[int, int] = {}  # consecutive failed pulls per item (until one succeeds)
        # Items a host asked to wait for: id -> (origin, until (wall), hosts, per-source reasons).
        self.waiting: dict[int, tuple[str, float, tuple[str, ...], dict[str, str]]] = {}
        self._problem_keys: set[str] = set()
        self.client = HttpClient(node.cfg.fetch, node.traffic, down)
        self.layout = CacheLayout(node.cfg.paths.cache_dir, node.cfg.paths.state_dir)
        self.adapters: list[Adapter] = []
        self.http_sources: list[HttpOriginSource] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._active: dict[int, asyncio.Task[None]] = {}
        self._per_origin: dict[str, int] = {}  # active pulls by the origin that listed the item first
        self._source_sems: dict[str, asyncio.Semaphore] = {}
        self._refresh_now = asyncio.Event()
        self.last_refresh: dict[str, dict[str, Any]] = {}
        self.pulled = 0
        self.failed = 0
        self.unverified_items = 0  # current items no location publishes a checksum for (after the last refresh)
        self.conflict_count = 0
        self.multi_pulls: dict[int, tuple[Item, MultiPull]] = {}  # pulls from several locations at once

    # -- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Everything but the background loops (tests drive refresh() and pull() directly)."""
        await asyncio.get_running_loop().run_in_executor(None, self.layout.ensure)
        await self.client.start()
        await self._open_extensions()
        self._configure(self.node.cfg)

    async def _open_extensions(self) -> None:
        opened = {id(ext) for ext, _, _ in self._opened}
        for ext in self.extensions:
            if id(ext) in opened or any(s.name == ext.name for s in self.sources_last):
                continue
            source, adapter = await ext.open()
            self._opened.append((ext, source, adapter))
            if source is not None:
                self.sources_last.append(source)
            if adapter is not None:
                self.extra_adapters.append(adapter)

    async def start(self) -> None:
        self._started_at = time.time()
        await self.open()
        self._tasks = [
            supervise(self._refresh_loop, "catalog-refresh", self.node, self.name),
            supervise(self._pull_loop, "pull-loop", self.node, self.name),
        ]

    def _configure(self, cfg: Config) -> None:
        mine = build_adapters(cfg, self.client)
        self.adapters = [*mine, *self.extra_adapters]
        # Extra adapters bring their own sources (e.g. R2 over boto3 in sources_last).
        self.http_sources = [HttpOriginSource(a.name, self.client, a.owns) for a in mine]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._active.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._active.clear()
        self._per_origin.clear()
        await self.client.close()
        for ext, source, adapter in reversed(self._opened):
            self.sources_last = [s for s in self.sources_last if s is not source]
            self.extra_adapters = [a for a in self.extra_adapters if a is not adapter]
            await ext.close()
        self._opened.clear()

    async def reload(self, cfg: Config) -> None:
        self._configure(cfg)
        self._refresh_now.set()

    def status(self) -> dict[str, Any]:
        return {
            "state": "running" if self._tasks else "stopped",
            "active_pulls": len(self._active),
            "pulled": self.pulled,
            "failed": self.failed,
            "unverified_items": self.unverified_items,
            "conflicts": self.conflict_count,
            "origins": [a.name for a in self.adapters],
            "last_refresh": self.last_refresh,
            "hosts": {h: s.status() for h, s in self.client.hosts.items()},
            "pulls": [{"key": it.key, "version": it.version, **mp.status()} for it, mp in self.multi_pulls.values()],
        }

    def update_problems(self) -> None:
        """`/v1/status` problems: failed items by origin and cause, waiting items, waiting hosts."""
        now = time.time()
        new: dict[str, str] = {}
        groups: dict[tuple[str, str], list[Failure]] = {}
        for f in self.failures.values():
            groups.setdefault((f.origin, f.cause), []).append(f)
        for (origin, cause), fs in groups.items():
            soonest = min(f.next_at for f in fs)
            new[f"items:{origin}:failed:{cause}"] = (
                f"{len(fs)} item(s) failed ({cause}); next retry in {max(0.0, soonest - now):.0f}s"
            )
        by_origin: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
        for origin, until, hosts, _ in self.waiting.values():
            if until > now:
                by_origin.setdefault(origin, []).append((until, hosts))
        for origin, ws in by_origin.items():
            names = sorted({h for _, hs in ws for h in hs})
            new[f"items:{origin}:waiting"] = (
                f"{len(ws)} item(s) waiting for {', '.join(names)} until {_iso(max(u for u, _ in ws))}"
            )
        for name, h in self.client.hosts.items():
            if h.waiting() > 0:
                new[f"host:{name}"] = f"waiting until {_iso(h.until_wall())}: {h.wait_reason}"
        for k in self._problem_keys - set(new):
            self.node.problems.pop(k, None)
        self.node.problems.update(new)
        self._problem_keys = set(new)

    def item_detail(self, item: Item) -> dict[str, Any]:
        """What /v1/items says about one item beyond its row: cause, next attempt, per-location errors."""
        out: dict[str, Any] = {}
        f = self.failures.get(item.id)
        if f is not None and item.state == State.FAILED:
            out.update(cause=f.cause, attempts=f.count, next_attempt=round(f.next_at, 3), locations=f.locations)
        w = self.waiting.get(item.id)
        if w is not None and item.state == State.WANTED:
            out.update(cause="waiting", waiting_for=list(w[2]), next_attempt=round(w[1], 3), locations=w[3])
        elif item.state == State.WANTED and self._deferred.get(item.id, 0) > time.time():
            out["next_attempt"] = round(self._deferred[item.id], 3)
        return out

    def refresh_soon(self) -> None:
        self._refresh_now.set()

    # -- catalog refresh ------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        """Each origin refreshes on its own task: a listing that hangs never holds up the others,
        and each origin's items are pulled as soon as its own listing is in. A refresh still running
        when the next round comes is left to finish (not started twice)."""
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for a in self.adapters:
                    t = running.get(a.name)
                    if t is None or t.done():
                        running[a.name] = asyncio.create_task(self.refresh(a), name=f"refresh-{a.name}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refresh_now.wait(), self.node.cfg.origins.refresh_interval)
                self._refresh_now.clear()
        finally:
            for t in running.values():
                t.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(a) for a in self.adapters))
        await self.retry_due()
        self.node.notify("wanted")

    async def refresh(self, adapter: Adapter) -> None:
        t0 = time.monotonic()
        try:
            listing = await adapter.list()
        except Exception as e:  # an adapter's failure (or bug) costs that origin's refresh only
            if not isinstance(e, CatalogError | FetchError):
                log.error("catalog.adapter_crashed", origin=adapter.name, error=repr(e), exc_info=True)
            log.warning("catalog.refresh_failed", origin=adapter.name, reason=str(e))
            self.node.problems[f"catalog:{adapter.name}"] = str(e)[:300]
            self.last_refresh[adapter.name] = {"ok": False, "at": time.time(), "error": str(e)[:300]}
            return
        for r in listing.rejected:
            log.warning("catalog.entry_rejected", origin=adapter.name, key=r.key, reason=r.reason)
        new = 0
        entries = listing.entries
        store = self.node.store
        # The listing is complete and trusted: locations it no longer names are gone from this origin.
        listed = {(e.key, e.urls[0] if e.urls else "") for e in entries}
        await store.run(store.prune_locations, adapter.name, listed)
        conflicts: list[str] = []
        preference = self.node.cfg.origins.preference
        for i in range(0, len(entries), UPSERT_BATCH):
            new += await store.run(_upsert_batch, store, entries[i : i + UPSERT_BATCH], preference, conflicts)
        for line in conflicts:
            log.warning("catalog.conflict", origin=adapter.name, conflict=line[:500])
        await self._show_conflicts()
        self.node.problems.pop(f"catalog:{adapter.name}", None)
        self.node.notify("wanted")  # this origin's items can be pulled now, whatever the others do
        self.last_refresh[adapter.name] = {
            "ok": True,
            "at": time.time(),
            "entries": len(entries),
            "rejected": len(listing.rejected),
            "new": new,
            "pages": listing.pages,
        }
        log.info(
            "catalog.refreshed",
            origin=adapter.name,
            entries=len(entries),
            rejected=len(listing.rejected),
            new=new,
            pages=listing.pages,
            seconds=round(time.monotonic() - t0, 3),
        )

    async def _show_conflicts(self) -> None:
        """status problems `conflict:<key>` = the names whose locations disagree, kept current."""
        store = self.node.store
        now = dict(await store.run(store.conflicts))
        self.unverified_items = await store.run(_count_unverified, store)
        self.conflict_count = len(now)
        for name in [p for p in self.node.problems if p.startswith("conflict:")]:
            if name.removeprefix("conflict:") not in now:
                self.node.problems.pop(name, None)
        for key, why in now.items():
            self.node.problems[f"conflict:{key}"] = why[:300]

    # -- pulls ------------------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        while True:
            try:
                await self.retry_due()
                await self._schedule()
            except Exception as e:  # a store hiccup must not end the loop
                log.error("pull.schedule_failed", error=str(e), exc_info=True)
            # Wake for the next deferred item's re-check and failed item's retry too, not only on notifications.
            now = time.time()
            soonest = min((t for t in self._deferred.values() if t > now), default=now + POLL_SECONDS)
            soonest = min([soonest, *(f.next_at for f in self.failures.values())])
            if any(f.cause in ("disk", "host") for f in self.failures.values()):
                soonest = min(soonest, now + CAUSE_RECHECK)
            self.update_problems()
            await self.node.wait("wanted", max(0.2, min(POLL_SECONDS, soonest - now)))

    async def _load_failed(self) -> None:
        """FAILED rows from before this start get their first retry at updated_at + failed_retry_after."""
        store = self.node.store
        base = self.node.cfg.origins.failed_retry_after
        for it in await store.run(store.items, states=[State.FAILED], limit=100_000):
            if it.id not in self.failures and not (it.error or "").startswith("superseded"):
                self.failures[it.id] = Failure(1, it.updated_at, it.updated_at + base, "unknown", it.origin)
        self._failed_loaded = True

    def _cleared(self, f: Failure, free: int | None = None) -> str | None:
        """Why the cause of a failure has gone away (so the item is retried at once), or None.
        `free`: bytes free on the cache filesystem, when the caller measured it."""
        if f.cause == "host":
            for name in f.hosts:
                h = self.client.hosts.get(name)
                if h is not None and h.last_success_wall > f.at and h.failures == 0 and h.waiting() == 0:
                    return f"host {name} is back"
        if f.cause == "disk" and free is not None and free >= f.need_bytes + self.node.cfg.cache.free_space_floor:
            return f"{free} bytes free again"
        return None

    def _free_bytes(self) -> int | None:
        # The cache's own measure counts a disk quota that statvfs cannot see; the filesystem otherwise.
        cache = self.node.components.get("cache")
        measured = cache.status().get("fs_free_bytes") if cache is not None else None
        if isinstance(measured, int):
            return measured
        try:
            return shutil.disk_usage(self.layout.partial_dir).free
        except OSError:
            return None

    async def retry_due(self) -> None:
        """Failed items whose timer ran out, or whose cause cleared, become WANTED again."""
        if not self._failed_loaded:
            await self._load_failed()
        now = time.time()
        store = self.node.store
        free: int | None = None
        if any(f.cause == "disk" for f in self.failures.values()):
            free = await asyncio.get_running_loop().run_in_executor(None, self._free_bytes)
        for item_id, f in list(self.failures.items()):
            why = "timer" if f.next_at <= now else self._cleared(f, free)
            if why is None:
                continue
            item = await store.run(store.get_item, item_id)
            self.failures.pop(item_id, None)
            if item is None or item.state != State.FAILED:
                continue
            self.update_problems()
            log.info("pull.retry", key=item.key, version=item.version, attempt=f.count + 1, why=why)
            await store.run(store.set_state, item.id, State.WANTED, error=item.error)

    async def _schedule(self) -> None:
        store = self.node.store
        cap = self.node.cfg.fetch.max_concurrent_items
        after = 0
        while len(self._active) < cap:
            batch = await store.run(store.items, states=[State.FETCHING, State.WANTED], after_id=after, limit=200)
            if not batch:
                return
            after = batch[-1].id
            now = time.time()
            for item in batch:
                if len(self._active) >= cap:
                    return
                if item.id in self._active or self._deferred.get(item.id, 0) > now:
                    continue
                if not self.may_pull(item):
                    continue
                if self._per_origin.get(item.origin, 0) >= self.node.cfg.fetch.max_items_per_origin:
                    continue  # its origin is at its cap: leave the global slot to items of other origins
                task = asyncio.create_task(self._pull_guarded(item), name=f"pull-{item.id}")
                self._active[item.id] = task
                self._per_origin[item.origin] = self._per_origin.get(item.origin, 0) + 1

    async def _pull_guarded(self, item: Item) -> None:
        try:
            await self.pull(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("pull.crashed", key=item.key, error=str(e), exc_info=True)
            with contextlib.suppress(Exception):
                await self._fail(item, f"internal: {e}", "internal")
        finally:
            self._active.pop(item.id, None)
            self._per_origin[item.origin] = self._per_origin.get(item.origin, 1) - 1
            self.node.notify("wanted")  # a slot is free

    def _sem(self, name: str) -> asyncio.Semaphore:
        sem = self._source_sems.get(name)
        if sem is None:
            sem = self._source_sems[name] = asyncio.Semaphore(self.node.cfg.fetch.max_items_per_origin)
        return sem

    @staticmethod
    def _healthy(src: Source) -> bool:
        healthy = getattr(src, "healthy", None)
        return bool(healthy()) if callable(healthy) else True

    def sources(self) -> list[Source]:
        return order_sources(
            self.sources_first,
            self.http_sources,
            self.sources_last,
            self.node.cfg.origins.preference,
            self._healthy,
        )

    async def pull(self, item: Item) -> None:
        store = self.node.store
        self.waiting.pop(item.id, None)
        loop = asyncio.get_running_loop()
        current = await store.run(store.get_current, item.key)
        if current is not None and current.version > item.version:
            await store.run(store.set_state, item.id, State.FAILED, error=f"superseded by version {current.version}")
            return
        try:
            final = self.layout.final_path(item.key)
        except UnsafePath as e:  # listings are validated; this guards rows from anywhere else
            await store.run(store.set_state, item.id, State.FAILED, error=str(e))
            return
        pinned = await store.run(_pinned_older, store, item)
        if pinned is not None:
            # A newer release would replace the bytes at the same path: the pin keeps the older one.
            reason = f"version {pinned} is pinned here; unpin it to take this newer release"
            if item.error != reason:
                log.info("pull.kept_pinned_version", key=item.key, version=item.version, pinned=pinned)
            if item.state != State.FAILED:
                await store.run(store.set_state, item.id, State.FAILED, error=reason)
            return
        if self.node.cfg.origins.require_checksum and item.verification == "unverified":
            reason = "no location publishes a checksum (origins.require_checksum)"
            if item.error != reason:
                log.warning("pull.unverified_refused", key=item.key, version=item.version)
            await store.run(store.set_state, item.id, State.FAILED, error=reason)
            return
        if await self._defer_to_owner(item):
            return
        partial = self.layout.partial_path(item.id, item.version)
        if await self._adopt_published(item, partial, final):
            return
        # A suspect copy gets another chance once failed items are retried (the origin may fix it).
        since = time.time() - self.node.cfg.origins.failed_retry_after
        bad = await store.run(suspects, store, item.key, item.version, since)
        reasons: list[str] = [f"{name}: suspect copy ({why})" for name, why in bad.items()]
        candidates: list[Source] = []
        for src in self.sources():
            if src.name in bad:
                continue
            try:
                if await src.offers(item):
                    candidates.append(src)
            except Exception as e:
                reasons.append(f"{src.name}: offers() failed: {e}")
        if not candidates and not bad:
            # Nothing can serve it now (no origin lists it, peer and R2 lack it): not a failed pull.
            # The row keeps its state and error (e.g. the cache's "deleted by hand") and is looked at again later.
            if item.state == State.FETCHING:
                await store.run(store.set_state, item.id, State.WANTED, error=item.error)
            if item.id not in self._deferred:
                log.info("pull.no_source", key=item.key, version=item.version)
            self._deferred[item.id] = time.time() + NO_SOURCE_RECHECK
            return
        cache = self.node.get("cache")
        reserve = getattr(cache, "reserve", None)
        ctx: contextlib.AbstractAsyncContextManager[Any] = (
            # The partial's path: the cache counts the reservation as max(reserved, written), once, not the
            # bytes on disk again as a stray partial.
            reserve(item.size or 0, item_id=item.id, path=partial) if reserve is not None else contextlib.nullcontext()
        )
        async with ctx:
            if item.state != State.FETCHING:
                item = await store.run(store.set_state, item.id, State.FETCHING, error=None)
            waits: list[HostWaiting] = []
            locations: dict[str, str] = {}
            hosts: set[str] = set()
            checksum = False
            outcome = await self._pull_multi(item, partial, final, candidates)
            if outcome is not None:
                if outcome.done:
                    return
                # What it learned: locations that served bad bytes are not tried one by one either.
                candidates = [s for s in candidates if s.name not in outcome.bad]
                reasons.extend(outcome.reasons)
                locations.update(outcome.locations)
            for src in candidates:
                log.info("pull.start", key=item.key, version=item.version, source=src.name, size=item.size)
                t0 = time.monotonic()
                try:
                    async with self._sem(src.name):
                        result = await src.fetch(item, partial)
                except HostWaiting as e:
                    waits.append(e)
                    reasons.append(f"{src.name}: {e}")
                    locations[src.name] = str(e)
                    continue
                except OSError as e:
                    if e.errno not in _DISK_FULL:
                        raise
                    # Every other source would hit the same full disk: stop here, retry once there is room.
                    reason = f"disk full writing {partial.name}: {e.strerror}"
                    log.warning("pull.disk_full", key=item.key, source=src.name, reason=reason)
                    await asyncio.get_running_loop().run_in_executor(None, _discard_partial, partial)
                    await self._fail(item, reason, "disk", locations={src.name: reason})
                    return
                except FetchError as e:
                    locations[src.name] = str(e)
                    if isinstance(src, HttpOriginSource) and e.retryable:
                        hosts.update(urlsplit(u).netloc for u in src.urls(item))
                    reasons.append(f"{src.name}: {e}")
                    log.warning("pull.source_failed", key=item.key, source=src.name, reason=str(e))
                    if e.suspect:
                        await self._quarantine(item, partial, src.name, str(e))
                    continue
                problem = mismatch(item, result)
                published = await store.run(store.published_pieces, item.key, item.size)
                if published is not None and published[0] != result.piece_length:
                    published = None  # another piece length: nothing to compare piece by piece
                if problem is None and published is not None and published[1] != result.pieces:
                    problem = "piece hashes differ from the published torrent's"
                if problem is not None and published is not None:
                    repaired = await self._repair(item, partial, result, published, src, candidates)
                    if repaired is not None:
                        await store.run(mark_suspect, store, item.key, item.version, src.name, problem)
                        result, problem = repaired, None
                if problem is not None:
                    locations[src.name] = f"{problem} (quarantined)"
                    checksum = True
                    reasons.append(f"{src.name}: {problem} (quarantined)")
                    log.warning("pull.checksum_mismatch", key=item.key, source=src.name, reason=problem)
                    await self._quarantine(item, partial, src.name, problem)
                    continue
                st = await loop.run_in_executor(None, publish, partial, final)
                await self._commit(item, result, st)
                log.info(
                    "pull.cached",
                    key=item.key,
                    version=item.version,
                    source=src.name,
                    size=result.size,
                    seconds=round(time.monotonic() - t0, 3),
                )
                return
            if waits:
                # Asked to wait, not refused: back in the queue until the earliest host lets us in again.
                until = min(w.until for w in waits)
                why = "; ".join(reasons)
                self.client.log_limited(
                    "pull.waiting",
                    f"item {item.id}",
                    key=item.key,
                    hosts=[w.host for w in waits],
                    until=round(until, 3),
                )
                await store.run(store.set_state, item.id, State.WANTED, error=f"waiting: {why}"[:2000])
                self._deferred[item.id] = until
                self.waiting[item.id] = (item.origin, until, tuple(sorted({w.host for w in waits})), locations)
                self.update_problems()
                return
            reason = "; ".join(reasons) or "no source offers it"
            cause = "checksum" if checksum else "host" if hosts else "upstream"
            await self._fail(item, reason, cause, hosts=frozenset(hosts), locations=locations)

    def multi_locations(self, item: Item, candidates: Sequence[Source]) -> list[tuple[str, str]]:
        """The (origin, url) pairs one pull may take segments from at once, or [] when it should not:
        a peer source ranks first (BitTorrent takes it), fewer than two HTTP locations, or nothing to
        check the assembled bytes against (locations' validators differ, only a checksum ties them)."""
        cfg = self.node.cfg.fetch
        if not cfg.multi_location or not candidates or not isinstance(candidates[0], HttpOriginSource):
            return []
        if not item.size or not (item.md5 or item.sha256 or item.sha1):
            return []
        out: list[tuple[str, str]] = []
        for src in candidates:
            if isinstance(src, HttpOriginSource):
                out.extend((src.name, u) for u in src.urls(item) if (src.name, u) not in out)
        return out if len(out) >= 2 else []

    async def _pull_multi(
        self, item: Item, partial: Path, final: Path, candidates: Sequence[Source]
    ) -> MultiOutcome | None:
        """Every HTTP location at once; None when the item is not pulled that way."""
        pairs = self.multi_locations(item, candidates)
        if not pairs:
            return None
        assert item.size is not None
        store = self.node.store
        published = await store.run(store.published_pieces, item.key, item.size)

        async def bad_bytes(name: str, reason: str) -> None:
            await store.run(mark_suspect, store, item.key, item.version, name, reason)

        mp = MultiPull(
            self.client, pairs, partial, size=item.size, want_sha1=bool(item.sha1), pieces=published,
            on_bad_bytes=bad_bytes,
        )  # fmt: skip
        for src in candidates:
            if isinstance(src, HttpOriginSource):
                for _, url in pairs:
                    if src.owns(url):
                        src._hosts[urlsplit(url).netloc] = url
        log.info("pull.start", key=item.key, version=item.version, source="multi", size=item.size,
                 locations=[u for _, u in pairs])  # fmt: skip
        t0 = time.monotonic()
        self.multi_pulls[item.id] = (item, mp)
        try:
            result = await mp.run()
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            reason = f"disk full writing {partial.name}: {e.strerror}"
            log.warning("pull.disk_full", key=item.key, source="multi", reason=reason)
            await asyncio.get_running_loop().run_in_executor(None, _discard_partial, partial)
            await self._fail(item, reason, "disk", locations={"multi": reason})
            return MultiOutcome(done=True)
        except (FetchError, HostWaiting) as e:
            # The bytes reached stay in the partial file: the locations one by one continue from there.
            log.warning("pull.multi_failed", key=item.key, reason=str(e), from_locations=mp.bytes_by_location(),
                        dropped=mp.dropped())  # fmt: skip
            return MultiOutcome(False, set(mp.bad_locations()), [f"multi: {e}"], mp.dropped())
        finally:
            self.multi_pulls.pop(item.id, None)
        problem = mismatch(item, result)
        same_plen = published is not None and published[0] == result.piece_length
        if problem is None and same_plen and published is not None and published[1] != result.pieces:
            problem = "piece hashes differ from the published torrent's"
        if problem is not None:
            # Which location it was cannot be told without piece hashes: each is tried alone next.
            log.warning("pull.checksum_mismatch", key=item.key, source="multi", reason=problem,
                        from_locations=mp.bytes_by_location())  # fmt: skip
            await asyncio.get_running_loop().run_in_executor(None, _discard_partial, partial)
            return MultiOutcome(False, set(mp.bad_locations()), [f"multi: {problem}"], {})
        st = await asyncio.get_running_loop().run_in_executor(None, publish, partial, final)
        await self._commit(item, result, st)
        log.info(
            "pull.cached",
            key=item.key,
            version=item.version,
            source="multi",
            size=result.size,
            seconds=round(time.monotonic() - t0, 3),
            from_locations=mp.bytes_by_location(),
            dropped=mp.dropped(),
            repaired_pieces=mp.repaired_pieces,
        )
        return MultiOutcome(done=True)

    async def _fail(
        self,
        item: Item,
        reason: str,
        cause: str,
        *,
        hosts: frozenset[str] = frozenset(),
        locations: dict[str, str] | None = None,
    ) -> None:
        """FAILED with the reason; the item's own timer (growing per failure) brings it back."""
        self.failed += 1
        count = self._fail_counts[item.id] = self._fail_counts.get(item.id, 0) + 1
        if len(self._fail_counts) > 200_000:
            self._fail_counts = {item.id: count}  # bounded; forgetting only shortens a retry interval
        now = time.time()
        delay = retry_delay(self.node.cfg.origins.failed_retry_after, count)
        self.failures[item.id] = Failure(
            count,
            now,
            now + delay,
            cause,
            item.origin,
            hosts,
            item.size or 0,
            {k: v[:500] for k, v in (locations or {}).items()},
        )
        self.update_problems()
        log.warning(
            "pull.failed", key=item.key, version=item.version, cause=cause, attempt=count, retry_in=delay, reason=reason
        )
        await self.node.store.run(self.node.store.set_state, item.id, State.FAILED, error=reason[:2000])

    async def _repair(
        self,
        item: Item,
        partial: Path,
        got: HashResult,
        published: tuple[int, bytes],
        bad_source: Source,
        candidates: Sequence[Source],
    ) -> HashResult | None:
        """Re-fetch only the pieces whose sha1 differs from the published torrent's, from other HTTP
        locations; the hashes of the repaired file, or None when it cannot be repaired that way."""
        plen, hashes = published
        if item.size is None or got.piece_length != plen or len(got.pieces) != len(hashes):
            return None
        n = len(hashes) // 20
        bad = [i for i in range(n) if got.pieces[i * 20 : i * 20 + 20] != hashes[i * 20 : i * 20 + 20]]
        if not bad or 2 * len(bad) > n:
            return None  # most of it is wrong: a whole fetch from the next location is no worse
        others = [s for s in candidates if isinstance(s, HttpOriginSource) and s is not bad_source]
        loop = asyncio.get_running_loop()
        for i in bad:
            start, end = i * plen, min(item.size, (i + 1) * plen) - 1
            if not await self._fetch_piece(item, partial, others, start, end, hashes[i * 20 : i * 20 + 20]):
                log.warning("pull.repair_failed", key=item.key, piece=i)
                return None
        result = await loop.run_in_executor(None, lambda: hash_file(partial, want_sha1=bool(item.sha1)))
        if mismatch(item, result) is not None or result.pieces != hashes:
            return None
        log.info("pull.repaired", key=item.key, version=item.version, source=bad_source.name, pieces=bad)
        return result

    async def _fetch_piece(
        self, item: Item, partial: Path, sources: Sequence[HttpOriginSource], start: int, end: int, want: bytes
    ) -> bool:
        loop = asyncio.get_running_loop()
        for src in sources:
            for url in src.urls(item):
                try:
                    reply = await self.client.get_bytes(
                        url,
                        channel=src.name,
                        headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                        max_bytes=end - start + 1,
                    )
                except FetchError as e:
                    log.info("pull.repair_source_failed", key=item.key, source=src.name, reason=str(e))
                    continue
                body = reply.body
                if reply.status != 206 or len(body) != end - start + 1:
                    continue
                if await loop.run_in_executor(None, _piece_sha1, body) != want:
                    continue
                await loop.run_in_executor(None, _pwrite, partial, start, body)
                return True
        return False

    def owner_wait(self, item: Item, now: float | None = None) -> float | None:
        """Until when to leave `item` to the peer that ranks first for it, or None to go ahead."""
        cfg = self.node.cfg
        if not cfg.peers:
            return None
        now = time.time() if now is None else now
        up = [p.name for p in cfg.peers if self.peer_up(p.name)]
        d = decide(item.key, cfg.node.name, up, [], waited=now - item.created_at, peer_wait=cfg.fetch.peer_wait)
        return item.created_at + cfg.fetch.peer_wait if d.action == "wait" else None

    async def _defer_to_owner(self, item: Item) -> bool:
        """Fetch once, replicate: while another node owns the first fetch, only a peer source may serve."""
        cfg = self.node.cfg
        if cfg.peers and not self.peers_ready() and time.time() < self._started_at + cfg.fetch.peer_wait:
            if item.state == State.FETCHING:
                await self.node.store.run(self.node.store.set_state, item.id, State.WANTED, error=None)
            self._deferred[item.id] = time.time() + 1.0  # the first inventory round is due any moment
            return True
        until = self.owner_wait(item)
        if until is None:
            self._deferred.pop(item.id, None)
            return False
        for src in self.sources_first:
            with contextlib.suppress(Exception):
                if await src.offers(item):
                    return False  # the owner (or any peer) has it: take it from there
        if item.state == State.FETCHING:
            await self.node.store.run(self.node.store.set_state, item.id, State.WANTED, error=None)
        if item.id not in self._deferred:
            log.info("pull.deferred", key=item.key, until=round(until, 3))
        # Look again soon: the peer may have it long before the wait is over.
        self._deferred[item.id] = min(until, time.time() + DEFER_RECHECK)
        return True

    async def _adopt_published(self, item: Item, partial: Path, final: Path) -> bool:
        """A crash between rename and commit leaves verified bytes at the final path: take them."""
        if not (item.md5 or item.sha256):
            return False
        loop = asyncio.get_running_loop()

        def look() -> bool:
            if partial.exists():
                return False
            try:  # never a symlink or special file left at the final path
                st = lstat_regular(final, self.layout.root)
            except OSError:
                return False
            return item.size is None or st.st_size == item.size

        if not await loop.run_in_executor(None, look):
            return False
        if await self.node.store.run(other_version_cached, self.node.store, item):
            return False  # the bytes there belong to another (older) version: not worth hashing
        result = await loop.run_in_executor(None, lambda: hash_file(final, want_sha1=bool(item.sha1)))
        if mismatch(item, result) is not None:
            return False  # an older version's bytes: fetch as usual (they stay until replaced)
        st = await loop.run_in_executor(None, final.stat)
        await self._commit(item, result, st)
        log.info("pull.adopted", key=item.key, version=item.version)
        return True

    async def _commit(self, item: Item, result: HashResult, st: os.stat_result) -> None:
        store = self.node.store

        def commit() -> None:
            with store.tx():
                store.set_pieces(item.id, result.piece_length, result.pieces)
                store.set_state(
                    item.id,
                    State.CACHED,
                    error=None,
                    size=result.size,
                    md5=result.md5,
                    sha256=result.sha256,
                    sha1=result.sha1 or item.sha1,
                    disk_bytes=disk_bytes(st),
                    mtime_ns=st.st_mtime_ns,
                    verified_at=time.time(),
                )
                # Older versions shared the final path: their bytes were just replaced.
                rows = store.conn.execute(
                    "SELECT id FROM items WHERE key=? AND version<? AND state=?",
                    (item.key, item.version, State.CACHED.value),
                ).fetchall()
                for (old_id,) in rows:
                    store.set_state(old_id, State.EVICTED, error=f"superseded by version {item.version}")

        await store.run(commit)
        self._fail_counts.pop(item.id, None)
        self.failures.pop(item.id, None)
        self.waiting.pop(item.id, None)
        self.update_problems()
        self.pulled += 1
        self.node.notify("cached")

    async def _quarantine(self, item: Item, partial: Path, source: str, reason: str) -> None:
        target = self.layout.quarantine_path(item.id, item.version)

        def move() -> None:
            with contextlib.suppress(FileNotFoundError):
                state_path(partial).unlink()
            with contextlib.suppress(FileNotFoundError):
                os.replace(partial, target)

        await asyncio.get_running_loop().run_in_executor(None, move)
        await self.node.store.run(mark_suspect, self.node.store, item.key, item.version, source, reason)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _discard_partial(partial: Path) -> None:
    for p in (partial, state_path(partial)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _pinned_older(store: Store, item: Item) -> int | None:
    row = store.conn.execute(
        "SELECT version FROM items WHERE key=? AND version<? AND state=? AND pinned=1 LIMIT 1",
        (item.key, item.version, State.CACHED.value),
    ).fetchone()
    return None if row is None else int(row[0])


def _count_unverified(store: Store) -> int:
    row = store.conn.execute(
        "SELECT COUNT(*) FROM items i WHERE verification = 'unverified'"
        " AND version = (SELECT MAX(version) FROM items j WHERE j.key = i.key)"
    ).fetchone()
    return int(row[0])


def _piece_sha1(data: bytes) -> bytes:
    return hashlib.sha1(data, usedforsecurity=False).digest()  # BitTorrent v1 piece hash, not security


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _upsert_batch(
    store: Store, entries: Sequence[CatalogEntry], preference: Sequence[str], conflicts: list[str]
) -> int:
    """Runs on the store thread: one transaction per batch. Returns how many rows were created."""
    created = 0
    with store.tx():
        for e in entries:
            before = store.get_current(e.key)
            item, _ = store.upsert_entry(e, preference=preference, conflicts=conflicts)
            if before is None or item.id != before.id:
                created += 1
    return created
