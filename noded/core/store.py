"""SQLite (WAL) state of the node: items, where they are known to live, traffic, probes, reports.

One connection, used only from the store's own single thread, so the event loop never waits on disk
and SQLite never sees two writers from this process. Async callers use `await store.run(fn, ...)`;
the CLI and tests may call the sync methods directly on a store opened with `open_sync()`.

Writes that belong together run inside `with store.tx():` (BEGIN IMMEDIATE ... COMMIT), so a crash
leaves either all of them or none. The schema is versioned with `PRAGMA user_version`; MIGRATIONS is
append-only and each step runs in its own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from noded.core.model import CatalogEntry, Item, State, check_transition

P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: items and where they live
    """
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        origin TEXT NOT NULL,
        state TEXT NOT NULL,
        size INTEGER,
        md5 TEXT, sha1 TEXT, sha256 TEXT, etag TEXT,
        urls TEXT NOT NULL DEFAULT '[]',
        infohash TEXT,
        pinned INTEGER NOT NULL DEFAULT 0,
        pushed INTEGER NOT NULL DEFAULT 0,
        seeding INTEGER NOT NULL DEFAULT 0,
        last_access REAL NOT NULL DEFAULT 0,
        disk_bytes INTEGER NOT NULL DEFAULT 0,
        mtime_ns INTEGER,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (key, version)
    );
    CREATE INDEX items_state ON items(state);
    CREATE INDEX items_infohash ON items(infohash);
    CREATE TABLE replicas (
        key TEXT NOT NULL,
        location TEXT NOT NULL,
        size INTEGER, md5 TEXT, sha256 TEXT, etag TEXT,
        seen_at REAL NOT NULL,
        PRIMARY KEY (key, location)
    );
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: transparency: traffic buckets, probe results, community reports
    """
    CREATE TABLE traffic (
        hour INTEGER NOT NULL,
        channel TEXT NOT NULL,
        direction TEXT NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, channel, direction)
    );
    CREATE TABLE probes (
        id INTEGER PRIMARY KEY,
        mirror TEXT NOT NULL,
        ts REAL NOT NULL,
        ok INTEGER NOT NULL,
        status TEXT NOT NULL,
        latency_ms REAL,
        reason TEXT
    );
    CREATE INDEX probes_mirror_ts ON probes(mirror, ts);
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY,
        mirror TEXT NOT NULL,
        item_key TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        contact TEXT,
        client TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'open',
        created_at REAL NOT NULL,
        resolved_at REAL,
        resolution TEXT
    );
    CREATE INDEX reports_mirror_status ON reports(mirror, status);
    """,
    # 3: torrent piece hashes taken from the pull stream, so a torrent needs no second read
    """
    CREATE TABLE pieces (
        item_id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        piece_length INTEGER NOT NULL,
        hashes BLOB NOT NULL
    );
    """,
    # 4: copies to re-verify against the origin checksum (a `corrupt` community report asks for it)
    """
    CREATE TABLE verify_queue (
        item_id INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
        reason TEXT NOT NULL,
        report_id INTEGER,
        requested_at REAL NOT NULL
    );
    """,
    # 5 (cache): durability and LRU order without per-row lookups, for eviction plans over 1M items.
    # listed_at = newest sighting of this item's exact bytes (md5 or sha256, same size) at an origin or
    # R2, kept current by triggers on both tables; items_lru holds the evictable candidates in LRU order
    # with everything a plan needs (covering), so a plan reads the index only; items_cached covers the
    # cache's byte total and the counts of items kept back (pinned, not durable).
    """
    ALTER TABLE items ADD COLUMN listed_at REAL;
    UPDATE items SET listed_at = (
        SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = items.key
          AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
          AND ((items.md5 IS NOT NULL AND lower(r.md5) = lower(items.md5))
               OR (items.sha256 IS NOT NULL AND lower(r.sha256) = lower(items.sha256)))
          AND (r.size IS NULL OR items.size IS NULL OR r.size = items.size));
    CREATE TRIGGER replicas_listed_ins AFTER INSERT ON replicas BEGIN
        UPDATE items SET listed_at = (
            SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = items.key
              AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
              AND ((items.md5 IS NOT NULL AND lower(r.md5) = lower(items.md5))
                   OR (items.sha256 IS NOT NULL AND lower(r.sha256) = lower(items.sha256)))
              AND (r.size IS NULL OR items.size IS NULL OR r.size = items.size))
        WHERE key = NEW.key;
    END;
    CREATE TRIGGER replicas_listed_upd AFTER UPDATE ON replicas BEGIN
        UPDATE items SET listed_at = (
            SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = items.key
              AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
              AND ((items.md5 IS NOT NULL AND lower(r.md5) = lower(items.md5))
                   OR (items.sha256 IS NOT NULL AND lower(r.sha256) = lower(items.sha256)))
              AND (r.size IS NULL OR items.size IS NULL OR r.size = items.size))
        WHERE key IN (NEW.key, OLD.key);
    END;
    CREATE TRIGGER replicas_listed_del AFTER DELETE ON replicas BEGIN
        UPDATE items SET listed_at = (
            SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = items.key
              AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
              AND ((items.md5 IS NOT NULL AND lower(r.md5) = lower(items.md5))
                   OR (items.sha256 IS NOT NULL AND lower(r.sha256) = lower(items.sha256)))
              AND (r.size IS NULL OR items.size IS NULL OR r.size = items.size))
        WHERE key = OLD.key;
    END;
    CREATE TRIGGER items_listed_ins AFTER INSERT ON items BEGIN
        UPDATE items SET listed_at = (
            SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = NEW.key
              AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
              AND ((NEW.md5 IS NOT NULL AND lower(r.md5) = lower(NEW.md5))
                   OR (NEW.sha256 IS NOT NULL AND lower(r.sha256) = lower(NEW.sha256)))
              AND (r.size IS NULL OR NEW.size IS NULL OR r.size = NEW.size))
        WHERE id = NEW.id;
    END;
    CREATE TRIGGER items_listed_upd AFTER UPDATE OF md5, sha256, size, key ON items BEGIN
        UPDATE items SET listed_at = (
            SELECT MAX(r.seen_at) FROM replicas r WHERE r.key = NEW.key
              AND r.location IN ('sourcecoop', 'zenodo', 'ia', 'r2')
              AND ((NEW.md5 IS NOT NULL AND lower(r.md5) = lower(NEW.md5))
                   OR (NEW.sha256 IS NOT NULL AND lower(r.sha256) = lower(NEW.sha256)))
              AND (r.size IS NULL OR NEW.size IS NULL OR r.size = NEW.size))
        WHERE id = NEW.id;
    END;
    CREATE INDEX items_lru ON items(last_access, id, disk_bytes, pushed, listed_at, state, pinned)
        WHERE state = 'cached' AND pinned = 0;
    CREATE INDEX items_cached ON items(state, pinned, pushed, listed_at, disk_bytes);
    """,
    # 6: multipart uploads this node started on R2, so a restart resumes or aborts exactly its own
    """
    CREATE TABLE r2_uploads (
        upload_id TEXT PRIMARY KEY,
        item_id INTEGER NOT NULL,
        object_key TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 7: origin copies whose bytes did not verify, per item version (the pull skips them)
    """
    CREATE TABLE suspects (
        key TEXT NOT NULL,
        version INTEGER NOT NULL,
        location TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (key, version, location)
    );
    """,
    # 8: when the bytes of a cached copy were last hashed and found right (the pusher trusts a recent one)
    """
    ALTER TABLE items ADD COLUMN verified_at REAL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

_ITEM_COLS = (
    "id, key, version, origin, state, size, md5, sha1, sha256, etag, urls, infohash, pinned, pushed, "
    "seeding, last_access, disk_bytes, mtime_ns, error, created_at, updated_at, verified_at"
)


class StoreError(RuntimeError):
    pass


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements; a trigger body's inner ';' does not end its CREATE TRIGGER."""
    buf = ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                yield buf
            buf = ""
    if buf.strip(" \n\t;"):
        raise StoreError(f"incomplete SQL statement in a migration: {buf.strip()[:80]!r}")


def _row_to_item(r: Sequence[Any]) -> Item:
    return Item(
        id=r[0],
        key=r[1],
        version=r[2],
        origin=r[3],
        state=State(r[4]),
        size=r[5],
        md5=r[6],
        sha1=r[7],
        sha256=r[8],
        etag=r[9],
        urls=json.loads(r[10]),
        infohash=r[11],
        pinned=bool(r[12]),
        pushed=bool(r[13]),
        seeding=bool(r[14]),
        last_access=r[15],
        disk_bytes=r[16],
        mtime_ns=r[17],
        error=r[18],
        created_at=r[19],
        updated_at=r[20],
        verified_at=r[21],
    )


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._thread_id: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a crash loses at most the last commits, never consistency.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self._conn = conn
        self.migrate()

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open_on_thread)

    def _open_on_thread(self) -> None:
        self._thread_id = threading.get_ident()
        self.open_sync()

    async def close(self) -> None:
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.close_sync)
            self._executor.shutdown(wait=True)
            self._executor = None
        else:
            self.close_sync()

    def close_sync(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a sync store function on the store thread."""
        if self._executor is None:
            raise StoreError("store is not open for async use")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        c = self.conn
        if c.in_transaction:  # nested: join the outer transaction
            yield c
            return
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # -- schema ----------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int | None = None) -> None:
        target = SCHEMA_VERSION if target is None else target
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this noded ({SCHEMA_VERSION}); "
                "refusing to touch it"
            )
        for v in range(current, target):
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _statements(MIGRATIONS[v]):
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version = {v + 1}")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def integrity_ok(self) -> bool:
        return bool(self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, name: str) -> str | None:
        r = self.conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if r is None else str(r[0])

    def set_meta(self, name: str, value: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO meta(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (name, value),
            )

    # -- items -----------------------------------------------------------------------------
    def get_item(self, item_id: int) -> Item | None:
        r = self.conn.execute(f"SELECT {_ITEM_COLS} FROM items WHERE id=?", (item_id,)).fetchone()
        return None if r is None else _row_to_item(r)

    def get_current(self, key: str) -> Item | None:
        """The newest version of an item."""
        r = self.conn.execute(
            f"SELECT {_ITEM_COLS} FROM items WHERE key=? ORDER BY version DESC LIMIT 1", (key,)
        ).fetchone()
        return None if r is None else _row_to_item(r)

    def get_by_infohash(self, infohash: str) -> Item | None:
        r = self.conn.execute(
            f"SELECT {_ITEM_COLS} FROM items WHERE infohash=? ORDER BY version DESC LIMIT 1",
            (infohash.lower(),),
        ).fetchone()
        return None if r is None else _row_to_item(r)

    def items(self, *, states: Sequence[State] | None = None, after_id: int = 0, limit: int = 1000) -> list[Item]:
        q = f"SELECT {_ITEM_COLS} FROM items WHERE id > ?"
        args: list[Any] = [after_id]
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        q += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [_row_to_item(r) for r in self.conn.execute(q, args)]

    def upsert_entry(self, e: CatalogEntry, now: float | None = None) -> tuple[Item, bool]:
        """Record an origin's listing of a file. Returns (current item, created_new_version).

        Same key with a different published checksum becomes a new version (state wanted); the old
        version keeps its row and bytes until the new one is verified and replaces it.
        """
        now = time.time() if now is None else now
        with self.tx() as c:
            c.execute(
                "INSERT INTO replicas(key, location, size, md5, sha256, etag, seen_at) "
                "VALUES(?,?,?,?,?,?,?) ON CONFLICT(key, location) DO UPDATE SET size=excluded.size, "
                "md5=excluded.md5, sha256=excluded.sha256, etag=excluded.etag, seen_at=excluded.seen_at",
                (e.key, e.origin, e.size, e.md5, e.sha256, e.etag, now),
            )
            cur = self.get_current(e.key)
            if cur is not None and not _changed(cur, e):
                merged = list(dict.fromkeys([*cur.urls, *e.urls]))
                if merged != cur.urls or (e.infohash and not cur.infohash) or (e.size and not cur.size):
                    c.execute(
                        "UPDATE items SET urls=?, infohash=COALESCE(infohash, ?), size=COALESCE(size, ?),"
                        " md5=COALESCE(md5, ?), sha1=COALESCE(sha1, ?), sha256=COALESCE(sha256, ?),"
                        " updated_at=? WHERE id=?",
                        (json.dumps(merged), e.infohash, e.size, e.md5, e.sha1, e.sha256, now, cur.id),
                    )
                    cur = self.get_item(cur.id)
                    assert cur is not None
                return cur, False
            version = 1 if cur is None else cur.version + 1
            c.execute(
                "INSERT INTO items(key, version, origin, state, size, md5, sha1, sha256, etag, urls, "
                "infohash, last_access, created_at, updated_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.key,
                    version,
                    e.origin,
                    State.WANTED.value,
                    e.size,
                    e.md5,
                    e.sha1,
                    e.sha256,
                    e.etag,
                    json.dumps(list(e.urls)),
                    e.infohash,
                    now,
                    now,
                    now,
                ),
            )
            new = self.get_current(e.key)
            assert new is not None
            return new, cur is not None

    def set_state(self, item_id: int, new: State, *, error: str | None = None, **fields: Any) -> Item:
        """Move an item to a new state (validated), updating any extra columns in the same write."""
        allowed = {
            "size",
            "md5",
            "sha1",
            "sha256",
            "etag",
            "infohash",
            "pushed",
            "seeding",
            "disk_bytes",
            "mtime_ns",
            "verified_at",
            "last_access",
            "pinned",
        }
        bad = set(fields) - allowed
        if bad:
            raise StoreError(f"cannot set columns {sorted(bad)}")
        with self.tx() as c:
            cur = self.get_item(item_id)
            if cur is None:
                raise StoreError(f"no item with id {item_id}")
            check_transition(cur.state, new)
            sets = ["state=?", "error=?", "updated_at=?"]
            args: list[Any] = [new.value, error, time.time()]
            for k, v in fields.items():
                sets.append(f"{k}=?")
                args.append(int(v) if isinstance(v, bool) else v)
            args.append(item_id)
            c.execute(f"UPDATE items SET {', '.join(sets)} WHERE id=?", args)
            out = self.get_item(item_id)
            assert out is not None
            return out

    def update_item(self, item_id: int, **fields: Any) -> None:
        """Set flags/columns that are not a state change (pushed, seeding, pinned, last_access...)."""
        allowed = {
            "pushed",
            "seeding",
            "pinned",
            "last_access",
            "infohash",
            "disk_bytes",
            "mtime_ns",
            "verified_at",
            "error",
            "sha256",
            "md5",
            "sha1",
            "urls",
        }
        bad = set(fields) - allowed
        if bad:
            raise StoreError(f"cannot set columns {sorted(bad)}")
        if not fields:
            return
        sets, args = [], []
        for k, v in fields.items():
            sets.append(f"{k}=?")
            args.append(json.dumps(v) if k == "urls" else int(v) if isinstance(v, bool) else v)
        sets.append("updated_at=?")
        args += [time.time(), item_id]
        with self.tx() as c:
            c.execute(f"UPDATE items SET {', '.join(sets)} WHERE id=?", args)

    def touch(self, item_ids: Sequence[int], when: float | None = None) -> None:
        """Record an access (LRU) for several items in one write."""
        when = time.time() if when is None else when
        with self.tx() as c:
            c.executemany("UPDATE items SET last_access=MAX(last_access, ?) WHERE id=?", [(when, i) for i in item_ids])

    def counts_by_state(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state"):
            out[state] = n
        return out

    def cache_summary(self) -> dict[str, int]:
        r = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(disk_bytes),0), "
            "COALESCE(SUM(CASE WHEN pushed=0 THEN 1 ELSE 0 END),0), "
            "COALESCE(SUM(CASE WHEN pushed=0 THEN COALESCE(size,0) ELSE 0 END),0), "
            "COALESCE(SUM(seeding),0), COALESCE(SUM(pinned),0) FROM items WHERE state=?",
            (State.CACHED.value,),
        ).fetchone()
        return {
            "cached_items": r[0],
            "cached_disk_bytes": r[1],
            "unpushed_items": r[2],
            "unpushed_bytes": r[3],
            "seeding_items": r[4],
            "pinned_items": r[5],
        }

    def set_pieces(self, item_id: int, piece_length: int, hashes: bytes) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO pieces(item_id, piece_length, hashes) VALUES(?,?,?) ON CONFLICT(item_id) "
                "DO UPDATE SET piece_length=excluded.piece_length, hashes=excluded.hashes",
                (item_id, piece_length, hashes),
            )

    def get_pieces(self, item_id: int) -> tuple[int, bytes] | None:
        r = self.conn.execute("SELECT piece_length, hashes FROM pieces WHERE item_id=?", (item_id,)).fetchone()
        return None if r is None else (int(r[0]), bytes(r[1]))

    def replicas(self, key: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT location, size, md5, sha256, etag, seen_at FROM replicas WHERE key=?", (key,))
        return [dict(zip(("location", "size", "md5", "sha256", "etag", "seen_at"), r, strict=True)) for r in rows]


def _changed(cur: Item, e: CatalogEntry) -> bool:
    """True when the origin now publishes different content under the same key."""
    for mine, theirs in ((cur.md5, e.md5), (cur.sha256, e.sha256), (cur.sha1, e.sha1)):
        if mine and theirs and mine.lower() != theirs.lower():
            return True
    return bool(cur.size is not None and e.size is not None and cur.size != e.size)
