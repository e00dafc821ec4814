"""Prometheus metrics: a registry whose collector reads the node's state at scrape time.

Labels are low-cardinality by construction: channel (origins, configured peers and seed targets, the
API), direction, state, mirror (configured mirrors only), window. Never an item key.

Each component's numbers are exported too: those of `metrics() -> Mapping[str, float]` when it has
one (the libtorrent session's counters, for instance), else the numeric fields of its status().
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from noded import __version__
from noded.core.component import Node, cancel_task, supervise
from noded.core.logs import get_logger
from noded.transparency.mirror_state import MirrorStatus
from noded.transparency.reports import open_counts

log = get_logger("noded.metrics")
LAG_INTERVAL = 0.1
LAG_WINDOW = 60.0  # seconds of samples behind the p50/p99 shown in status()
_BAD = re.compile(r"[^a-zA-Z0-9_]")
_ABBREVIATED_UNIT = re.compile(r"_(ms|us|ns|kb|mb|gb|kib|mib|gib|pct|percent)$")


def _metric_name(*parts: str) -> str:
    return "_".join(_BAD.sub("_", p).strip("_").lower() for p in parts if p)


class NodeCollector(Collector):
    def __init__(self, node: Node, owner: object = None) -> None:
        self.node = node
        self.owner = owner
        # Store-backed figures, refreshed (off the loop) just before each scrape renders.
        self.items_by_state: dict[str, int] = {}
        self.cache_summary: dict[str, int] = {}
        self.open_reports: dict[str, int] = {}

    def collect(self) -> Iterator[Any]:
        # Components' generic figures must not repeat a name the fixed families already use.
        fixed: set[str] = set()
        for family in self._fixed():
            fixed.add(family.name)
            yield family
        yield from self._component_metrics(fixed)

    def _fixed(self) -> Iterator[Any]:
        node = self.node
        yield InfoMetricFamily("noded", "This node", value={"version": __version__, "node": node.cfg.node.name})
        ready = GaugeMetricFamily("noded_ready", "1 when the node is ready to serve")
        ready.add_metric([], 1.0 if node.ready and not node.stopping else 0.0)
        yield ready
        yield from self._traffic()
        items = GaugeMetricFamily("noded_items", "Items by state", labels=["state"])
        for state, n in sorted(self.items_by_state.items()):
            items.add_metric([state], n)
        yield items
        budget = GaugeMetricFamily("noded_cache_budget_bytes", "Configured cache budget")
        budget.add_metric([], node.cfg.cache.budget)
        yield budget
        used = GaugeMetricFamily("noded_cache_used_bytes", "Bytes of cached items on disk")
        cache = node.get("cache")
        used_bytes = cache.status().get("used_bytes") if cache is not None else None
        if used_bytes is None:
            used_bytes = self.cache_summary.get("cached_disk_bytes", 0)
        used.add_metric([], float(used_bytes))
        yield used
        backlog = GaugeMetricFamily("noded_push_backlog_bytes", "Bytes of cached items not yet pushed to R2")
        backlog.add_metric([], self.cache_summary.get("unpushed_bytes", 0))
        yield backlog
        yield from self._mirrors()
        lag = GaugeMetricFamily("noded_event_loop_lag_seconds_last", "Most recent event-loop lag sample")
        lag.add_metric([], node.loop_lag)
        yield lag

    def _traffic(self) -> Iterator[Any]:
        t = self.node.traffic
        b = CounterMetricFamily("noded_traffic_bytes", "Bytes moved per channel", labels=["channel", "direction"])
        r = CounterMetricFamily("noded_traffic_requests", "Requests per channel", labels=["channel", "direction"])
        e = CounterMetricFamily("noded_traffic_errors", "Failed requests per channel", labels=["channel", "direction"])
        for ch, dirs in t.totals_by_channel().items():
            for d, c in dirs.items():
                b.add_metric([ch, d], c["bytes"])
                r.add_metric([ch, d], c["requests"])
                e.add_metric([ch, d], c["errors"])
        rate = GaugeMetricFamily(
            "noded_traffic_rate_bytes_per_second",
            f"Moving average over {t.window:g} s",
            labels=["channel", "direction"],
        )
        for ch, v in sorted(t.rates().items()):
            for d in ("in", "out"):
                rate.add_metric([ch, d], v[d])
        yield from (b, r, e, rate)

    def _mirrors(self) -> Iterator[Any]:
        up = GaugeMetricFamily("noded_mirror_up", "1 if up or degraded, else 0", labels=["mirror"])
        status = GaugeMetricFamily("noded_mirror_status", "Mirror status (one-hot)", labels=["mirror", "status"])
        lat = GaugeMetricFamily("noded_mirror_latency_seconds", "Latency of the last probe", labels=["mirror"])
        upt = GaugeMetricFamily("noded_mirror_uptime_ratio", "Share of successful probes", labels=["mirror", "window"])
        errs = CounterMetricFamily("noded_probe_errors", "Failed probes since start", labels=["mirror"])
        reports = GaugeMetricFamily("noded_reports_open", "Open community reports", labels=["mirror"])
        prober = self.node.get("probe")
        names: list[str] = []
        if prober is not None:
            for m in prober.mirrors():
                name = m["name"]
                names.append(name)
                st = MirrorStatus(m["status"])
                up.add_metric([name], 1.0 if st in (MirrorStatus.UP, MirrorStatus.DEGRADED) else 0.0)
                for s in MirrorStatus:
                    status.add_metric([name, s.value], 1.0 if s is st else 0.0)
                if m["latency_ms"] is not None:
                    lat.add_metric([name], m["latency_ms"] / 1000)
                for w in ("24h", "7d"):
                    if m[f"uptime_{w}"] is not None:
                        upt.add_metric([name, w], m[f"uptime_{w}"])
                errs.add_metric([name], m["probe_errors"])
        # Only configured mirrors (and this node) get a series, whatever was reported.
        allowed = {*names, self.node.cfg.node.name}
        for name in sorted(allowed):
            reports.add_metric([name], self.open_reports.get(name, 0))
        yield from (up, status, lat, upt, errs, reports)

    def _component_metrics(self, taken: set[str]) -> Iterator[Any]:
        """Numbers each component reports: `metrics()` when it has one, else the numeric part of status().

        Flat numbers become `noded_<component>_<key>`; a dict of numbers (e.g. torrents by state) becomes
        one gauge with a `key` label. Both come from fixed status fields, so cardinality stays bounded.
        """
        seen: set[str] = set(taken)
        for cname, comp in list(self.node.components.items()):
            if comp is self.owner:
                continue  # our own lag figures are exported as a histogram already
            fn = getattr(comp, "metrics", None)
            try:
                values = fn() if callable(fn) else comp.status()
            except Exception as e:  # a broken component must not break the scrape
                log.warning("metrics.component_failed", component=cname, error=str(e))
                continue
            if not isinstance(values, Mapping):
                continue
            for k, v in sorted(values.items()):
                name = _metric_name("noded", cname, str(k))
                # Families are named without "_total" (prometheus_client's counters too): compare those.
                family = name.removesuffix("_total")
                # Prometheus names carry base units: "_ms" style fields are left out.
                if family in seen or _ABBREVIATED_UNIT.search(name):
                    continue
                if _number(v):
                    seen.add(family)
                    # A field named *_total is a running count: exposed as a counter, as promtool expects.
                    if name.endswith("_total"):
                        c = CounterMetricFamily(family, f"{cname} {k}")
                        c.add_metric([], float(v))
                        yield c
                        continue
                    g = GaugeMetricFamily(name, f"{cname} {k}")
                    g.add_metric([], float(v))
                    yield g
                elif isinstance(v, Mapping) and v and all(_number(x) for x in v.values()) and len(v) <= 50:
                    seen.add(name)
                    g = GaugeMetricFamily(name, f"{cname} {k}", labels=["key"])
                    for sub, x in sorted(v.items()):
                        g.add_metric([str(sub)], float(x))
                    yield g


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Metrics:
    """The component: owns the registry and samples event-loop lag for it."""

    name = "metrics"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(node, owner=self)
        self.registry.register(self.collector)
        self.lag = Histogram(
            "noded_event_loop_lag_seconds",
            "Event-loop lag: how late a timer fires",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.samples: deque[tuple[float, float]] = deque()
        self._percentiles: tuple[tuple[float | None, int, float], dict[str, float]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = supervise(self._sample_lag, "loop-lag", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    def lag_percentiles(self, window: float = LAG_WINDOW) -> dict[str, float]:
        # /v1/status asks on every call: sort the window once per new sample, not once per request.
        last = self.samples[-1][0] if self.samples else None
        key = (last, len(self.samples), window)
        if self._percentiles is not None and self._percentiles[0] == key:
            return dict(self._percentiles[1])
        out = self._lag_percentiles(window)
        self._percentiles = (key, out)
        return dict(out)

    def _lag_percentiles(self, window: float) -> dict[str, float]:
        cutoff = time.monotonic() - window
        xs = sorted(lag for ts, lag in self.samples if ts >= cutoff)
        if not xs:
            return {"lag_p50_ms": 0.0, "lag_p99_ms": 0.0, "lag_max_ms": 0.0, "lag_samples": 0}
        return {
            "lag_p50_ms": round(xs[len(xs) // 2] * 1000, 3),
            "lag_p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 3),
            "lag_max_ms": round(xs[-1] * 1000, 3),
            "lag_samples": len(xs),
        }

    def status(self) -> dict[str, Any]:
        return {"state": "running" if self._task else "stopped", **self.lag_percentiles()}

    async def _sample_lag(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            now = time.monotonic()
            lag = max(0.0, now - t0 - LAG_INTERVAL)
            self.lag.observe(lag)
            self.samples.append((now, lag))
            while self.samples and self.samples[0][0] < now - LAG_WINDOW:
                self.samples.popleft()

    async def render(self) -> bytes:
        store = self.node.store
        self.collector.items_by_state = await store.run(store.counts_by_state)
        self.collector.cache_summary = await store.run(store.cache_summary)
        self.collector.open_reports = await store.run(open_counts, store)
        return generate_latest(self.registry)
