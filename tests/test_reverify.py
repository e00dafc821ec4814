"""A corrupt report on a held copy reaches the cache's verifier through verify_queue.

The cache component (noded/cache/accounting.py, noded/cache/verify.py) is not started here; a small component
with the same `reverify(key)` contract re-hashes the real file against the sha256 in the store, so the
queue, the wake-up and the bookkeeping are exercised for real."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from noded.core.component import Node
from noded.core.config import parse_config
from noded.core.store import Store
from noded.transparency.reports import NewReport, insert_report, pending_verifications
from noded.transparency.reverify import ReverifyQueue, verdict
from tests.conftest import base_config, to_toml
from tests.transparency_helpers import seed_item

DATA = b"census " * 1000


class HashingCache:
    """Implements the cache's `reverify` contract by re-hashing the file (what noded/verify.py does)."""

    name = "cache"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.calls: list[str] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    async def reverify(self, key: str) -> dict[str, Any]:
        self.calls.append(key)
        item = await self.node.store.run(self.node.store.get_current, key)
        assert item is not None
        data = await asyncio.get_running_loop().run_in_executor(None, (self.node.cfg.paths.cache_dir / key).read_bytes)
        bad = hashlib.sha256(data).hexdigest() != item.sha256
        return {"ok": 0 if bad else 1, "corrupt": [key] if bad else []}


async def test_corrupt_report_is_drained_into_the_verifier(tmp_path: Path) -> None:
    cfg = parse_config(to_toml(base_config(tmp_path)))
    seed_item(cfg.paths.state_dir, cfg.paths.cache_dir, "zenodo", "a.parquet", DATA, ["http://x/a"])
    seed_item(cfg.paths.state_dir, cfg.paths.cache_dir, "zenodo", "b.parquet", DATA, ["http://x/b"])
    (cfg.paths.cache_dir / "b.parquet").write_bytes(DATA[:-1] + b"!")  # flipped on disk
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    node = Node(cfg=cfg, store=store)
    q = ReverifyQueue(node)
    try:
        for key in ("a.parquet", "b.parquet"):
            rep = NewReport(mirror="toronto", kind="corrupt", detail="", item=key)
            await store.run(insert_report, store, rep, "127.0.0.1", per_hour=10, max_open=100)
        # No verifier yet: nothing is lost, and status says why.
        assert await q.drain() == 0
        assert "2 reported copies wait" in node.problems["reverify"]
        cache = HashingCache(node)
        node.components["cache"] = cache
        await q.start()
        node.notify("verify")
        for _ in range(100):
            if q.done == 2:
                break
            await asyncio.sleep(0.05)
        assert cache.calls == ["a.parquet", "b.parquet"]
        assert [(r["key"], r["verdict"]) for r in q.recent] == [("a.parquet", "ok"), ("b.parquet", "corrupt")]
        assert await store.run(pending_verifications, store) == []
        assert "reverify" not in node.problems
    finally:
        await q.stop()
        await store.close()


def test_verdict() -> None:
    assert verdict("k", {"ok": 1, "corrupt": []}) == "ok"
    assert verdict("k", {"ok": 0, "missing": ["k"]}) == "missing"
    assert verdict("k", {"ok": 0}) == "unknown"
