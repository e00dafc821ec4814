"""The cache's SQL: lean queries for accounting, eviction, reconciliation, pins and verify checkpoints.

Every function takes the Store and runs on the store's thread (`await store.run(fn, store, ...)`), or
directly on a store opened with `open_sync()` (CLI, tests, benchmarks). Writes that depend on a check
(evict only if still evictable) do the check and the write in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from noded.cache import eviction
from noded.core.model import HashResult, Item, State
from noded.core.store import Store

# Copies that count as durable: the organisation's origins and R2. Not the inbox (that is us), not
# peers (caches like this one, which may evict too). The same list is in migration 4's triggers,
# which keep items.listed_at = the newest sighting of the item's exact bytes at one of them.
DURABLE_LOCATIONS = ("sourcecoop", "zenodo", "ia", "r2")

# Evictable candidates in LRU order, read from the covering partial index items_lru (state cached, not
# pinned): the scan runs in SQLite and hands Python only durable rows. Pinned and non-durable items
# are counted separately, and only when a plan falls short (to say why).
_EVICTABLE_SQL = (
    "SELECT id, disk_bytes, 0, 1 FROM items WHERE state = 'cached' AND pinned = 0"
    " AND (pushed = 1 OR listed_at >= ?) ORDER BY last_access, id"
)
_KEPT_SQL = (
    "SELECT COALESCE(SUM(pinned), 0),"
    " COALESCE(SUM(pinned = 0 AND NOT (pushed = 1 OR COALESCE(listed_at, 0) >= ?)), 0)"
    " FROM items WHERE state = 'cached'"
)
_ONE_SQL = (
    "SELECT id, disk_bytes, pinned, (pushed = 1 OR COALESCE(listed_at, 0) >= ?) FROM items"
    " WHERE state = 'cached' AND id = ?"
)
_ALL_SQL = (
    "SELECT id, disk_bytes, pinned, (pushed = 1 OR COALESCE(listed_at, 0) >= ?), key, version, last_access"
    " FROM items WHERE state = 'cached' ORDER BY last_access, id"
)


def lru_candidates(store: Store, listed_since: float) -> Iterator[tuple[int, int, int, int]]:
    """Stream the durable, unpinned cached items in LRU order (see eviction.Candidate)."""
    yield from store.conn.execute(_EVICTABLE_SQL, (listed_since,))


def plan_eviction(
    store: Store, need: int, in_use: Collection[int], listed_since: float, max_items: int | None = None
) -> eviction.Plan:
    """Run the pure policy over the streamed candidates (on the store thread: the cursor lives there)."""
    p = eviction.plan(lru_candidates(store, listed_since), need, in_use, max_items)
    if not p.sufficient and not p.truncated:
        pinned, not_durable = store.conn.execute(_KEPT_SQL, (listed_since,)).fetchone()
        if pinned:
            p.kept[eviction.PINNED] = int(pinned)
        if not_durable:
            p.kept[eviction.NOT_DURABLE] = int(not_durable)
    return p


@dataclass(frozen=True, slots=True)
class Explained:
    id: int
    key: str
    version: int
    disk_bytes: int
    last_access: float
    reason: str | None  # None: evictable


def explain(store: Store, in_use: Collection[int], listed_since: float, limit: int | None = None) -> list[Explained]:
    """Every cached item in LRU order with the reason it is (not) evictable (for `evict --dry-run`)."""
    out: list[Explained] = []
    for row in store.conn.execute(_ALL_SQL, (listed_since,)):
        out.append(Explained(row[0], row[4], row[5], row[1], row[6], eviction.why_not(row[:4], in_use)))
        if limit is not None and len(out) >= limit:
            break
    return out


def cached_bytes(store: Store) -> tuple[int, int]:
    """(number of cached items, their allocated bytes)."""
    r = store.conn.execute("SELECT COUNT(*), COALESCE(SUM(disk_bytes), 0) FROM items WHERE state = 'cached'").fetchone()
    return int(r[0]), int(r[1])


def cached_rows(store: Store) -> list[tuple[int, str, int, int | None, int | None, int]]:
    """(id, key, version, size, mtime_ns, disk_bytes) of every cached item: what reconciliation needs."""
    return list(
        store.conn.execute("SELECT id, key, version, size, mtime_ns, disk_bytes FROM items WHERE state = 'cached'")
    )


def unaccounted_rows(store: Store) -> list[tuple[int, str]]:
    """Cached items whose allocation or mtime was never recorded (published by another component)."""
    return list(
        store.conn.execute(
            "SELECT id, key FROM items WHERE state = 'cached' AND (mtime_ns IS NULL OR (disk_bytes = 0 AND size > 0))"
        )
    )


def record_stat(store: Store, updates: list[tuple[int, int, int]]) -> None:
    """[(id, disk_bytes, mtime_ns)] for cached rows, in one transaction."""
    if not updates:
        return
    with store.tx() as c:
        c.executemany(
            "UPDATE items SET disk_bytes = ?, mtime_ns = ? WHERE id = ? AND state = 'cached'",
            [(d, m, i) for i, d, m in updates],
        )


def is_current(store: Store, item: Item) -> bool:
    """No newer version of the key exists (the item is the one its path belongs to)."""
    r = store.conn.execute("SELECT MAX(version) FROM items WHERE key = ?", (item.key,)).fetchone()
    return r[0] is None or int(r[0]) <= item.version


def mark_evicted(store: Store, item_id: int, in_use: Collection[int], listed_since: float) -> Item | None:
    """CACHED -> EVICTED if the item is still evictable now (re-checked inside the transaction)."""
    with store.tx() as c:
        row = c.execute(_ONE_SQL, (listed_since, item_id)).fetchone()
        if row is None or eviction.why_not(tuple(row), in_use) is not None:
            return None
        return store.set_state(item_id, State.EVICTED, disk_bytes=0, seeding=False, mtime_ns=None)


def path_in_use(store: Store, key: str) -> bool:
    """Another cached row owns the same path (a newer version published over it): keep the file."""
    r = store.conn.execute("SELECT 1 FROM items WHERE key = ? AND state = 'cached' LIMIT 1", (key,)).fetchone()
    return r is not None


def mark_gone(store: Store, item_id: int, reason: str, *, quarantined: bool) -> Item | None:
    """A cached file vanished or changed behind our back.

    The current version goes back to WANTED (through QUARANTINED when its bytes changed), so the pull
    pipeline fetches it again; an older version that was superseded is simply EVICTED.
    """
    with store.tx():
        item = store.get_item(item_id)
        if item is None or item.state is not State.CACHED:
            return None
        cols = {"disk_bytes": 0, "seeding": False, "mtime_ns": None}
        if not is_current(store, item):
            return store.set_state(item_id, State.EVICTED, error=f"superseded; {reason}", **cols)
        if quarantined:
            store.set_state(item_id, State.QUARANTINED, error=reason, **cols)
        return store.set_state(item_id, State.WANTED, error=reason, **cols)


def set_pinned(store: Store, key: str, pinned: bool, now: float | None = None) -> Item | None:
    """Pin or unpin the current version of `key`; pinning counts as an access (LRU)."""
    now = time.time() if now is None else now
    with store.tx():
        item = store.get_current(key)
        if item is None:
            return None
        store.update_item(item.id, pinned=pinned, last_access=max(item.last_access, now))
        return store.get_item(item.id)


def evicted_leftovers(store: Store) -> list[tuple[int, str]]:
    """Keys whose every version is evicted: a crash between the store write and the unlink may have
    left their file behind. Keys with any other row are left alone (a publish may be under way)."""
    return list(
        store.conn.execute(
            "SELECT MAX(e.id), e.key FROM items e WHERE e.state = 'evicted' AND NOT EXISTS "
            "(SELECT 1 FROM items c WHERE c.key = e.key AND c.state != 'evicted') GROUP BY e.key"
        )
    )


def cached_under(store: Store, rel: str) -> list[tuple[int, str, int | None, int | None]]:
    """(id, key, size, mtime_ns) of cached items at `rel` or below it (a deleted directory)."""
    return list(
        store.conn.execute(
            "SELECT id, key, size, mtime_ns FROM items WHERE state = 'cached' AND (key = ? OR substr(key, 1, ?) = ?)",
            (rel, len(rel) + 1, rel + "/"),
        )
    )


def record_published(store: Store, item_id: int, h: HashResult, disk: int, mtime_ns: int) -> list[Item]:
    """The bytes of `item_id` are now under their final path: CACHED with checksums, allocation, mtime
    and piece hashes in one transaction; older cached versions of the key (same path) are retired.
    Returns [the item, *the retired versions] (their torrents must go)."""
    now = time.time()
    with store.tx() as c:
        item = store.set_state(
            item_id,
            State.CACHED,
            size=h.size,
            md5=h.md5,
            sha256=h.sha256,
            disk_bytes=disk,
            mtime_ns=mtime_ns,
            verified_at=now,
            last_access=now,
        )
        store.set_pieces(item_id, h.piece_length, h.pieces)
        older = c.execute(
            "SELECT id FROM items WHERE key = ? AND version < ? AND state = 'cached'", (item.key, item.version)
        ).fetchall()
        out = [item]
        for (old_id,) in older:
            out.append(
                store.set_state(
                    old_id,
                    State.EVICTED,
                    error=f"superseded by version {item.version}",
                    disk_bytes=0,
                    seeding=False,
                    mtime_ns=None,
                )
            )
        return out
