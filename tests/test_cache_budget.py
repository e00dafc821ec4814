"""Acceptance 1 and 3: a small budget under a stream of fetches; refusing to evict the last copy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from noded.cache import db as cachedb
from noded.cache.accounting import Cache, CacheFull
from noded.cache.eviction import NOT_DURABLE
from noded.cache.layout import disk_bytes, publish
from noded.core.hashing import hash_file
from noded.core.model import CatalogEntry, State
from tests.cachekit import make_config, running_cache, seed_cached, small_filesystem, tree_disk_bytes


def _write_chunks(path: Path, data: bytes, chunk: int) -> None:
    with open(path, "ab") as f:
        f.write(data[:chunk])


async def _fetch_into(cache: Cache, item_id: int, version: int, data: bytes) -> None:
    """What the pull pipeline does: reserve, write a partial in pieces, hash, publish, record."""
    node = cache.node
    store = node.store
    loop = asyncio.get_running_loop()
    partial = cache.layout.partial_path(item_id, version)
    async with cache.reserve(len(data), item_id=item_id, path=partial):
        await store.run(store.set_state, item_id, State.FETCHING)
        for off in range(0, len(data), 64 * 1024):
            await loop.run_in_executor(None, _write_chunks, partial, data[off:], 64 * 1024)
            await asyncio.sleep(0)
        h = await loop.run_in_executor(None, hash_file, partial)
        item = await store.run(store.get_item, item_id)
        assert item is not None
        final = cache.layout.final_path(item.key)
        st = await loop.run_in_executor(None, publish, partial, final)
        await store.run(cachedb.record_published, store, item_id, h, disk_bytes(st), st.st_mtime_ns)


async def test_stream_200_items_through_small_budget(tmp_path: Path) -> None:
    budget = 4 * 1024 * 1024
    cfg = make_config(
        tmp_path,
        cache={
            "budget": budget,
            "high_watermark": 0.8,
            "low_watermark": 0.5,
            "free_space_floor": "1MB",
            "check_interval": 0.5,
        },
    )
    high = int(budget * 0.8)
    rng = random.Random(6)
    async with running_cache(cfg) as (node, cache, p2p):
        store = node.store
        # Items that must survive: pinned ones, and ones nobody else holds (inbox, never pushed).
        protected = []
        for n in range(3):
            protected.append(
                await store.run(
                    seed_cached,
                    store,
                    cache.layout,
                    f"keep/pinned-{n}.bin",
                    rng.randbytes(20_000),
                    origin="sourcecoop",
                    pushed=True,
                    pinned=True,
                )
            )
            protected.append(
                await store.run(seed_cached, store, cache.layout, f"keep/inbox-{n}.bin", rng.randbytes(20_000))
            )
        # 200 items listed by origins; each becomes durable a different way once fetched.
        todo = []
        for n in range(200):
            data = rng.randbytes(rng.randint(1, 600_000))
            key = f"stream/{n:03d}.parquet"
            entry = CatalogEntry(
                origin="sourcecoop",
                key=key,
                urls=(f"http://127.0.0.1:9/{key}",),
                size=len(data),
                md5=hashlib.md5(data).hexdigest(),
                infohash=hashlib.sha1(key.encode()).hexdigest(),
            )
            item, _ = await store.run(store.upsert_entry, entry)
            todo.append((item, data))

        violations: list[tuple[int, int]] = []
        samples = 0
        stop = asyncio.Event()

        async def sampler() -> None:
            nonlocal samples
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                before = sum(r.nbytes for r in cache._reservations)
                used = await loop.run_in_executor(None, tree_disk_bytes, cache.layout.root)
                after = sum(r.nbytes for r in cache._reservations)
                samples += 1
                if used > high + max(before, after):
                    violations.append((used, max(before, after)))
                await asyncio.sleep(0.005)

        queue: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
        for item, data in todo:
            queue.put_nowait((item.id, item.version, data))

        async def worker(w: int) -> None:
            while not queue.empty():
                item_id, version, data = queue.get_nowait()
                await _fetch_into(cache, item_id, version, data)
                # Durability arrives after the fetch: R2 confirms some, the origin listing covers others.
                if item_id % 2:
                    await store.run(store.update_item, item_id, pushed=True)
                    node.notify("pushed")

        sampling = asyncio.create_task(sampler())
        await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(4))), timeout=240)
        stop.set()
        await sampling

        assert samples > 20
        assert violations == [], f"disk usage above high watermark + reservations: {violations[:5]}"
        final = tree_disk_bytes(cache.layout.root)
        assert final <= high, (final, high)
        counts = await store.run(store.counts_by_state)
        assert counts["evicted"] > 100, counts  # 200 x ~300 KB through 3.2 MB: most went
        assert counts["cached"] + counts["evicted"] == 206, counts
        for p in protected:
            row = await store.run(store.get_item, p.id)
            assert row is not None and row.state is State.CACHED
            assert cache.layout.final_path(p.key).exists()
        # Every evicted item: file gone, torrent dropped, row consistent.
        evicted = await store.run(store.items, states=[State.EVICTED], limit=1000)
        for it in evicted:
            assert not cache.layout.final_path(it.key).exists()
            assert it.disk_bytes == 0
            assert it.infohash in p2p.removed
        # The store's accounting matches the disk.
        _, recorded = await store.run(cachedb.cached_bytes, store)
        assert recorded == final, (recorded, final)
        assert cache.status()["waiting_reason"] is None


async def test_refuses_to_evict_last_copy_and_fetches_wait(tmp_path: Path) -> None:
    """Acceptance 3: R2 down (nothing pushed), no origin lists the items: no eviction, the fetch waits."""
    budget = 1_000_000
    cfg = make_config(
        tmp_path,
        cache={
            "budget": budget,
            "high_watermark": 0.9,
            "low_watermark": 0.5,
            "free_space_floor": "1MB",
            "check_interval": 0.2,
        },
    )
    async with running_cache(cfg) as (node, cache, _p2p):
        store = node.store
        old = time.time() - 3600
        seeded = [
            await store.run(
                seed_cached, store, cache.layout, f"inbox/{n}.bin", os.urandom(280_000), last_access=old + n
            )
            for n in range(3)
        ]
        # An origin lists the first key, but with other bytes: that is not a copy of ours.
        await store.run(
            store.upsert_entry,
            CatalogEntry(origin="sourcecoop", key=seeded[0].key, urls=(), size=seeded[0].size, md5="0" * 32),
        )
        entered = asyncio.Event()

        async def fetch() -> None:
            async with cache.reserve(200_000):
                entered.set()

        task = asyncio.create_task(fetch())
        for _ in range(200):
            if "cache" in node.problems:
                break
            await asyncio.sleep(0.02)
        reason = node.problems.get("cache", "")
        assert NOT_DURABLE in reason and "fetches wait" in reason
        assert cache.status()["waiting"] == 1 and cache.status()["waiting_reason"] == reason
        assert not entered.is_set()
        for it in seeded:
            row = await store.run(store.get_item, it.id)
            assert row is not None and row.state is State.CACHED
            assert cache.layout.final_path(it.key).exists()
        plan = await cache.plan_report(10)
        assert plan["plan"]["evict"] == 0 and not plan["plan"]["sufficient"]
        assert all(i["reason"] == NOT_DURABLE for i in plan["items"])

        # R2 comes back and confirms the oldest item: exactly that one goes, the fetch proceeds.
        await store.run(store.update_item, seeded[0].id, pushed=True)
        node.notify("pushed")
        await asyncio.wait_for(task, timeout=30)
        assert entered.is_set()
        states = [(await store.run(store.get_item, it.id)).state for it in seeded]  # type: ignore[union-attr]
        assert states == [State.EVICTED, State.CACHED, State.CACHED]
        assert not cache.layout.final_path(seeded[0].key).exists()
        assert "cache" not in node.problems


async def test_too_large_for_budget_is_an_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, cache={"budget": 1_000_000, "free_space_floor": "1MB"})
    async with running_cache(cfg) as (_node, cache, _p2p):
        with pytest.raises(CacheFull, match="can never fit"):
            async with cache.reserve(2_000_000):
                pass


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "smallfs") as mnt:
        yield mnt


async def test_free_space_floor_evicts_even_under_budget(tmp_path: Path, small_fs: Path) -> None:
    mib = 1024 * 1024
    cfg = make_config(
        tmp_path,
        paths={"cache_dir": str(small_fs / "cache"), "state_dir": str(tmp_path / "state")},
        cache={"budget": "1GB", "free_space_floor": 8 * mib},
    )
    async with running_cache(cfg) as (node, cache, _p2p):
        store = node.store
        items = [
            await store.run(
                seed_cached,
                store,
                cache.layout,
                f"f/{n}.bin",
                os.urandom(4 * mib),
                origin="sourcecoop",
                pushed=True,
                last_access=1000.0 + n,
            )
            for n in range(3)
        ]
        # 12 MiB used of 24: the budget (1 GB) has room, the filesystem does not keep 8 MiB free after 6 more.
        async with cache.reserve(6 * mib):
            states = [(await store.run(store.get_item, it.id)).state for it in items]  # type: ignore[union-attr]
            assert states == [State.EVICTED, State.CACHED, State.CACHED]
            assert cache.status()["fs_free_bytes"] - 6 * mib >= 8 * mib
