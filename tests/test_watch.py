"""The watcher in a real `noded run`: inbox publishing, files deleted or changed behind noded's back,
fetches waiting with the reason in status, and polling where inotify is unavailable."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.model import PIECE_LENGTH
from noded.core.store import Store
from tests.cachekit import seed_cached, small_filesystem
from tests.conftest import free_port
from tests.r2_fixtures import BUCKET, CountingMotoServer, s3_client, s3server  # noqa: F401 - fixture


def _row(node_dir: Path, key: str) -> dict[str, Any] | None:
    db = node_dir / "state" / "noded.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        c.row_factory = sqlite3.Row
        r = c.execute("SELECT * FROM items WHERE key=? ORDER BY version DESC LIMIT 1", (key,)).fetchone()
        if r is None:
            return None
        out = dict(r)
        p = c.execute("SELECT hashes FROM pieces WHERE item_id=?", (r["id"],)).fetchone()
        out["pieces"] = None if p is None else bytes(p[0])
        return out


def _until(cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_inbox_writer_stalled_past_stable_seconds_is_not_published_while_open(
    noded_factory: Any, tmp_path: Path
) -> None:
    """A writer can stall for seconds inside write() (dirty-page throttling under heavy I/O): its size stops
    changing, but it still holds the file open, so the file is not complete. Only the close publishes it."""
    noded_factory(origins={"inbox": {"dir": str(tmp_path / "toronto" / "inbox"), "stable_seconds": 1.0}})
    src = tmp_path / "toronto" / "inbox" / "stalled.bin"
    src.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(2 * 1024 * 1024)
    with open(src, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        # Stall with the file open for 4x stable_seconds: size and mtime do not change.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            assert _row(tmp_path / "toronto", "stalled.bin") is None
            assert src.exists()
            time.sleep(0.1)
        f.write(data[len(data) // 2 :])
    row = _until(
        lambda: (r := _row(tmp_path / "toronto", "stalled.bin")) and r["state"] == "cached" and r,
        what="the file to be published after its close",
    )
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "toronto" / "cache" / "stalled.bin").read_bytes() == data


def test_inbox_slow_writer_published_only_when_complete(noded_factory: Any, tmp_path: Path) -> None:
    node = noded_factory(origins={"inbox": {"dir": str(tmp_path / "toronto" / "inbox"), "stable_seconds": 3.0}})
    inbox = tmp_path / "toronto" / "inbox"
    data = os.urandom(3 * 1024 * 1024 + 12345)
    src = inbox / "census" / "2021" / "dwellings.parquet"
    src.parent.mkdir(parents=True, exist_ok=True)
    opened = threading.Event()
    wrote_all = threading.Event()
    may_close = threading.Event()

    def writer() -> None:
        with open(src, "wb") as f:
            opened.set()
            for off in range(0, len(data), 256 * 1024):
                f.write(data[off : off + 256 * 1024])
                f.flush()
                time.sleep(0.15)  # slower than the watcher's checks, faster than stable_seconds
            wrote_all.set()
            may_close.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert opened.wait(10)  # the file exists from here on (checking before the thread ran was a test race)
    try:
        # The whole time the writer is busy, nothing is published.
        while not wrote_all.is_set():
            assert _row(tmp_path / "toronto", "census/2021/dwellings.parquet") is None
            assert src.exists()
            time.sleep(0.1)
        assert _row(tmp_path / "toronto", "census/2021/dwellings.parquet") is None
    finally:
        may_close.set()
        t.join()
    row = _until(
        lambda: (r := _row(tmp_path / "toronto", "census/2021/dwellings.parquet")) and r["state"] == "cached" and r,
        what="the inbox file to be published",
    )
    final = tmp_path / "toronto" / "cache" / "census" / "2021" / "dwellings.parquet"
    assert final.read_bytes() == data
    assert not src.exists()
    assert row["origin"] == "inbox" and row["size"] == len(data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["md5"] == hashlib.md5(data).hexdigest()
    expected_pieces = b"".join(
        hashlib.sha1(data[o : o + PIECE_LENGTH]).digest() for o in range(0, len(data), PIECE_LENGTH)
    )
    assert row["pieces"] == expected_pieces
    assert row["mtime_ns"] == final.stat().st_mtime_ns and row["disk_bytes"] >= len(data)
    assert not list((tmp_path / "toronto" / "cache" / ".noded" / "partial").iterdir())
    events = [e.get("event") for e in node.log_events()]
    assert "inbox.published" in events


def test_inbox_size_stable_without_close_and_temp_names(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    noded_factory(origins={"inbox": {"dir": str(d / "inbox"), "stable_seconds": 1.0, "open_grace": 2.0}})
    inbox = d / "inbox"
    # A writer that keeps the file open: published once its size has been stable for open_grace.
    f = open(inbox / "held-open.csv", "wb")  # noqa: SIM115
    try:
        f.write(b"a,b\n1,2\n")
        f.flush()
        _until(lambda: (r := _row(d, "held-open.csv")) and r["state"] == "cached", what="stable file")
    finally:
        f.close()
    # A temporary name is ignored until it is renamed into place.
    tmp = inbox / ".upload.tmp"
    tmp.write_bytes(b"x" * 5000)
    time.sleep(2.0)
    assert tmp.exists() and _row(d, ".upload.tmp") is None
    tmp.rename(inbox / "final.bin")
    _until(lambda: (r := _row(d, "final.bin")) and r["state"] == "cached", what="renamed file")
    assert (d / "cache" / "final.bin").read_bytes() == b"x" * 5000


def _seed_before_start(node_dir: Path, items: dict[str, bytes], **kw: Any) -> None:
    store = Store(node_dir / "state" / "noded.sqlite3")
    store.open_sync()
    try:
        layout = CacheLayout(node_dir / "cache", node_dir / "state")
        layout.ensure()
        for key, data in items.items():
            seed_cached(store, layout, key, data, **kw)
    finally:
        store.close_sync()


def test_cached_file_deleted_or_changed_by_hand_is_marked(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    node = noded_factory(start=False)
    _seed_before_start(
        d,
        {
            "a/gone.parquet": os.urandom(50_000),
            "a/edited.parquet": os.urandom(50_000),
            "a/fine.parquet": os.urandom(50_000),
            "a/touched.parquet": os.urandom(50_000),
            "a/grown.parquet": os.urandom(50_000),
        },
        origin="sourcecoop",
    )
    node.start()
    (d / "cache" / "a" / "gone.parquet").unlink()
    with open(d / "cache" / "a" / "edited.parquet", "r+b") as f:
        f.write(b"EDITED")  # same size: only a re-hash can tell
    with open(d / "cache" / "a" / "grown.parquet", "ab") as f:
        f.write(b"more")
    touched = d / "cache" / "a" / "touched.parquet"
    with open(touched, "r+b") as f:  # rewritten with the same bytes: new mtime, same content
        same = f.read()
        f.seek(0)
        f.write(same)
    new_mtime = touched.stat().st_mtime_ns
    gone = _until(lambda: (r := _row(d, "a/gone.parquet")) and r["state"] == "wanted" and r, what="deletion noticed")
    assert "deleted" in gone["error"] and gone["disk_bytes"] == 0
    edited = _until(lambda: (r := _row(d, "a/edited.parquet")) and r["state"] == "wanted" and r, what="edit noticed")
    assert "modified" in edited["error"] and "sha256" in edited["error"]
    grown = _until(lambda: (r := _row(d, "a/grown.parquet")) and r["state"] == "wanted" and r, what="growth noticed")
    assert "size differs" in grown["error"]
    # The edited bytes are kept aside, never served from the cache path.
    assert not (d / "cache" / "a" / "edited.parquet").exists()
    assert (d / "cache" / ".noded" / "quarantine" / f"{edited['id']}-{edited['version']}").exists()
    assert _row(d, "a/fine.parquet")["state"] == "cached"  # type: ignore[index]
    kept = _until(
        lambda: (r := _row(d, "a/touched.parquet")) and r["mtime_ns"] == new_mtime and r,
        what="the touched file to be re-hashed and kept",
    )
    assert kept["state"] == "cached" and touched.exists()
    # And across a restart, a deletion while the node was down is found by reconciliation.
    assert node.stop() == 0
    (d / "cache" / "a" / "fine.parquet").unlink()
    os.utime(touched, ns=(new_mtime + 10**9, new_mtime + 10**9))  # mtime only, while the node is down
    node.start()
    fine = _until(lambda: (r := _row(d, "a/fine.parquet")) and r["state"] == "wanted" and r, what="reconciliation")
    assert "missing" in fine["error"]
    kept = _row(d, "a/touched.parquet")
    assert kept is not None and kept["state"] == "cached" and kept["mtime_ns"] == new_mtime + 10**9


def test_fetch_waits_and_status_says_why(noded_factory: Any, tmp_path: Path) -> None:
    """Through a real node: R2 not configured, nothing durable; an inbox file must wait."""
    d = tmp_path / "toronto"
    node = noded_factory(
        start=False,
        cache={
            "budget": 1_000_000,
            "high_watermark": 0.9,
            "low_watermark": 0.5,
            "free_space_floor": "1MB",
            "check_interval": 0.5,
        },
        origins={"inbox": {"dir": str(d / "inbox"), "stable_seconds": 0.5}},
    )
    _seed_before_start(d, {f"old/{n}.bin": os.urandom(280_000) for n in range(3)})
    node.start()
    (d / "inbox").mkdir(exist_ok=True)
    (d / "inbox" / "new.bin").write_bytes(os.urandom(200_000))

    def reason() -> str | None:
        _, st = node.get("/v1/status")
        return st["problems"].get("cache")

    why = _until(reason, what="the cache problem in /v1/status")
    assert "fetches wait" in why and "not durable elsewhere" in why
    _, st = node.get("/v1/status")
    assert st["components"]["cache"]["waiting"] == 1
    assert st["cache"]["used_bytes"] > 800_000
    for n in range(3):
        assert _row(d, f"old/{n}.bin")["state"] == "cached"  # type: ignore[index]
    assert (d / "inbox" / "new.bin").exists() or _row(d, "new.bin") is None


def test_inbox_new_bytes_make_a_new_version_and_duplicates_are_dropped(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    noded_factory(origins={"inbox": {"dir": str(d / "inbox"), "stable_seconds": 0.5}})
    one, two = os.urandom(30_000), os.urandom(40_000)
    (d / "inbox" / "v.bin").write_bytes(one)
    _until(lambda: (r := _row(d, "v.bin")) and r["state"] == "cached", what="version 1")
    (d / "inbox" / "v.bin").write_bytes(two)
    row = _until(
        lambda: (r := _row(d, "v.bin")) and r["version"] == 2 and r["state"] == "cached" and r, what="version 2"
    )
    assert (d / "cache" / "v.bin").read_bytes() == two and row["size"] == len(two)
    with sqlite3.connect(d / "state" / "noded.sqlite3") as c:
        old = c.execute("SELECT state, error FROM items WHERE key='v.bin' AND version=1").fetchone()
    assert old[0] == "evicted" and "superseded" in old[1]
    # The same bytes again: nothing new, and the inbox copy is gone.
    (d / "inbox" / "v.bin").write_bytes(two)
    _until(lambda: not (d / "inbox" / "v.bin").exists(), what="the duplicate to be taken")
    assert _row(d, "v.bin")["version"] == 2  # type: ignore[index]


def test_inbox_on_another_filesystem_is_copied_then_removed(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    with small_filesystem(tmp_path / "otherfs") as other:
        noded_factory(origins={"inbox": {"dir": str(other / "inbox"), "stable_seconds": 0.5}})
        data = os.urandom(1_500_000)
        src = other / "inbox" / "x" / "far.bin"
        src.parent.mkdir(parents=True)
        src.write_bytes(data)
        assert os.stat(other).st_dev != os.stat(d / "cache").st_dev
        row = _until(lambda: (r := _row(d, "x/far.bin")) and r["state"] == "cached" and r, what="cross-fs publish")
        assert (d / "cache" / "x" / "far.bin").read_bytes() == data and not src.exists()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_inbox_file_larger_than_budget_stays_with_a_clear_problem(noded_factory: Any, tmp_path: Path) -> None:
    d = tmp_path / "toronto"
    node = noded_factory(
        cache={"budget": 1_000_000, "free_space_floor": "1MB"},
        origins={"inbox": {"dir": str(d / "inbox"), "stable_seconds": 0.5}},
    )
    big = d / "inbox" / "huge.bin"
    big.write_bytes(os.urandom(2_000_000))

    def problem() -> str | None:
        _, st = node.get("/v1/status")
        return st["problems"].get("inbox")

    assert "can never fit" in _until(problem, what="the inbox problem")
    assert big.exists() and big.stat().st_size == 2_000_000  # nothing lost
    assert _row(d, "huge.bin") is None


def test_inbox_file_reaches_r2_and_peer(
    noded_factory: Any,
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    """End to end: slow writer -> published -> pushed to the test S3 server -> on the peer.

    Written against the contracts: the R2 component pushes CACHED items after node.notify("cached")
    (object key = r2.prefix + item key) and sets pushed=1; the P2P component seeds them and the peer
    node, configured under [[peers]], takes them over BitTorrent into its own cache.
    """
    s3 = s3_client(s3server.endpoint)
    env = {"R2_ACCESS_KEY_ID": "test", "R2_SECRET_ACCESS_KEY": "test"}
    r2 = {
        "enabled": True,
        "endpoint": s3server.endpoint,
        "bucket": BUCKET,  # the s3server fixture created it
        "region": "us-east-1",
    }
    ports = {n: (free_port(), free_port()) for n in ("toronto", "amsterdam")}

    def cfg(name: str, other: str) -> dict[str, Any]:
        api, bt = ports[name]
        o_api, o_bt = ports[other]
        return {
            "env": env,
            "r2": r2,
            "api": {"bind": "127.0.0.1", "port": api},
            "bittorrent": {"listen_interfaces": f"127.0.0.1:{bt}"},
            "peers": [{"name": other, "api_url": f"http://127.0.0.1:{o_api}", "bittorrent": f"127.0.0.1:{o_bt}"}],
            "origins": {"inbox": {"dir": str(tmp_path / name / "inbox"), "stable_seconds": 3.0}},
        }

    noded_factory("toronto", **cfg("toronto", "amsterdam"))
    noded_factory("amsterdam", **cfg("amsterdam", "toronto"))
    data = os.urandom(20 * 1024 * 1024 + 7)  # more than one 16 MiB piece
    src = tmp_path / "toronto" / "inbox" / "sync" / "tiles.pmtiles"
    src.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "wb") as f:
        for off in range(0, len(data), 1024 * 1024):
            f.write(data[off : off + 1024 * 1024])
            f.flush()
            time.sleep(0.1)
            assert _row(tmp_path / "toronto", "sync/tiles.pmtiles") is None
    _until(
        lambda: (r := _row(tmp_path / "toronto", "sync/tiles.pmtiles")) and r["pushed"] == 1,
        timeout=120,
        what="the R2 push",
    )
    obj = s3.get_object(Bucket=BUCKET, Key="sync/tiles.pmtiles")
    assert obj["Body"].read() == data
    peer_file = tmp_path / "amsterdam" / "cache" / "sync" / "tiles.pmtiles"
    _until(
        lambda: (r := _row(tmp_path / "amsterdam", "sync/tiles.pmtiles")) and r["state"] == "cached",
        timeout=120,
        what="the copy on the peer",
    )
    assert peer_file.read_bytes() == data


def test_deleted_by_hand_is_fetched_again(
    noded_factory: Any,
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    """End to end: the WANTED marking tested above, then the pull pipeline
    fetches the item again from the origin (moto as the Source Cooperative S3 endpoint, path-style)."""
    s3 = s3_client(s3server.endpoint)
    s3.create_bucket(Bucket="d4c")
    data = os.urandom(2 * 1024 * 1024)
    # Source Cooperative is public: anonymous GETs must succeed, as they do there.
    s3.put_object(Bucket="d4c", Key="data/x.parquet", Body=data, ACL="public-read")
    d = tmp_path / "toronto"
    node = noded_factory(
        origins={
            "refresh_interval": 2.0,
            "sourcecoop": {
                "enabled": True,
                "endpoint": s3server.endpoint,
                "bucket": "d4c",
                "prefixes": ["data/"],
            },
        }
    )
    _until(lambda: (r := _row(d, "x.parquet")) and r["state"] == "cached", timeout=60, what="first fetch")
    (d / "cache" / "x.parquet").unlink()

    def events(name: str) -> list[dict[str, Any]]:
        return [e for e in node.log_events() if e["event"] == name and e.get("key") == "x.parquet"]

    # The deletion is noticed (row back to wanted), then the pipeline pulls it again: the wanted state
    # can be too brief to poll, so the node's own log is the witness.
    _until(lambda: events("cache.external_change"), what="deletion noticed")
    assert events("cache.external_change")[0]["state"] == "wanted"
    _until(lambda: len(events("pull.cached")) >= 2, timeout=60, what="the refetch")
    row = _until(
        lambda: (r := _row(d, "x.parquet")) and r["state"] == "cached" and r, timeout=60, what="cached again"
    )
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert (d / "cache" / "x.parquet").read_bytes() == data


# A user namespace of its own gives the daemon its own inotify limits: none at all here, as on a
# shared host whose users have used up every watch.
NO_INOTIFY = [
    "unshare", "--user", "--map-root-user",
    "sh", "-c", 'echo 0 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh",
]  # fmt: skip


def test_without_inotify_watches_the_watcher_polls_and_says_so(noded_factory: Any, tmp_path: Path) -> None:
    probe = subprocess.run([*NO_INOTIFY, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot limit inotify in a user namespace here: {probe.stderr.strip()}")
    d = tmp_path / "toronto"
    node = noded_factory(
        start=False, prefix=NO_INOTIFY, origins={"inbox": {"dir": str(d / "inbox"), "stable_seconds": 1.0}}
    )
    _seed_before_start(d, {"b/gone.parquet": os.urandom(50_000)}, origin="sourcecoop")
    node.start()
    _, status = node.get("/v1/status")
    assert "inotify unavailable" in status["problems"]["watch"], status["problems"]
    assert status["components"]["watch"]["state"] == "polling", status["components"]["watch"]
    # The inbox is still published, found by listing it.
    (d / "inbox" / "polled.csv").write_bytes(b"a,b\n1,2\n")
    _until(lambda: (r := _row(d, "polled.csv")) and r["state"] == "cached", timeout=60, what="polled inbox file")
    # A cached file deleted behind noded's back is still noticed, by the stat pass.
    (d / "cache" / "b" / "gone.parquet").unlink()
    gone = _until(
        lambda: (r := _row(d, "b/gone.parquet")) and r["state"] == "wanted" and r, timeout=90, what="polled deletion"
    )
    assert "deleted" in gone["error"]
