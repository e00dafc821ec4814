"""Bandwidth timetable: weekday/hour slots with separate down/up limits, applied by token buckets.

`rates_at` is the pure policy (first matching slot wins, else the defaults; None = unlimited). The
`Schedule` component re-evaluates it at each hour boundary and on reload (SIGHUP), and adjusts the
two shared buckets in place, so transfers already running slow down or speed up at once. The HTTP pull
engine takes from `down`, the R2 pusher from `up`; the BitTorrent session has a rate limiter of its
own, which follows the same rates through `on_change`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from noded.core.component import Node, cancel_task, supervise
from noded.core.config import Config, ScheduleConfig
from noded.core.logs import get_logger
from noded.transparency.offpeak import limits_in_force

log = get_logger("noded.schedule")


def rates_at(cfg: ScheduleConfig, when: datetime) -> tuple[int | None, int | None]:
    """(down, up) bytes per second in force at `when` (an aware datetime): the rule the traffic
    statistics report too (offpeak.limits_in_force)."""
    limits = limits_in_force(cfg, when.timestamp())
    return limits.down, limits.up


class TokenBucket:
    """Bytes per second with a one-second burst; `rate=None` means unlimited (no waiting at all).

    Takers may run the bucket into debt and then sleep it off, so one large chunk never starves and
    the long-run rate over all takers is the configured one.
    """

    def __init__(self, rate: int | None = None, burst_seconds: float = 1.0) -> None:
        self.burst_seconds = burst_seconds
        self._lock = threading.Lock()
        self.rate: int | None = None
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self.set_rate(rate)

    def set_rate(self, rate: int | None) -> None:
        with self._lock:
            self._refill()
            self.rate = rate if rate and rate > 0 else None
            if self.rate is not None:
                self._tokens = min(self._tokens, self._capacity())

    def _capacity(self) -> float:
        return max(float(self.rate or 0) * self.burst_seconds, 64 * 1024)

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate is not None:
            self._tokens = min(self._capacity(), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` now; the seconds the taker must then wait (0 when unlimited or in credit).
        Safe from any thread: bodies are received by worker threads too."""
        if self.rate is None:
            return 0.0
        with self._lock:
            self._refill()
            self._tokens -= nbytes
            rate = self.rate
            return -self._tokens / rate if self._tokens < 0 and rate else 0.0

    async def take(self, nbytes: int) -> None:
        wait = self.reserve(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)


class Schedule:
    """Component "schedule": owns the node-wide `down` and `up` buckets."""

    name = "schedule"

    def __init__(self, cfg: ScheduleConfig, node: Node | None = None) -> None:
        self.cfg = cfg
        self.node = node  # where a crash of its loop is shown; None in tests of the buckets alone
        self.down = TokenBucket()
        self.up = TokenBucket()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # (down, up, until as a unix time): an operator's temporary override of the timetable (API).
        self.override: tuple[int | None, int | None, float] | None = None
        self._listeners: list[Callable[[int | None, int | None], None]] = []
        self.apply()

    def on_change(self, fn: Callable[[int | None, int | None], None]) -> None:
        """Call fn(down, up) now and whenever the rates in force change (None = unlimited)."""
        self._listeners.append(fn)
        fn(self.down.rate, self.up.rate)

    def set_override(self, down: int | None, up: int | None, seconds: float) -> None:
        self.override = (down, up, time.time() + seconds)
        self.apply()
        self._wake.set()

    def clear_override(self) -> None:
        self.override = None
        self.apply()

    def apply(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        if self.override is not None and now.timestamp() >= self.override[2]:
            log.info("schedule.override_expired")
            self.override = None
        if self.override is not None:
            down, up = self.override[0], self.override[1]
        else:
            down, up = rates_at(self.cfg, now)
        changed = (down, up) != (self.down.rate, self.up.rate)
        if changed:
            log.info("schedule.rates", down=down, up=up)
        self.down.set_rate(down)
        self.up.set_rate(up)
        if changed:
            for fn in list(self._listeners):
                try:
                    fn(self.down.rate, self.up.rate)
                except Exception as e:  # one listener's failure must not stop the others
                    log.warning("schedule.listener_failed", error=str(e))

    async def start(self) -> None:
        self._task = supervise(self._run, "schedule", self.node, self.name)

    async def _run(self) -> None:
        while True:
            now = datetime.now(UTC)
            nxt = (now + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
            wait = (nxt - now).total_seconds() + 0.5
            if self.override is not None:
                wait = min(wait, self.override[2] - now.timestamp() + 0.05)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, wait))
            self.apply()

    async def stop(self) -> None:
        await cancel_task(self._task)

    async def reload(self, cfg: Config) -> None:
        self.cfg = cfg.schedule
        self.apply()

    def status(self) -> dict[str, Any]:
        state = "running" if self._task else "stopped"
        out: dict[str, Any] = {"state": state, "down": self.down.rate, "up": self.up.rate}
        if self.override is not None:
            out["override_until"] = round(self.override[2], 3)
        return out
