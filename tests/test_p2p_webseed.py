"""The HTTP web-seed listener and the P2P API routes, in-process over a real store and real sockets."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from xml.etree import ElementTree as ET

import aiohttp
import pytest

from noded.api import torrents as routes
from noded.api.app import create_app
from noded.cache.layout import CacheLayout
from noded.core.model import CatalogEntry, State
from noded.p2p import torrent as T
from noded.p2p.webseed import WebSeedServer, key_from_path
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync


@pytest.fixture
async def mirror(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path, http_mirror={"port": 0, "strip_prefix": "/processed"})
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    server = WebSeedServer(node, layout)
    await server.start()
    try:
        yield node, layout, server, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()
        await node.store.close()


async def test_range_requests_return_exact_bytes(mirror) -> None:  # type: ignore[no-untyped-def]
    node, layout, _server, base = mirror
    data = content(3 * 1024 * 1024 + 17, 21)
    item = await node.store.run(put_cached_sync, node.store, layout, "a/layer.pmtiles", data, pieces=False)
    before = node.traffic.totals.get(("webseed", "out"))
    assert before is None
    async with aiohttp.ClientSession() as s:
        for start, end in [(0, 0), (5, 99), (1024 * 1024 - 3, 2 * 1024 * 1024 + 5), (len(data) - 10, len(data) - 1)]:
            async with s.get(f"{base}/processed/a/layer.pmtiles", headers={"Range": f"bytes={start}-{end}"}) as r:
                assert r.status == 206
                assert await r.read() == data[start : end + 1]
                assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
        async with s.get(f"{base}/processed/a/layer.pmtiles", headers={"Range": "bytes=-7"}) as r:
            assert r.status == 206 and await r.read() == data[-7:]
        async with s.get(f"{base}/processed/a/layer.pmtiles") as r:
            assert r.status == 200
            body = await r.read()
            assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
            etag = r.headers["ETag"]
        async with s.get(f"{base}/processed/a/layer.pmtiles", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        async with s.head(f"{base}/processed/a/layer.pmtiles") as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
        async with s.get(f"{base}/processed/a/layer.pmtiles", headers={"Range": f"bytes={len(data) + 5}-"}) as r:
            assert r.status == 416
    sent = node.traffic.totals[("webseed", "out")].bytes
    assert sent == 1 + 95 + (1024 * 1024 + 9) + 10 + 7 + len(data)
    row = await node.store.run(node.store.get_item, item.id)
    assert row is not None and row.last_access > item.last_access


async def test_never_serves_partial_quarantined_or_unknown(mirror) -> None:  # type: ignore[no-untyped-def]
    node, layout, _server, base = mirror
    layout.ensure()
    # A wanted item with bytes in its partial path, and a quarantined one.
    wanted, _ = await node.store.run(node.store.upsert_entry, CatalogEntry("sourcecoop", "w.bin", ("http://x/w",), 4))
    layout.partial_path(wanted.id, wanted.version).write_bytes(b"part")
    bad = await node.store.run(put_cached_sync, node.store, layout, "q.bin", b"quarantined", pieces=False)
    await node.store.run(node.store.set_state, bad.id, State.QUARANTINED)
    async with aiohttp.ClientSession() as s:
        for path in [
            "/processed/w.bin",
            "/processed/q.bin",
            "/processed/nothing.bin",
            "/processed/../etc/passwd",
            "/processed/.noded/partial/1-1",
            f"/processed/.noded/partial/{wanted.id}-{wanted.version}",
            "/w.bin",  # outside the configured prefix
        ]:
            async with s.get(base + path) as r:
                assert r.status == 404, path


def test_key_from_path() -> None:
    assert key_from_path("/processed/a/b.pmtiles", "/processed") == "a/b.pmtiles"
    assert key_from_path("/a/b.pmtiles", "") == "a/b.pmtiles"
    assert key_from_path("/processed/../x", "/processed") is None
    assert key_from_path("/processedx/a", "/processed") is None
    assert key_from_path("/a//b", "") is None


async def test_inventory_torrent_and_rss_routes(tmp_path: Path, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path)
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    try:
        items = []
        for i in range(5):
            items.append(await node.store.run(put_cached_sync, node.store, layout, f"k{i}.bin", content(100 + i, i)))
        # Give item 0 a torrent as the engine would (infohash + file + seeding).
        data0 = content(100, 0)
        info = T.single_file_info(
            "k0.bin", 100, hashlib.md5(data0).hexdigest(), hashlib.sha1(data0).digest(), source="Data for Canada"
        )
        ih = T.infohash_of(info)
        layout.torrent_path(ih).write_bytes(T.encode_torrent(info))
        await node.store.run(node.store.update_item, items[0].id, infohash=ih, seeding=True)
        client = await aiohttp_client(create_app(node, [routes.setup]))
        r = await client.get("/v1/inventory", params={"limit": "2"})
        assert r.status == 200
        page = await r.json()
        assert [e["key"] for e in page["items"]] == ["k0.bin", "k1.bin"] and page["next"] == items[1].id
        etag = r.headers["ETag"]
        r = await client.get("/v1/inventory", params={"limit": "2"}, headers={"If-None-Match": etag})
        assert r.status == 304
        keys = []
        cursor = 0
        while True:
            r = await client.get("/v1/inventory", params={"limit": "2", "after": str(cursor)})
            page = await r.json()
            keys += [e["key"] for e in page["items"]]
            if page["next"] is None:
                break
            cursor = page["next"]
        assert keys == [f"k{i}.bin" for i in range(5)]
        # Changing a row changes the ETag.
        await node.store.run(node.store.update_item, items[1].id, seeding=True)
        r = await client.get("/v1/inventory", params={"limit": "2"}, headers={"If-None-Match": etag})
        assert r.status == 200
        for bad in ({"limit": "0"}, {"limit": "x"}, {"after": "-1"}, {"state": "nope"}):
            r = await client.get("/v1/inventory", params=bad)
            assert r.status == 400 and "error" in await r.json()
        before = node.traffic.totals_by_channel()["api"]["out"]["bytes"]
        r = await client.get(f"/v1/torrents/{ih}.torrent")
        assert r.status == 200 and r.content_type == "application/x-bittorrent"
        body = await r.read()
        assert T.parse_torrent(body).infohash == ih
        # A streamed answer is counted on the api channel like any other (once the handler has finished).
        for _ in range(100):
            counted = node.traffic.totals_by_channel()["api"]["out"]["bytes"] - before
            if counted:
                break
            await asyncio.sleep(0.05)
        assert counted == len(body)
        assert (await client.get(f"/v1/torrents/{'0' * 40}.torrent")).status == 404
        assert (await client.get("/v1/torrents/zz.torrent")).status == 400
        r = await client.get("/v1/torrents.rss")
        assert r.status == 200
        root = ET.fromstring(await r.read())
        enclosures = [e.attrib for e in root.iter("enclosure")]
        assert len(enclosures) == 1  # only torrents that are seeding
        assert enclosures[0]["url"].endswith(f"/v1/torrents/{ih}.torrent")
        assert enclosures[0]["type"] == "application/x-bittorrent"
        assert enclosures[0]["length"] == str(len(body))  # the .torrent's size
    finally:
        await node.store.close()


async def test_an_aborted_download_counts_the_bytes_actually_sent(mirror) -> None:  # type: ignore[no-untyped-def]
    """A client that reads part of a large body and goes away is charged what went out, not the whole file."""
    import asyncio

    node, layout, _server, base = mirror
    size = 96 * 1024 * 1024
    data = content(size, 3)
    await node.store.run(put_cached_sync, node.store, layout, "a/big.pmtiles", data, pieces=False)
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    # A small receive window, so the server cannot push the whole body into socket buffers.
    sock = writer.get_extra_info("socket")
    import socket

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    writer.write(b"GET /processed/a/big.pmtiles HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = 0
    while got < 8 * 1024 * 1024:
        got += len(await reader.read(1 << 16))
    writer.transport.abort()  # the client goes away mid-body
    for _ in range(100):
        c = node.traffic.totals.get(("webseed", "out"))
        if c is not None and c.requests:
            break
        await asyncio.sleep(0.05)
    c = node.traffic.totals[("webseed", "out")]
    assert c.requests == 1 and c.errors == 1
    # What the client read, plus at most what sat in the two sockets' buffers when it left.
    assert got <= c.bytes < size // 2, (got, c.bytes)
