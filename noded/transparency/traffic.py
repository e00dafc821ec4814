"""Persistence of the traffic counters: hourly buckets in the store, kept `traffic.retention_days`.

The flush takes the pending counts *on the store thread* and writes them there, and the reads that
merge stored buckets with still-pending counts run there too: the store thread serialises both, so
a count is never seen twice nor missed while a flush is in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from noded.core.component import Node, cancel_task, supervise
from noded.core.config import Config
from noded.core.counters import Counter, Traffic
from noded.core.logs import get_logger
from noded.core.store import Store
from noded.transparency.offpeak import hour_of_week, limits_in_force, load_profile, quiet_hours

log = get_logger("noded.traffic")

# The API's own requests are not load a big download competes with.
PROFILE_EXCLUDES = ("api",)


def flush_pending(store: Store, traffic: Traffic) -> int:
    """Add the pending counts to their hourly buckets in one transaction; returns the rows touched."""
    pending = traffic.take_pending()
    if not pending:
        return 0
    try:
        with store.tx() as c:
            c.executemany(
                "INSERT INTO traffic(hour, channel, direction, bytes, requests, errors) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(hour, channel, direction) DO UPDATE SET bytes = bytes + excluded.bytes, "
                "requests = requests + excluded.requests, errors = errors + excluded.errors",
                [(h, ch, d, n.bytes, n.requests, n.errors) for (h, ch, d), n in pending.items()],
            )
    except BaseException:
        traffic.restore_pending(pending)  # nothing counted is lost; the next flush retries
        raise
    return len(pending)


def prune_traffic(store: Store, before_hour: int) -> int:
    with store.tx() as c:
        return c.execute("DELETE FROM traffic WHERE hour < ?", (before_hour,)).rowcount


def buckets_since(store: Store, traffic: Traffic, since_hour: int) -> dict[tuple[int, str, str], Counter]:
    """Stored buckets from `since_hour` on, plus the counts not flushed yet (same thread as the flush)."""
    out: dict[tuple[int, str, str], Counter] = {}
    for h, ch, d, b, r, e in store.conn.execute(
        "SELECT hour, channel, direction, bytes, requests, errors FROM traffic WHERE hour >= ?", (since_hour,)
    ):
        out[(h, ch, d)] = Counter(b, r, e)
    for key, c in traffic.snapshot_pending().items():
        if key[0] >= since_hour:
            mine = out.setdefault(key, Counter())
            mine.bytes += c.bytes
            mine.requests += c.requests
            mine.errors += c.errors
    return out


def hourly_load(store: Store, since_hour: int) -> tuple[dict[int, int], int | None]:
    """Bytes per absolute hour (all channels but the API's), and the first hour with any record."""
    marks = ",".join("?" * len(PROFILE_EXCLUDES))
    rows = store.conn.execute(
        f"SELECT hour, SUM(bytes) FROM traffic WHERE hour >= ? AND channel NOT IN ({marks}) GROUP BY hour",  # noqa: S608
        (since_hour, *PROFILE_EXCLUDES),
    ).fetchall()
    first = store.conn.execute("SELECT MIN(hour) FROM traffic WHERE hour >= ?", (since_hour,)).fetchone()[0]
    return {int(h): int(b) for h, b in rows}, None if first is None else int(first)


class TrafficRecorder:
    """The component: flushes counters into buckets, prunes old ones, keeps the off-peak advice fresh."""

    name = "traffic"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.profile: list[float] = [0.0] * 168
        self.quiet: list[int] = []
        self.flushes = 0
        self.flush_errors = 0
        self._profile_hour: int | None = None
        self._last_prune = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh_profile(force=True)
        self._task = supervise(self._loop, "traffic-flush", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        # The last counts of this run go to disk before the store closes (the store stops after us).
        if self.node.store.is_open:
            try:
                await self.node.store.run(flush_pending, self.node.store, self.node.traffic)
            except Exception as e:
                log.error("traffic.final_flush_failed", error=str(e))

    async def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        await self.refresh_profile(force=True)

    def status(self) -> dict[str, Any]:
        return {
            "state": "running" if self._task else "stopped",
            "flushes": self.flushes,
            "flush_errors": self.flush_errors,
            "quiet_hours": self.quiet_hours_of_day(),
        }

    def quiet_hours_of_day(self) -> list[int]:
        """Quiet hours as UTC hours of the day, in time order from now."""
        return [h % 24 for h in self.quiet]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.traffic.flush_interval)
            try:
                await self.flush()
            except Exception as e:
                self.flush_errors += 1
                log.error("traffic.flush_failed", error=str(e))

    async def flush(self) -> None:
        store = self.node.store
        await store.run(flush_pending, store, self.node.traffic)
        self.flushes += 1
        now = time.time()
        if now - self._last_prune > 3600:
            self._last_prune = now
            cutoff = int(now // 3600) - self.cfg.traffic.retention_days * 24
            n = await store.run(prune_traffic, store, cutoff)
            if n:
                log.info("traffic.pruned", rows=n)
        await self.refresh_profile()

    async def refresh_profile(self, *, force: bool = False) -> None:
        """Recompute the hour-of-week profile once per hour (it only changes when an hour completes)."""
        now = time.time()
        now_hour = int(now // 3600)
        if not force and self._profile_hour == now_hour:
            return
        store = self.node.store
        since = now_hour - self.cfg.traffic.retention_days * 24
        loads, first = await store.run(hourly_load, store, since)
        self.profile = load_profile(loads, first, now_hour) if first is not None else [0.0] * 168
        self.quiet = quiet_hours(self.profile, now, self.cfg.traffic.quiet_hours)
        self._profile_hour = now_hour

    async def report(self) -> dict[str, Any]:
        """The body of GET /v1/traffic."""
        await self.refresh_profile()
        now = time.time()
        now_hour = int(now // 3600)
        store, traffic = self.node.store, self.node.traffic
        buckets = await store.run(buckets_since, store, traffic, now_hour - 23)
        by_hour: dict[int, dict[str, dict[str, int]]] = {}
        totals_24h: dict[str, dict[str, int]] = {}
        for (bh, ch, d), c in buckets.items():
            by_hour.setdefault(bh, {}).setdefault(ch, {"in": 0, "out": 0})[d] += c.bytes
            totals_24h.setdefault(ch, {"in": 0, "out": 0})[d] += c.bytes
        hours: list[dict[str, Any]] = []
        for h in range(now_hour - 23, now_hour + 1):
            channels = by_hour.get(h, {})
            hours.append(
                {
                    "hour_start": h * 3600,
                    "in": sum(v["in"] for v in channels.values()),
                    "out": sum(v["out"] for v in channels.values()),
                    "channels": channels,
                }
            )
        lim = limits_in_force(self.cfg.schedule, now)
        return {
            "now": now,
            "rate_window_seconds": traffic.window,
            "rates": traffic.rates(now),
            "totals_since_start": traffic.totals_by_channel(),
            "totals_24h": totals_24h,
            "last_24h": hours,
            "profile": {"timezone": "UTC", "index": "hour of week, Monday 00:00 = 0", "mean_bytes": self.profile},
            "limits": {"down": lim.down, "up": lim.up, "slot": lim.slot, "timezone": lim.timezone},
            "quiet_hours": self.quiet_hours_of_day(),
            "quiet_windows": [
                {"start": h * 3600, "end": (h + 1) * 3600, "expected_bytes": round(self.profile_at(h))}
                for h in self.quiet
            ],
        }

    def profile_at(self, abs_hour: int) -> float:
        return self.profile[hour_of_week(abs_hour)]
