"""The pull pipeline end to end in-process: real store, real HTTP origins, real files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from noded.api import origins_routes
from noded.api.app import create_app
from noded.cli.main import render_failing
from noded.core.component import Node
from noded.core.config import parse_config
from noded.core.hashing import hash_file
from noded.core.model import HashResult, Item, State
from noded.core.store import Store
from noded.origins.pipeline import Origins, mismatch, order_sources, suspects
from noded.origins.rendezvous import rank
from tests.catalog_servers import ArchiveServer, ZenodoServer, ia_file, ia_metadata, zenodo_file, zenodo_record
from tests.conftest import base_config, to_toml
from tests.origin import Origin

MiB = 1024 * 1024


class Servers:
    """Zenodo and archive.org APIs plus their file downloads, on one aiohttp server."""

    def __init__(self) -> None:
        self.zenodo = ZenodoServer()
        self.ia = ArchiveServer()
        self.files = Origin()
        self.base = ""

    def app(self) -> web.Application:
        app = self.zenodo.app()
        app.router.add_get("/metadata/{ident}", self.ia.metadata)
        app.router.add_get("/services/search/v1/scrape", self.ia.scrape)
        app.router.add_get("/download/{ident}/{name}", self.ia_download)
        app.router.add_route("GET", "/{tail:.*}", self.files.handle)
        return app

    async def ia_download(self, request: web.Request) -> web.Response:
        """archive.org redirects /download/ to the data node that holds the item."""
        raise web.HTTPFound(f"/ia800000/items/{request.match_info['ident']}/{request.match_info['name']}")

    def publish(self, key: str, data: bytes, *, zenodo_data: bytes | None = None, ia_data: bytes | None = None) -> None:
        """List `key` with data's md5 at both origins; each may serve other bytes than it lists."""
        rid = 7
        z = zenodo_file(self.base, rid, key, data)
        self.zenodo.records[rid] = zenodo_record(self.base, rid, [z])
        self.files.add(f"/api/records/{rid}/files/{key}/content", zenodo_data if zenodo_data is not None else data)
        self.ia.items["item"] = ia_metadata("item", [ia_file(key, data)])
        self.files.add(f"/ia800000/items/item/{key}", ia_data if ia_data is not None else data)


@pytest.fixture
async def servers(aiohttp_server: Any) -> Servers:
    s = Servers()
    server = await aiohttp_server(s.app())
    s.base = str(server.make_url("")).rstrip("/")
    return s


Factory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path, servers: Servers) -> AsyncIterator[Factory]:
    made: list[tuple[Origins, Store]] = []

    async def factory(**kw: Any) -> Origins:
        origins_cfg = {
            "zenodo": {"enabled": True, "base_url": servers.base, "records": [7], "requests_per_minute": 6000},
            "ia": {"enabled": True, "base_url": servers.base, "identifiers": ["item"], "requests_per_minute": 6000},
            **kw.pop("origins", {}),
        }
        fetch = {"retry_initial": 0.05, "max_attempts": 3, "segment_size": "1MiB", **kw.pop("fetch", {})}
        data = base_config(tmp_path, origins=origins_cfg, fetch=fetch, peers=kw.pop("peers", []))
        cfg = parse_config(to_toml(data))
        store = Store(cfg.paths.state_dir / "noded.sqlite3")
        await store.open()
        o = Origins(Node(cfg=cfg, store=store), **kw)
        await o.open()
        made.append((o, store))
        return o

    yield factory
    for o, store in made:
        await o.stop()
        await store.close()


async def one(o: Origins, key: str) -> Item:
    item = await o.node.store.run(o.node.store.get_current, key)
    assert item is not None
    return item


async def test_pull_publishes_verified_bytes_with_pieces(servers: Servers, make: Factory) -> None:
    data = os.urandom(3 * MiB + 11)
    servers.publish("census.parquet", data)
    o = await make()
    await o.refresh_all()
    before = time.time()
    await o.pull(await one(o, "census.parquet"))
    item = await one(o, "census.parquet")
    # Hashed on the way in: the pusher may trust this for a while instead of reading the file again.
    assert item.verified_at is not None and before <= item.verified_at <= time.time()
    assert item.state == State.CACHED and item.error is None
    final = o.layout.final_path("census.parquet")
    assert final.read_bytes() == data
    assert item.sha256 == hashlib.sha256(data).hexdigest() and item.disk_bytes >= len(data)
    assert item.mtime_ns == final.stat().st_mtime_ns
    pieces = await o.node.store.run(o.node.store.get_pieces, item.id)
    assert pieces == (16 * MiB, hashlib.sha1(data).digest())
    assert list(o.layout.partial_dir.iterdir()) == []
    # zenodo comes first in the default preference and served it; its traffic is counted under its name
    assert o.node.traffic.totals[("zenodo", "in")].bytes >= len(data)


async def test_checksum_mismatch_quarantines_and_tries_the_next_origin(servers: Servers, make: Factory) -> None:
    data = os.urandom(2 * MiB)
    bad = bytearray(data)
    bad[MiB] ^= 0xFF
    servers.publish("d.gpkg", data, zenodo_data=bytes(bad))
    o = await make()
    await o.refresh_all()
    item = await one(o, "d.gpkg")
    await o.pull(item)
    item = await one(o, "d.gpkg")
    assert item.state == State.CACHED
    assert o.layout.final_path("d.gpkg").read_bytes() == data
    assert o.layout.quarantine_path(item.id, item.version).read_bytes() == bytes(bad)
    marked = await o.node.store.run(suspects, o.node.store, "d.gpkg", item.version)
    assert set(marked) == {"zenodo"} and "md5" in marked["zenodo"]
    assert o.node.traffic.totals[("ia", "in")].bytes >= len(data)
    # The archive.org copy came through its /download/ redirect, with ranges.
    assert any(e.path == "/ia800000/items/item/d.gpkg" and e.status == 206 for e in servers.files.log)


async def test_every_origin_wrong_ends_failed_and_nothing_at_the_final_path(servers: Servers, make: Factory) -> None:
    data = os.urandom(MiB)
    servers.publish("x.bin", data, zenodo_data=os.urandom(MiB), ia_data=data[:-1])
    o = await make()
    await o.refresh_all()
    await o.pull(await one(o, "x.bin"))
    item = await one(o, "x.bin")
    assert item.state == State.FAILED
    assert "zenodo" in (item.error or "") and "ia" in (item.error or "")
    assert not o.layout.final_path("x.bin").exists()


async def test_new_upstream_version_replaces_the_old_only_once_verified(servers: Servers, make: Factory) -> None:
    v1, v2 = os.urandom(MiB), os.urandom(MiB)
    servers.publish("d.tif", v1)
    o = await make(origins={"failed_retry_after": 0.5})
    await o.refresh_all()
    await o.pull(await one(o, "d.tif"))
    # Upstream publishes v2, but both origins still serve v1 bytes at first: v2 cannot verify.
    servers.publish("d.tif", v2, zenodo_data=v1, ia_data=v1)
    await o.refresh_all()
    new = await one(o, "d.tif")
    assert new.version == 2 and new.state == State.WANTED
    await o.pull(new)
    old = await o.node.store.run(o.node.store.items)
    assert [(i.version, i.state) for i in old] == [(1, State.CACHED), (2, State.FAILED)]
    assert o.layout.final_path("d.tif").read_bytes() == v1  # the old version is kept meanwhile
    servers.publish("d.tif", v2)
    await asyncio.sleep(0.6)
    await o.refresh_all()  # failed items (and suspect marks) older than failed_retry_after get another go
    assert (await one(o, "d.tif")).state == State.WANTED
    await o.pull(await one(o, "d.tif"))
    rows = await o.node.store.run(o.node.store.items)
    assert [(i.version, i.state) for i in rows] == [(1, State.EVICTED), (2, State.CACHED)]
    assert o.layout.final_path("d.tif").read_bytes() == v2


class LocalSource:
    """A source that copies a local file: stands in for the P2P/R2 helpers' sources."""

    def __init__(self, name: str, data: bytes | None) -> None:
        self.name = name
        self.data = data
        self.calls = 0

    async def offers(self, item: Item) -> bool:
        return self.data is not None

    async def fetch(self, item: Item, partial: Path) -> HashResult:
        self.calls += 1
        assert self.data is not None
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(self.data)
        return hash_file(partial)


class Cache:
    name = "cache"

    def __init__(self) -> None:
        self.reserved: list[int] = []

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int, item_id: int | None = None, path: Path | None = None) -> AsyncIterator[None]:
        self.reserved.append(nbytes)
        yield


async def test_injected_sources_go_first_and_last_and_the_cache_is_asked(servers: Servers, make: Factory) -> None:
    data = os.urandom(MiB)
    servers.publish("p.bin", data, zenodo_data=b"", ia_data=b"")
    peer = LocalSource("peer", data)
    r2 = LocalSource("r2", data)
    o = await make(sources_first=[peer], sources_last=[r2])
    cache = Cache()
    o.node.components["cache"] = cache  # type: ignore[assignment]
    await o.refresh_all()
    await o.pull(await one(o, "p.bin"))
    assert (peer.calls, r2.calls) == (1, 0) and cache.reserved == [len(data)]
    assert (await one(o, "p.bin")).state == State.CACHED
    # Peer gone, HTTP origins broken: R2 (last) saves the day.
    servers.publish("q.bin", data, zenodo_data=b"x" * MiB, ia_data=b"y" * MiB)
    peer.data = None
    await o.refresh_all()
    await o.pull(await one(o, "q.bin"))
    assert r2.calls == 1 and (await one(o, "q.bin")).state == State.CACHED


async def test_background_loops_pull_everything_wanted(servers: Servers, make: Factory) -> None:
    data = os.urandom(MiB)
    servers.publish("bg.bin", data)
    o = await make()
    await o.stop()  # close what open() made; start() opens again with the loops
    await o.start()
    assert await o.node.wait("cached", 20)
    assert (await one(o, "bg.bin")).state == State.CACHED


def test_mismatch_policy() -> None:
    item = Item(1, "k", 1, "zenodo", State.FETCHING, 3, "a" * 32, None, None, None, [], None, False, False, False,
                0, 0, None, None, 0, 0)  # fmt: skip
    good = HashResult(size=3, md5="a" * 32, sha256="b" * 64, pieces=b"")
    assert mismatch(item, good) is None
    assert "size" in (mismatch(item, HashResult(size=4, md5="a" * 32, sha256="b" * 64, pieces=b"")) or "")
    assert "md5" in (mismatch(item, HashResult(size=3, md5="c" * 32, sha256="b" * 64, pieces=b"")) or "")


def test_source_order_is_preference_then_health() -> None:
    a, b, c = LocalSource("ia", b""), LocalSource("zenodo", b""), LocalSource("sourcecoop", b"")
    peer, r2 = LocalSource("peer", b""), LocalSource("r2", b"")
    names = [s.name for s in order_sources([peer], [a, b, c], [r2], ["sourcecoop", "zenodo", "ia"], lambda s: True)]
    assert names == ["peer", "sourcecoop", "zenodo", "ia", "r2"]
    names = [s.name for s in order_sources([], [a, b, c], [], ["sourcecoop", "zenodo", "ia"], lambda s: s is not c)]
    assert names == ["zenodo", "ia", "sourcecoop"]


async def test_per_origin_and_global_item_caps(servers: Servers, make: Factory, tmp_path: Path) -> None:
    rid = 9
    files = []
    for i in range(5):
        data = os.urandom(MiB // 2)
        files.append(zenodo_file(servers.base, rid, f"f{i}.bin", data))
        servers.files.add(f"/api/records/{rid}/files/f{i}.bin/content", data, rate=2 * MiB)
    servers.zenodo.records[rid] = zenodo_record(servers.base, rid, files)
    o = await make(origins={"zenodo": {"enabled": True, "base_url": servers.base, "records": [rid],
                                       "requests_per_minute": 6000}, "ia": {"enabled": False}})  # fmt: skip
    await o.stop()
    await o.start()
    for _ in range(5):
        await o.node.wait("cached", 20)
        counts = await o.node.store.run(o.node.store.counts_by_state)
        if counts["cached"] == 5:
            break
    assert counts["cached"] == 5
    spans: dict[str, tuple[float, float]] = {}
    for e in servers.files.log:
        a, b = spans.get(e.path, (e.start, e.end))
        spans[e.path] = (min(a, e.start), max(b, e.end))
    overlap = max(sum(1 for a, b in spans.values() if a <= t < b) for t, _ in spans.values())
    assert overlap == 2  # fetch.max_items_per_origin, although max_concurrent_items is 4


async def test_the_rendezvous_owner_fetches_others_wait_then_fall_back(
    servers: Servers, make: Factory, tmp_path: Path
) -> None:
    keys = [f"r{i}.bin" for i in range(12)]
    mine = next(k for k in keys if rank(k, ["toronto", "amsterdam"])[0] == "toronto")
    theirs = next(k for k in keys if rank(k, ["toronto", "amsterdam"])[0] == "amsterdam")
    rid = 11
    files = []
    for key in (mine, theirs):
        data = os.urandom(1000)
        files.append(zenodo_file(servers.base, rid, key, data))
        servers.files.add(f"/api/records/{rid}/files/{key}/content", data)
    servers.zenodo.records[rid] = zenodo_record(servers.base, rid, files)
    peer = {"name": "amsterdam", "api_url": "http://127.0.0.1:9", "bittorrent": "127.0.0.1:9"}
    o = await make(
        origins={"zenodo": {"enabled": True, "base_url": servers.base, "records": [rid], "requests_per_minute": 6000},
                 "ia": {"enabled": False}},
        peers=[peer], fetch={"peer_wait": 1.0},
    )  # fmt: skip
    await o.refresh_all()
    await o.pull(await one(o, mine))
    await o.pull(await one(o, theirs))
    assert (await one(o, mine)).state == State.CACHED
    assert (await one(o, theirs)).state == State.WANTED  # left to amsterdam for now
    assert not any(theirs in e.path for e in servers.files.log)
    await asyncio.sleep(1.1)  # amsterdam did not deliver within peer_wait: fetch it ourselves
    await o.pull(await one(o, theirs))
    assert (await one(o, theirs)).state == State.CACHED


async def test_a_down_owner_is_not_waited_for(servers: Servers, make: Factory) -> None:
    key = next(k for k in (f"d{i}" for i in range(50)) if rank(k, ["toronto", "amsterdam"])[0] == "amsterdam")
    servers.publish(key, os.urandom(1000))
    peer = {"name": "amsterdam", "api_url": "http://127.0.0.1:9", "bittorrent": "127.0.0.1:9"}
    o = await make(peers=[peer])
    o.peer_up = lambda name: False
    await o.refresh_all()
    await o.pull(await one(o, key))
    assert (await one(o, key)).state == State.CACHED


def _always(action: str) -> Any:
    return lambda blob, request, n: action


def _changing(blob: Any, request: Any, n: int) -> None:
    blob.data = os.urandom(len(blob.data))  # a different file on every request
    blob.etag = f'"v{n}"'


@pytest.mark.parametrize(
    "fault",
    [_always("truncate:1000"), _always("reset:5000"), _always("status:503"), _always("stall:10"), _changing,
     _always("corrupt")],
    ids=["truncated", "reset", "503-storm", "stalled", "etag-changes", "wrong-bytes"],
)  # fmt: skip
async def test_faulty_origin_ends_verified_from_the_next_or_cleanly_failed(
    servers: Servers, make: Factory, fault: Any
) -> None:
    data = os.urandom(MiB + 3)
    servers.publish("f.bin", data)
    servers.files.blobs["/api/records/7/files/f.bin/content"].fault = fault
    o = await make(fetch={"read_timeout": 0.5, "max_attempts": 2, "host_failure_threshold": 100})
    await o.refresh_all()
    await o.pull(await one(o, "f.bin"))
    item = await one(o, "f.bin")
    # The next location continues from the bytes the first one delivered (if any were good).
    got = o.node.traffic.totals[("ia", "in")].bytes + o.node.traffic.totals[("zenodo", "in")].bytes
    assert item.state == State.CACHED and got >= len(data)
    assert o.layout.final_path("f.bin").read_bytes() == data
    # Now the second origin breaks the same way: a clean failure, the final path stays empty.
    servers.publish("g.bin", data)
    for path in ("/api/records/7/files/g.bin/content", "/ia800000/items/item/g.bin"):
        servers.files.blobs[path].fault = fault
    await o.refresh_all()
    await o.pull(await one(o, "g.bin"))
    item = await one(o, "g.bin")
    assert item.state == State.FAILED and item.error
    assert not o.layout.final_path("g.bin").exists()


async def test_a_busy_origin_does_not_starve_the_others(servers: Servers, make: Factory) -> None:
    rid = 12
    files = []
    for i in range(4):
        data = os.urandom(MiB // 2)
        files.append(zenodo_file(servers.base, rid, f"z{i}.bin", data))
        servers.files.add(f"/api/records/{rid}/files/z{i}.bin/content", data, rate=MiB)
    servers.zenodo.records[rid] = zenodo_record(servers.base, rid, files)
    ia_data = os.urandom(1000)
    servers.ia.items["item"] = ia_metadata("item", [ia_file("ia.bin", ia_data)])
    servers.files.add("/ia800000/items/item/ia.bin", ia_data)
    o = await make(
        origins={"zenodo": {"enabled": True, "base_url": servers.base, "records": [rid], "requests_per_minute": 6000}},
        fetch={"max_concurrent_items": 3, "max_items_per_origin": 1},
    )
    await o.stop()
    await o.start()
    # zenodo's four items queue behind its cap of one; archive.org's item gets a free global slot at once.
    for _ in range(20):
        ia_item = await o.node.store.run(o.node.store.get_current, "ia.bin")
        if ia_item is not None and ia_item.state == State.CACHED:
            break
        await o.node.wait("cached", 1)
    assert (await one(o, "ia.bin")).state == State.CACHED
    counts = await o.node.store.run(o.node.store.counts_by_state)
    assert counts["cached"] == 1  # no zenodo item (0.5 s each at least) had to finish first


async def test_a_host_asking_to_wait_requeues_its_items_instead_of_failing_them(
    servers: Servers, make: Factory
) -> None:
    data = os.urandom(MiB)
    servers.publish("wait.bin", data)
    path = "/api/records/7/files/wait.bin/content"
    # Retry-After 200 in the field; 2 here, with a pull's own patience (host_backoff_max_wait) shorter still.
    servers.files.blobs[path].fault = lambda b, r, n: "status:429:2" if n == 1 else None
    o = await make(fetch={"host_backoff_max_wait": 0.5})
    await o.stop()
    await o.start()
    seen: set[State] = set()
    waiting: dict[str, Any] | None = None
    problems: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        item = await o.node.store.run(o.node.store.get_current, "wait.bin")
        if item is not None:
            seen.add(item.state)
            if item.state == State.CACHED:
                break
        for h in o.status()["hosts"].values():
            if "waiting_until" in h:
                waiting = h
        problems |= set(o.node.problems)
        await asyncio.sleep(0.05)
    assert any(k.startswith("items:") and k.endswith(":waiting") for k in problems)
    assert any(k.startswith("host:127.0.0.1") for k in problems)
    assert not any(k.startswith(("items:", "host:")) for k in o.node.problems)  # cleared once it is cached
    assert (await one(o, "wait.bin")).state == State.CACHED
    assert State.FAILED not in seen
    assert waiting is not None and "Retry-After 2" in waiting["reason"] and waiting["waiting_until"] > time.time() - 30
    hits = [e for e in servers.files.log if e.path == path]
    assert hits[0].status == 429 and hits[1].start - hits[0].start >= 2.0  # measured by the server


async def cached_soon(o: Origins, key: str, seconds: float = 30) -> Item | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        item = await o.node.store.run(o.node.store.get_current, key)
        if item is not None and item.state == State.CACHED:
            return item
        await o.node.wait("cached", 0.2)
    return None


async def test_a_failed_item_is_retried_on_its_own_growing_timer(servers: Servers, make: Factory) -> None:
    data = os.urandom(1000)
    servers.publish("late.bin", data)
    path = "/api/records/7/files/late.bin/content"
    servers.files.blobs[path].fault = lambda b, r, n: "status:404" if n <= 2 else None
    o = await make(origins={"failed_retry_after": 1.0, "ia": {"enabled": False}})
    await o.stop()
    await o.start()
    assert await cached_soon(o, "late.bin") is not None
    hits = [e for e in servers.files.log if e.path == path]
    assert [e.status for e in hits] == [404, 404, 206]
    # No catalog refresh in between (the interval is an hour): the item's own timer, doubling.
    assert sum(1 for _, p in servers.zenodo.log.requests if p.startswith("/api/records/7")) == 1
    assert hits[1].start - hits[0].start >= 1.0 and hits[2].start - hits[1].start >= 2.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """The cache on a real 3 MiB filesystem, so a write can really fail with ENOSPC."""
    mnt = tmp_path / "cache"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]
    if os.geteuid() != 0 or subprocess.run(mount, check=False).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_a_disk_full_failure_recovers_once_space_returns(
    small_disk: Path, servers: Servers, make: Factory
) -> None:
    data = os.urandom(MiB)
    servers.publish("big.bin", data)
    junk = small_disk / "junk"
    junk.write_bytes(b"\0" * (5 * MiB // 2))
    o = await make(origins={"failed_retry_after": 600.0})
    await o.stop()
    await o.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await o.node.store.run(o.node.store.get_current, "big.bin")
        if found is not None and found.state == State.FAILED:
            break
        await asyncio.sleep(0.05)
    item = await one(o, "big.bin")
    assert item.state == State.FAILED and "disk full" in (item.error or "")
    assert o.failures[item.id].cause == "disk"
    junk.unlink()
    # Retried as soon as there is room, long before its 600 s timer.
    got = await cached_soon(o, "big.bin", 20)
    assert got is not None and o.layout.final_path("big.bin").read_bytes() == data


async def test_a_hanging_listing_never_delays_the_other_origins_pulls(servers: Servers, make: Factory) -> None:
    data = os.urandom(MiB // 2)
    servers.publish("quick.bin", data)
    servers.ia.hang = asyncio.Event()
    try:
        o = await make()
        await o.stop()
        await o.start()
        assert await cached_soon(o, "quick.bin", 15) is not None  # while the archive.org listing still hangs
        assert "ia" not in o.last_refresh
    finally:
        servers.ia.hang.set()


async def test_failed_items_are_listed_with_cause_next_attempt_and_location_errors(
    servers: Servers, make: Factory, aiohttp_client: Any
) -> None:
    servers.publish("b.bin", os.urandom(100))
    extra = os.urandom(100)
    servers.zenodo.records[7]["files"].append(zenodo_file(servers.base, 7, "a.bin", extra))
    servers.files.add("/api/records/7/files/a.bin/content", extra)
    servers.files.blobs["/api/records/7/files/b.bin/content"].fault = lambda b, r, n: "status:404"
    servers.files.blobs["/ia800000/items/item/b.bin"].fault = lambda b, r, n: "status:403"
    o = await make(origins={"failed_retry_after": 600.0})
    o.node.components["origins"] = o
    await o.refresh_all()
    before = time.time()
    await o.pull(await one(o, "b.bin"))
    assert o.node.problems.get("items:" + (await one(o, "b.bin")).origin + ":failed:upstream", "").startswith("1 item")
    client = await aiohttp_client(create_app(o.node, [origins_routes.setup]))
    resp = await client.get("/v1/items", params={"state": "failed", "limit": "10"})
    body = await resp.json()
    assert resp.status == 200 and body["next_after"] is None
    [it] = body["items"]
    assert it["key"] == "b.bin" and it["state"] == "failed" and it["cause"] == "upstream"
    assert before + 600 <= it["next_attempt"] <= time.time() + 601
    assert "404" in it["locations"]["zenodo"] and "403" in it["locations"]["ia"] and "404" in it["reason"]
    text = render_failing(body["items"])
    assert "b.bin" in text and "upstream" in text
    page = await (await client.get("/v1/items", params={"limit": "1"})).json()
    assert len(page["items"]) == 1 and page["next_after"] == page["items"][0]["id"]
    rest = await (await client.get("/v1/items", params={"limit": "5", "after": str(page["next_after"])})).json()
    assert rest["next_after"] is None and page["items"][0]["id"] < rest["items"][0]["id"]
    assert (await client.get("/v1/items", params={"state": "nonsense"})).status == 400
    assert (await client.get("/v1/items", params={"limit": "0"})).status == 400


async def test_withdrawn_restricted_and_dark_records_are_rejected_alone(servers: Servers, make: Factory) -> None:
    base = servers.base
    good_z, good_ia = os.urandom(500), os.urandom(600)
    servers.zenodo.records[7] = zenodo_record(base, 7, [zenodo_file(base, 7, "z.bin", good_z)])
    servers.files.add("/api/records/7/files/z.bin/content", good_z)
    servers.zenodo.status[8] = 410
    restricted = zenodo_record(base, 9, [zenodo_file(base, 9, "r.bin", b"r")])
    servers.zenodo.records[9] = {**restricted, "access": {"record": "public", "files": "restricted"}}
    servers.zenodo.status[10] = 403
    secret = {**ia_file("secret.bin", b"s"), "private": "true"}
    servers.ia.items["good"] = ia_metadata(
        "good",
        [ia_file("i.bin", good_ia), ia_file("good_files.xml", b"<files/>"), ia_file("good_meta.xml", b"<m/>"), secret],
    )
    for name, data in (
        ("i.bin", good_ia),
        ("good_files.xml", b"<files/>"),
        ("good_meta.xml", b"<m/>"),
        ("secret.bin", b"s"),
    ):
        servers.files.add(f"/ia800000/items/good/{name}", data)
    servers.ia.items["dark"] = {"created": 1735689600, "is_dark": True}
    z = {"enabled": True, "base_url": base, "records": [7, 8, 9, 10], "requests_per_minute": 6000}
    ia = {"enabled": True, "base_url": base, "identifiers": ["dark", "good", "unknown"], "requests_per_minute": 6000}
    o = await make(origins={"zenodo": z, "ia": ia})
    with capture_logs() as logs:
        await o.refresh_all()
    rejected = {e["key"]: e["reason"] for e in logs if e["event"] == "catalog.entry_rejected"}
    assert "410" in rejected["record 8"] and "withdrawn" in rejected["record 8"]
    assert "restricted" in rejected["record 9"] and "restricted" in rejected["record 10"]
    assert "dark" in rejected["identifier dark"] and "does not exist" in rejected["identifier unknown"]
    assert "private" in rejected["secret.bin"]
    assert o.last_refresh["zenodo"]["ok"] and o.last_refresh["ia"]["ok"]
    keys = {row[0] for row in o.node.store.conn.execute("SELECT key FROM items")}
    assert keys == {"z.bin", "i.bin"}  # the Archive's own files are never listed, the private one is rejected
    await o.stop()
    await o.start()
    assert await cached_soon(o, "z.bin") is not None and await cached_soon(o, "i.bin") is not None
    fetched = {e.path for e in servers.files.log}
    assert not any(p.endswith(("_files.xml", "_meta.xml", "secret.bin")) for p in fetched)
