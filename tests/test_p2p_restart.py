"""Acceptance 5: 200 seeded items survive SIGTERM and a restart with no recheck and almost no reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.store import Store
from tests.conftest import NodedProcess
from tests.p2p_helpers import content, drop_page_cache, put_cached_sync

N_ITEMS = 200
ITEM_SIZE = 256 * 1024 + 123


def read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/PID/io")


def own_read_bytes() -> int:
    import os

    return read_bytes(os.getpid())


def p2p_status(node: NodedProcess) -> dict[str, Any]:
    status, body = node.get("/v1/status")
    assert status == 200, body
    return dict(body["components"]["p2p"])


def wait_seeding(node: NodedProcess, n: int, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = p2p_status(node)
        if st.get("seeding") == n:
            return st
        time.sleep(0.2)
    raise AssertionError(f"not all seeding: {st}\n{node.output()[-3000:]}")


@pytest.mark.slow
def test_restart_resumes_without_recheck(noded_factory: Any, tmp_path: Path) -> None:
    node = noded_factory("toronto", start=False)
    cfg = load_config(node.config)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    for i in range(N_ITEMS):
        put_cached_sync(store, layout, f"d{i % 7}/item{i:03d}.bin", content(ITEM_SIZE, 1000 + i))
    store.close_sync()
    cache_files = [p for p in layout.root.rglob("*.bin") if ".noded" not in p.parts]
    assert len(cache_files) == N_ITEMS
    cache_bytes = sum(p.stat().st_size for p in cache_files)

    node.start()
    first = wait_seeding(node, N_ITEMS)
    assert first["checking_seen"] == 0
    assert node.stop() == 0
    assert len(list(layout.resume_dir.glob("*.fastresume"))) == N_ITEMS

    # Evict the cache files from the page cache, so any read of them by the restarted daemon hits the
    # disk and shows in read_bytes. Check that this machine lets us see such reads at all.
    drop_page_cache(cache_files)
    before = own_read_bytes()
    cache_files[0].read_bytes()
    if own_read_bytes() - before < ITEM_SIZE // 2:
        pytest.skip("read_bytes does not reflect file reads here (page cache cannot be dropped)")
    drop_page_cache(cache_files)

    node.start()
    second = wait_seeding(node, N_ITEMS)
    assert second["restored"] == N_ITEMS
    assert second["checking_seen"] == 0, second
    states = second["torrent_states"]
    assert not any(s.startswith("checking") for s in states), states
    reads = read_bytes(node.pid)
    assert reads < cache_bytes / 20, f"restart read {reads} bytes of a {cache_bytes}-byte cache"
    events = [e for e in node.log_events() if e.get("event") == "p2p.checking"]
    assert events == []
    assert node.stop() == 0
