"""Benchmark: plan an eviction over a store of 1,000,000 cached items; time and peak RSS.

    /work/venv/bin/python bench/evict.py [--items 1000000] [--keep DIR]

Builds the store once (in a child process), then plans in fresh child processes so each peak RSS is
that of the planning alone:
  - lean (noded): SUM over the cache, then the pure policy over a cursor in LRU order from the covering
    partial index items_lru, stopping as soon as enough is freed or PLAN_MAX_ITEMS are planned (the
    daemon executes that round and plans again). Cases: typical (free 10% of the cache) as the
    daemon's first round and as one uncapped plan, blocked (origin listings stale: only the 0.5%
    pushed to R2 are evictable; the plan falls short and counts why), evict-all in one plan.
  - naive baseline: load every cached row as model.Item (store.items pages), sort by last access in
    Python, filter, take the prefix.
The last line is one JSON object with plan_seconds (the slowest of the typical plans and the blocked
round; the uncapped evict-all is reported apart),
the figure of each case, peak_rss_mib (the largest of the lean runs) and the baseline's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noded.cache import db as cachedb  # noqa: E402
from noded.cache import eviction  # noqa: E402
from noded.cache.accounting import PLAN_MAX_ITEMS  # noqa: E402
from noded.core.model import State  # noqa: E402
from noded.core.store import Store  # noqa: E402

_INSERT_REPLICA = "INSERT INTO replicas(key, location, size, md5, sha256, seen_at) VALUES(?,?,?,?,?,?)"
_INSERT = (
    "INSERT INTO items(id, key, version, origin, state, size, md5, sha1, sha256, etag, urls, infohash, pinned,"
    " pushed, seeding, last_access, disk_bytes, mtime_ns, error, created_at, updated_at)"
    f" VALUES ({','.join('?' * 21)})"
)


def build(path: Path, n: int) -> None:
    rng = random.Random(7)
    store = Store(path)
    store.open_sync()
    now = time.time()
    c = store.conn
    c.execute("PRAGMA cache_size = -262144")  # 256 MiB while building: the index pages stay in memory
    c.execute("PRAGMA temp_store = MEMORY")  # statement journals of the trigger updates
    with store.tx():
        rows = []
        reps = []
        for i in range(1, n + 1):
            key = f"ds{i % 997:03d}/part-{i:07d}.parquet"
            md5 = f"{i:032x}"
            kind = rng.random()
            size = rng.randint(1 << 20, 1 << 30)
            pushed = 1 if kind < 0.005 else 0
            pinned = 1 if rng.random() < 0.01 else 0
            if 0.005 <= kind < 0.8:  # durable through an origin listing with the same checksum
                reps.append((key, "sourcecoop", size, md5, None, now))
            elif 0.8 <= kind < 0.9:  # listed, but with other bytes: not durable
                reps.append((key, "zenodo", size, "f" * 32, None, now))
            rows.append(
                (
                    i,
                    key,
                    1,
                    "sourcecoop",
                    State.CACHED.value,
                    size,
                    md5,
                    None,
                    None,
                    None,
                    "[]",
                    None,
                    pinned,
                    pushed,
                    0,
                    rng.uniform(now - 90 * 86400, now),
                    size + 4096,
                    None,
                    None,
                    now,
                    now,
                )
            )
            if len(rows) >= 50_000:
                # Listings first: the items' insert trigger then finds them (one lookup per item).
                c.executemany(_INSERT_REPLICA, reps)
                c.executemany(_INSERT, rows)
                rows.clear()
                reps.clear()
        c.executemany(_INSERT_REPLICA, reps)
        c.executemany(_INSERT, rows)
    c.execute("ANALYZE")
    store.close_sync()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plan_lean(path: Path, fraction: float, listed_since: float, max_items: int | None) -> dict[str, float]:
    store = Store(path)
    store.open_sync()
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    _, used = cachedb.cached_bytes(store)
    need = int(used * fraction)
    p = cachedb.plan_eviction(store, need, set(), listed_since, max_items)
    dt = time.perf_counter() - t0
    store.close_sync()
    return {
        "seconds": dt,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss0,
        "evict": len(p.evict),
        "scanned": p.scanned,
        "sufficient": p.sufficient,
    }


def plan_naive(path: Path, fraction: float, listed_since: float, max_items: int | None) -> dict[str, float]:
    store = Store(path)
    store.open_sync()
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    items = []
    after = 0
    while True:
        page = store.items(states=[State.CACHED], after_id=after, limit=10_000)
        if not page:
            break
        items += page
        after = page[-1].id
    used = sum(i.disk_bytes for i in items)
    need = int(used * fraction)
    items.sort(key=lambda i: (i.last_access, i.id))
    durable_ids = {
        r[0]
        for r in store.conn.execute(
            "SELECT i.id FROM items i JOIN replicas r ON r.key = i.key AND r.md5 = i.md5 WHERE i.state = 'cached'"
        )
    }
    cands = ((i.id, i.disk_bytes, int(i.pinned), int(i.pushed or i.id in durable_ids)) for i in items)
    p = eviction.plan(cands, need)
    dt = time.perf_counter() - t0
    store.close_sync()
    return {
        "seconds": dt,
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss0,
        "evict": len(p.evict),
        "scanned": p.scanned,
        "sufficient": p.sufficient,
    }


def child(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="directory for the store (kept; reused if present)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "PATH", "FRACTION", "SINCE"), help=argparse.SUPPRESS)
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        build(a.build, a.items)
        print(json.dumps({"built": a.items}))
        return
    if a.child:
        mode, path, frac, since = a.child
        fn = plan_naive if mode == "naive" else plan_lean
        cap = PLAN_MAX_ITEMS if mode == "lean" else None  # "uncapped": one plan for everything
        print(json.dumps(fn(Path(path), float(frac), float(since), cap)))
        return

    with tempfile.TemporaryDirectory(dir=a.keep.parent if a.keep else None) as tmp:
        path = (a.keep or Path(tmp)) / "noded.sqlite3"
        if not path.exists():
            t0 = time.perf_counter()
            child(["--build", str(path), "--items", str(a.items)])
            print(
                f"built a store of {a.items} cached items in {time.perf_counter() - t0:.1f}s "
                f"({path.stat().st_size / 2**20:.0f} MiB)"
            )
        # The daemon's first round of a typical eviction (free 10% of the cache; PLAN_MAX_ITEMS per round).
        typical = child(["--child", "lean", str(path), "0.1", "0"])
        # The same need in one uncapped plan: what the baseline computes too.
        typical_all = child(["--child", "uncapped", str(path), "0.1", "0"])
        # Origin listings all stale: only the 0.5% pushed to R2 are evictable; the plan scans the whole
        # index, falls short, and counts why (the slowest round the daemon makes).
        blocked = child(["--child", "lean", str(path), "0.1", "1e12"])
        # More wanted than is evictable, in one plan (output-bound: ~790,000 ids).
        everything = child(["--child", "uncapped", str(path), "2.0", "0"])
        naive = child(["--child", "naive", str(path), "0.1", "0"])
    rows = (
        ("lean typical, first round", typical),
        ("lean typical, one uncapped plan", typical_all),
        ("lean blocked (listings stale)", blocked),
        ("lean evict-all, one uncapped plan", everything),
        ("baseline naive (load all Items, sort)", naive),
    )
    for name, r in rows:
        print(
            f"{name:40s} {r['seconds']:7.3f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
            f"evict {r['evict']} of {r['scanned']} scanned"
        )
    print(
        f"ratio baseline/lean (same need, one plan): time {naive['seconds'] / typical_all['seconds']:.1f}x, "
        f"peak RSS {naive['peak_rss_mib'] / typical_all['peak_rss_mib']:.1f}x"
    )
    runs = (typical, typical_all, blocked, everything)
    print(
        json.dumps(
            {
                "items": a.items,
                "plan_seconds": round(max(typical["seconds"], blocked["seconds"], typical_all["seconds"]), 3),
                "plan_seconds_typical_round": round(typical["seconds"], 3),
                "plan_seconds_typical_uncapped": round(typical_all["seconds"], 3),
                "plan_seconds_blocked": round(blocked["seconds"], 3),
                "plan_seconds_evict_all_uncapped": round(everything["seconds"], 3),
                "plan_max_items": PLAN_MAX_ITEMS,
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
                "baseline_naive_seconds": round(naive["seconds"], 3),
                "baseline_naive_peak_rss_mib": round(naive["peak_rss_mib"], 1),
                "ratio_time": round(naive["seconds"] / typical_all["seconds"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
