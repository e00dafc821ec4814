"""A store and cache from before dataset-name keys move to them without reading the cached bytes."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from noded.cache.layout import CacheLayout
from noded.core.model import State
from noded.core.store import Store
from noded.origins.rekey import META, rekey

MiB = 1024 * 1024
P = "ca-orthoimagery-labs"


def io_counters() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


def old_row(store: Store, key: str, origin: str, state: State, data: bytes | None, *, md5: str | None = None) -> int:
    """A row as the previous schema (8 migrations) wrote it."""
    now = time.time()
    digest = md5 or (hashlib.md5(data).hexdigest() if data is not None else None)
    cur = store.conn.execute(
        "INSERT INTO items(key, version, origin, state, size, md5, sha256, urls, pinned, pushed, seeding, "
        "last_access, disk_bytes, mtime_ns, created_at, updated_at, verified_at) "
        "VALUES(?,1,?,?,?,?,?,?,?,0,0,?,?,?,?,?,?)",
        (
            key,
            origin,
            state.value,
            len(data) if data is not None else None,
            digest,
            hashlib.sha256(data).hexdigest() if data is not None and state == State.CACHED else None,
            json.dumps([f"http://127.0.0.1:9/{origin}/{key}"]),
            1 if key.endswith("pinned.pmtiles") else 0,
            now,
            len(data) if data is not None and state == State.CACHED else 0,
            1 if state == State.CACHED else None,
            now,
            now,
            now if state == State.CACHED else None,
        ),
    )
    store.conn.execute(
        "INSERT INTO replicas(key, location, size, md5, seen_at) VALUES(?,?,?,?,?)",
        (key, origin, len(data) if data is not None else None, digest, now),
    )
    assert cur.lastrowid is not None
    if state == State.CACHED:
        store.conn.execute(
            "INSERT INTO pieces(item_id, piece_length, hashes) VALUES(?,?,?)", (cur.lastrowid, 16 * MiB, b"p" * 20)
        )
    return cur.lastrowid


def test_store_and_cache_move_to_dataset_names_without_reading_a_byte(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache", tmp_path / "state")
    layout.ensure()
    db = tmp_path / "state" / "noded.sqlite3"
    # The schema the previous release wrote (8 migrations).
    old = Store(db)
    old._conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    old.migrate(target=8)
    blobs = {n: os.urandom(8 * MiB + i) for i, n in enumerate("abcde")}

    def cached(key: str, data: bytes) -> None:
        path = layout.final_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # a: only at Source Cooperative, cached under the product prefix -> renamed.
    old_row(old, f"{P}/a.pmtiles", "sourcecoop", State.CACHED, blobs["a"])
    cached(f"{P}/a.pmtiles", blobs["a"])
    # b: pulled twice (Source Cooperative and Zenodo), same content -> one item, one copy.
    old_row(old, f"{P}/b.pmtiles", "sourcecoop", State.CACHED, blobs["b"])
    old_row(old, "b.pmtiles", "zenodo", State.CACHED, blobs["b"])
    cached(f"{P}/b.pmtiles", blobs["b"])
    cached("b.pmtiles", blobs["b"])
    # c: cached from Source Cooperative, still wanted from Zenodo -> the Zenodo row takes the file.
    old_row(old, f"{P}/c.pmtiles", "sourcecoop", State.CACHED, blobs["c"])
    old_row(old, "c.pmtiles", "zenodo", State.WANTED, blobs["c"])
    cached(f"{P}/c.pmtiles", blobs["c"])
    # d: the two disagree -> both left as they are.
    old_row(old, f"{P}/d.pmtiles", "sourcecoop", State.CACHED, blobs["d"])
    old_row(old, "d.pmtiles", "zenodo", State.WANTED, blobs["e"])
    cached(f"{P}/d.pmtiles", blobs["d"])
    # A Zenodo file with a directory in its name is not Source Cooperative's: untouched.
    old_row(old, "dir/e.parquet", "zenodo", State.CACHED, blobs["e"])
    cached("dir/e.parquet", blobs["e"])
    old.conn.execute(
        "INSERT INTO reports(mirror, item_key, kind, client, created_at) VALUES('sourcecoop', ?, 'corrupt', 'x', 0)",
        (f"{P}/a.pmtiles",),
    )
    old.close_sync()

    store = Store(db)
    store.open_sync()  # schema 8 -> current
    before = io_counters()
    report = rekey(store, layout)
    after = io_counters()
    # rchar counts every read(2) (page cache included): far less than one of the 8 MiB files.
    assert after["rchar"] - before["rchar"] < MiB, (before, after)
    assert after["read_bytes"] - before["read_bytes"] < MiB

    assert sorted(report.renamed) == [(f"{P}/a.pmtiles", "a.pmtiles")]
    assert sorted(report.merged) == [(f"{P}/b.pmtiles", "b.pmtiles"), (f"{P}/c.pmtiles", "c.pmtiles")]
    assert report.copies_removed == [f"{P}/b.pmtiles"]
    assert len(report.conflicts) == 1 and "d.pmtiles" in report.conflicts[0]
    files = sorted(str(p.relative_to(layout.root)) for p in layout.root.rglob("*") if p.is_file())
    assert files == ["a.pmtiles", "b.pmtiles", "c.pmtiles", f"{P}/d.pmtiles", "dir/e.parquet"]
    for n in "abc":
        item = store.get_current(f"{n}.pmtiles")
        assert item is not None and item.state == State.CACHED, n
        assert layout.final_path(item.key).stat().st_size == item.size == len(blobs[n])
        assert store.get_pieces(item.id) == (16 * MiB, b"p" * 20)
        assert len(store.versions(f"{n}.pmtiles")) == 1 and store.versions(f"{P}/{n}.pmtiles") == []
    c = store.get_current("c.pmtiles")
    assert c is not None and len(c.urls) == 2 and c.verified_at is not None
    assert store.conn.execute("SELECT item_key FROM reports").fetchone()[0] == "a.pmtiles"
    assert {r["location"] for r in store.replicas("b.pmtiles")} == {"sourcecoop", "zenodo"}
    assert store.get_current(f"{P}/d.pmtiles") is not None and store.get_current("d.pmtiles") is not None
    # Once per store: a later Source Cooperative key with a directory stays as it is.
    assert store.get_meta(META) == "1"
    assert rekey(store, layout).renamed == []
    store.close_sync()


def test_a_new_store_has_nothing_to_move(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache", tmp_path / "state")
    layout.ensure()
    store = Store(tmp_path / "state" / "noded.sqlite3")
    store.open_sync()
    data = os.urandom(1000)
    # A Source Cooperative dataset with a directory inside its product, listed by this release.
    old_row(store, "tiles/a.pmtiles", "sourcecoop", State.CACHED, data)
    assert rekey(store, layout).renamed == [] and store.get_current("tiles/a.pmtiles") is not None
    store.close_sync()


def test_an_interrupted_move_is_finished_on_the_next_run(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache", tmp_path / "state")
    layout.ensure()
    store = Store(tmp_path / "state" / "noded.sqlite3")
    store.open_sync()
    store.conn.execute("DELETE FROM meta WHERE name=?", (META,))  # as a store from before the move
    data = os.urandom(MiB)
    old_row(store, f"{P}/a.pmtiles", "sourcecoop", State.CACHED, data)
    # The file was renamed, then the process died before the commit.
    layout.final_path("a.pmtiles").write_bytes(data)
    report = rekey(store, layout)
    assert report.renamed == [(f"{P}/a.pmtiles", "a.pmtiles")]
    item = store.get_current("a.pmtiles")
    assert item is not None and item.state == State.CACHED
    assert layout.final_path("a.pmtiles").read_bytes() == data
    store.close_sync()
