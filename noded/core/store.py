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
    # 9: one dataset, many locations. Each origin URL listing an item's name, with what it publishes;
    # `conflict` says why a location disagrees with the trusted values. items.conflict summarises them,
    # items.verification is 'checksum' (some location publishes one), 'unverified' (size only), 'local'.
    # A store with no items has no origin-path keys to move to dataset names (origins/rekey.py): mark it done.
    """
    CREATE TABLE locations (
        key TEXT NOT NULL,
        origin TEXT NOT NULL,
        url TEXT NOT NULL,
        size INTEGER, md5 TEXT, sha1 TEXT, sha256 TEXT, etag TEXT, infohash TEXT,
        conflict TEXT,
        release_group TEXT,
        release_order INTEGER,
        superseded TEXT,
        seen_at REAL NOT NULL,
        PRIMARY KEY (key, origin, url)
    );
    CREATE INDEX locations_origin ON locations(origin);
    CREATE TABLE published_pieces (
        infohash TEXT PRIMARY KEY,
        key TEXT NOT NULL,
        size INTEGER NOT NULL,
        piece_length INTEGER NOT NULL,
        hashes BLOB NOT NULL
    );
    CREATE INDEX published_pieces_key ON published_pieces(key);
    CREATE INDEX locations_md5 ON locations(md5);
    ALTER TABLE items ADD COLUMN conflict TEXT;
    ALTER TABLE items ADD COLUMN verification TEXT NOT NULL DEFAULT 'unverified';
    UPDATE items SET verification = CASE
        WHEN origin = 'inbox' THEN 'local'
        WHEN origin = 'torrent' OR sha1 IS NOT NULL
          OR EXISTS (SELECT 1 FROM replicas r WHERE r.key = items.key AND (r.md5 IS NOT NULL OR r.sha256 IS NOT NULL))
          THEN 'checksum'
        ELSE 'unverified' END;
    INSERT INTO meta(name, value) SELECT 'keys.dataset_names', '1' WHERE NOT EXISTS (SELECT 1 FROM items)
        ON CONFLICT(name) DO NOTHING;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

_ITEM_COLS = (
    "id, key, version, origin, state, size, md5, sha1, sha256, etag, urls, infohash, pinned, pushed, "
    "seeding, last_access, disk_bytes, mtime_ns, error, created_at, updated_at, verified_at, conflict, verification"
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
        conflict=r[22],
        verification=r[23],
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
        # Up to 32 MiB of pages kept (2 MiB by default): status counts and the cache's checks scan the
        # items table every few seconds, and with tens of thousands of rows each scan would read it anew.
        conn.execute("PRAGMA cache_size=-32768")
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

    def versions(self, key: str) -> list[Item]:
        """Every version of an item, oldest first."""
        rows = self.conn.execute(f"SELECT {_ITEM_COLS} FROM items WHERE key=? ORDER BY version", (key,))
        return [_row_to_item(r) for r in rows]

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

    def upsert_entry(
        self,
        e: CatalogEntry,
        now: float | None = None,
        *,
        preference: Sequence[str] = (),
        conflicts: list[str] | None = None,
    ) -> tuple[Item, bool]:
        """Record an origin's listing of a file as a location of the item of that name.

        Returns (current item, created_new_version). Values that agree with the item merge into it (a
        location with no checksum borrows the others'). A location that disagrees while other locations
        still back the item's values is a conflict: `preference` (origin names, most trusted first)
        decides which side the item follows, the other side's locations are marked, and a line is
        appended to `conflicts`. When no other location backs the current values any more (the origin
        re-published the file), the entry becomes a new version (state wanted); the old version keeps
        its row and bytes until the new one is verified and replaces it.
        """
        now = time.time() if now is None else now
        url = e.urls[0] if e.urls else ""
        with self.tx() as c:
            c.execute(
                "INSERT INTO replicas(key, location, size, md5, sha256, etag, seen_at) "
                "VALUES(?,?,?,?,?,?,?) ON CONFLICT(key, location) DO UPDATE SET size=excluded.size, "
                "md5=excluded.md5, sha256=excluded.sha256, etag=excluded.etag, seen_at=excluded.seen_at",
                (e.key, e.origin, e.size, e.md5, e.sha256, e.etag, now),
            )
            group, order = e.extra.get("release_group"), e.extra.get("release_order")
            if not (isinstance(group, str) and isinstance(order, int)):
                group, order = None, None
            c.execute(
                "INSERT INTO locations(key, origin, url, size, md5, sha1, sha256, etag, infohash, release_group, "
                "release_order, seen_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key, origin, url) DO UPDATE SET "
                "size=excluded.size, md5=excluded.md5, sha1=excluded.sha1, sha256=excluded.sha256, "
                "etag=excluded.etag, infohash=excluded.infohash, release_group=excluded.release_group, "
                "release_order=excluded.release_order, seen_at=excluded.seen_at",
                (e.key, e.origin, url, e.size, e.md5, e.sha1, e.sha256, e.etag, e.infohash, group, order, now),
            )
            hashes, plen = e.extra.get("pieces"), e.extra.get("piece_length")
            if e.infohash and e.size and isinstance(hashes, bytes) and isinstance(plen, int):
                c.execute(
                    "INSERT INTO published_pieces(infohash, key, size, piece_length, hashes) VALUES(?,?,?,?,?) "
                    "ON CONFLICT(infohash) DO UPDATE SET key=excluded.key",
                    (e.infohash, e.key, e.size, plen, hashes),
                )
            cur = self.get_current(e.key)
            if cur is not None and _disagreement(cur, e) is None:
                self._merge(cur, e, url, now)
                out = self._refresh_conflict(e.key)
                return out, False
            if cur is not None:
                why = _disagreement(cur, e) or ""
                release = self._release_relation(e.key, e.origin, url, group, order)
                if release == "older":
                    # An older release of a dataset whose newer one is listed too: not a conflict.
                    c.execute(
                        "UPDATE locations SET superseded='a newer release of this dataset is listed', conflict=NULL"
                        " WHERE key=? AND origin=? AND url=?",
                        (e.key, e.origin, url),
                    )
                    return self._refresh_conflict(e.key), False
                if release == "newer":
                    c.execute(
                        "UPDATE locations SET superseded=? WHERE key=? AND release_group=? AND release_order<?",
                        (f"superseded by release {order}", e.key, group, order),
                    )
                backers = self._backers(e.key, e.origin, url)
                if backers:
                    mine, theirs = _rank(preference, e.origin), min(_rank(preference, o) for o in backers)
                    if mine >= theirs:  # the item's values stay trusted; this location is the odd one
                        reason = f"{e.origin} publishes {why}"
                        c.execute(
                            "UPDATE locations SET conflict=? WHERE key=? AND origin=? AND url=?",
                            (reason[:500], e.key, e.origin, url),
                        )
                        if conflicts is not None:
                            conflicts.append(f"{e.key}: {reason}; trusting {', '.join(sorted(backers))}")
                        return self._refresh_conflict(e.key), False
                    # The more trusted origin disagrees with what the others publish: follow it.
                    reason = f"{', '.join(sorted(backers))} publish {_values(cur)}, {e.origin} publishes {_values(e)}"
                    c.execute(
                        "UPDATE locations SET conflict=? WHERE key=? AND NOT (origin=? AND url=?) AND conflict IS NULL",
                        (reason[:500], e.key, e.origin, url),
                    )
                    if conflicts is not None:
                        conflicts.append(f"{e.key}: {reason}; trusting {e.origin}")
            version = 1 if cur is None else cur.version + 1
            c.execute(
                "INSERT INTO items(key, version, origin, state, size, md5, sha1, sha256, etag, urls, "
                "infohash, last_access, created_at, updated_at, verification) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    _verification(e),
                ),
            )
            # Locations that publish the new values (or say nothing against them) agree again.
            for o, u, size, md5, sha1, sha256 in c.execute(
                "SELECT origin, url, size, md5, sha1, sha256 FROM locations WHERE key=? AND conflict IS NOT NULL",
                (e.key,),
            ).fetchall():
                if _disagreement_values(e, size, md5, sha1, sha256) is None:
                    c.execute("UPDATE locations SET conflict=NULL WHERE key=? AND origin=? AND url=?", (e.key, o, u))
            c.execute("UPDATE locations SET conflict=NULL WHERE key=? AND origin=? AND url=?", (e.key, e.origin, url))
            return self._refresh_conflict(e.key), cur is not None

    def _merge(self, cur: Item, e: CatalogEntry, url: str, now: float) -> None:
        c = self.conn
        c.execute(
            "UPDATE locations SET conflict=NULL, superseded=NULL WHERE key=? AND origin=? AND url=?",
            (e.key, e.origin, url),
        )
        merged = list(dict.fromkeys([*cur.urls, *e.urls]))
        verification = cur.verification
        if verification == "unverified" and _verification(e) != "unverified":
            verification = _verification(e)
        if (
            merged != cur.urls
            or verification != cur.verification
            or (e.infohash and not cur.infohash)
            or (e.size is not None and cur.size is None)
            or (e.md5 and not cur.md5)
            or (e.sha1 and not cur.sha1)
            or (e.sha256 and not cur.sha256)
            or (e.etag and not cur.etag)
        ):
            c.execute(
                "UPDATE items SET urls=?, infohash=COALESCE(infohash, ?), size=COALESCE(size, ?),"
                " md5=COALESCE(md5, ?), sha1=COALESCE(sha1, ?), sha256=COALESCE(sha256, ?), etag=COALESCE(etag, ?),"
                " verification=?, updated_at=? WHERE id=?",
                (json.dumps(merged), e.infohash, e.size, e.md5, e.sha1, e.sha256, e.etag, verification, now, cur.id),
            )

    def _backers(self, key: str, origin: str, url: str) -> set[str]:
        """Origins of the other listed locations that agree with the item's current values."""
        rows = self.conn.execute(
            "SELECT origin FROM locations WHERE key=? AND conflict IS NULL AND superseded IS NULL"
            " AND NOT (origin=? AND url=?)",
            (key, origin, url),
        )
        return {str(r[0]) for r in rows}

    def _release_relation(self, key: str, origin: str, url: str, group: str | None, order: int | None) -> str | None:
        """"newer"/"older" when the locations backing the item are releases of the same dataset
        (e.g. records of one Zenodo concept) and this entry comes after/before all of them."""
        if group is None or order is None:
            return None
        rows = self.conn.execute(
            "SELECT release_group, release_order FROM locations WHERE key=? AND conflict IS NULL"
            " AND superseded IS NULL AND NOT (origin=? AND url=?)",
            (key, origin, url),
        ).fetchall()
        if not rows or any(g != group or o is None for g, o in rows):
            return None
        if all(int(o) < order for _, o in rows):
            return "newer"
        if all(int(o) > order for _, o in rows):
            return "older"
        return None

    def _refresh_conflict(self, key: str) -> Item:
        """items.conflict of the current version = the reasons of its disagreeing locations."""
        rows = self.conn.execute(
            "SELECT origin, url, conflict FROM locations WHERE key=? AND conflict IS NOT NULL ORDER BY origin, url",
            (key,),
        ).fetchall()
        text = "; ".join(f"{o} {u}: {why}" if u else f"{o}: {why}" for o, u, why in rows)[:2000] or None
        cur = self.get_current(key)
        assert cur is not None
        if cur.conflict != text:
            self.conn.execute("UPDATE items SET conflict=? WHERE id=?", (text, cur.id))
            cur.conflict = text
        return cur

    def locations(self, key: str) -> list[dict[str, Any]]:
        cols = (
            "origin", "url", "size", "md5", "sha1", "sha256", "etag", "infohash", "conflict", "superseded",
            "release_group", "release_order", "seen_at",
        )  # fmt: skip
        rows = self.conn.execute(
            f"SELECT {', '.join(cols)} FROM locations WHERE key=? ORDER BY origin, url", (key,)
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def published_pieces(self, key: str, size: int | None) -> tuple[int, bytes] | None:
        """(piece length, sha1 digests) a published torrent of this name and size gives, if any."""
        r = self.conn.execute(
            "SELECT piece_length, hashes FROM published_pieces WHERE key=? AND size=? LIMIT 1", (key, size)
        ).fetchone()
        return None if r is None else (int(r[0]), bytes(r[1]))

    def prune_locations(self, origin: str, listed: set[tuple[str, str]]) -> list[str]:
        """After a complete listing of `origin`: forget its locations it no longer lists. Returns their keys.

        Their URLs leave the items' URL lists, so no pull tries them; items and bytes stay.
        """
        gone = [
            (str(k), str(u))
            for k, u in self.conn.execute("SELECT key, url FROM locations WHERE origin=?", (origin,))
            if (k, u) not in listed
        ]
        return self.forget_locations(origin, gone)

    def forget_locations(self, origin: str, gone: Sequence[tuple[str, str]]) -> list[str]:
        """Forget these (key, url) locations of `origin`. Returns their keys."""
        with self.tx() as c:
            for key, url in gone:
                c.execute("DELETE FROM locations WHERE key=? AND origin=? AND url=?", (key, origin, url))
                for item_id, urls in c.execute("SELECT id, urls FROM items WHERE key=?", (key,)).fetchall():
                    kept = [u for u in json.loads(urls) if u != url]
                    if len(kept) != len(json.loads(urls)):
                        c.execute("UPDATE items SET urls=? WHERE id=?", (json.dumps(kept), item_id))
                if self.get_current(key) is not None:
                    self._refresh_conflict(key)
        return sorted({k for k, _ in gone})

    def conflicts(self, limit: int = 100) -> list[tuple[str, str]]:
        """(key, reason) of current items whose locations disagree."""
        rows = self.conn.execute(
            "SELECT key, conflict FROM items i WHERE conflict IS NOT NULL"
            " AND version = (SELECT MAX(version) FROM items j WHERE j.key = i.key) ORDER BY key LIMIT ?",
            (limit,),
        )
        return [(str(k), str(c)) for k, c in rows]

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

    def count_seeding(self) -> int:
        """Cached items marked seeding: what a restart brings back into the BitTorrent session."""
        row = self.conn.execute("SELECT COUNT(*) FROM items WHERE state = 'cached' AND seeding = 1").fetchone()
        return int(row[0])

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


def _values(x: Item | CatalogEntry) -> str:
    parts = [f"{k} {v}" for k, v in (("size", x.size), ("md5", x.md5), ("sha1", x.sha1), ("sha256", x.sha256)) if v]
    return ", ".join(parts) or "no size or checksum"


def _disagreement(cur: Item, e: CatalogEntry) -> str | None:
    """What an entry publishes differently from the item's values (None: they agree where both say)."""
    return _disagreement_values(cur, e.size, e.md5, e.sha1, e.sha256)


def _disagreement_values(
    cur: Item | CatalogEntry, size: int | None, md5: str | None, sha1: str | None, sha256: str | None
) -> str | None:
    for name, mine, theirs in (("md5", cur.md5, md5), ("sha256", cur.sha256, sha256), ("sha1", cur.sha1, sha1)):
        if mine and theirs and mine.lower() != theirs.lower():
            return f"{name} {theirs}, not {mine}"
    if cur.size is not None and size is not None and cur.size != size:
        return f"size {size}, not {cur.size}"
    return None


def _rank(preference: Sequence[str], origin: str) -> int:
    return preference.index(origin) if origin in preference else len(preference)


def _verification(e: CatalogEntry) -> str:
    if e.origin == "inbox":
        return "local"
    return "checksum" if (e.md5 or e.sha1 or e.sha256 or e.infohash) else "unverified"
