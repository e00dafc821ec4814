"""Acceptance 2: the eviction policy against a simple reference model (hypothesis).

The pure policy never plans a pinned, in-use or non-durable item and evicts in LRU order among the
rest; the SQL that feeds it (order, durability from R2 or matching origin listings) agrees with the
same reference model on a real SQLite store.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noded.cache import db as cachedb
from noded.cache import eviction
from noded.core.model import CatalogEntry, State
from noded.core.store import Store


@dataclass(frozen=True)
class Ref:
    id: int
    disk_bytes: int
    last_access: int
    pinned: bool
    in_use: bool
    durable: bool


def reference_plan(items: list[Ref], need: int, max_items: int | None = None) -> list[int]:
    """The obvious model: sort by last access (id breaks ties), skip the protected, take until enough."""
    if need <= 0:
        return []
    out, freed = [], 0
    for it in sorted(items, key=lambda r: (r.last_access, r.id)):
        if it.pinned or it.in_use or not it.durable:
            continue
        out.append(it.id)
        freed += it.disk_bytes
        if freed >= need or len(out) == max_items:
            break
    return out


items_st = st.lists(
    st.tuples(
        st.integers(0, 5_000_000),
        st.integers(0, 30),  # few distinct times: plenty of ties
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    max_size=60,
).map(lambda rows: [Ref(i + 1, *r) for i, r in enumerate(rows)])


@settings(max_examples=400, deadline=None)
@given(items=items_st, need_frac=st.floats(0, 1.2), max_items=st.one_of(st.none(), st.integers(1, 8)))
def test_plan_matches_reference_and_never_evicts_protected(
    items: list[Ref], need_frac: float, max_items: int | None
) -> None:
    need = int(sum(r.disk_bytes for r in items) * need_frac)
    lru = sorted(items, key=lambda r: (r.last_access, r.id))
    in_use = {r.id for r in items if r.in_use}
    cands = ((r.id, r.disk_bytes, int(r.pinned), int(r.durable)) for r in lru)
    plan = eviction.plan(cands, need, in_use, max_items)

    assert plan.evict == reference_plan(items, need, max_items)
    assert max_items is None or len(plan.evict) <= max_items
    by_id = {r.id: r for r in items}
    for i in plan.evict:
        r = by_id[i]
        assert not r.pinned and not r.in_use and r.durable
    # LRU among the evictable: the plan is a prefix of the evictable items in LRU order.
    evictable = [r.id for r in lru if not (r.pinned or r.in_use or not r.durable)]
    assert plan.evict == evictable[: len(plan.evict)]
    assert plan.freed == sum(by_id[i].disk_bytes for i in plan.evict)
    assert plan.sufficient == (plan.freed >= need)
    if not plan.sufficient and not plan.truncated:
        assert plan.evict == evictable  # it took everything it was allowed to
    if plan.truncated:
        assert len(plan.evict) == max_items and not plan.sufficient


def test_bytes_to_free_hysteresis_and_floor() -> None:
    b = eviction.Budget(budget=1000, high_watermark=0.9, low_watermark=0.5, free_space_floor=100)
    assert eviction.bytes_to_free(b, committed=800, incoming=100, fs_free=10_000) == 0  # exactly at high
    assert eviction.bytes_to_free(b, committed=800, incoming=101, fs_free=10_000) == 401  # down to low
    # The filesystem floor wins over a budget that still has room.
    assert eviction.bytes_to_free(b, committed=0, incoming=50, fs_free=120, fs_pending=20) == 50
    assert eviction.alloc_estimate(1) == 4096 and eviction.alloc_estimate(4096) == 4096


# -- the SQL side against the same model ----------------------------------------------------------
replica_st = st.sampled_from(
    ["none", "match", "mismatch", "stale", "inbox", "peer", "sha_match", "relisted_other", "delisted"]
)
row_st = st.tuples(
    st.integers(1, 3_000_000),  # disk_bytes
    st.integers(0, 20),  # last_access
    st.booleans(),  # pinned
    st.booleans(),  # pushed
    replica_st,
    st.booleans(),  # in use
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(row_st, max_size=25), need_frac=st.floats(0, 1.1))
def test_sql_candidates_agree_with_reference(
    rows: list[tuple[int, int, bool, bool, str, bool]], need_frac: float
) -> None:
    now = time.time()
    max_age = 3600.0
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "s.sqlite3")
        store.open_sync()
        try:
            refs: list[Ref] = []
            for n, (dbytes, la, pinned, pushed, replica, in_use) in enumerate(rows):
                key = f"d/{n}.parquet"
                md5, sha = f"{n:032x}", f"{n:064x}"
                item, _ = store.upsert_entry(
                    CatalogEntry(origin="inbox", key=key, urls=(), size=dbytes, md5=md5, sha256=sha), now=now
                )
                store.set_state(item.id, State.CACHED, disk_bytes=dbytes, pushed=pushed, pinned=pinned, last_access=la)
                loc, r_md5, r_sha, seen = {
                    "none": (None, None, None, now),
                    "match": ("sourcecoop", md5.upper(), None, now),
                    "sha_match": ("zenodo", None, sha, now),
                    "mismatch": ("ia", "f" * 32, None, now),
                    "stale": ("r2", md5, sha, now - 2 * max_age),
                    "inbox": ("inbox", md5, sha, now),
                    "peer": ("peer:amsterdam", md5, sha, now),
                    "relisted_other": ("sourcecoop", md5, None, now),  # then the origin lists other bytes
                    "delisted": ("ia", md5, None, now),  # then the origin drops it
                }[replica]
                if loc is not None:
                    with store.tx() as c:
                        c.execute(
                            "INSERT OR REPLACE INTO replicas(key, location, size, md5, sha256, seen_at)"
                            " VALUES(?,?,?,?,?,?)",
                            (key, loc, dbytes, r_md5, r_sha, seen),
                        )
                        if replica == "relisted_other":
                            c.execute(
                                "UPDATE replicas SET md5 = ? WHERE key = ? AND location = ?", ("e" * 32, key, loc)
                            )
                        elif replica == "delisted":
                            c.execute("DELETE FROM replicas WHERE key = ? AND location = ?", (key, loc))
                durable = pushed or replica in ("match", "sha_match")
                refs.append(Ref(item.id, dbytes, la, pinned, in_use, durable))
            need = int(sum(r.disk_bytes for r in refs) * need_frac)
            in_use = {r.id for r in refs if r.in_use}
            plan = cachedb.plan_eviction(store, need, in_use, now - max_age)
            assert plan.evict == reference_plan(refs, need)
            # And the executor's re-check agrees item by item.
            for r in refs:
                marked = cachedb.mark_evicted(store, r.id, in_use, now - max_age)
                assert (marked is not None) == (not r.pinned and not r.in_use and r.durable)
        finally:
            store.close_sync()
