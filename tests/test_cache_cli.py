"""`noded verify`, `noded pin/unpin`, `noded evict --dry-run` and the matching API endpoints."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from noded.cache.layout import CacheLayout
from noded.core.store import Store
from tests.cachekit import seed_cached
from tests.conftest import ROOT, base_config, noded_env, write_config

TOKEN = "test-token-0123456789"


def noded_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noded", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=noded_env(env),
        cwd=str(ROOT),
        timeout=120,
    )


def _seed(d: Path, items: dict[str, bytes], **kw: Any) -> dict[str, int]:
    store = Store(d / "state" / "noded.sqlite3")
    store.open_sync()
    try:
        layout = CacheLayout(d / "cache", d / "state")
        layout.ensure()
        return {k: seed_cached(store, layout, k, v, **kw).id for k, v in items.items()}
    finally:
        store.close_sync()


def _state(d: Path, key: str) -> tuple[str, str | None, int, float]:
    with sqlite3.connect(d / "state" / "noded.sqlite3") as c:
        r = c.execute(
            "SELECT state, error, pinned, last_access FROM items WHERE key=? ORDER BY version DESC LIMIT 1", (key,)
        ).fetchone()
    return r[0], r[1], r[2], r[3]


def test_verify_catches_flipped_bytes_and_resumes(tmp_path: Path) -> None:
    """Acceptance 5, second half: flipped bytes are caught by `noded verify`, quarantined, and the item is
    wanted again (the refetch itself is the pull pipeline's, enabled after merge)."""
    d = tmp_path / "n"
    cfg = write_config(d, base_config(d))
    items = {f"v/{n:02d}.bin": os.urandom(40_000 + n) for n in range(30)}
    ids = _seed(d, items, origin="sourcecoop")
    victim = d / "cache" / "v" / "17.bin"
    st = victim.stat()
    with open(victim, "r+b") as f:  # flip one byte, keep size and mtime: only a re-hash can tell
        f.seek(20_000)
        b = f.read(1)
        f.seek(20_000)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))

    r = noded_cli(cfg, "verify", "--json", "--rate", "0")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["checked"] == 30 and rep["ok"] == 29 and rep["corrupt"] == ["v/17.bin"]
    assert rep["bytes_read"] == sum(len(v) for v in items.values())
    state, error, _, _ = _state(d, "v/17.bin")
    assert state == "wanted" and "sha256" in error  # type: ignore[operator]
    assert not victim.exists()
    assert (d / "cache" / ".noded" / "quarantine" / f"{ids['v/17.bin']}-1").exists()
    assert _state(d, "v/03.bin")[0] == "cached"

    # Resumable: a checkpoint from an interrupted pass makes the next pass start after it.
    with sqlite3.connect(d / "state" / "noded.sqlite3") as c:
        c.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES('verify.checkpoint', ?)",
            (json.dumps({"after_id": ids["v/19.bin"], "checked": 20, "ok": 20, "bytes_read": 0}),),
        )
    r = noded_cli(cfg, "verify", "--json", "--rate", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["resumed_after_id"] == ids["v/19.bin"]
    assert rep["checked"] == 20 + 10  # the 10 items after the checkpoint, added to the saved counts
    # A finished pass clears the checkpoint; the next one starts from the beginning.
    r = noded_cli(cfg, "verify", "--json", "--rate", "0")
    rep = json.loads(r.stdout)
    assert rep["resumed_after_id"] == 0 and rep["checked"] == 29

    # Selected items, and a clear answer for an unknown key.
    r = noded_cli(cfg, "verify", "v/01.bin", "nope/x.bin")
    assert r.returncode == 1
    assert "unknown  nope/x.bin" in r.stdout and "1 ok" in r.stdout


def test_verify_rate_limit_paces_the_pass(tmp_path: Path) -> None:
    d = tmp_path / "n"
    cfg = write_config(d, base_config(d))
    _seed(d, {f"r/{n}.bin": os.urandom(100_000) for n in range(5)}, origin="sourcecoop")
    t0 = time.monotonic()
    r = noded_cli(cfg, "verify", "--json", "--rate", "1MB/s")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    # 500 kB at 1 MB/s: the pass cannot be faster than the limit allows (a lower bound, not a speed test).
    assert json.loads(r.stdout)["seconds"] >= 0.45 and elapsed >= 0.45


def test_pin_unpin_api_and_cli(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    node = noded_factory(start=False, env={"NODED_API_TOKEN": TOKEN})
    _seed(d, {"p/a.parquet": b"a" * 1000}, origin="sourcecoop", pushed=True, last_access=1000.0)
    node.start()
    # No token, a wrong token, an unknown key, a key escaping the cache: clear errors, nothing changes.
    status, body = node.get("/v1/items/p/a.parquet/pin", method="POST")
    assert status == 401 and "bearer" in body["error"]["message"]
    status, _ = node.get("/v1/items/p/a.parquet/pin", method="POST", headers={"Authorization": "Bearer nope"})
    assert status == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body = node.get("/v1/items/p/missing.parquet/pin", method="POST", headers=auth)
    assert status == 404
    status, body = node.get("/v1/items/p/..%2F..%2Fetc/pin", method="POST", headers=auth)
    assert status in (400, 404)
    assert _state(d, "p/a.parquet")[2] == 0

    status, body = node.get("/v1/items/p/a.parquet/pin", method="POST", headers=auth)
    assert status == 200 and body["pinned"] is True and body["last_access"] > 1000.0
    _, _, pinned, last_access = _state(d, "p/a.parquet")
    assert pinned == 1 and last_access > 1000.0
    status, plan = node.get("/v1/cache/plan")
    assert plan["items"][0]["reason"] == "pinned"

    env = {"NODED_API_TOKEN": TOKEN}
    r = noded_cli(node.config, "unpin", "p/a.parquet", env=env)
    assert r.returncode == 0, r.stderr
    assert "unpinned p/a.parquet" in r.stdout and _state(d, "p/a.parquet")[2] == 0
    r = noded_cli(node.config, "pin", "p/a.parquet", env=env)
    assert r.returncode == 0 and _state(d, "p/a.parquet")[2] == 1
    r = noded_cli(node.config, "pin", "p/a.parquet", env={"NODED_API_TOKEN": ""})
    assert r.returncode == 2 and "no API token" in r.stderr

    # Re-verify one item over the API (what a community "corrupt" report triggers).
    status, rep = node.get("/v1/items/p/a.parquet/verify", method="POST", headers=auth)
    assert status == 200 and rep["ok"] == 1
    path = d / "cache" / "p" / "a.parquet"
    st = path.stat()
    path.write_bytes(b"b" * 1000)  # same size and mtime, other bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, rep = node.get("/v1/items/p/a.parquet/verify", method="POST", headers=auth)
    assert status == 200 and rep["corrupt"] == ["p/a.parquet"]
    assert _state(d, "p/a.parquet")[0] == "wanted" and not path.exists()
    status, body = node.get("/v1/items/p/a.parquet/verify", method="POST", headers=auth)
    assert status == 409 and "not cached" in body["error"]["message"]


def test_evict_dry_run_explains_each_item(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    node = noded_factory(
        start=False,
        cache={
            "budget": 1_000_000,
            "high_watermark": 0.5,
            "low_watermark": 0.2,
            "free_space_floor": "1MB",
            "check_interval": 600,
        },
    )
    now = time.time()
    _seed(d, {"e/1-pushed.bin": os.urandom(150_000)}, origin="sourcecoop", pushed=True, last_access=now - 500)
    _seed(
        d, {"e/2-pinned.bin": os.urandom(150_000)}, origin="sourcecoop", pushed=True, pinned=True, last_access=now - 400
    )
    _seed(d, {"e/3-inbox.bin": os.urandom(150_000)}, last_access=now - 300)
    _seed(d, {"e/4-listed.bin": os.urandom(150_000)}, origin="sourcecoop", last_access=now - 200)
    _seed(d, {"e/5-pushed.bin": os.urandom(150_000)}, origin="sourcecoop", pushed=True, last_access=now - 100)
    # Offline (node down): reads the store.
    r = noded_cli(node.config, "evict", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "node not reachable" in r.stderr and "store read directly" in out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.strip()[:1].isdigit()}
    assert "EVICT" in lines["e/1-pushed.bin"]
    assert "keep: pinned" in lines["e/2-pinned.bin"]
    assert "keep: not durable elsewhere" in lines["e/3-inbox.bin"]
    # 5 x 150 kB = 750 kB above 500 kB: down to 200 kB needs 550 kB; only 3 items are evictable.
    assert "EVICT" in lines["e/4-listed.bin"] and "EVICT" in lines["e/5-pushed.bin"]
    assert "NOT ENOUGH" in out
    # Nothing was evicted by a dry run.
    assert all(_state(d, k)[0] == "cached" for k in lines)
    r = noded_cli(node.config, "evict")
    assert r.returncode == 2 and "--dry-run" in r.stderr
    # Online: the same plan from the running node, as JSON.
    node.start()
    r = noded_cli(node.config, "evict", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    # The running node evicted on its own at start-up (above the high watermark): the plan is now empty.
    assert plan["need_bytes"] == 0
    kept = {i["key"]: i["reason"] for i in plan["items"]}
    assert kept["e/2-pinned.bin"] == "pinned" and kept["e/3-inbox.bin"].startswith("not durable")
    assert all(_state(d, k)[0] == "evicted" for k in ("e/1-pushed.bin", "e/4-listed.bin", "e/5-pushed.bin"))
