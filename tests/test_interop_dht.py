"""`dht = true`: a node found through the DHT alone.

A private DHT on loopback only: one plain libtorrent session is the router, noded bootstraps from it
(bittorrent.dht_bootstrap_nodes) and seeds a cached item; a plain libtorrent leecher that bootstraps
from the same router is given a magnet with nothing but the infohash (no tracker, no peer, no web
seed) and completes the download with the same sha256.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.p2p.engine import P2PEngine
from tests.conftest import free_port
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync

SIZE = 3 * 1024 * 1024 + 5


def dht_session(host: str, port: int, bootstrap: str) -> Any:
    return lt.session(
        {
            "listen_interfaces": f"{host}:{port}",
            "enable_dht": True,
            "dht_bootstrap_nodes": bootstrap,
            # Every node of this DHT is on loopback: lift the one-node-per-address rules.
            "dht_restrict_routing_ips": False,
            "dht_restrict_search_ips": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": 0,
        }
    )


def leech_by_dht(infohash: str, save: Path, bootstrap: str, timeout: float = 90) -> bool:
    """Blocking: download with nothing but the infohash and the DHT."""
    ses = dht_session("127.0.0.4", free_port("127.0.0.4"), bootstrap)
    try:
        atp = lt.parse_magnet_uri(f"magnet:?xt=urn:btih:{infohash}")
        atp.save_path = str(save)
        h = ses.add_torrent(atp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if h.status().is_seeding:
                return True
            time.sleep(0.2)
        return False
    finally:
        ses.pause()


async def test_leecher_finds_noded_through_a_private_dht(tmp_path: Path) -> None:
    import asyncio

    router_port = free_port("127.0.0.2")
    bootstrap = f"127.0.0.2:{router_port}"
    router = await asyncio.to_thread(dht_session, "127.0.0.2", router_port, "")
    cfg = make_config(
        tmp_path,
        bittorrent={
            "listen_interfaces": f"127.0.0.3:{free_port('127.0.0.3')}",
            "dht": True,
            "dht_bootstrap_nodes": [bootstrap],
        },
    )
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = content(SIZE, 61)
    item = await node.store.run(put_cached_sync, node.store, layout, "dht/found.bin", data)
    engine = P2PEngine(node, layout)
    await engine.start()
    try:
        assert await engine.seed_pending() == 1
        item = await node.store.run(node.store.get_item, item.id)
        assert item is not None and item.infohash
        save = tmp_path / "leech"
        save.mkdir()
        assert await asyncio.to_thread(leech_by_dht, item.infohash, save, bootstrap)
        got = (save / "found.bin").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    finally:
        await engine.stop()
        await node.store.close()
        del router
