"""The cache's schema step (migration 4) and its bookkeeping in the store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from noded.cache import db as cachedb
from noded.core.model import CatalogEntry, State
from noded.core.store import SCHEMA_VERSION, Store
from tests.cachekit import make_config, running_cache, seed_cached


def test_migration_backfills_durability_of_existing_rows(tmp_path: Path) -> None:
    # A store created by the previous schema, with a listed item and an unlisted one.
    s3 = Store(tmp_path / "s.sqlite3")
    s3._conn = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None)
    s3.migrate(target=3)
    now = time.time()
    for n, md5 in enumerate(("a" * 32, "b" * 32)):
        s3.conn.execute(
            "INSERT INTO items(key, origin, state, size, md5, disk_bytes, last_access, created_at, updated_at)"
            " VALUES(?, 'sourcecoop', 'cached', 10, ?, 4096, ?, ?, ?)",
            (f"k{n}", md5, n, now, now),
        )
    s3.conn.execute(
        "INSERT INTO replicas(key, location, size, md5, seen_at) VALUES('k0', 'sourcecoop', 10, ?, ?)", ("A" * 32, now)
    )
    s3.conn.execute(
        "INSERT INTO replicas(key, location, size, md5, seen_at) VALUES('k1', 'sourcecoop', 10, ?, ?)", ("c" * 32, now)
    )
    s3.close_sync()

    store = Store(tmp_path / "s.sqlite3")
    store.open_sync()
    try:
        assert store.schema_version() == SCHEMA_VERSION
        plan = cachedb.plan_eviction(store, 10**9, set(), now - 60)
        assert plan.evict == [1]  # k0 is listed with the same md5; k1's listing has other bytes
        assert plan.kept == {cachedb.eviction.NOT_DURABLE: 1}
        # The triggers follow later listings: the origin now lists k1's bytes too.
        store.upsert_entry(CatalogEntry(origin="zenodo", key="k1", urls=(), size=10, md5="b" * 32), now=now)
        assert cachedb.plan_eviction(store, 10**9, set(), now - 60).evict == [1, 2]
    finally:
        store.close_sync()


async def test_touch_pin_and_accounting_fixups(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, cache={"budget": "10MB", "free_space_floor": "1MB"})
    async with running_cache(cfg) as (node, cache, _p2p):
        store = node.store
        a = await store.run(
            seed_cached, store, cache.layout, "t/a.bin", b"a" * 5000, origin="sourcecoop", last_access=100.0
        )
        b = await store.run(
            seed_cached, store, cache.layout, "t/b.bin", b"b" * 5000, origin="sourcecoop", last_access=200.0
        )
        # Accesses are batched: nothing is written until the flush, then last_access moves.
        cache.touch(a.id)
        assert (await store.run(store.get_item, a.id)).last_access == 100.0  # type: ignore[union-attr]
        await cache.flush_touches()
        assert (await store.run(store.get_item, a.id)).last_access > 200.0  # type: ignore[union-attr]
        plan = await cache.plan_report(10)
        assert [i["key"] for i in plan["items"]] == ["t/b.bin", "t/a.bin"]  # LRU order follows the touch
        # A component that published without recording the allocation: the cache fills it in.
        await store.run(store.update_item, b.id, disk_bytes=0, mtime_ns=None)
        assert await cache.fix_unaccounted() == 1
        row = await store.run(store.get_item, b.id)
        assert row is not None and row.disk_bytes == 8192 and row.mtime_ns is not None
        # Pin: kept whatever its age; unknown keys say so.
        assert (await cache.pin("t/b.bin", True)).pinned  # type: ignore[union-attr]
        assert await cache.pin("t/nope.bin", True) is None
        plan = await cache.plan_report(10)
        assert {i["key"]: i["reason"] for i in plan["items"]}["t/b.bin"] == "pinned"
        # In use: held items are never planned.
        with cache.hold(a.id):
            p = await cache._plan(10**9)
            assert a.id not in p.evict and p.kept.get(cachedb.eviction.IN_USE) == 1
        assert (await store.run(store.get_item, a.id)).state is State.CACHED  # type: ignore[union-attr]


async def test_large_need_is_met_in_bounded_rounds(tmp_path: Path, monkeypatch: object) -> None:
    import noded.cache.accounting

    monkeypatch.setattr(noded.cache.accounting, "PLAN_MAX_ITEMS", 2)  # type: ignore[attr-defined]
    cfg = make_config(
        tmp_path, cache={"budget": 100_000, "high_watermark": 0.9, "low_watermark": 0.3, "free_space_floor": "1MB"}
    )
    async with running_cache(cfg) as (node, cache, _p2p):
        store = node.store
        items = [
            await store.run(
                seed_cached,
                store,
                cache.layout,
                f"r/{n}.bin",
                b"x" * 8192,
                origin="sourcecoop",
                pushed=True,
                last_access=float(n),
            )
            for n in range(12)
        ]
        # 12 x 8 KiB = 98,304 B over 90,000: down to 30,000 means 9 items, in rounds of at most 2.
        await cache.evict_if_needed()
        states = [(await store.run(store.get_item, it.id)).state for it in items]  # type: ignore[union-attr]
        assert states == [State.EVICTED] * 9 + [State.CACHED] * 3


async def test_partials_count_in_blocks_and_reservations_count_what_they_wrote(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, cache={"budget": "10MB", "free_space_floor": "1MB"})
    async with running_cache(cfg) as (_node, cache, _p2p):
        # A sparse partial (a resumed download): only its allocated blocks count.
        orphan = cache.layout.partial_path(99, 1)
        with open(orphan, "wb") as f:
            f.seek(5_000_000)
            f.write(b"x" * 10_000)
        snap = await cache.measure()
        assert 10_000 <= snap.partial_bytes <= 20_480 and snap.used_bytes == snap.partial_bytes
        orphan_bytes = snap.partial_bytes
        # A reservation counts as max(reserved, written): writing beyond it grows the count.
        path = cache.layout.partial_path(100, 1)
        async with cache.reserve(50_000, item_id=100, path=path) as r:
            assert (await cache.measure()).reserved_bytes == r.nbytes == 53_248  # whole 4 KiB blocks
            path.write_bytes(b"y" * 200_000)
            snap = await cache.measure()
            assert snap.reserved_bytes >= 200_000 and snap.fs_pending == 0
            assert snap.partial_bytes == orphan_bytes  # its own file is counted once, in the reservation
            assert cache.status()["reserved_bytes"] == snap.reserved_bytes
        assert (await cache.measure()).reserved_bytes == 0
