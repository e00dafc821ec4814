"""One item from every location at once: three mirrors (a Source Cooperative-, a Zenodo- and an
archive.org-shaped server, each on its own port) publish one dataset; the pull takes segments from all
three, checks every piece against the published torrent's hashes, drops a location that corrupts or
stalls, and resumes after a SIGKILL from the segments the last checkpoint recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from noded.core.component import Node
from noded.core.config import parse_config
from noded.core.store import Store
from noded.origins.multisource import split_point, worth_stealing
from noded.origins.pipeline import Origins, suspects
from noded.p2p.torrent import parse_torrent
from tests.conftest import base_config, to_toml
from tests.origin import LogEntry, Origin, ThreadedOrigin
from tests.test_mirrors import NAME, PIECE, PRODUCT, Mirrors, current
from tests.test_p2p_torrent import py3createtorrent

MiB = 1024 * 1024
DATA_PATHS = {"sourcecoop": "/dataforcanada/", "zenodo": "/api/records/", "ia": "/ia800000/"}


class Three:
    """The three mirrors, each its own server; `origin(name)` is the one serving that mirror's bytes."""

    def __init__(self) -> None:
        self.m = {name: Mirrors() for name in ("sourcecoop", "zenodo", "ia")}

    def origin(self, name: str) -> Origin:
        m = self.m[name]
        return {"sourcecoop": m.sc, "zenodo": m.z, "ia": m.a}[name]

    def publish(self, data: bytes) -> None:
        for m in self.m.values():
            m.publish(NAME, data)

    def data_log(self, name: str) -> list[LogEntry]:
        return [e for e in self.origin(name).log if e.path.startswith(DATA_PATHS[name]) and NAME in e.path]

    def sent(self) -> dict[str, int]:
        return {name: sum(e.sent for e in self.data_log(name)) for name in self.m}

    def origins_config(self) -> dict[str, Any]:
        return {
            "sourcecoop": {
                "enabled": True,
                "endpoint": self.m["sourcecoop"].base,
                "prefixes": [f"dataforcanada/{PRODUCT}/"],
            },
            "zenodo": {"enabled": True, "base_url": self.m["zenodo"].base, "records": [7], "requests_per_minute": 6000},
            "ia": {"enabled": True, "base_url": self.m["ia"].base, "identifiers": ["d4c"], "requests_per_minute": 6000},
        }


@pytest.fixture
async def three(aiohttp_server: Any) -> Three:
    t = Three()
    for m in t.m.values():
        server = await aiohttp_server(m.app())
        m.base = str(server.make_url("")).rstrip("/")
    return t


@pytest.fixture
async def node(tmp_path: Path, three: Three) -> AsyncIterator[Any]:
    made: list[tuple[Origins, Store]] = []

    async def factory(**fetch: Any) -> Origins:
        fetch = {"retry_initial": 0.05, "max_attempts": 2, "segment_size": "4MiB", **fetch}
        cfg = parse_config(to_toml(base_config(tmp_path, origins=three.origins_config(), fetch=fetch)))
        store = Store(cfg.paths.state_dir / "noded.sqlite3")
        await store.open()
        o = Origins(Node(cfg=cfg, store=store))
        await o.open()
        made.append((o, store))
        return o

    yield factory
    for o, store in made:
        await o.stop()
        await store.close()


def write_random(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def with_torrent(o: Origins, tmp_path: Path, data_path: Path) -> None:
    """The published torrent: its md5sum and 16 MiB piece hashes become the item's."""
    meta = parse_torrent(py3createtorrent(data_path, tmp_path / f"{NAME}.torrent"))
    store = o.node.store
    await store.run(store.upsert_entry, meta.catalog_entry(), preference=o.node.cfg.origins.preference)


def test_split_and_steal_policy() -> None:
    # A holder three times slower keeps a quarter of what is left; a stalled one keeps nothing.
    assert split_point(1000, 5000, 10.0, 30.0, stalled=False) == 2000
    assert split_point(1000, 5000, 10.0, 30.0, stalled=True) == 1000
    assert worth_stealing(8 * MiB, 1 * MiB, 10 * MiB, stalled=False)
    assert not worth_stealing(8 * MiB, 10 * MiB, 10 * MiB, stalled=False)  # as fast: leave it
    assert not worth_stealing(1024, 1.0, 10 * MiB, stalled=False)  # too little left to be worth a request
    assert worth_stealing(1024, 0.0, 0.0, stalled=True)


async def test_three_mirrors_each_serve_part_and_the_counters_add_up(tmp_path: Path, three: Three, node: Any) -> None:
    size = 3 * PIECE + 12345
    data = write_random(tmp_path / "src" / NAME, size)
    three.publish(data)
    for name in three.m:  # slow enough to watch the pull in status
        for blob in three.origin(name).blobs.values():
            blob.rate = 12 * MiB
    o = await node()
    await o.refresh_all()
    await with_torrent(o, tmp_path, tmp_path / "src" / NAME)
    item = await current(o, NAME)
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        while True:
            pulls = o.status()["pulls"]
            if pulls:
                seen.append(pulls[0])
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    try:
        await o.pull(item)
    finally:
        watcher.cancel()
    item = await current(o, NAME)
    assert item.state.value == "cached" and item.md5 == hashlib.md5(data).hexdigest()
    assert o.layout.final_path(NAME).read_bytes() == data
    sent = three.sent()
    assert all(n > 0 for n in sent.values()), sent  # every mirror served part of it
    segment = 4 * MiB
    assert size <= sum(sent.values()) <= size + 3 * segment, sent
    # Status showed the pull with bytes and rate per location while it ran.
    assert seen and seen[0]["key"] == NAME
    last = seen[-1]
    assert {loc["origin"] for loc in last["locations"]} == {"sourcecoop", "zenodo", "ia"}
    assert sum(loc["bytes"] for loc in last["locations"]) > 0
    assert any(loc["rate_Bps"] > 0 for s in seen for loc in s["locations"])
    assert o.status()["pulls"] == []


async def test_a_corrupting_mirror_is_dropped_and_its_pieces_fetched_elsewhere(
    tmp_path: Path, three: Three, node: Any
) -> None:
    size = 4 * PIECE + 777
    data = write_random(tmp_path / "src" / NAME, size)
    three.publish(data)
    for blob in three.origin("zenodo").blobs.values():
        blob.fault = lambda b, request, n: "corrupt"  # every response: its chunks' first bytes flipped
    o = await node()
    await o.refresh_all()
    await with_torrent(o, tmp_path, tmp_path / "src" / NAME)
    await o.pull(await current(o, NAME))
    item = await current(o, NAME)
    assert item.state.value == "cached" and item.md5 == hashlib.md5(data).hexdigest()
    assert o.layout.final_path(NAME).read_bytes() == data
    bad = await o.node.store.run(suspects, o.node.store, NAME, item.version)
    assert set(bad) == {"zenodo"} and "piece" in bad["zenodo"]
    # Bad pieces were fetched again whole from the other two, the first piece Zenodo wrote among them.
    repairs = [
        (lo, hi)
        for name in ("sourcecoop", "ia")
        for lo, hi in map(span, three.data_log(name))
        if lo % PIECE == 0 and hi == min(size, lo + PIECE)
    ]
    first = min(lo for lo, _ in map(span, three.data_log("zenodo")))
    assert (first // PIECE * PIECE, min(size, first // PIECE * PIECE + PIECE)) in repairs, repairs
    sent = three.sent()
    assert sum(sent.values()) <= size + len(repairs) * PIECE + 3 * 4 * MiB, sent


def span(e: LogEntry) -> tuple[int, int]:
    """The byte range [lo, hi) a logged request asked for."""
    a, b = (e.range or "").removeprefix("bytes=").split("-")
    return int(a), int(b) + 1


def stalling_mirror(m: Mirrors, after: int, closed: asyncio.Event, stalled_at: list[int]) -> web.Application:
    """archive.org-shaped mirror whose first range request sends `after` bytes and then nothing,
    holding the connection open until the client closes it (which is recorded)."""
    served = {"n": 0}
    inner = m.a.handle

    async def data(request: web.Request) -> web.StreamResponse:
        served["n"] += 1
        if served["n"] > 1 or "Range" not in request.headers:
            return await inner(request)
        blob = m.a.blobs[request.path]
        a, b = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(a), int(b) + 1
        resp = web.StreamResponse(
            status=206,
            headers={
                "Content-Range": f"bytes {start}-{end - 1}/{blob.size}",
                "Content-Length": str(end - start),
                "ETag": blob.etag or "",
            },
        )
        await resp.prepare(request)
        await resp.write(blob.read(start, start + after))
        stalled_at.append(start + after)
        deadline = time.monotonic() + 120
        try:
            while request.transport is not None and not request.transport.is_closing():
                assert time.monotonic() < deadline, "the client never let go of the stalled connection"
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            closed.set()  # the server cancels a handler whose client went away
            raise
        closed.set()
        return resp

    app = web.Application()
    app.router.add_get("/metadata/{ident}", m.ia.metadata)
    app.router.add_get("/download/{ident}/{name}", m.ia_download)
    app.router.add_get("/ia800000/{tail:.+}", data)
    return app


async def test_a_stalling_mirror_loses_its_segment_to_the_endgame_and_is_let_go(
    tmp_path: Path, aiohttp_server: Any, node: Any
) -> None:
    three = Three()
    closed = asyncio.Event()
    stalled_at: list[int] = []
    for name, m in three.m.items():
        app = stalling_mirror(m, 256 * 1024, closed, stalled_at) if name == "ia" else m.app()
        server = await aiohttp_server(app)
        m.base = str(server.make_url("")).rstrip("/")
    size = 2 * PIECE + 99
    data = write_random(tmp_path / "src" / NAME, size)
    three.publish(data)
    cfg = parse_config(
        to_toml(
            base_config(
                tmp_path / "n",
                origins=three.origins_config(),
                fetch={"segment_size": "4MiB", "read_timeout": 300},
            )
        )
    )
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    o = Origins(Node(cfg=cfg, store=store))
    await o.open()
    try:
        await o.refresh_all()
        # The endgame finishes the pull, not the stalled read's timeout (300 s, beyond this wait).
        await asyncio.wait_for(o.pull(await current(o, NAME)), 120)
        item = await current(o, NAME)
        assert item.state.value == "cached" and o.layout.final_path(NAME).read_bytes() == data
        await asyncio.wait_for(closed.wait(), 10)  # the stalled connection was closed by the client
        # The stalled range was finished by another mirror from the byte the stalled one reached.
        others = [span(e)[0] for name in ("sourcecoop", "zenodo") for e in three.data_log(name)]
        assert stalled_at and stalled_at[0] in others, (stalled_at, others)
        sent = three.sent()
        assert sum(sent.values()) <= size + 3 * 4 * MiB, sent
    finally:
        await o.stop()
        await store.close()


@pytest.mark.slow
def test_sigkill_mid_multi_mirror_pull_resumes_from_the_checkpointed_segments(
    tmp_path: Path, noded_factory: Any
) -> None:
    size = 96 * MiB
    src = tmp_path / "src" / NAME
    data = write_random(src, size)
    md5 = hashlib.md5(data).hexdigest()
    three = Three()
    for m in three.m.values():
        m.base = "http://127.0.0.1:0"  # replaced once the servers have ports
    servers = {name: ThreadedOrigin(m.app()) for name, m in three.m.items()}
    for s in servers.values():
        s.__enter__()
    try:
        for name, m in three.m.items():
            m.base = servers[name].url
        three.publish(data)
        for name in three.m:
            for blob in three.origin(name).blobs.values():
                blob.rate = 2 * MiB  # per response: ~24 MB/s over the three mirrors' 12 connections
        n = noded_factory(origins=three.origins_config(), fetch={"segment_size": "8MiB"})
        deadline = time.monotonic() + 90
        per_location: list[dict[str, Any]] = []
        while sum(three.sent().values()) < 0.4 * size:
            assert time.monotonic() < deadline, "the pull never got going"
            with_status = n.get("/v1/status")[1]
            per_location += with_status["components"]["origins"].get("pulls", [])
            time.sleep(0.2)
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait(10)
        partial_dir = Path(n.config).parent / "cache" / ".noded" / "partial"
        (state,) = [p for p in partial_dir.iterdir() if p.name.endswith(".state")]
        checkpoint = json.loads(state.read_text())
        kept = [(s["start"], s["start"] + s["done"]) for s in checkpoint["segments"] if s["done"]]
        assert sum(b - a for a, b in kept) > 0
        # Status had shown the pull, location by location (the pull starts once two listings are in:
        # each origin's items are pulled as soon as its own listing arrives).
        shown = {loc["origin"] for loc in per_location[-1]["locations"]} if per_location else set()
        assert len(shown) >= 2 and shown <= set(three.m), per_location[-1:]
        before = {name: len(three.data_log(name)) for name in three.m}
        for name in three.m:
            for blob in three.origin(name).blobs.values():
                blob.rate = None
        n.start()
        deadline = time.monotonic() + 120
        while n.get("/v1/status")[1]["items"]["cached"] != 1:
            assert time.monotonic() < deadline, "the pull did not complete after the restart"
            time.sleep(0.2)
        final = Path(n.config).parent / "cache" / NAME
        assert hashlib.md5(final.read_bytes()).hexdigest() == md5
        # No byte the checkpoint had recorded was asked for again.
        for name in three.m:
            for e in three.data_log(name)[before[name] :]:
                assert e.range, e
                a, b = e.range.removeprefix("bytes=").split("-")
                lo, hi = int(a), int(b) + 1
                assert all(hi <= ka or lo >= kb for ka, kb in kept), (name, e.range, kept)
        events = [e["event"] for e in n.log_events()]
        assert "fetch.resume" in events and "pull.cached" in events
        cached = next(e for e in n.log_events() if e["event"] == "pull.cached")
        assert cached["source"] == "multi" and set(cached["from_locations"]) <= set(three.m)
        n.stop()
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)


async def test_host_caps_and_retry_after_hold_across_the_locations(tmp_path: Path, three: Three, node: Any) -> None:
    size = 4 * PIECE + 5  # more than the others bring in during the wait
    data = write_random(tmp_path / "src" / NAME, size)
    three.publish(data)
    for name in three.m:
        for blob in three.origin(name).blobs.values():
            blob.rate = 4 * MiB  # per response: long enough that every connection is busy at once
    for blob in three.origin("zenodo").blobs.values():
        blob.fault = lambda b, request, n: "status:503:1" if n == 1 else None
    o = await node(max_connections_per_host=2, segments_per_item=4)
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    assert o.layout.final_path(NAME).read_bytes() == data
    for name in three.m:
        assert 0 < three.origin(name).max_in_flight <= 2, name  # the host's cap, whatever the pull wants
    # Zenodo asked for a second: its next request waited for it.
    log = three.data_log("zenodo")
    assert log[0].status == 503
    # (A request already past the gate when the 503 arrived may start just after it.)
    end = log[0].end
    later = [e.start for e in log[1:]]
    assert any(t >= end + 0.95 for t in later), (end, later)
    assert not [t for t in later if end + 0.2 < t < end + 0.95], (end, later)


async def test_multi_location_off_takes_one_location_at_a_time(tmp_path: Path, three: Three, node: Any) -> None:
    data = write_random(tmp_path / "src" / NAME, 12 * MiB + 3)
    three.publish(data)
    o = await node(multi_location=False)
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    assert o.layout.final_path(NAME).read_bytes() == data
    sent = three.sent()
    assert sorted(sent.values())[:2] == [0, 0] and sum(sent.values()) == len(data), sent


async def test_a_corrupting_alternate_of_one_origin_is_told_apart_from_the_others(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    from tests.test_stac import md5_multihash, stac_item

    size = 3 * PIECE + 11
    data = write_random(tmp_path / "src" / NAME, size)
    servers = [Origin() for _ in range(3)]
    bases = []
    for srv in servers:
        srv.add(f"/{NAME}", data)
        bases.append(str((await aiohttp_server(srv.app())).make_url("")).rstrip("/"))
    servers[1].blobs[f"/{NAME}"].fault = lambda b, request, n: "corrupt"
    urls = [f"{b}/{NAME}" for b in bases]
    item_doc = stac_item(
        "one",
        {
            "data": {
                "href": urls[0],
                "roles": ["data"],
                "file:size": size,
                "file:checksum": md5_multihash(data),
                "alternate": {"b": {"href": urls[1]}, "c": {"href": urls[2]}},
            }
        },
    )

    async def item_json(request: web.Request) -> web.Response:
        return web.json_response(item_doc)

    docs = web.Application()
    docs.router.add_get("/item.json", item_json)
    catalog = str((await aiohttp_server(docs)).make_url("/item.json"))
    cfg = parse_config(
        to_toml(
            base_config(
                tmp_path / "n",
                origins={"stac": {"enabled": True, "catalogs": [catalog]}},
                fetch={"retry_initial": 0.05, "max_attempts": 2, "segment_size": "4MiB"},
            )
        )
    )
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    o = Origins(Node(cfg=cfg, store=store))
    await o.open()
    try:
        await o.refresh_all()
        await with_torrent(o, tmp_path, tmp_path / "src" / NAME)
        item = await current(o, NAME)
        assert sorted(item.urls) == sorted(urls)
        await o.pull(item)
        item = await current(o, NAME)
        assert item.state.value == "cached" and o.layout.final_path(NAME).read_bytes() == data
        bad = await store.run(suspects, store, NAME, item.version)
        # The suspect mark is the origin's; its reason names the one URL whose bytes were wrong.
        assert set(bad) == {"stac"} and urls[1] in bad["stac"]
        assert urls[0] not in bad["stac"] and urls[2] not in bad["stac"]
    finally:
        await o.stop()
        await store.close()
