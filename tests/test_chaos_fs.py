"""Chaos: a clumsy or hostile operator's filesystem, against real `noded run` processes.

Symlinks and special files in the inbox or the cache are never published, listed, served, built into a
torrent or pushed; they stay where they are (a cached item replaced by one is moved aside) and show as a
problem in /v1/status and in the log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.model import PIECE_LENGTH
from noded.core.store import Store
from tests.cachekit import seed_cached
from tests.conftest import ROOT, NodedProcess, base_config, free_port, noded_env, write_config
from tests.p2p_helpers import content
from tests.r2_fixtures import BUCKET, CountingMotoServer, s3_client, s3server  # noqa: F401 - fixture
from tests.test_p2p_sync import start_node_a

SECRET = "r2-secret-Zq8vKp2Lr7Wn4Tx9"


def _until(cond: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(node_dir: Path) -> dict[str, dict[str, Any]]:
    db = node_dir / "state" / "noded.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        c.row_factory = sqlite3.Row
        return {r["key"]: dict(r) for r in c.execute("SELECT * FROM items ORDER BY version")}


def _webseed(cfg: dict[str, Any], key: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{cfg['http_mirror']['port']}/{key}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _credentials(tmp: Path) -> Path:
    """A credentials directory laid out as systemd's LoadCredential= makes it."""
    creds = tmp / "credentials"
    creds.mkdir()
    (creds / "r2-access-key-id").write_text("test\n")
    (creds / "r2-secret-access-key").write_text(SECRET + "\n")
    (creds / "api-token").write_text("token-for-tests\n")
    return creds


def test_inbox_symlinks_are_refused_reported_and_never_published(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    creds = _credentials(tmp_path)
    node_dir = tmp_path / "toronto"
    inbox = node_dir / "inbox"
    inbox.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    same_fs = elsewhere / "roads.parquet"
    same_fs.write_bytes(os.urandom(300_000))
    (elsewhere / "dir").mkdir()
    (elsewhere / "dir" / "inner.bin").write_bytes(os.urandom(1000))

    # Laid down before the start (found by the first listing) and after it (found by inotify).
    (inbox / "secret.parquet").symlink_to(creds / "r2-secret-access-key")
    os.mkfifo(inbox / "pipe.bin")
    (inbox / "linked-dir").symlink_to(elsewhere / "dir")
    cfg = base_config(
        node_dir,
        r2={"enabled": True, "endpoint": s3server.endpoint, "bucket": BUCKET, "region": "us-east-1"},
        origins={"inbox": {"dir": str(inbox), "stable_seconds": 1.0}},
    )
    node = NodedProcess(write_config(node_dir, cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        node.start()
        (inbox / "sub").mkdir()
        (inbox / "sub" / "roads.parquet").symlink_to(same_fs)  # same filesystem: a rename would move the link
        good = os.urandom(200_000)
        (inbox / "good.bin").write_bytes(good)

        # The good file goes all the way (so the refusals are not a node that does nothing) ...
        _until(lambda: _rows(node_dir).get("good.bin", {}).get("pushed") == 1, what="good.bin pushed to R2")
        problem = _until(
            lambda: (p := node.get("/v1/status")[1]["problems"].get("unsafe_files")) and "sub/roads" in p and p,
            what="the refused files in the status",
        )
        # ... and every unsafe entry is named in the status, without where the symlink points.
        for name in ("inbox/secret.parquet", "inbox/pipe.bin", "inbox/linked-dir", "inbox/sub/roads.parquet"):
            assert name in problem, problem
        assert "a symlink" in problem and "a FIFO" in problem
        assert str(creds) not in problem and str(tmp_path) not in problem
        refused = {e["path"] for e in node.log_events() if e["event"] == "inbox.refused"}
        assert str(inbox / "secret.parquet") in refused and str(inbox / "sub" / "roads.parquet") in refused

        # Left in place, untouched.
        assert (inbox / "secret.parquet").is_symlink() and (inbox / "sub" / "roads.parquet").is_symlink()
        assert (creds / "r2-secret-access-key").read_text() == SECRET + "\n"
        assert same_fs.is_file()
        # Never a row, a cached file, an inventory entry, a web-seed answer, a torrent or an object.
        assert set(_rows(node_dir)) == {"good.bin"}
        cache = node_dir / "cache"
        assert sorted(p.name for p in cache.iterdir() if p.name != ".noded") == ["good.bin"]
        inventory = node.get("/v1/inventory")[1]
        assert [i["key"] for i in inventory["items"]] == ["good.bin"]
        for key in ("secret.parquet", "sub/roads.parquet", "linked-dir/inner.bin"):
            status, body = _webseed(cfg, key)
            assert status == 404 and SECRET.encode() not in body
        for t in (node_dir / "state" / "torrents").iterdir():
            assert b"secret" not in t.read_bytes() and b"roads" not in t.read_bytes()
        s3 = s3_client(s3server.endpoint)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
        assert keys == ["good.bin"]
        assert SECRET not in node.output()

        # Removing the symlinks clears the problem.
        for p in (inbox / "secret.parquet", inbox / "pipe.bin", inbox / "linked-dir", inbox / "sub" / "roads.parquet"):
            p.unlink()
        _until(lambda: "unsafe_files" not in node.get("/v1/status")[1]["problems"], what="the problem to clear")
        assert node.stop() == 0
    finally:
        node.kill()


def _publish(node: NodedProcess, node_dir: Path, key: str, data: bytes) -> None:
    (node_dir / "inbox" / key).write_bytes(data)
    _until(lambda: _rows(node_dir).get(key, {}).get("state") == "cached", what=f"{key} published")


def test_cached_file_replaced_by_a_symlink_is_moved_aside_running_and_at_restart(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    secret = creds / "r2-secret-access-key"
    node_dir = tmp_path / "toronto"
    cfg = base_config(node_dir, origins={"inbox": {"dir": str(node_dir / "inbox"), "stable_seconds": 1.0}})
    node = NodedProcess(write_config(node_dir, cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    cache = node_dir / "cache"
    try:
        node.start()
        # The same size as the secret: a size check alone would not notice the swap.
        a = os.urandom(secret.stat().st_size)
        b = os.urandom(4096)
        _publish(node, node_dir, "a.bin", a)
        _publish(node, node_dir, "b.bin", b)

        # While running: the watcher sees the swap.
        (cache / "a.bin").unlink()
        (cache / "a.bin").symlink_to(secret)
        _until(lambda: _rows(node_dir)["a.bin"]["state"] != "cached", what="a.bin marked")
        problem = _until(lambda: node.get("/v1/status")[1]["problems"].get("unsafe_files"), what="problem")
        assert "cache/a.bin" in problem and "a symlink" in problem and str(creds) not in problem
        assert not os.path.lexists(cache / "a.bin")  # moved aside, into the quarantine area
        assert any(p.is_symlink() for p in (cache / ".noded" / "quarantine").iterdir())
        assert _webseed(cfg, "a.bin")[0] == 404
        inventory = node.get("/v1/inventory")[1]["items"]
        assert [i["key"] for i in inventory if i["state"] == "cached"] == ["b.bin"]
        assert node.stop() == 0

        # While stopped: the start-up reconciliation sees it.
        (cache / "b.bin").unlink()
        (cache / "b.bin").symlink_to(secret)
        node.start()
        problem = _until(lambda: node.get("/v1/status")[1]["problems"].get("unsafe_files"), what="problem")
        assert "cache/b.bin" in problem
        assert _rows(node_dir)["b.bin"]["state"] != "cached"
        assert not os.path.lexists(cache / "b.bin")
        status, body = _webseed(cfg, "b.bin")
        assert status == 404 and SECRET.encode() not in body
        assert secret.read_text() == SECRET + "\n"
        assert not [i for i in node.get("/v1/inventory")[1]["items"] if i["state"] == "cached"]
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.kill()


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and mtime (what a second daemon must not change)."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                with contextlib.suppress(FileNotFoundError):
                    st = p.lstat()
                    out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def test_second_daemon_on_the_same_directories_refuses_and_touches_nothing(tmp_path: Path) -> None:
    node_dir = tmp_path / "toronto"
    first_cfg = base_config(node_dir)
    first = NodedProcess(write_config(node_dir, first_cfg, "first.toml"))
    try:
        first.start()
        _publish(first, node_dir, "a.bin", os.urandom(100_000))
        # The first node stopped writing for a moment: SIGSTOP, so any change below is the second one's.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            before = _tree(node_dir / "state", node_dir / "cache", node_dir / "inbox")
            # Same directories, other ports (base_config picks new ones).
            for name, paths in (
                ("same.toml", first_cfg["paths"]),
                ("cache-only.toml", {**first_cfg["paths"], "state_dir": str(tmp_path / "other-state")}),
            ):
                second_cfg = base_config(node_dir, paths=paths)
                second = NodedProcess(write_config(tmp_path, second_cfg, name))
                second.start(wait_ready=False)
                assert second.proc is not None
                rc = second.proc.wait(30)
                out = second.output()
                assert rc == 75, out
                assert "in use by another noded" in out and f"pid {first.pid}" in out, out
                assert "component.started" not in out
                assert _tree(node_dir / "state", node_dir / "cache", node_dir / "inbox") == before
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.get("/readyz")[0] == 200
        assert first.stop() == 0
        # Once the first one is gone (even by kill -9), a new one starts on the same directories.
        first.start()
        first.kill()
        again = NodedProcess(write_config(node_dir, base_config(node_dir), "again.toml")).start()
        assert again.get("/readyz")[0] == 200
        assert again.stop() == 0
    finally:
        first.kill()


def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noded", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=noded_env(),
        cwd=str(ROOT),
        check=False,
    )


def test_overlapping_directories_are_refused_by_check_config_and_at_start(tmp_path: Path) -> None:
    t = tmp_path
    bad = {
        "cache == state": ({"cache_dir": str(t / "one"), "state_dir": str(t / "one")}, None, "paths.state_dir"),
        "state in cache": ({"cache_dir": str(t / "c"), "state_dir": str(t / "c" / "state")}, None, "paths.state_dir"),
        "cache in state": ({"cache_dir": str(t / "s" / "cache"), "state_dir": str(t / "s")}, None, "paths.state_dir"),
        "inbox in cache": ({"cache_dir": str(t / "c"), "state_dir": str(t / "s")}, t / "c" / "in", "origins.inbox.dir"),
        "inbox is state": ({"cache_dir": str(t / "c"), "state_dir": str(t / "s")}, t / "s", "origins.inbox.dir"),
        "state in inbox": ({"cache_dir": str(t / "c"), "state_dir": str(t / "i" / "s")}, t / "i", "origins.inbox.dir"),
        "inbox as torrents": (
            {"cache_dir": str(t / "c"), "state_dir": str(t / "s")},
            t / "s" / "torrents",
            "origins.inbox.dir",
        ),
    }
    for what, (paths, inbox, key) in bad.items():
        cfg = base_config(t, paths=paths, origins={"inbox": {"dir": str(inbox or t / "inbox")}})
        path = write_config(t, cfg, "bad.toml")
        r = _cli(path, "check-config", "--skip-ports")
        assert r.returncode == 78, (what, r.stderr)
        assert key in r.stderr, (what, r.stderr)
    # At start too: a cache that is the state directory never gets a dataset over the database.
    cfg = base_config(t, paths={"cache_dir": str(t / "same"), "state_dir": str(t / "same")})
    r = _cli(write_config(t, cfg, "same.toml"), "run")
    assert r.returncode == 78, r.stderr
    assert not (t / "same" / "noded.sqlite3").exists()
    # The deployed layout, an inbox in its own directory under the state directory, is fine.
    cfg = base_config(t, paths={"cache_dir": str(t / "c"), "state_dir": str(t / "s")})
    cfg["origins"]["inbox"]["dir"] = str(t / "s" / "inbox")
    r = _cli(write_config(t, cfg, "good.toml"), "check-config", "--skip-ports")
    assert r.returncode == 0, r.stderr


def test_config_file_checks_floor_fifo_and_world_writable(tmp_path: Path) -> None:
    total = shutil.disk_usage(tmp_path).total
    cfg = base_config(tmp_path, cache={"budget": "1GB", "free_space_floor": total})
    r = _cli(write_config(tmp_path, cfg, "floor.toml"), "check-config", "--skip-ports")
    assert r.returncode == 78 and "cache.free_space_floor" in r.stderr, r.stderr

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    r = _cli(fifo, "check-config", "--skip-ports", timeout=30)  # nobody writes: a blocking read would hang
    assert r.returncode == 78 and "not a regular file" in r.stderr, r.stderr
    r = _cli(tmp_path, "check-config", "--skip-ports")  # a directory
    assert r.returncode == 78 and "not a regular file" in r.stderr, r.stderr

    path = write_config(tmp_path, base_config(tmp_path), "open.toml")
    path.chmod(0o666)
    r = _cli(path, "check-config", "--skip-ports")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "world-writable" in r.stderr
    path.chmod(0o640)
    r = _cli(path, "check-config", "--skip-ports")
    assert r.returncode == 0 and "world-writable" not in r.stderr


def _peer_bytes_in(node: NodedProcess, peer: str) -> int:
    with urllib.request.urlopen(node.api + "/metrics", timeout=10) as r:
        text = r.read().decode()
    want = f'noded_traffic_bytes_total{{channel="peer:{peer}",direction="in"}}'
    return sum(int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(want))


def test_sigterm_during_a_peer_download_keeps_the_partial_and_the_restart_resumes(
    noded_factory: Any, tmp_path: Path
) -> None:
    size = 160 * 1024 * 1024  # ten 16 MiB pieces
    data = content(size, 15)
    a, a_bt = start_node_a(noded_factory, data)
    b_bt = free_port()
    b = noded_factory(
        "amsterdam",
        start=False,
        peers=[{"name": "toronto", "api_url": a.api, "bittorrent": a_bt}],
        bittorrent={"listen_interfaces": f"127.0.0.1:{b_bt}"},
    )
    partial_dir = tmp_path / "amsterdam" / "cache" / ".noded" / "partial"

    def on_disk() -> int:
        return sum(p.stat().st_blocks * 512 for p in partial_dir.glob("*") if p.is_file())

    b.start()
    # Rate limits do not apply on loopback: freeze the sender once B is partway, so the stop comes midway.
    _until(lambda: on_disk() >= 32 * 1024 * 1024, timeout=120, what="B partway through the download")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        first_run = _peer_bytes_in(b, "toronto")
        assert first_run < size, "the download ended before the stop; nothing to resume"
        assert b.stop(signal.SIGTERM) == 0
    finally:
        os.kill(a.pid, signal.SIGCONT)
    kept = on_disk()
    assert kept >= 32 * 1024 * 1024, "the clean stop dropped the partial"
    assert any(e["event"] == "sync.partial_kept" for e in b.log_events())

    b.start()
    _until(
        lambda: _rows(tmp_path / "amsterdam").get("layers/x.pmtiles", {}).get("state") == "cached",
        timeout=180,
        what="B done after the restart",
    )
    resent = _peer_bytes_in(b, "toronto")
    assert (tmp_path / "amsterdam" / "cache" / "layers" / "x.pmtiles").read_bytes() == data
    # Only what was not on disk comes again (whole pieces: a piece half written at the stop is fetched anew).
    assert resent <= size - kept + 2 * PIECE_LENGTH, (first_run, kept, resent)
    assert resent < size, (first_run, kept, resent)
    assert b.stop() == 0


def test_eviction_counts_a_download_in_progress_once(noded_factory: Any, tmp_path: Path) -> None:
    mib = 1024 * 1024
    size = 128 * mib
    a, a_bt = start_node_a(noded_factory, content(size, 8))
    b = noded_factory(
        "amsterdam",
        start=False,
        peers=[{"name": "toronto", "api_url": a.api, "bittorrent": a_bt}],
        bittorrent={"listen_interfaces": f"127.0.0.1:{free_port()}", "peer_stall_timeout": 300.0},
        # high 285 MiB, low 255 MiB
        cache={"budget": 300 * mib, "high_watermark": 0.95, "low_watermark": 0.85, "check_interval": 0.5},
    )
    b_dir = tmp_path / "amsterdam"
    cfg = load_config(b.config)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    layout.ensure()
    for n in range(20):  # 200 MiB, all durable elsewhere (pushed), oldest first
        seed_cached(store, layout, f"old/{n:02}.bin", os.urandom(10 * mib), pushed=True, last_access=1000.0 + n)
    store.close_sync()
    partial_dir = b_dir / "cache" / ".noded" / "partial"

    def on_disk() -> int:
        return sum(p.stat().st_blocks * 512 for p in partial_dir.glob("*") if p.is_file())

    def evicted() -> list[str]:
        return sorted(k for k, r in _rows(b_dir).items() if k.startswith("old/") and r["state"] == "evicted")

    b.start()
    # Admission: 200 MiB cached + 128 MiB reserved is above the high watermark: evict to the low one,
    # 8 items of 10 MiB (120 + 128 = 248 MiB).
    _until(lambda: on_disk() >= 48 * mib, timeout=120, what="B partway through the download")
    os.kill(a.pid, signal.SIGSTOP)  # the download stays in progress with its bytes on disk
    try:
        assert on_disk() < size
        need = 200 * mib + size - 255 * mib
        expected = -(-need // (10 * mib))
        # Several accounting rounds with the partial's bytes on disk: counted once inside the reservation
        # (248 MiB, below the high watermark) they evict nothing more; counted again they would (296 MiB).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert len(evicted()) <= expected, evicted()
            time.sleep(0.25)
        assert evicted() == [f"old/{n:02}.bin" for n in range(expected)]
        st = b.get("/v1/status")[1]["cache"]
        assert st["reserved_bytes"] >= size and st["used_bytes"] <= 120 * mib + 8 * mib, st
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _until(lambda: _rows(b_dir).get("layers/x.pmtiles", {}).get("state") == "cached", timeout=120, what="B's download")
    assert len(evicted()) == expected
    assert b.stop() == 0


def test_status_shows_no_filesystem_paths_and_sigusr_signals_dump_instead_of_killing(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    node_dir = tmp_path / "toronto"
    inbox = node_dir / "inbox"
    bad_torrent = node_dir / "state" / "published" / "bad.torrent"  # its problem names its path
    bad_torrent.parent.mkdir(parents=True)
    bad_torrent.write_bytes(b"d4:infod6:lengthi-1eee")
    cfg = base_config(
        node_dir,
        origins={"inbox": {"dir": str(inbox), "stable_seconds": 0.5}, "torrents": {"files": [str(bad_torrent)]}},
    )
    node = NodedProcess(write_config(node_dir, cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        node.start()
        inbox.mkdir(exist_ok=True)
        (inbox / "key.bin").symlink_to(creds / "r2-secret-access-key")  # a problem whose text names paths
        _until(lambda: "unsafe_files" in node.get("/v1/status")[1]["problems"], what="the problem")
        raw = urllib.request.urlopen(node.api + "/v1/status", timeout=10).read().decode()
        for p in (str(tmp_path), str(node_dir / "state" / "noded.sqlite3"), str(creds), str(inbox)):
            assert p not in raw, p
        assert '"database": "noded.sqlite3"' in raw
        problems = node.get("/v1/status")[1]["problems"]
        assert "<state_dir>/published/bad.torrent" in problems["torrents"], problems

        pid = node.pid
        os.kill(pid, signal.SIGUSR1)
        ev = _until(lambda: next((e for e in node.log_events() if e["event"] == "daemon.status"), None), what="dump")
        assert ev["components"]["store"] == "running" and "unsafe_files" in ev["problems"]
        os.kill(pid, signal.SIGUSR2)
        ev = _until(lambda: next((e for e in node.log_events() if e["event"] == "daemon.tasks"), None), what="tasks")
        assert ev["count"] > 0 and any("status-loop" in t for t in ev["tasks"])
        assert node.proc is not None and node.proc.poll() is None
        assert node.get("/readyz")[0] == 200
        assert node.stop(signal.SIGTERM) == 0
        assert any(e["event"] == "daemon.stopped" for e in node.log_events())
    finally:
        node.kill()


async def test_web_seed_never_opens_a_symlink_swapped_in_after_its_check(tmp_path: Path) -> None:
    """The race a hostile local user would try: the file passes the web seed's lstat, then becomes a
    symlink before the response opens it. The open itself refuses it (O_NOFOLLOW): 404, no byte of the
    link's target."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from noded.core.httpserve import serve_file

    secret = _credentials(tmp_path) / "r2-secret-access-key"
    item = tmp_path / "item.bin"
    item.write_bytes(b"x" * 27)
    (tmp_path / "item.bin.gz").write_bytes(b"not this")

    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_file(request, item)

    app = web.Application()
    app.router.add_get("/item", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        r = await client.get("/item", headers={"Accept-Encoding": "gzip, br"})
        assert r.status == 200 and await r.read() == b"x" * 27  # the file itself, never a sibling
        item.unlink()
        item.symlink_to(secret)
        r = await client.get("/item")
        body = await r.read()
        assert r.status == 404, r.status
        assert secret.read_bytes() not in body
