"""1 GiB node A -> node B, against two baselines in the same run. Not a test: prints figures.

  noded:        node A is a real `noded run` subprocess seeding a cached item; node B is noded's
                PeerSync + P2PEngine (this process) fetching it with the "peer" source, as the pull
                pipeline would, over loopback. Transfer = add -> complete (libtorrent sha1-checked);
                end-to-end adds noded's md5 + sha256 verification read.
  raw:          (a) a seeder subprocess and a leecher session in this process, plain libtorrent with
                the same tuned settings noded uses, over loopback.
  transmission: (b) two transmission-daemon 3.00 (Debian): seeder on the host side of a veth pair,
                leecher in a network namespace (transmission ignores 127.0.0.1 peers), found via a
                minimal HTTP tracker run here.

Rounds (default 3) alternate which of raw and noded goes first; the best time of each counts (the
medians are printed too). The transmission pair runs once, after them.

Usage: /work/venv/bin/python bench/p2p.py [--size-mib 1024] [--rounds 3] [--skip-transmission]
The last line is one JSON object with ratio_vs_raw_libtorrent and ratio_vs_transmission
(noded throughput / baseline throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libtorrent as lt  # noqa: E402
from aiohttp import web  # noqa: E402

from noded.cache.layout import CacheLayout, disk_bytes  # noqa: E402
from noded.core.config import BitTorrentConfig, load_config  # noqa: E402
from noded.core.model import PIECE_LENGTH, CatalogEntry, State  # noqa: E402
from noded.core.store import Store  # noqa: E402
from noded.p2p import torrent as T  # noqa: E402
from noded.p2p.settings import session_settings  # noqa: E402
from tests.conftest import NodedProcess, base_config, free_port, write_config  # noqa: E402
from tests.p2p_helpers import make_config, sync_node  # noqa: E402
from tests.third_party import Transmission, VethNamespace, netns_available  # noqa: E402

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def log(msg: str) -> None:
    print(msg, flush=True)


# -- noded ---------------------------------------------------------------------------------------
async def run_noded(work: Path, src: Path, pieces: bytes, md5: str) -> dict[str, float]:
    size = src.stat().st_size
    a_dir = work / "noded-a"
    bt_port = free_port()
    cfg_a = base_config(a_dir, name="toronto")
    cfg_a["bittorrent"]["listen_interfaces"] = f"127.0.0.1:{bt_port}"
    cfg_a["log"]["level"] = "info"
    cfg_a["cache"]["budget"] = "4GB"
    a = NodedProcess(write_config(a_dir, cfg_a))
    cfg = load_config(a.config)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    layout.ensure()
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    item, _ = store.upsert_entry(CatalogEntry("sourcecoop", "bench/big.bin", ("http://127.0.0.1:9/x",), size, md5))
    final = layout.final_path("bench/big.bin")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, final)  # same bytes, no second GiB on disk
    st = final.stat()
    store.set_state(item.id, State.FETCHING)
    store.set_state(item.id, State.CACHED, disk_bytes=disk_bytes(st), mtime_ns=st.st_mtime_ns)
    store.set_pieces(item.id, PIECE_LENGTH, pieces)
    store.close_sync()
    a.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, s = a.get("/v1/status")
            if s["components"]["p2p"]["seeding"] == 1:
                break
            await asyncio.sleep(0.2)
        b_cfg = make_config(
            work / "noded-b",
            name="amsterdam",
            peers=[{"name": "toronto", "api_url": a.api, "bittorrent": f"127.0.0.1:{bt_port}"}],
            cache={"budget": "4GB"},
        )
        async with sync_node(b_cfg) as b:
            b_item, _ = await b.node.store.run(
                b.node.store.upsert_entry, CatalogEntry("sourcecoop", "bench/big.bin", (), size, md5)
            )
            await b.sync.poll_all()
            partial = b.layout.partial_path(b_item.id, b_item.version)
            t0 = time.monotonic()
            result = await b.sync.source.fetch(b_item, partial)
            total = time.monotonic() - t0
            assert result.md5 == md5 and result.size == size
            timing = dict(b.sync.source.last_timing)
            partial.unlink()
    finally:
        a.stop()
    return {"transfer_seconds": timing["transfer_seconds"], "end_to_end_seconds": round(total, 3)}


# -- raw libtorrent --------------------------------------------------------------------------------
SEEDER = textwrap.dedent(
    """
    import json, sys, time, libtorrent as lt
    settings = json.loads(sys.argv[1]); tor = open(sys.argv[2], "rb").read()
    ses = lt.session(settings)
    atp = lt.add_torrent_params(); atp.ti = lt.torrent_info(tor); atp.save_path = sys.argv[3]
    atp.flags |= lt.torrent_flags.seed_mode
    ses.add_torrent(atp)
    print(ses.listen_port(), flush=True)
    sys.stdin.read()
    """
)


def run_raw(work: Path, src: Path, tor: bytes) -> float:
    settings = session_settings(BitTorrentConfig(listen_interfaces=f"127.0.0.1:{free_port()}"))
    settings["alert_mask"] = 0
    tpath = work / "raw.torrent"
    tpath.write_bytes(tor)
    seeder = subprocess.Popen(
        [sys.executable, "-c", SEEDER, json.dumps(settings), str(tpath), str(src.parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert seeder.stdout is not None
        port = int(seeder.stdout.readline())
        leech_settings = dict(settings, listen_interfaces=f"127.0.0.1:{free_port()}")
        ses = lt.session(leech_settings)
        out = work / "raw-out"
        out.mkdir()
        atp = lt.add_torrent_params()
        ti = lt.torrent_info(tor)
        atp.ti = ti
        atp.save_path = str(out)
        t0 = time.monotonic()
        h = ses.add_torrent(atp)
        h.connect_peer(("127.0.0.1", port))
        while not h.status().is_seeding:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        ses.pause()
        del ses
        shutil.rmtree(out)
        return elapsed
    finally:
        assert seeder.stdin is not None
        seeder.stdin.close()
        seeder.wait(30)


# -- transmission pair -------------------------------------------------------------------------------
async def run_transmission(work: Path, src: Path, pieces: bytes, md5: str) -> float:
    ns = VethNamespace()
    ns.up()
    host_ns = _HostSide(ns)
    runner: web.AppRunner | None = None
    seeder = leecher = None
    try:
        seeder = Transmission(host_ns, work / "tr-seed")  # type: ignore[arg-type]
        seeder.rpc_port, seeder.peer_port = free_port(ns.host_ip), free_port(ns.host_ip)
        leecher = Transmission(ns, work / "tr-leech")
        tracker_port = free_port(ns.host_ip)
        peers = {"seed": (ns.host_ip, seeder.peer_port)}
        runner = await _tracker(ns.host_ip, tracker_port, peers)
        info = T.single_file_info(src.name, src.stat().st_size, md5, pieces, source="Data for Canada")
        tor = T.encode_torrent(info, trackers=[f"http://{ns.host_ip}:{tracker_port}/announce"])
        await asyncio.to_thread(seeder.start)
        await asyncio.to_thread(leecher.start)
        sid = await asyncio.to_thread(seeder.add, metainfo=tor, download_dir=src.parent)
        await asyncio.to_thread(seeder.wait_done, sid, 600)  # transmission verifies the local GiB first
        t0 = time.monotonic()
        lid = await asyncio.to_thread(leecher.add, metainfo=tor)
        await asyncio.to_thread(leecher.wait_done, lid, 1800)
        return time.monotonic() - t0
    finally:
        for t in (leecher, seeder):
            if t is not None:
                await asyncio.to_thread(t.stop)
        if runner is not None:
            await runner.cleanup()
        ns.down()


class _HostSide:
    """Runs the seeding transmission-daemon in the host namespace, bound to the veth's host address."""

    def __init__(self, ns: VethNamespace) -> None:
        self.name = ""  # no `ip netns exec`: the host namespace
        self.ns_ip = ns.host_ip
        self.host_ip = ns.host_ip


async def _tracker(host: str, port: int, peers: dict[str, tuple[str, int]]) -> web.AppRunner:
    """A minimal BEP 3/23 HTTP tracker: every announce gets the seeder's compact address."""
    import socket

    async def announce(request: web.Request) -> web.Response:
        compact = b"".join(socket.inet_aton(ip) + p.to_bytes(2, "big") for ip, p in peers.values())
        body = lt.bencode({b"interval": 30, b"complete": 1, b"incomplete": 1, b"peers": compact})
        return web.Response(body=bytes(body), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/announce", announce)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--skip-transmission", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="raw/noded rounds, alternating; the best of each counts")
    args = ap.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="bench-p2p-"))
    try:
        src_dir = work / "src"
        src_dir.mkdir()
        src = src_dir / "big.bin"
        log(f"making {args.size_mib} MiB test file in {work}")
        make_file(src, size)
        pieces, md5s = await asyncio.to_thread(T.hash_files, [src])
        md5 = md5s[0]
        info = T.single_file_info(src.name, size, md5, pieces, source="Data for Canada")
        tor = T.encode_torrent(info)

        raws: list[float] = []
        nds: list[dict[str, float]] = []
        for r in range(args.rounds):
            # Alternate which side goes first: the page cache and the machine's load favour neither.
            order = ("raw", "noded") if r % 2 == 0 else ("noded", "raw")
            for side in order:
                if side == "raw":
                    log(f"round {r + 1}: raw libtorrent (tuned settings, loopback)...")
                    raw = await asyncio.to_thread(run_raw, work, src, tor)
                    raws.append(raw)
                    log(f"  {raw:.2f} s = {size / raw / 1e6:.0f} MB/s")
                else:
                    log(f"round {r + 1}: noded A -> noded B (loopback)...")
                    nd = await run_noded(work / f"round{r}", src, pieces, md5)
                    nds.append(nd)
                    log(
                        f"  transfer {nd['transfer_seconds']:.2f} s = "
                        f"{size / nd['transfer_seconds'] / 1e6:.0f} MB/s; "
                        f"end-to-end incl. md5+sha256 verify {nd['end_to_end_seconds']:.2f} s"
                    )
        raw = min(raws)
        transfer = min(n["transfer_seconds"] for n in nds)
        end_to_end = min(n["end_to_end_seconds"] for n in nds)

        tr: float | None = None
        why = netns_available()
        if args.skip_transmission or why:
            log(f"transmission pair skipped ({why or '--skip-transmission'})")
        else:
            log("transmission-daemon pair (veth between namespaces)...")
            tr = await run_transmission(work, src, pieces, md5)
            log(f"  {tr:.2f} s = {size / tr / 1e6:.0f} MB/s")

        noded_tp = size / transfer
        figures: dict[str, Any] = {
            "bench": "p2p",
            "bytes": size,
            "rounds": args.rounds,
            "noded_transfer_mb_s": round(noded_tp / 1e6, 1),
            "noded_end_to_end_mb_s": round(size / end_to_end / 1e6, 1),
            "raw_libtorrent_mb_s": round(size / raw / 1e6, 1),
            "transmission_mb_s": round(size / tr / 1e6, 1) if tr else None,
            "raw_runs_s": [round(x, 3) for x in raws],
            "noded_transfer_runs_s": [n["transfer_seconds"] for n in nds],
            "noded_end_to_end_runs_s": [n["end_to_end_seconds"] for n in nds],
            "ratio_vs_raw_libtorrent": round(noded_tp / (size / raw), 3),
            "ratio_vs_raw_libtorrent_median": round(median(raws) / median(n["transfer_seconds"] for n in nds), 3),
            "ratio_end_to_end_vs_raw_libtorrent": round(raw / end_to_end, 3),
            "ratio_vs_transmission": round(noded_tp / (size / tr), 3) if tr else None,
        }
        print(json.dumps(figures), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
