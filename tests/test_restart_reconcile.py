"""Acceptance 6: restart with 10,000 cached items reads (almost) nothing from the cache (/proc/PID/io).

The files are flushed and dropped from the page cache (POSIX_FADV_DONTNEED) before the restart, so any
re-read would have to come from the disk and show up in read_bytes. A control process that does read
the files proves the measurement sees such reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.store import Store
from tests.cachekit import seed_cached
from tests.p2p_helpers import drop_page_cache

N = 10_000
SIZE = 4096


def _read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/PID/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/PID/io (task io accounting)")
def test_restart_with_10000_items_reads_nothing(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    node = noded_factory(start=False)
    store = Store(d / "state" / "noded.sqlite3")
    store.open_sync()
    layout = CacheLayout(d / "cache", d / "state")
    layout.ensure()
    paths = []
    try:
        with store.tx():
            for n in range(N):
                key = f"set{n % 100:02d}/item{n:05d}.bin"
                seed_cached(store, layout, key, os.urandom(SIZE), origin="sourcecoop", pushed=True)
                paths.append(layout.final_path(key))
    finally:
        store.close_sync()
    total = N * SIZE

    node.start(timeout=60)
    assert node.stop() == 0

    # Control: reading the files after dropping them from the page cache shows up in read_bytes.
    drop_page_cache(paths[:2000])
    ctl = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time\nfor p in sys.argv[1:]: open(p,'rb').read()\nprint('done', flush=True)\ntime.sleep(30)",
            *map(str, paths[:2000]),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert ctl.stdout is not None and ctl.stdout.readline().strip() == b"done"
        control = _read_bytes(ctl.pid)
    finally:
        ctl.kill()
        ctl.wait()
    assert control >= 0.9 * 2000 * SIZE, f"the control read of {2000 * SIZE} bytes was not visible ({control})"

    drop_page_cache(paths)
    t0 = time.monotonic()
    node.start(timeout=60)
    ready = time.monotonic() - t0
    read = _read_bytes(node.pid)
    events = node.log_events()
    rec = [e for e in events if e.get("event") == "cache.reconciled"][-1]
    print(f"restart with {N} items: ready in {ready:.2f}s, read_bytes {read} of {total} cached bytes")
    assert rec["items"] == N and rec.get("ok") == N
    # Near zero: well under one file's worth per hundred files (the SQLite store itself may be read).
    assert read < 0.05 * total, f"start-up read {read} bytes, cache holds {total}"
    _, st = node.get("/v1/status")
    assert st["cache"]["cached_items"] == N and st["items"]["cached"] == N
