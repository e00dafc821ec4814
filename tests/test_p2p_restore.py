"""A restart's restore of seeded items: in the background with its progress shown, the .torrent not read
when the resume data carries the info dictionary, symlinked directories still refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from noded.cache.layout import CacheLayout
from noded.core.safefs import DirRealpaths
from noded.p2p.engine import P2PEngine
from noded.p2p.resume import load_plan, seed_params
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync

N = 12


async def seeded_node(tmp_path: Path) -> tuple[P2PEngine, CacheLayout, list[int]]:
    """A node whose N cached items were seeded by a first run, which stopped and wrote resume data."""
    cfg = make_config(tmp_path / "node")
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    ids = []
    for i in range(N):
        item = await node.store.run(put_cached_sync, node.store, layout, f"d{i % 3}/f{i}.bin", content(70_000, i))
        ids.append(item.id)
    first = P2PEngine(node, layout)
    await first.start()
    assert await first.seed_pending() == N
    await first.stop()
    assert len(list(layout.resume_dir.glob("*.fastresume"))) == N
    return P2PEngine(node, layout, restore_in_background=True), layout, ids


async def test_background_restore_shows_progress_until_every_item_is_back(tmp_path: Path) -> None:
    engine, _layout, _ids = await seeded_node(tmp_path)
    node = engine.node
    try:
        async with engine._seed_lock:  # a seed scan in progress: the restore waits its turn
            await engine.start()  # returns with the restore under way, not done
            for _ in range(50):
                if engine.restore_total is not None:
                    break
                await asyncio.sleep(0.05)
            st = engine.status()
            assert st["state"] == f"restoring 0/{N}", st
            assert st["restore"] == {"done": False, "restored": 0, "total": N}
        for _ in range(200):
            if not engine.restoring:
                break
            await asyncio.sleep(0.05)
        st = engine.status()
        assert st["state"] == "running" and st["restore"] == {"done": True, "restored": N, "total": N}, st
        assert len(engine.session.handles) == N
        # A seed scan after the restore adds nothing twice.
        assert await engine.seed_pending() == 0
    finally:
        await engine.stop()
        await node.store.close()


async def test_restore_plan_takes_the_info_dict_from_resume_data(tmp_path: Path) -> None:
    engine, layout, ids = await seeded_node(tmp_path)
    node = engine.node
    try:
        item = await node.store.run(node.store.get_item, ids[0])
        assert item is not None and item.infohash
        final = layout.final_path(item.key)
        plan = load_plan(layout, item.id, item.infohash, final, item.size, item.mtime_ns)
        assert not isinstance(plan, str)
        assert plan.torrent is None and plan.resume  # the .torrent was not needed
        atp = seed_params(plan)
        assert str(atp.ti.info_hashes().v1) == item.infohash
        # Resume data that cannot be read: the .torrent is read and the item comes back in seed mode.
        layout.resume_path(item.infohash).write_bytes(b"not bencoded")
        plan = load_plan(layout, item.id, item.infohash, final, item.size, item.mtime_ns)
        assert not isinstance(plan, str) and plan.torrent is not None and plan.params is None
        assert str(seed_params(plan).ti.info_hashes().v1) == item.infohash
        # Resume data of another torrent: its info dict is not taken for this one.
        other = await node.store.run(node.store.get_item, ids[1])
        assert other is not None and other.infohash
        layout.resume_path(item.infohash).write_bytes(layout.resume_path(other.infohash).read_bytes())
        plan = load_plan(layout, item.id, item.infohash, final, item.size, item.mtime_ns)
        assert not isinstance(plan, str) and plan.torrent is not None
        assert str(seed_params(plan).ti.info_hashes().v1) == item.infohash
    finally:
        await node.store.close()


async def test_restore_refuses_a_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    engine, layout, ids = await seeded_node(tmp_path)
    node = engine.node
    # d1/ becomes a symlink to a copy outside the cache: the same files, reached through a link.
    outside = tmp_path / "outside"
    (layout.root / "d1").rename(outside)
    os.symlink(outside, layout.root / "d1")
    try:
        items = [await node.store.run(node.store.get_item, i) for i in ids]
        realpath = DirRealpaths()  # one pass, shared by every key, as the restore does
        for item in items:
            assert item is not None and item.infohash
            try:
                final = layout.final_path(item.key, realpath)
            except ValueError:
                assert item.key.startswith("d1/")
                continue
            plan = load_plan(layout, item.id, item.infohash, final, item.size, item.mtime_ns, realpath)
            assert not isinstance(plan, str), (item.key, plan)
        await engine.start()
        for _ in range(200):
            if not engine.restoring:
                break
            await asyncio.sleep(0.05)
        assert engine.restored == sum(1 for it in items if it is not None and not it.key.startswith("d1/"))
        for item in items:
            assert item is not None
            row = await node.store.run(node.store.get_item, item.id)
            assert row is not None and row.seeding == (not item.key.startswith("d1/")), row.key
    finally:
        await engine.stop()
        await node.store.close()


async def test_a_stop_during_the_restore_loses_nothing(tmp_path: Path) -> None:
    engine, layout, ids = await seeded_node(tmp_path)
    node = engine.node
    try:
        await engine.start()
        await asyncio.sleep(0)  # the restore has begun, or is about to: either way it is cut short
        await engine.stop()
        rows = [await node.store.run(node.store.get_item, i) for i in ids]
        assert all(r is not None and r.seeding for r in rows)  # still marked for the next start
        again = P2PEngine(node, layout, restore_in_background=True)
        await again.start()
        try:
            for _ in range(200):
                if not again.restoring:
                    break
                await asyncio.sleep(0.05)
            assert again.restored == N and again.seed_errors == 0
            assert set(again.session.handles) == {r.infohash for r in rows if r is not None}
        finally:
            await again.stop()
    finally:
        await node.store.close()
