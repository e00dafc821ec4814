"""A quota smaller than the filesystem's free space: free space is the smaller of the two, and the
budget, the free-space floor and check-config all answer to it.

The kernel of the build machines has no quota support (CONFIG_QUOTA), so the system's quota is read
here only from the text the `quota` tool prints; the configured `cache.quota` runs the whole path.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from noded.cache import db as cachedb
from noded.cache.accounting import Cache
from noded.cache.layout import disk_bytes, publish
from noded.core.config import EX_CONFIG, ConfigError, parse_config
from noded.core.hashing import hash_file
from noded.core.model import CatalogEntry, State
from noded.core.quota import Quota, QuotaView, parse_quota
from noded.origins.pipeline import Origins
from tests.cachekit import make_config, running_cache, tree_disk_bytes
from tests.conftest import ROOT, base_config, noded_env, to_toml

# `quota -w -p --show-mntpoint --hide-device` for a user with limits on two filesystems; the first is
# over its soft limit (`*`), grace times in seconds since the epoch (-p), sizes in 1 KiB blocks.
QUOTA_OUTPUT = """\
Disk quotas for user seed (uid 1000):
     Filesystem   blocks   quota   limit   grace   files   quota   limit   grace
          /srv  5120100*  5000000 6000000 1767225600   812       0       0       0
         /home   204800  1048576 1153434       0    1201       0       0       0
"""


def test_quota_output_is_read_per_filesystem_with_the_tighter_limit() -> None:
    home = parse_quota(QUOTA_OUTPUT, Path("/home"))
    assert home == Quota(1048576 * 1024, 204800 * 1024, "system (quota on /home)")
    assert home.headroom == (1048576 - 204800) * 1024
    srv = parse_quota(QUOTA_OUTPUT, Path("/srv"))
    assert srv is not None and srv.limit == 5000000 * 1024 and srv.headroom == 0  # over the soft limit
    assert parse_quota(QUOTA_OUTPUT, None) == srv  # no mount point asked: the first line


def test_no_limit_or_no_quota_reads_as_none() -> None:
    unlimited = [*QUOTA_OUTPUT.splitlines()[0:2], "  /home   204800       0       0       0    1201   0   0   0"]
    assert parse_quota("\n".join(unlimited), Path("/home")) is None
    assert parse_quota("", Path("/home")) is None
    assert parse_quota("quota: Cannot open quotafile //aquota.user: No such file or directory\n", None) is None
    # A hard limit alone counts.
    hard_only = "  /home   1000   0   4000   0   1   0   0   0"
    assert parse_quota(hard_only, Path("/home")) == Quota(4000 * 1024, 1000 * 1024, "system (quota on /home)")


def test_free_space_is_the_smaller_of_filesystem_and_quota_headroom(tmp_path: Path) -> None:
    view = QuotaView(tmp_path, 4_000_000, read_system=False)
    assert view.free(fs_free=10**12, on_disk=3_000_000) == 1_000_000
    assert view.last == Quota(4_000_000, 3_000_000, "cache.quota")
    assert view.free(fs_free=500_000, on_disk=3_000_000) == 500_000  # the filesystem is tighter
    assert view.free(fs_free=10**12, on_disk=5_000_000) == 0  # past the quota: nothing, never negative
    assert QuotaView(tmp_path, None, read_system=False).free(fs_free=123, on_disk=10**9) == 123


def test_quota_must_be_positive(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    cfg["cache"]["quota"] = "0"
    with pytest.raises(ConfigError, match=r"cache"):
        parse_config(to_toml(cfg), tmp_path / "config.toml")


def _check_config(tmp_path: Path, cache: dict[str, object]) -> subprocess.CompletedProcess[str]:
    cfg = base_config(tmp_path)
    cfg["cache"].update(cache)
    tmp_path.mkdir()
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    return subprocess.run(
        [sys.executable, "-m", "noded", "-c", str(path), "check-config", "--skip-ports"],
        capture_output=True, text=True, env=noded_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_check_config_reports_the_budget_against_the_quota(tmp_path: Path) -> None:
    r = _check_config(tmp_path / "a", {"budget": "10MB", "quota": "8MB"})
    assert r.returncode == EX_CONFIG, r.stdout + r.stderr
    assert "cache.budget" in r.stderr and "larger than cache.quota (8000000 bytes)" in r.stderr
    r = _check_config(tmp_path / "b", {"budget": "8MB", "quota": "10MB"})
    assert r.returncode == 0, r.stdout + r.stderr


async def _fetch_into(cache: Cache, item_id: int, version: int, data: bytes) -> None:
    """What the pull pipeline does: reserve, write the partial, hash, publish, record."""
    store = cache.node.store
    loop = asyncio.get_running_loop()
    partial = cache.layout.partial_path(item_id, version)
    async with cache.reserve(len(data), item_id=item_id, path=partial):
        await store.run(store.set_state, item_id, State.FETCHING)
        await loop.run_in_executor(None, partial.write_bytes, data)
        h = await loop.run_in_executor(None, hash_file, partial)
        item = await store.run(store.get_item, item_id)
        assert item is not None
        st = await loop.run_in_executor(None, publish, partial, cache.layout.final_path(item.key))
        await store.run(cachedb.record_published, store, item_id, h, disk_bytes(st), st.st_mtime_ns)


async def test_cache_stays_within_a_quota_far_below_budget_and_filesystem(tmp_path: Path) -> None:
    """60 items of up to 600 KB (about 18 MB) through a 64 MB budget and a 4 MB quota."""
    quota = 4_000_000
    floor = 1_000_000
    cfg = make_config(
        tmp_path,
        cache={
            "budget": 64_000_000,
            "quota": quota,
            "high_watermark": 1.0,
            "low_watermark": 0.5,
            "free_space_floor": floor,
            "check_interval": 0.2,
        },
    )
    rng = random.Random(16)
    async with running_cache(cfg) as (node, cache, _p2p):
        store = node.store
        assert cache.budget.budget == quota  # the budget never exceeds the quota
        over: list[int] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                used = await loop.run_in_executor(None, tree_disk_bytes, cache.layout.root)
                if used > quota:
                    over.append(used)
                await asyncio.sleep(0.005)

        sampling = asyncio.create_task(sampler())
        for n in range(60):
            data = rng.randbytes(rng.randint(1, 600_000))
            key = f"quota/{n:02d}.bin"
            entry = CatalogEntry(
                origin="sourcecoop", key=key, urls=(f"http://127.0.0.1:9/{key}",), size=len(data),
                md5=hashlib.md5(data).hexdigest(),
            )  # fmt: skip
            item, _ = await store.run(store.upsert_entry, entry)
            await asyncio.wait_for(_fetch_into(cache, item.id, item.version, data), timeout=60)
            await store.run(store.update_item, item.id, pushed=True)  # durable in R2: evictable
            node.notify("pushed")
        stop.set()
        await sampling

        assert over == [], f"the cache passed its quota: {over[:5]}"
        final = tree_disk_bytes(cache.layout.root)
        # The floor is kept inside the quota too: what is left under the quota stays above it.
        assert final <= quota - floor + 600_000, final
        counts = await store.run(store.counts_by_state)
        assert counts["evicted"] > 30, counts  # ~18 MB went through 4 MB
        q = cache.status()["quota"]
        assert q["source"] == "cache.quota" and q["limit_bytes"] == quota
        assert cache.status()["fs_free_bytes"] <= quota


async def test_a_disk_failure_is_retried_against_the_quota_not_statvfs(tmp_path: Path) -> None:
    """The pull pipeline asks the cache's measure (quota included) whether a disk-full item has room again."""
    cfg = make_config(tmp_path, cache={"budget": 64_000_000, "quota": 4_000_000, "free_space_floor": 1_000_000})
    async with running_cache(cfg) as (node, cache, _p2p):
        await cache.measure()
        holder = SimpleNamespace(node=node, layout=cache.layout)
        free = Origins._free_bytes(holder)  # type: ignore[arg-type]
        assert free is not None and free <= 4_000_000 < shutil.disk_usage(tmp_path).free
