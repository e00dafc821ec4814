"""Byte counters per channel and direction, with short-window rates.

Channels are low-cardinality names: each origin ("sourcecoop", "zenodo", "ia", "r2"), each peer
("peer:<name>"), "netcup"-style seed targets ("seed:<name>"), other BitTorrent clients ("swarm"),
BitTorrent payload no connection explains ("unattributed"), "webseed" (our HTTP mirror) and "api".
Counting is a dict update on the loop (cheap); persistence into hourly buckets happens in batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["in", "out"]


@dataclass
class Counter:
    bytes: int = 0
    requests: int = 0
    errors: int = 0


@dataclass
class Traffic:
    window: float = 10.0  # seconds over which current rates are averaged
    totals: dict[tuple[str, str], Counter] = field(default_factory=dict)
    # Not yet flushed to the store: (hour, channel, direction) -> Counter
    pending: dict[tuple[int, str, str], Counter] = field(default_factory=dict)
    _samples: deque[tuple[float, str, str, int]] = field(default_factory=deque)
    # Running sum of the samples in the window, so rates() costs O(channels), not O(samples):
    # the API adds a sample per request, thousands per window under load.
    _window_sums: dict[tuple[str, str], int] = field(default_factory=dict)
    # Counters are bumped from libtorrent's and boto3's threads too.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        channel: str,
        direction: Direction,
        nbytes: int = 0,
        *,
        requests: int = 0,
        errors: int = 0,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        hour = int(now // 3600)
        with self._lock:
            for key, table in (((channel, direction), self.totals),):
                c = table.setdefault(key, Counter())
                c.bytes += nbytes
                c.requests += requests
                c.errors += errors
            p = self.pending.setdefault((hour, channel, direction), Counter())
            p.bytes += nbytes
            p.requests += requests
            p.errors += errors
            if nbytes:
                self._samples.append((now, channel, direction, nbytes))
                k = (channel, direction)
                self._window_sums[k] = self._window_sums.get(k, 0) + nbytes
            self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        while self._samples and self._samples[0][0] < cutoff:
            _, ch, d, n = self._samples.popleft()
            self._window_sums[(ch, d)] -= n

    def rates(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """Bytes per second per channel and direction over the window."""
        now = time.time() if now is None else now
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            self._trim(now)
            for (ch, d), n in self._window_sums.items():
                if n:
                    out.setdefault(ch, {"in": 0.0, "out": 0.0})[d] += n / self.window
        return out

    def total_rate(self, direction: Direction, now: float | None = None) -> float:
        return sum(v[direction] for v in self.rates(now).values())

    def take_pending(self) -> dict[tuple[int, str, str], Counter]:
        with self._lock:
            p, self.pending = self.pending, {}
        return p

    def snapshot_pending(self) -> dict[tuple[int, str, str], Counter]:
        """A copy of the counts not flushed yet (for reads that merge them with the stored buckets)."""
        with self._lock:
            return {k: Counter(c.bytes, c.requests, c.errors) for k, c in self.pending.items()}

    def totals_by_channel(self) -> dict[str, dict[str, dict[str, int]]]:
        """Counts since the process started: channel -> direction -> bytes/requests/errors."""
        with self._lock:
            out: dict[str, dict[str, dict[str, int]]] = {}
            for (ch, d), c in sorted(self.totals.items()):
                out.setdefault(ch, {})[d] = {"bytes": c.bytes, "requests": c.requests, "errors": c.errors}
            return out

    def restore_pending(self, p: dict[tuple[int, str, str], Counter]) -> None:
        """Put back counts a failed flush did not write, so none are lost."""
        with self._lock:
            for k, c in p.items():
                mine = self.pending.setdefault(k, Counter())
                mine.bytes += c.bytes
                mine.requests += c.requests
                mine.errors += c.errors
