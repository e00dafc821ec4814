"""Store: migrations, state machine, and crash consistency under SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from noded.core.model import CatalogEntry, State, TransitionError
from noded.core.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError
from tests.conftest import ROOT, noded_env


def _entry(key: str = "a/b.pmtiles", md5: str = "0" * 32, size: int = 10) -> CatalogEntry:
    return CatalogEntry(origin="zenodo", key=key, urls=(f"http://127.0.0.1/{key}",), size=size, md5=md5)


def test_migrations_from_empty(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite3")
    s.open_sync()
    assert s.schema_version() == SCHEMA_VERSION
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"items", "replicas", "meta", "traffic", "probes", "reports", "pieces"} <= tables
    s.close_sync()


@pytest.mark.parametrize("from_version", range(1, SCHEMA_VERSION))
def test_migrations_from_each_previous_version_keep_data(tmp_path: Path, from_version: int) -> None:
    s = Store(tmp_path / "db.sqlite3")
    s.path.parent.mkdir(parents=True, exist_ok=True)
    s._conn = sqlite3.connect(s.path, isolation_level=None)
    s.migrate(target=from_version)
    assert s.schema_version() == from_version
    # A row as the oldest schema holds it (today's code may read columns that version lacks).
    s.conn.execute(
        "INSERT INTO items(key, version, origin, state, size, md5, urls, created_at, updated_at) "
        "VALUES('a/b.pmtiles', 1, 'zenodo', 'wanted', 10, ?, '[]', 1.0, 1.0)",
        ("0" * 32,),
    )
    item_id = s.conn.execute("SELECT id FROM items").fetchone()[0]
    s.close_sync()

    s2 = Store(tmp_path / "db.sqlite3")
    s2.open_sync()  # runs the remaining migrations
    assert s2.schema_version() == SCHEMA_VERSION
    again = s2.get_current("a/b.pmtiles")
    assert again is not None and again.id == item_id and again.md5 == "0" * 32 and again.verified_at is None
    s2.close_sync()


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    p = tmp_path / "db.sqlite3"
    c = sqlite3.connect(p)
    c.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    c.close()
    s = Store(p)
    with pytest.raises(StoreError, match="newer than this noded"):
        s.open_sync()


def test_state_machine_and_versions(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite3")
    s.open_sync()
    item, new_version = s.upsert_entry(_entry())
    assert item.state is State.WANTED and item.version == 1 and not new_version
    with pytest.raises(TransitionError):
        s.set_state(item.id, State.EVICTED)  # wanted -> evicted is not a thing
    s.set_state(item.id, State.FETCHING)
    cached = s.set_state(item.id, State.CACHED, sha256="f" * 64, disk_bytes=4096, mtime_ns=1)
    assert cached.state is State.CACHED and cached.sha256 == "f" * 64
    # Same listing again: no new version, URLs merged.
    same, new_version = s.upsert_entry(
        CatalogEntry(origin="ia", key="a/b.pmtiles", urls=("http://127.0.0.2/x",), size=10, md5="0" * 32)
    )
    assert same.id == item.id and not new_version and len(same.urls) == 2
    # One origin publishes another md5 while the other still publishes the first: a conflict, not a
    # silent new version; the other origin's values stay trusted (same rank without a preference).
    conflicts: list[str] = []
    same, new_version = s.upsert_entry(_entry(md5="1" * 32), conflicts=conflicts)
    assert same.id == item.id and not new_version
    assert same.conflict and "zenodo" in same.conflict and "md5 " + "1" * 32 in same.conflict
    assert len(conflicts) == 1 and "trusting ia" in conflicts[0]
    assert s.conflicts() == [("a/b.pmtiles", same.conflict)]
    # Both re-published it (nothing backs the old md5 any more): a new version, the old row stays as it
    # was until the new one verifies, and the conflict is over.
    v2, new_version = s.upsert_entry(
        CatalogEntry(origin="ia", key="a/b.pmtiles", urls=("http://127.0.0.2/x",), size=10, md5="1" * 32)
    )
    assert new_version and v2.version == 2 and v2.state is State.WANTED
    assert v2.conflict is None and s.conflicts() == []
    old = s.get_item(item.id)
    assert old is not None and old.state is State.CACHED
    assert {r["location"] for r in s.replicas("a/b.pmtiles")} == {"zenodo", "ia"}
    assert s.counts_by_state()["cached"] == 1 and s.counts_by_state()["wanted"] == 1
    s.close_sync()


async def test_async_access_runs_on_the_store_thread(tmp_path: Path) -> None:
    import threading

    s = Store(tmp_path / "db.sqlite3")
    await s.open()
    item, _ = await s.run(s.upsert_entry, _entry())
    thread_name = await s.run(lambda: threading.current_thread().name)
    assert thread_name.startswith("store")
    assert (await s.run(s.get_item, item.id)) is not None
    await s.close()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from noded.core.model import CatalogEntry, State
    from noded.core.store import Store
    s = Store(Path(sys.argv[1]))
    s.open_sync()
    batch = 0
    print("ready", flush=True)
    while True:
        # One batch = 50 items + a meta counter, all in one transaction.
        with s.tx():
            for i in range(50):
                e = CatalogEntry(origin="zenodo", key=f"b{batch}/f{i}", urls=("http://x",), size=i, md5="0" * 32)
                item, _ = s.upsert_entry(e)
                s.set_state(item.id, State.FETCHING)
            s.set_meta("batches", str(batch + 1))
        batch += 1
""")


def test_sigkill_mid_batch_leaves_a_consistent_db(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, env=noded_env(), cwd=ROOT)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        time.sleep(0.3 + 0.2 * round_)
        p.send_signal(signal.SIGKILL)
        p.wait()

        s = Store(db)
        s.open_sync()
        assert s.integrity_ok()
        batches = int(s.get_meta("batches") or 0)
        n_items = s.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        n_fetching = s.counts_by_state()["fetching"]
        # Every committed batch is whole, and nothing of an uncommitted one is visible.
        assert batches > 0
        assert n_items == n_fetching == batches * 50, (batches, n_items)
        s.close_sync()
        # Each round starts from an empty database (the writer's batch numbering restarts at 0).
        db.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
