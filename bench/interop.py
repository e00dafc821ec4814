"""How fast the clients people run take a dataset from one noded over the peer wire. Not a test.

One `noded run` subprocess seeds a cached file (256 MiB by default) on the host side of a veth pair,
announcing to Debian's opentracker there. In the network namespace, one after the other, each
downloader is given noded's magnet from /v1/locate with its ws= removed (trackers and x.pe= only, so
every byte comes over the peer wire):

  raw_libtorrent  the baseline: a plain libtorrent session with the same tuned settings noded uses,
                  run before and after the clients (the faster run counts);
  transmission    transmission-daemon 3.00 (Debian);
  qbittorrent     qbittorrent-nox (Debian);
  aria2           aria2c (Debian).

For each: seconds from adding the magnet to a complete file (sha256 checked afterwards, outside the
time), and `discovery_seconds`, from adding the magnet to the first payload byte on disk (metadata,
tracker announce, connect), which the transfer time then excludes.
ratio_vs_raw_libtorrent = raw seconds / client seconds (1.0 = as fast as libtorrent, higher is faster).

Usage (root; a loaded machine makes the figures noisy):
  /work/main/.venv/bin/python bench/interop.py [--size-mib 256] [--clients transmission,qbittorrent,aria2]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noded.cache.layout import CacheLayout  # noqa: E402
from noded.core.config import BitTorrentConfig, load_config  # noqa: E402
from noded.core.store import Store  # noqa: E402
from noded.p2p.settings import session_settings  # noqa: E402
from tests.conftest import NodedProcess, base_config, free_port, write_config  # noqa: E402
from tests.interop_clients import magnet_without, make_client, missing  # noqa: E402
from tests.p2p_helpers import put_cached_sync  # noqa: E402
from tests.third_party import VethNamespace, netns_available  # noqa: E402
from tests.tracker import opentracker, opentracker_missing  # noqa: E402

MiB = 1024 * 1024
NAME = "interop-bench.bin"

LEECHER = textwrap.dedent(
    """
    import json, sys, time
    import libtorrent as lt
    settings, uri, save = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ses = lt.session(settings)
    atp = lt.parse_magnet_uri(uri)
    atp.save_path = save
    t0 = time.monotonic()
    h = ses.add_torrent(atp)
    first = None
    while True:
        st = h.status()
        if first is None and st.total_payload_download > 0:
            first = time.monotonic() - t0
        if st.is_seeding:
            break
        time.sleep(0.02)
    print(json.dumps({"seconds": time.monotonic() - t0, "discovery_seconds": first}), flush=True)
    """
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_data(path: Path, t0: float, stop: threading.Event, out: list[float]) -> None:
    """Seconds from t0 until the file holds its first written block (preallocation is sparse)."""
    # transmission writes to <name>.part until the file is complete.
    candidates = [path, path.with_name(path.name + ".part")]
    while not stop.is_set():
        for p in candidates:
            try:
                if p.stat().st_blocks > 0:
                    out.append(time.monotonic() - t0)
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.01)


def run_raw(ns: VethNamespace, uri: str, work: Path) -> dict[str, float]:
    settings = session_settings(BitTorrentConfig(listen_interfaces=f"{ns.ns_ip}:6890"))
    settings["alert_mask"] = 0
    save = work / f"raw-{time.monotonic_ns()}"
    save.mkdir()
    try:
        cmd = ["ip", "netns", "exec", ns.name, sys.executable, "-c", LEECHER, json.dumps(settings), uri, str(save)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(save, ignore_errors=True)


def run_client(kind: str, ns: VethNamespace, uri: str, ih: str, work: Path, sha: str) -> dict[str, float]:
    root = work / kind
    client = make_client(kind, ns, root)
    client.start()
    stop = threading.Event()
    firsts: list[float] = []
    try:
        t0 = time.monotonic()
        watcher = threading.Thread(target=first_data, args=(client.path(NAME), t0, stop, firsts), daemon=True)
        watcher.start()
        client.add_magnet(uri)
        client.wait_done(ih, 900)
        seconds = time.monotonic() - t0
    finally:
        stop.set()
        client.stop()
    h = hashlib.sha256()
    with open(client.path(NAME), "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    if h.hexdigest() != sha:
        raise SystemExit(f"{kind}: sha256 differs")
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds, "discovery_seconds": firsts[0] if firsts else None}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--clients", default="transmission,qbittorrent,aria2")
    args = ap.parse_args()
    why = netns_available() or opentracker_missing()
    if why:
        raise SystemExit(f"cannot run: {why}")
    kinds = [k for k in args.clients.split(",") if k]
    for k in kinds:
        if missing(k):
            raise SystemExit(str(missing(k)))
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-interop-"))
    ns = VethNamespace()
    ns.up()
    node: NodedProcess | None = None
    try:
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        host = ns.host_ip
        cfg = base_config(work / "noded", name="toronto")
        cfg["api"] = {"bind": host, "port": free_port(host)}
        cfg["http_mirror"] = {"bind": host, "port": free_port(host)}
        cfg["log"]["level"] = "info"
        cfg["cache"]["budget"] = "4GB"
        cfg["bittorrent"]["listen_interfaces"] = f"{host}:{free_port(host)}"
        # The infohash is needed for the tracker's whitelist before noded starts: hash once here.
        from noded.p2p import torrent as T

        src = work / NAME
        src.write_bytes(data)
        pieces, md5s = T.hash_files([src])
        ih = T.infohash_of(T.single_file_info(NAME, size, md5s[0], pieces, source="Data for Canada"))
        src.unlink()
        with opentracker([ih], host=host) as tracker:
            cfg["bittorrent"]["trackers"] = [tracker]
            node = NodedProcess(write_config(work / "noded", cfg))
            c = load_config(node.config)
            store = Store(c.paths.state_dir / "noded.sqlite3")
            store.open_sync()
            put_cached_sync(store, CacheLayout(c.paths.cache_dir, c.paths.state_dir), NAME, data)
            store.close_sync()
            del data
            node.start()
            deadline = time.monotonic() + 120
            while not any(i["seeding"] and i["infohash"] == ih for i in node.get("/v1/inventory")[1]["items"]):
                if time.monotonic() > deadline:
                    raise SystemExit("noded did not start seeding")
                time.sleep(0.2)
            uri = magnet_without(node.get(f"/v1/locate/{NAME}")[1]["magnet"], "ws")
            log(f"magnet: {uri}")
            raws = [run_raw(ns, uri, work)]
            log(f"raw libtorrent: {raws[0]}")
            results: dict[str, dict[str, float]] = {}
            for k in kinds:
                results[k] = run_client(k, ns, uri, ih, work, sha)
                log(f"{k}: {results[k]}")
            raws.append(run_raw(ns, uri, work))
            log(f"raw libtorrent again: {raws[1]}")
        best = min(raws, key=lambda r: r["seconds"])
        raw, raw_disc = best["seconds"], best["discovery_seconds"] or 0.0
        clients: dict[str, Any] = {}
        for k, r in results.items():
            disc = r["discovery_seconds"]
            clients[k] = {
                "seconds": round(r["seconds"], 3),
                "mb_s": round(size / r["seconds"] / 1e6, 1),
                "discovery_seconds": round(disc, 3) if disc is not None else None,
                "ratio_vs_raw_libtorrent": round(raw / r["seconds"], 3),
                # Transfer alone (after the first byte) against libtorrent's transfer alone.
                "transfer_ratio_vs_raw_libtorrent": (
                    round((raw - raw_disc) / (r["seconds"] - disc), 3) if disc is not None else None
                ),
            }
        figures = {
            "bench": "interop",
            "bytes": size,
            "raw_libtorrent_seconds": round(raw, 3),
            "raw_libtorrent_discovery_seconds": round(raw_disc, 3),
            "raw_libtorrent_runs_s": [round(r["seconds"], 3) for r in raws],
            "clients": clients,
            "ratio_vs_raw_libtorrent": {k: v["ratio_vs_raw_libtorrent"] for k, v in clients.items()},
        }
        print(json.dumps(figures), flush=True)
    finally:
        if node is not None:
            node.kill()
        ns.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
