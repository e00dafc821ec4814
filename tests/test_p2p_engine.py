"""The p2p component in-process: seeding cached items, real transfers, accounting, removal."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.config import ScheduleConfig
from noded.core.model import PIECE_LENGTH, Item
from noded.origins.schedule import Schedule
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine
from tests.p2p_helpers import content, leech, make_config, open_node, put_cached_sync


async def wait_seeding(node: Node, item_id: int, timeout: float = 20) -> Item:
    """The pipeline's hint, then the row as the engine leaves it."""
    node.notify("cached")
    for _ in range(int(timeout * 10)):
        row = await node.store.run(node.store.get_item, item_id)
        assert row is not None
        if row.seeding and row.infohash:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError("item never started seeding")


async def test_cached_item_is_seeded_and_downloadable(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path / "a",
        bittorrent={"web_seed_templates": ["http://127.0.0.1:9/processed/{name}"]},
    )
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = content(PIECE_LENGTH + 4321, 11)
    item = await node.store.run(put_cached_sync, node.store, layout, "layers/a.pmtiles", data)
    engine = P2PEngine(node, layout)
    await engine.start()
    try:
        row = await wait_seeding(node, item.id)
        tor = layout.torrent_path(row.infohash).read_bytes()
        meta = T.parse_torrent(tor)
        # The infohash is the one a full read of the file gives (pieces came from the store).
        pieces, md5s = T.hash_files([layout.final_path("layers/a.pmtiles")])
        assert meta.infohash == T.infohash_of(
            T.single_file_info("a.pmtiles", len(data), md5s[0], pieces, source="Data for Canada")
        )
        assert meta.web_seeds == ("http://127.0.0.1:9/layers/a.pmtiles", "http://127.0.0.1:9/processed/a.pmtiles")
        # A second seed_pending finds nothing new to do.
        assert await engine.seed_pending() == 0
        port = engine.session.listen_port
        assert port
        out = tmp_path / "leecher"
        ok = await asyncio.to_thread(leech, tor, out, ("127.0.0.1", port), 60)
        assert ok
        assert hashlib.sha256((out / "a.pmtiles").read_bytes()).digest() == hashlib.sha256(data).digest()
        # Upload accounting: bytes per channel (unknown peer -> "swarm") and the item's last access.
        for _ in range(50):
            if node.traffic.totals.get(("swarm", "out")) and node.traffic.totals[("swarm", "out")].bytes >= len(data):
                break
            await asyncio.sleep(0.2)
        assert node.traffic.totals[("swarm", "out")].bytes >= len(data)
        row2 = await node.store.run(node.store.get_item, item.id)
        assert row2 is not None and row2.last_access > row.last_access
        assert engine.status()["checking_seen"] == 0
        # Eviction's hook: the torrent leaves the session and the row stops seeding.
        assert await engine.remove_torrent(row.infohash)
        assert row.infohash not in engine.session.handles
        row3 = await node.store.run(node.store.get_item, item.id)
        assert row3 is not None and not row3.seeding
    finally:
        await engine.stop()
        await node.store.close()


async def test_item_without_stored_pieces_is_hashed_off_loop(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "a")
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = content(3000, 12)
    item = await node.store.run(put_cached_sync, node.store, layout, "x.bin", data, pieces=False)
    engine = P2PEngine(node, layout)
    await engine.start()
    try:
        row = await wait_seeding(node, item.id)
        info = T.single_file_info(
            "x.bin", 3000, hashlib.md5(data).hexdigest(), hashlib.sha1(data).digest(), source="Data for Canada"
        )
        assert row.infohash == T.infohash_of(info)
        assert str(lt.torrent_info(layout.torrent_path(row.infohash).read_bytes()).info_hashes().v1) == row.infohash
    finally:
        await engine.stop()
        await node.store.close()


async def test_the_bittorrent_session_follows_the_bandwidth_timetable(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "a")
    node = await open_node(cfg)
    sched = Schedule(ScheduleConfig(default_down="40MB/s", default_up="20MB/s"))
    engine = P2PEngine(node, CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir), schedule=sched)
    await engine.start()

    async def limits(want: tuple[int, int]) -> tuple[int, int]:
        # apply_settings is asynchronous in libtorrent: read back what the session holds.
        got = (-1, -1)
        for _ in range(100):
            s = engine.session.ses.get_settings()
            got = (int(s["download_rate_limit"]), int(s["upload_rate_limit"]))
            if got == want:
                break
            await asyncio.sleep(0.02)
        return got

    try:
        assert await limits((40_000_000, 20_000_000)) == (40_000_000, 20_000_000)
        sched.set_override(None, 3_000_000, 60)  # an operator's override through the API
        assert await limits((0, 3_000_000)) == (0, 3_000_000)  # 0: unlimited
        assert engine.status()["rate_limits"] == {"down": None, "up": 3_000_000}
    finally:
        await engine.stop()
        await node.store.close()
