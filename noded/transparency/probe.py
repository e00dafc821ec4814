"""Real-time mirror status: periodic probes of the origins, R2's public endpoint, peers and seed targets.

A probe checks content, not only reachability: where the store knows an item at that mirror, it asks
for a small byte range of it and compares the total size and ETag with the catalog, and the bytes with
this node's verified copy when it holds one. Each outcome goes into the `probes` table (uptime over
24 h and 7 d is computed from there, so it survives restarts) and through the hysteresis of
`noded.transparency.mirror_state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core import jsonread
from noded.core.component import Node, cancel_task, supervise
from noded.core.config import Config
from noded.core.httpread import read_capped
from noded.core.logs import get_logger
from noded.core.safefs import open_regular
from noded.core.store import Store
from noded.transparency.mirror_state import MirrorState, MirrorStatus, Outcome, advance

log = get_logger("noded.probe")

RANGE_BYTES = 4096  # enough to tell wrong content from right, small enough to probe every minute
READYZ_JSON = jsonread.JsonLimits(max_bytes=64 * 1024, max_depth=8)
PROBE_RETENTION = 8 * 86400  # uptime looks back 7 days
Kind = Literal["origin", "r2", "peer", "seed"]


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # the mirror's name in the API, in reports and in metrics
    kind: Kind
    channel: str  # traffic channel the probe's bytes are counted on
    url: str | None = None  # base URL (origins, R2) or the URL to GET (peer /readyz, seed http_url)
    tcp: tuple[str, int] | None = None  # seed targets: their BitTorrent port


@dataclass(frozen=True, slots=True)
class KnownItem:
    """An item the store lists at a mirror, used to check that mirror's content."""

    key: str
    url: str
    size: int | None
    etag: str | None
    cached: bool


def _split_host_port(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    return host.strip("[]"), int(port)


def targets_from_config(cfg: Config) -> list[Target]:
    """Every mirror this node can probe, in a stable order."""
    out: list[Target] = []
    o = cfg.origins
    if o.sourcecoop.enabled:
        out.append(Target("sourcecoop", "origin", "sourcecoop", url=o.sourcecoop.endpoint))
    if o.zenodo.enabled:
        out.append(Target("zenodo", "origin", "zenodo", url=o.zenodo.base_url))
    if o.ia.enabled:
        out.append(Target("ia", "origin", "ia", url=o.ia.base_url))
    if cfg.r2.public_url:
        out.append(Target("r2", "r2", "r2", url=cfg.r2.public_url))
    for p in cfg.peers:
        out.append(Target(p.name, "peer", f"peer:{p.name}", url=p.api_url + "/readyz"))
    for s in cfg.seed_targets:
        out.append(Target(s.name, "seed", f"seed:{s.name}", url=s.http_url, tcp=_split_host_port(s.bittorrent)))
    return out


def r2_public_object_url(cfg: Config, key: str) -> str | None:
    if not cfg.r2.public_url:
        return None
    prefix = cfg.r2.prefix.strip("/")
    path = f"{prefix}/{key}" if prefix else key
    return f"{cfg.r2.public_url}/{quote(path)}"


# -- store queries (run on the store thread) ------------------------------------------------------


def known_item(store: Store, cfg: Config, target: Target) -> KnownItem | None:
    """An item listed at this mirror: the node's own verified copies first (their bytes can be compared)."""
    c = store.conn
    if target.kind == "r2":
        r = c.execute(
            "SELECT key, size, etag, state FROM items WHERE pushed=1 ORDER BY (state='cached') DESC, id DESC LIMIT 1"
        ).fetchone()
        if r is None:
            return None
        url = r2_public_object_url(cfg, r[0])
        return None if url is None else KnownItem(r[0], url, r[1], None, r[3] == "cached")
    if target.kind != "origin" or target.url is None:
        return None
    rows = c.execute(
        "SELECT i.key, i.urls, r.size, r.etag, i.state FROM replicas r JOIN items i ON i.key = r.key "
        "WHERE r.location = ? ORDER BY (i.state = 'cached') DESC, r.seen_at DESC, i.version DESC LIMIT 20",
        (target.name,),
    ).fetchall()
    for key, urls, size, etag, state in rows:
        for u in json.loads(urls):
            if isinstance(u, str) and u.startswith(target.url + "/"):
                return KnownItem(key, u, size, etag, state == "cached")
    return None


def record_probes(store: Store, rows: list[tuple[str, float, bool, str, float | None, str]]) -> None:
    with store.tx() as c:
        c.executemany(
            "INSERT INTO probes(mirror, ts, ok, status, latency_ms, reason) VALUES(?,?,?,?,?,?)",
            [(m, ts, int(ok), st, lat, reason) for m, ts, ok, st, lat, reason in rows],
        )


def prune_probes(store: Store, before: float) -> int:
    with store.tx() as c:
        return c.execute("DELETE FROM probes WHERE ts < ?", (before,)).rowcount


def uptimes(store: Store, now: float) -> dict[str, dict[str, float | None]]:
    """Fraction of successful probes per mirror over 24 h and 7 d."""
    out: dict[str, dict[str, float | None]] = {}
    for label, span in (("uptime_24h", 86400), ("uptime_7d", 7 * 86400)):
        for mirror, avg in store.conn.execute(
            "SELECT mirror, AVG(ok) FROM probes WHERE ts >= ? GROUP BY mirror", (now - span,)
        ):
            out.setdefault(mirror, {"uptime_24h": None, "uptime_7d": None})[label] = round(float(avg), 4)
    return out


def last_states(store: Store) -> dict[str, MirrorState]:
    """The state each mirror was left in, so a restart keeps its status and last success."""
    c = store.conn
    last_ok = dict(c.execute("SELECT mirror, MAX(ts) FROM probes WHERE ok=1 GROUP BY mirror").fetchall())
    out: dict[str, MirrorState] = {}
    for mirror, status, reason, latency, ts in c.execute(
        "SELECT mirror, status, reason, latency_ms, ts FROM probes p WHERE id = "
        "(SELECT MAX(id) FROM probes WHERE mirror = p.mirror)"
    ):
        try:
            st = MirrorStatus(status)
        except ValueError:
            continue
        out[mirror] = MirrorState(
            status=st,
            reason=reason or "",
            last_latency_ms=latency,
            last_probe=ts,
            last_success=last_ok.get(mirror),
        )
    return out


# -- probing --------------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


def _norm_etag(v: str | None) -> str | None:
    if not v:
        return None
    v = v.strip()
    v = v.removeprefix("W/")
    return v.strip('"') or None


def _read_head(path: Path, n: int) -> bytes | None:
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            return f.read(n)
    except OSError:
        return None


class Prober:
    """The component: probes every target each interval (with jitter), keeps each mirror's state."""

    name = "probe"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.targets = targets_from_config(self.cfg)
        self.states: dict[str, MirrorState] = {}
        self.uptime: dict[str, dict[str, float | None]] = {}
        self.probe_errors: dict[str, int] = {}
        self.rounds = 0
        self._layout = CacheLayout(self.cfg.paths.cache_dir, self.cfg.paths.state_dir)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._last_prune = 0.0

    # -- lifecycle --
    async def start(self) -> None:
        store = self.node.store
        self.states = await store.run(last_states, store)
        self.uptime = await store.run(uptimes, store, time.time())
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": self.cfg.fetch.user_agent},
            connector=aiohttp.TCPConnector(limit=32, force_close=True),
        )
        if not self.cfg.probe.enabled:
            return  # probe_all() still works on demand (tests, a future "probe now" endpoint)
        self._task = supervise(self._loop, "probe", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        self.targets = targets_from_config(cfg)
        if cfg.probe.enabled and self._task is None and self._session is not None:
            self._task = asyncio.create_task(self._loop(), name="probe")
        elif not cfg.probe.enabled and self._task is not None:
            await cancel_task(self._task)
            self._task = None

    def status(self) -> dict[str, Any]:
        counts = {s.value: 0 for s in MirrorStatus}
        for t in self.targets:
            counts[self.state(t.name).status.value] += 1
        return {
            "state": "running" if self._task else ("disabled" if not self.cfg.probe.enabled else "stopped"),
            "rounds": self.rounds,
            "mirrors": len(self.targets),
            **{f"mirrors_{k}": v for k, v in counts.items() if v},
        }

    # -- views --
    def state(self, name: str) -> MirrorState:
        return self.states.get(name, MirrorState())

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    def mirror_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def describe(self, t: Target) -> dict[str, Any]:
        s = self.state(t.name)
        up = self.uptime.get(t.name, {})
        return {
            "name": t.name,
            "kind": t.kind,
            "url": t.url,
            "tcp": f"{t.tcp[0]}:{t.tcp[1]}" if t.tcp else None,
            "status": s.status.value,
            "reason": s.reason,
            "latency_ms": None if s.last_latency_ms is None else round(s.last_latency_ms, 1),
            "last_probe": s.last_probe,
            "last_success": s.last_success,
            "consecutive_failures": s.failures,
            "uptime_24h": up.get("uptime_24h"),
            "uptime_7d": up.get("uptime_7d"),
            "probe_errors": self.probe_errors.get(t.name, 0),
        }

    def mirrors(self) -> list[dict[str, Any]]:
        return [self.describe(t) for t in self.targets]

    # -- work --
    async def _loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("probe.round_failed", error=str(e), exc_info=True)
            p = self.cfg.probe
            await asyncio.sleep(p.interval * (1 + random.uniform(-p.jitter, p.jitter)))

    async def probe_all(self) -> None:
        targets = list(self.targets)
        if not targets:
            return
        outcomes = await asyncio.gather(*(self.probe_one(t) for t in targets))
        now = time.time()
        p = self.cfg.probe
        rows = []
        for t, out in zip(targets, outcomes, strict=True):
            before = self.state(t.name)
            after = advance(before, out, now, fail_threshold=p.fail_threshold, success_threshold=p.success_threshold)
            self.states[t.name] = after
            if not out.ok:
                self.probe_errors[t.name] = self.probe_errors.get(t.name, 0) + 1
            if after.status != before.status:
                log.info("mirror.status", mirror=t.name, status=after.status.value, reason=after.reason)
            rows.append((t.name, now, out.ok, after.status.value, out.latency_ms, after.reason))
        store = self.node.store
        await store.run(record_probes, store, rows)
        if now - self._last_prune > 3600:
            self._last_prune = now
            await store.run(prune_probes, store, now - PROBE_RETENTION)
        self.uptime = await store.run(uptimes, store, now)
        self.rounds += 1
        self.node.notify("probed")

    async def probe_one(self, t: Target) -> Outcome:
        timeout = self.cfg.probe.timeout
        t0 = time.monotonic()
        try:
            out = await asyncio.wait_for(self._probe(t), timeout)
        except TimeoutError:
            out = Outcome(False, round((time.monotonic() - t0) * 1000, 1), f"timeout after {timeout:g} s")
        except aiohttp.ClientError as e:
            out = Outcome(False, None, f"unreachable: {e.__class__.__name__}: {e}"[:300])
        except OSError as e:
            out = Outcome(False, None, f"unreachable: {e.strerror or e}"[:300])
        except Exception as e:  # one odd answer must not cost the other mirrors their round
            log.warning("probe.error", mirror=t.name, error=str(e), exc_info=True)
            out = Outcome(False, None, f"probe error: {e.__class__.__name__}: {e}"[:300])
        self.node.traffic.add(t.channel, "out", 0, requests=1, errors=0 if out.ok else 1)
        if out.ok and out.latency_ms is not None and out.latency_ms > self.cfg.probe.slow_seconds * 1000:
            out = Outcome(
                True, out.latency_ms, f"{out.latency_ms:.0f} ms > {self.cfg.probe.slow_seconds * 1000:.0f} ms", True
            )
        return out

    async def _probe(self, t: Target) -> Outcome:
        if t.kind == "seed":
            return await self._probe_seed(t)
        if t.kind == "peer":
            return await self._probe_peer(t)
        store = self.node.store
        item = await store.run(known_item, store, self.cfg, t)
        if item is None:
            return await self._probe_reachable(t)
        return await self._probe_content(t, item)

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise aiohttp.ClientError("prober not started")
        return self._session

    async def _probe_seed(self, t: Target) -> Outcome:
        assert t.tcp is not None
        t0 = time.monotonic()
        _, writer = await asyncio.open_connection(*t.tcp)
        latency = (time.monotonic() - t0) * 1000
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if t.url is None:
            return Outcome(True, latency, f"BitTorrent port {t.tcp[0]}:{t.tcp[1]} accepts connections")
        async with self._session_or_fail().get(t.url, allow_redirects=False) as r:
            await r.read()
            latency = max(latency, (time.monotonic() - t0) * 1000)
            self.node.traffic.add(t.channel, "in", r.content_length or 0)
            if r.status >= 500:
                return Outcome(False, latency, f"BitTorrent port open but HTTP {r.status} from {t.url}")
        return Outcome(True, latency, "BitTorrent port open and HTTP answers")

    async def _probe_peer(self, t: Target) -> Outcome:
        assert t.url is not None
        t0 = time.monotonic()
        async with self._session_or_fail().get(t.url) as r:
            try:
                raw = await read_capped(r.content, READYZ_JSON.max_bytes, r.content_length, "/readyz answer")
                body = jsonread.loads(raw, READYZ_JSON, "/readyz answer")
            except ValueError:  # too large, or refused by the bounded reader: not a ready peer
                raw, body = b"", None
            latency = (time.monotonic() - t0) * 1000
            self.node.traffic.add(t.channel, "in", len(raw))
            ready = isinstance(body, dict) and body.get("ready") is True
            if r.status == 200 and ready:
                return Outcome(True, latency, "ready")
            if r.status == 503 or (isinstance(body, dict) and body.get("ready") is False):
                return Outcome(False, latency, f"peer not ready (HTTP {r.status})")
            return Outcome(False, latency, f"unexpected answer from /readyz: HTTP {r.status}")

    async def _probe_reachable(self, t: Target) -> Outcome:
        assert t.url is not None
        t0 = time.monotonic()
        async with self._session_or_fail().get(t.url + "/", allow_redirects=False) as r:
            await r.content.read(RANGE_BYTES)
            latency = (time.monotonic() - t0) * 1000
            if r.status >= 500:
                return Outcome(False, latency, f"HTTP {r.status} from {t.url}")
        return Outcome(True, latency, f"reachable (HTTP {r.status}); no item known here to check content")

    async def _probe_content(self, t: Target, item: KnownItem) -> Outcome:
        n = RANGE_BYTES if item.size is None else max(1, min(RANGE_BYTES, item.size))
        local: bytes | None = None
        if item.cached:
            with contextlib.suppress(UnsafePath):
                path = self._layout.final_path(item.key)
                local = await asyncio.get_running_loop().run_in_executor(None, _read_head, path, n)
        t0 = time.monotonic()
        async with self._session_or_fail().get(item.url, headers={"Range": f"bytes=0-{n - 1}"}) as r:
            body = await r.content.read(n)  # a server that ignores Range must not send us the whole file
            latency = (time.monotonic() - t0) * 1000
            self.node.traffic.add(t.channel, "in", len(body))
            if r.status in (404, 410):
                return Outcome(False, latency, f"missing: HTTP {r.status} for {item.key}")
            if r.status >= 400:
                return Outcome(False, latency, f"HTTP {r.status} for {item.key}")
            total: int | None = None
            if r.status == 206:
                m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
                if m and m.group(3) != "*":
                    total = int(m.group(3))
            elif r.status == 200:
                total = r.content_length
            if item.size is not None and total is not None and total != item.size:
                return Outcome(False, latency, f"wrong size for {item.key}: {total} bytes, catalog says {item.size}")
            want, got = _norm_etag(item.etag), _norm_etag(r.headers.get("ETag"))
            if want and got and want != got:
                return Outcome(False, latency, f"ETag of {item.key} changed: {got} (catalog {want})")
            if local is not None and body != local[: len(body)]:
                return Outcome(False, latency, f"wrong content: first {len(body)} bytes of {item.key} differ")
            if len(body) < min(n, item.size or n):
                return Outcome(False, latency, f"short answer for {item.key}: {len(body)} of {n} bytes")
        checked = "bytes" if local is not None else "size/ETag"
        return Outcome(True, latency, f"{item.key}: {checked} match")
