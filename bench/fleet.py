"""A volunteer fleet against the naive rule, in the same run. Not a test: prints figures.

  setup:     opentracker (Debian, whitelist, -u nobody) on 127.0.0.1; one full seed (a libtorrent session in
             this process) of an archive of N items, 16 MiB pieces, the last item larger than any budget.
  volunteer: `noded run` processes with [volunteer] on and a budget of `budget_fraction` of the archive,
             started one after another. Converged = every node's last round changed nothing and every
             chosen piece is verified, three polls in a row. Then `steady` seconds of steady state (10
             minutes scaled down) measure churn; then the full seed leaves and a fresh libtorrent client
             downloads every item through the tracker from the volunteers alone, md5-checked.
  naive:     (baseline) the same number of plain libtorrent sessions, each taking whole items in catalogue
             order while its budget allows (smartnode-transmission's rule); the seed leaves; a fresh
             client tries every item.

transmission-daemon is not used as the fresh client: 3.00 connects to no peer at 127.0.0.1 handed out by a
tracker (FIELD-NOTES), and every volunteer here is on 127.0.0.1.

Usage: .venv/bin/python bench/fleet.py [--nodes 8] [--items 8] [--item-mib 64] [--big-mib 192]
       [--budget-fraction 0.25] [--steady 30]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libtorrent as lt  # noqa: E402

from noded.core.model import PIECE_LENGTH  # noqa: E402
from noded.p2p import torrent as T  # noqa: E402
from tests.conftest import NodedProcess, base_config, free_port, write_config  # noqa: E402
from tests.p2p_helpers import raw_session  # noqa: E402
from tests.tracker import opentracker, opentracker_missing  # noqa: E402

MiB = 1024 * 1024


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_file(path: Path, size: int, seed: int) -> None:
    with open(path, "wb") as f:
        left, n = size, 0
        while left:
            block = hashlib.shake_256(f"{seed}-{n}".encode()).digest(min(left, 4 * MiB))
            f.write(block)
            left -= len(block)
            n += 1


class Archive:
    def __init__(self, root: Path, sizes: list[int]) -> None:
        self.root = root
        self.names: list[str] = []
        self.sizes: dict[str, int] = {}
        self.md5: dict[str, str] = {}
        self.info: dict[str, dict[bytes, Any]] = {}
        self.infohash: dict[str, str] = {}
        self.torrent: dict[str, bytes] = {}
        root.mkdir(parents=True, exist_ok=True)
        for k, size in enumerate(sizes):
            name = f"layer-{k}.pmtiles"
            make_file(root / name, size, k)
            raw, md5s = T.hash_files([root / name])
            info = T.single_file_info(name, size, md5s[0], raw, source="Data for Canada")
            self.names.append(name)
            self.sizes[name] = size
            self.md5[name] = md5s[0]
            self.info[name] = info
            self.infohash[name] = T.infohash_of(info)

    def set_tracker(self, announce: str, tdir: Path) -> list[Path]:
        tdir.mkdir(parents=True, exist_ok=True)
        files = []
        for name in self.names:
            self.torrent[name] = T.encode_torrent(self.info[name], trackers=[announce], web_seeds=[])
            p = tdir / f"{name}.torrent"
            p.write_bytes(self.torrent[name])
            files.append(p)
        return files

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def pieces(self, name: str) -> int:
        return T.num_pieces(self.sizes[name], PIECE_LENGTH)


def local_session() -> Any:
    ses = raw_session()
    ses.apply_settings({"ssrf_mitigation": False})
    return ses


def add(ses: Any, a: Archive, name: str, save: Path, *, seed: bool) -> Any:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(a.torrent[name])
    atp.save_path = str(save)
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    return ses.add_torrent(atp)


def fetch_all(a: Archive, out: Path, timeout: float) -> dict[str, bool]:
    """A fresh client downloads every item through the tracker; name -> md5 ok (absent: not complete)."""
    ses = local_session()
    try:
        hs = {n: add(ses, a, n, out, seed=False) for n in a.names}
        deadline = time.monotonic() + timeout
        last_progress, last_done = time.monotonic(), -1
        while time.monotonic() < deadline:
            done = sum(h.status().total_wanted_done for h in hs.values())
            if all(h.status().is_seeding for h in hs.values()):
                break
            if done > last_done:
                last_done, last_progress = done, time.monotonic()
            elif time.monotonic() - last_progress > 30:
                break  # nothing more is coming: the missing pieces are nowhere
            time.sleep(0.5)
        result = {}
        for n, h in hs.items():
            if h.status().is_seeding:
                md5 = hashlib.md5()
                with open(out / n, "rb") as f:
                    while chunk := f.read(8 * MiB):
                        md5.update(chunk)
                result[n] = md5.hexdigest() == a.md5[n]
        return result
    finally:
        ses.pause()
        del ses


def piece_stats(copies: dict[tuple[str, int], int]) -> tuple[int, float]:
    vals = list(copies.values())
    return min(vals), round(sum(vals) / len(vals), 3)


def run_volunteers(a: Archive, files: list[Path], tmp: Path, nodes: int, budget: int, steady: float) -> dict[str, Any]:
    procs: list[NodedProcess] = []
    seeder = local_session()
    for n in a.names:
        add(seeder, a, n, a.root, seed=True)
    try:
        t0 = time.monotonic()
        for i in range(nodes):
            d = tmp / f"vol-{i}"
            cfg = base_config(
                d,
                name=f"vol-{i}",
                cache={"budget": str(2 * budget), "free_space_floor": "1MB"},
                log={"format": "json", "level": "info"},
                http_mirror={"enabled": False, "bind": "127.0.0.1", "port": free_port()},
                origins={"inbox": {"dir": str(d / "inbox")}, "torrents": {"files": [str(p) for p in files]}},
                volunteer={
                    "enabled": True,
                    "budget": str(budget),
                    "interval": 2.0,
                    "scrape_interval": 2.0,
                    "allow_local_trackers": True,
                },
            )
            p = NodedProcess(write_config(d, cfg))
            procs.append(p.start(timeout=60))
            say(f"volunteer {i} up")
            time.sleep(2)

        def statuses() -> list[dict[str, Any]]:
            return [p.get("/v1/status")[1]["components"]["volunteer"] for p in procs]

        streak = 0
        deadline = time.monotonic() + 1800
        while streak < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no convergence: {statuses()}")
            sts = statuses()
            quiet = all(
                s["rounds"] and not s["last_acquire_bytes"] and not s["last_release_bytes"] and not s["missing_pieces"]
                for s in sts
            )
            streak = streak + 1 if quiet else 0
            time.sleep(2.5)
        converge_s = round(time.monotonic() - t0, 1)
        say(f"converged after {converge_s}s")

        def holdings() -> dict[tuple[str, int], int]:
            copies = {(n, i): 0 for n in a.names for i in range(a.pieces(n))}
            for p in procs:
                for e in p.get("/v1/inventory/pieces")[1]["items"]:
                    for i in e["pieces"]:
                        copies[(e["key"], i)] += 1
            return copies

        copies = holdings()
        for p in procs:  # what each node believes about the first item
            r = p.get(f"/v1/items/{a.names[0]}")[1]["replicas"]
            say(f"{p.api}: copies {r['pieces']['copies']} held {r['held_here']} swarm {r['swarm']}")
        say(
            "actual volunteer copies of the first item: "
            + str([copies[(a.names[0], i)] for i in range(a.pieces(a.names[0]))])
        )
        before = sum(s["acquired_bytes"] + s["released_bytes"] for s in statuses())
        time.sleep(steady)
        sts = statuses()
        churn = sum(s["acquired_bytes"] + s["released_bytes"] for s in sts) - before
        moved = sum(s["downloaded_bytes"] for s in sts)
        lo, mean = piece_stats(copies)
        say(f"min copies {lo}, mean {mean}; churn {churn} bytes in {steady}s; the full seed leaves")
        seeder.pause()
        del seeder
        seeder = None
        got = fetch_all(a, tmp / "fresh", 900)
        return {
            "converge_s": converge_s,
            "min_piece_replicas": lo,
            "mean_piece_replicas": mean,
            "bytes_moved": moved,
            "churn_bytes_after_converge": churn,
            "recovered_items": len(got),
            "recovered_md5_ok": len(got) == len(a.names) and all(got.values()),
        }
    finally:
        for p in procs:
            p.stop()
        if seeder is not None:
            seeder.pause()


def run_naive(a: Archive, tmp: Path, nodes: int, budget: int) -> dict[str, Any]:
    seeder = local_session()
    for n in a.names:
        add(seeder, a, n, a.root, seed=True)
    sessions = []
    copies = {(n, i): 0 for n in a.names for i in range(a.pieces(n))}
    try:
        handles = []
        for i in range(nodes):
            ses = local_session()
            sessions.append(ses)
            room = budget
            for n in a.names:  # whole items in catalogue order while space allows
                if a.sizes[n] <= room:
                    room -= a.sizes[n]
                    handles.append(add(ses, a, n, tmp / f"naive-{i}", seed=False))
                    for j in range(a.pieces(n)):
                        copies[(n, j)] += 1
        deadline = time.monotonic() + 900
        while not all(h.status().is_seeding for h in handles):
            if time.monotonic() > deadline:
                raise RuntimeError("naive volunteers did not finish")
            time.sleep(0.5)
        seeder.pause()
        del seeder
        seeder = None
        got = fetch_all(a, tmp / "naive-fresh", 120)
        lo, _ = piece_stats(copies)
        return {"naive_min_piece_replicas": lo, "naive_recovered_items": len(got)}
    finally:
        for ses in sessions:
            ses.pause()
        if seeder is not None:
            seeder.pause()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--item-mib", type=int, default=64)
    ap.add_argument("--big-mib", type=int, default=192, help="size of the last item (larger than any budget)")
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--steady", type=float, default=30.0, help="seconds of steady state (10 minutes scaled down)")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    missing = opentracker_missing()
    if missing:
        sys.exit(missing)
    with tempfile.TemporaryDirectory(prefix="fleet-") as d:
        tmp = Path(d)
        sizes = [args.item_mib * MiB] * (args.items - 1) + [args.big_mib * MiB]
        say(f"building the archive: {len(sizes)} items, {sum(sizes) // MiB} MiB")
        a = Archive(tmp / "archive", sizes)
        budget = int(a.total * args.budget_fraction)
        if max(sizes) <= budget:
            say(f"note: the largest item ({max(sizes)} bytes) fits a budget of {budget} bytes")
        with opentracker(a.infohash.values()) as announce:
            files = a.set_tracker(announce, tmp / "torrents")
            figures: dict[str, Any] = {
                "nodes": args.nodes,
                "archive_bytes": a.total,
                "budget_fraction": args.budget_fraction,
            }
            figures.update(run_volunteers(a, files, tmp, args.nodes, budget, args.steady))
            figures["churn_fraction"] = round(figures["churn_bytes_after_converge"] / a.total, 4)
            if not args.skip_naive:
                with contextlib.suppress(KeyboardInterrupt):
                    figures.update(run_naive(a, tmp, args.nodes, budget))
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
