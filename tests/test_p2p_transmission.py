"""Acceptance 3 and 7 against a real third-party client (transmission-daemon in a network namespace).

3a. transmission ("Netcup") downloads a noded torrent to 100% from the .torrent endpoint, the bytes
    coming from noded's seeding toward its seed target.
3b. noded downloads an item seeded only by transmission (an imported published torrent).
7.  transmission downloads from a noded node that acts only as a web seed (HTTP listener; no
    BitTorrent), and Range requests against that listener return exact bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.model import State
from noded.core.store import Store
from noded.p2p import torrent as T
from tests.conftest import NodedProcess, free_port
from tests.p2p_helpers import content, make_config, put_cached_sync, sync_node
from tests.third_party import Transmission, transmission  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

SIZE = 6 * 1024 * 1024 + 4321


def _seed_store(node: NodedProcess, key: str, data: bytes) -> None:
    cfg = load_config(node.config)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    put_cached_sync(store, CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir), key, data)
    store.close_sync()


def _wait_infohash(node: NodedProcess, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, inv = node.get("/v1/inventory")
        items = [i for i in inv["items"] if i["seeding"] and i["infohash"]]
        if items:
            return str(items[0]["infohash"])
        time.sleep(0.2)
    raise AssertionError(node.output()[-3000:])


def test_transmission_downloads_noded_torrent(noded_factory: Any, transmission: Transmission) -> None:  # noqa: F811
    host = transmission.ns.host_ip
    data = content(SIZE, 31)
    node = noded_factory(
        "toronto",
        start=False,
        api={"bind": host, "port": free_port(host)},
        http_mirror={"bind": "127.0.0.1", "port": free_port()},
        bittorrent={"listen_interfaces": f"{host}:{free_port(host)}", "seed_target_interval": 2.0},
        seed_targets=[{"name": "netcup", "bittorrent": f"{transmission.ns.ns_ip}:{transmission.peer_port}"}],
    )
    _seed_store(node, "layers/netcup.pmtiles", data)
    node.start()
    ih = _wait_infohash(node)
    # Netcup follows the RSS feed: the enclosure is the .torrent endpoint transmission fetches itself.
    with urllib.request.urlopen(f"{node.api}/v1/torrents.rss", timeout=10) as r:
        rss = r.read().decode()
    enclosure = f"{node.api}/v1/torrents/{ih}.torrent"
    assert f'url="{enclosure}"' in rss
    tid = transmission.add(url=enclosure)
    t = transmission.wait_done(tid)
    assert t["hashString"] == ih
    got = (transmission.downloads / "netcup.pmtiles").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # noded counted the upload on the seed target's channel.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, st = node.get("/v1/status")
        if st["rates"].get("seed:netcup", {}).get("out", 0) > 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no seed:netcup traffic in {st['rates']}")
    assert node.stop() == 0


async def test_noded_downloads_item_seeded_only_by_transmission(
    tmp_path: Path,
    transmission: Transmission,  # noqa: F811
) -> None:
    data = content(SIZE, 32)
    # transmission seeds a published torrent (built as the organisation builds them).
    src = transmission.root / "seed"
    src.mkdir(parents=True)
    (src / "published.pmtiles").write_bytes(data)
    pieces, md5s = T.hash_files([src / "published.pmtiles"])
    info = T.single_file_info("published.pmtiles", SIZE, md5s[0], pieces, source="Data for Canada")
    tor = T.encode_torrent(info, web_seeds=["http://127.0.0.1:9/published.pmtiles"])
    tpath = tmp_path / "published.pmtiles.torrent"
    tpath.write_bytes(tor)
    tid = await asyncio.to_thread(transmission.add, metainfo=tor, download_dir=src)
    await asyncio.to_thread(transmission.wait_done, tid, 30)  # verified local data: seeding

    host = transmission.ns.host_ip
    cfg = make_config(
        tmp_path / "node",
        bittorrent={"listen_interfaces": f"{host}:{free_port(host)}", "peer_stall_timeout": 20.0},
        seed_targets=[{"name": "netcup", "bittorrent": f"{transmission.ns.ns_ip}:{transmission.peer_port}"}],
        origins={"torrents": {"files": [str(tpath)]}},
    )
    async with sync_node(cfg) as b:
        node, layout, sync = b.node, b.layout, b.sync
        item = await node.store.run(node.store.get_current, "published.pmtiles")
        assert item is not None and item.state == State.WANTED and item.infohash == T.infohash_of(info)
        assert item.md5 == md5s[0] and item.size == SIZE
        assert await sync.source.offers(item)
        await node.store.run(node.store.set_state, item.id, State.FETCHING)
        partial = layout.partial_path(item.id, item.version)
        result = await sync.source.fetch(item, partial)
        assert result.md5 == md5s[0] and result.sha256 == hashlib.sha256(data).hexdigest()
        assert partial.read_bytes() == data
        assert node.traffic.totals[("seed:netcup", "in")].bytes >= SIZE


def test_transmission_downloads_from_noded_web_seed_only(
    noded_factory: Any,
    transmission: Transmission,  # noqa: F811
) -> None:
    host = transmission.ns.host_ip
    data = content(SIZE, 33)
    port = free_port(host)
    node = noded_factory(
        "toronto",
        start=False,
        http_mirror={"bind": host, "port": port, "strip_prefix": "/processed"},
        bittorrent={"enabled": False},
    )
    _seed_store(node, "webseed-only.pmtiles", data)
    node.start()
    url = f"http://{host}:{port}/processed/webseed-only.pmtiles"
    # Range requests return exact bytes.
    for start, end in [(0, 9), (1000, 1024 * 1024), (SIZE - 5, SIZE - 1)]:
        req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 206 and r.read() == data[start : end + 1]
    pieces, md5s = T.hash_files([Path(node.config).parent / "cache" / "webseed-only.pmtiles"])
    info = T.single_file_info("webseed-only.pmtiles", SIZE, md5s[0], pieces, source="Data for Canada")
    tid = transmission.add(metainfo=T.encode_torrent(info, web_seeds=[url]))
    t = transmission.wait_done(tid)
    got = (transmission.downloads / "webseed-only.pmtiles").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert t["percentDone"] == 1.0
    _, st = node.get("/v1/status")
    assert st["components"]["webseed"]["served"] >= 4
    assert node.stop() == 0
