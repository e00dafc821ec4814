"""Helpers for the cache tests: configs, a cache running in-process, items seeded on disk and in the store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from noded.cache.accounting import Cache
from noded.cache.layout import CacheLayout, disk_bytes
from noded.core.component import Node
from noded.core.config import Config, load_config
from noded.core.model import CatalogEntry, Item, State
from noded.core.store import Store
from tests.conftest import base_config, deep_merge, write_config


def make_config(tmp: Path, **overrides: Any) -> Config:
    cfg = deep_merge(base_config(tmp), overrides)
    return load_config(write_config(tmp, cfg))


class RecordingP2P:
    """Stands in for the P2P component's `remove_torrent` contract; records what eviction asks."""

    name = "p2p"

    def __init__(self) -> None:
        self.removed: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    async def remove_torrent(self, infohash: str) -> None:
        self.removed.append(infohash)


@contextlib.asynccontextmanager
async def running_cache(cfg: Config) -> AsyncIterator[tuple[Node, Cache, RecordingP2P]]:
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    node = Node(cfg=cfg, store=store)
    p2p = RecordingP2P()
    node.components["p2p"] = p2p
    cache = Cache(node)
    await cache.start()
    node.components["cache"] = cache
    try:
        yield node, cache, p2p
    finally:
        await cache.stop()
        await store.close()


def seed_cached(
    store: Store,
    layout: CacheLayout,
    key: str,
    data: bytes,
    *,
    origin: str = "inbox",
    pushed: bool = False,
    pinned: bool = False,
    last_access: float | None = None,
    infohash: str | None = None,
    fsync: bool = False,
) -> Item:
    """Write `data` under the cache path of `key` and record it CACHED (store opened with open_sync)."""
    path = layout.final_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    st = path.stat()
    md5 = hashlib.md5(data).hexdigest()
    sha = hashlib.sha256(data).hexdigest()
    item, _ = store.upsert_entry(
        CatalogEntry(origin=origin, key=key, urls=(), size=len(data), md5=md5, sha256=sha, infohash=infohash)
    )
    return store.set_state(
        item.id,
        State.CACHED,
        disk_bytes=disk_bytes(st),
        mtime_ns=st.st_mtime_ns,
        pushed=pushed,
        pinned=pinned,
        last_access=time.time() if last_access is None else last_access,
    )


def tree_disk_bytes(root: Path) -> int:
    """Allocated bytes of every file under `root` (cache + partials), as du would count them.

    Counted once per inode: a file renamed from the partial area into place while the walk runs
    would otherwise be seen in both places.
    """
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, f))
                seen[(st.st_dev, st.st_ino)] = disk_bytes(st)
    return sum(seen.values())


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "24m") -> Iterator[Path]:
    """A real small filesystem (tmpfs) mounted at `where`; skips the test when mounting is not allowed."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
