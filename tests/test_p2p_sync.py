"""Node-to-node sync: node B (in-process engine + sync) fetches a wanted item from node A (a real
noded subprocess) over BitTorrent, verifies it, and stops offering A once A is down."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.model import CatalogEntry, State
from noded.core.store import Store
from noded.origins.sources import FetchError
from tests.conftest import NodedProcess, free_port
from tests.p2p_helpers import content, make_config, put_cached_sync, sync_node

SIZE = 5 * 1024 * 1024 + 999


def start_node_a(noded_factory: Any, data: bytes) -> tuple[NodedProcess, str]:
    bt_port = free_port()
    a = noded_factory("toronto", start=False, bittorrent={"listen_interfaces": f"127.0.0.1:{bt_port}"})
    cfg = load_config(a.config)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    put_cached_sync(store, CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir), "layers/x.pmtiles", data)
    store.close_sync()
    a.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, st = a.get("/v1/status")
        if st["components"]["p2p"]["seeding"] == 1:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(a.output()[-3000:])
    return a, f"127.0.0.1:{bt_port}"


@pytest.mark.slow
async def test_wanted_item_comes_from_peer_then_peer_down(noded_factory: Any, tmp_path: Path) -> None:
    data = content(SIZE, 77)
    a, a_bt = await asyncio.to_thread(start_node_a, noded_factory, data)
    cfg = make_config(
        tmp_path / "b",
        name="amsterdam",
        peers=[{"name": "toronto", "api_url": a.api, "bittorrent": a_bt}],
        bittorrent={"peer_stall_timeout": 5.0},
    )
    async with sync_node(cfg) as b:
        node, layout, engine, sync = b.node, b.layout, b.engine, b.sync
        md5 = hashlib.md5(data).hexdigest()
        item, _ = await node.store.run(
            node.store.upsert_entry,
            CatalogEntry("sourcecoop", "layers/x.pmtiles", ("http://127.0.0.1:9/x",), SIZE, md5),
        )
        await sync.poll_all()
        assert sync.status()["peers_up"] == 1
        assert await sync.source.offers(item)
        # A different item (other md5) is not offered even under the same key.
        assert not await sync.source.offers(dataclasses.replace(item, md5="0" * 32))
        assert not await sync.source.offers(dataclasses.replace(item, key="layers/other.pmtiles"))
        await node.store.run(node.store.set_state, item.id, State.FETCHING)
        partial = layout.partial_path(item.id, item.version)
        result = await sync.source.fetch(item, partial)
        assert result.size == SIZE and result.md5 == md5
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        assert partial.read_bytes() == data
        assert node.traffic.totals[("peer:toronto", "in")].bytes >= SIZE, node.traffic.totals
        row = await node.store.run(node.store.get_item, item.id)
        assert row is not None and row.infohash and layout.torrent_path(row.infohash).exists()
        assert row.infohash not in engine.session.handles  # the download torrent left the session

        # A stops: the next poll marks it down, and the peer source no longer offers the item.
        await asyncio.to_thread(a.stop)
        await sync.poll_all()
        assert sync.status()["peers_up"] == 0 and "peers" in node.problems
        assert not await sync.source.offers(row)
        with pytest.raises(FetchError):
            await sync.source.fetch(row, layout.partial_path(item.id, item.version + 1))


@pytest.mark.slow
async def test_stalled_peer_gives_up_and_cleans_partial(noded_factory: Any, tmp_path: Path) -> None:
    """The peer's API answers but its BitTorrent endpoint is dead: the fetch fails within the stall
    timeout (so the pipeline moves on to the origins), leaving no partial bytes and no torrent behind."""
    data = content(SIZE, 78)
    a, _ = await asyncio.to_thread(start_node_a, noded_factory, data)
    cfg = make_config(
        tmp_path / "b",
        name="amsterdam",
        peers=[{"name": "toronto", "api_url": a.api, "bittorrent": f"127.0.0.1:{free_port()}"}],
        bittorrent={"peer_stall_timeout": 3.0},
    )
    try:
        async with sync_node(cfg) as b:
            node, layout, engine, sync = b.node, b.layout, b.engine, b.sync
            item, _ = await node.store.run(
                node.store.upsert_entry,
                CatalogEntry("sourcecoop", "layers/x.pmtiles", (), SIZE, hashlib.md5(data).hexdigest()),
            )
            await sync.poll_all()
            assert await sync.source.offers(item)
            partial = layout.partial_path(item.id, item.version)
            with pytest.raises(FetchError, match="no progress"):
                await sync.source.fetch(item, partial)
            assert not partial.exists()
            assert engine.session.handles == {}
    finally:
        await asyncio.to_thread(a.stop)
