"""Benchmark: plan an eviction over a store of 1,000,000 cached items; time and peak RSS.

    /work/venv/bin/python bench/evict.py [--items 1000000] [--keep DIR]

Builds the store once (in a child process), then plans in fresh child processes so each peak RSS is
that of the planning alone:
  - lean (noded): SUM over the cache, then the pure policy over a cursor in LRU order from the partial
    index items_lru, stopping as soon as enough is freed. Two cases: a typical plan (free 10% of the
    cache) and the worst case (more wanted than is evictable: every row is scanned).
  - naive baseline: load every cached row as model.Item (store.items pages), sort by last access in
    Python, filter, take the prefix.
The last line is one JSON object with plan_seconds (worst case), plan_seconds_typical, peak_rss_mib
(the larger of the two lean runs) and the baseline's figures.
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

from noded import cachedb, eviction  # noqa: E402
from noded.model import State  # noqa: E402
from noded.store import Store  # noqa: E402

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
            pushed = 1 if kind < 0.05 else 0
            pinned = 1 if rng.random() < 0.01 else 0
            if 0.05 <= kind < 0.8:  # durable through an origin listing with the same checksum
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


def plan_lean(path: Path, fraction: float, listed_since: float) -> dict[str, float]:
    store = Store(path)
    store.open_sync()
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    _, used = cachedb.cached_bytes(store)
    need = int(used * fraction)
    p = cachedb.plan_eviction(store, need, set(), listed_since)
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


def plan_naive(path: Path, fraction: float, listed_since: float) -> dict[str, float]:
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
        fn = plan_lean if mode == "lean" else plan_naive
        print(json.dumps(fn(Path(path), float(frac), float(since))))
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
        typical = child(["--child", "lean", str(path), "0.1", "0"])
        # Origins' listings all too old: only the 5% pushed to R2 are durable; the plan falls short.
        blocked = child(["--child", "lean", str(path), "0.1", "1e12"])
        # More wanted than is evictable: every evictable row goes into the plan (output-bound).
        everything = child(["--child", "lean", str(path), "2.0", "0"])
        naive = child(["--child", "naive", str(path), "0.1", "0"])
    rows = (
        ("lean typical (free 10%)", typical),
        ("lean blocked (listings stale)", blocked),
        ("lean evict-all (need > evictable)", everything),
        ("baseline naive (load all Items, sort)", naive),
    )
    for name, r in rows:
        print(
            f"{name:40s} {r['seconds']:7.3f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
            f"evict {r['evict']} of {r['scanned']} scanned"
        )
    print(
        f"ratio baseline/lean (typical): time {naive['seconds'] / typical['seconds']:.1f}x, "
        f"peak RSS {naive['peak_rss_mib'] / typical['peak_rss_mib']:.1f}x"
    )
    lean = (typical, blocked, everything)
    print(
        json.dumps(
            {
                "items": a.items,
                "plan_seconds": round(max(r["seconds"] for r in lean), 3),
                "plan_seconds_typical": round(typical["seconds"], 3),
                "plan_seconds_blocked": round(blocked["seconds"], 3),
                "plan_seconds_evict_all": round(everything["seconds"], 3),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in lean), 1),
                "baseline_naive_seconds": round(naive["seconds"], 3),
                "baseline_naive_peak_rss_mib": round(naive["peak_rss_mib"], 1),
                "ratio_time_typical": round(naive["seconds"] / typical["seconds"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
