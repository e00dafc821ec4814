"""Benchmark: a node at scale. Restart with 10,000 cached items seeded; adopt a 100,000-item peer inventory.

Fixture (built in this process, no daemon involved): a store of N cached items whose files are sparse
(`--item-size` apparent bytes each, no blocks allocated), each with its .torrent under state/torrents
(built from the piece hashes of a zero-filled file, computed once) and its row marked seeding. The node
then starts once unmeasured: it adds every torrent in seed mode and, on its clean stop, writes
libtorrent's resume data for each. The measured start is the next one, as after any restart:

  - restart_ready_s: process start -> READY=1 on $NOTIFY_SOCKET (sd_notify, sent once the store is
    open, the cache reconciled and the API listening; the torrents are then being added in the
    background, which status shows as the p2p state "restoring n/m");
  - restart_seeding_s: process start -> every torrent seeding (/readyz polled until the p2p component
    no longer says "restoring", then /v1/status until it counts them all seeding);
  - bytes_read_at_restart: `rchar` of /proc/PID/io when every torrent is seeding (bytes the process
    read through read(2) and friends, page cache included; `read_bytes` from the block device is
    reported beside it but is near zero when the files are in the page cache);
  - rss_mib: VmRSS at the same moment.

Baseline (same run): the same node with an empty store, started the same way; its figures show the
fixed cost of a start (interpreter, imports, libtorrent), so the difference is what 10,000 items cost.

Then a peer (an aiohttp server in this process speaking noded's /v1/inventory: pages of 1,000 with
ETags) starts listing `--peer-items` cached items; the node polls it and adopts every key it has never
seen as a wanted row. adopt_s: from the first non-empty page served to the store holding all of them
(read from /v1/status); adopt_rss_mib: the node's VmRSS then.

    /work/main/.venv/bin/python bench/scale.py [--items 10000] [--peer-items 100000]

Last line: one JSON object with restart_ready_s, bytes_read_at_restart, rss_mib, adopt_s,
adopt_rss_mib, the baseline's figures and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import base_config, free_port, noded_env, write_config  # noqa: E402

from noded.cache.layout import CacheLayout  # noqa: E402
from noded.core.model import PIECE_LENGTH, State  # noqa: E402
from noded.core.store import Store  # noqa: E402
from noded.core.units import parse_size  # noqa: E402
from noded.p2p import torrent as T  # noqa: E402

MIB = 1024 * 1024
TARGETS = {"restart_ready_s": 5.0, "bytes_read_at_restart": 64 * MIB, "rss_mib": 400.0}
PEER = "bench-peer"

_INSERT = (
    "INSERT INTO items(id, key, version, origin, state, size, md5, sha256, urls, infohash, seeding,"
    " last_access, disk_bytes, mtime_ns, created_at, updated_at) VALUES (?,?,1,?,?,?,?,?,'[]',?,1,?,?,?,?,?)"
)


def zero_digests(size: int) -> tuple[str, str, bytes]:
    """md5, sha256 and the piece sha1s of `size` zero bytes: what every sparse fixture file holds."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    block = bytes(MIB)
    left = size
    while left:
        n = min(left, MIB)
        md5.update(block[:n])
        sha256.update(block[:n])
        left -= n
    full = hashlib.sha1(bytes(PIECE_LENGTH)).digest()
    tail = size % PIECE_LENGTH
    pieces = full * (size // PIECE_LENGTH) + (hashlib.sha1(bytes(tail)).digest() if tail else b"")
    return md5.hexdigest(), sha256.hexdigest(), pieces


def build_fixture(cache_dir: Path, state_dir: Path, n: int, size: int) -> None:
    layout = CacheLayout(cache_dir, state_dir)
    layout.ensure()
    md5, sha256, pieces = zero_digests(size)
    store = Store(state_dir / "noded.sqlite3")
    store.open_sync()
    now = time.time()
    rows = []
    for i in range(1, n + 1):
        key = f"scale/d{i % 100:02d}/item-{i:06d}.bin"
        path = cache_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: no block is written
        st = path.stat()
        info = T.single_file_info(path.name, size, md5, pieces, source=None)
        ih = T.infohash_of(info)
        layout.torrent_path(ih).write_bytes(T.encode_torrent(info))
        blocks = st.st_blocks * 512
        rows.append(
            (i, key, "inbox", State.CACHED.value, size, md5, sha256, ih, now - i, blocks, st.st_mtime_ns, now, now)
        )
    with store.tx() as c:
        c.executemany(_INSERT, rows)
    store.close_sync()


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = int(v)
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process so far (less sensitive to a loaded machine than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return await r.json()


class Node:
    """`noded run` with its own sd_notify socket."""

    def __init__(self, cfg_path: Path, api: str, tmp: Path) -> None:
        self.cfg_path, self.api, self.tmp = cfg_path, api, tmp
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, seeding: int, label: str) -> dict[str, float]:
        """Start, wait for READY=1, then for `seeding` torrents seeding. Times and readings of both moments."""
        sock_path = self.tmp / f"notify-{label}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        log = open(self.tmp / f"node-{label}.log", "wb")  # noqa: SIM115 - the child keeps it
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "noded", "-c", str(self.cfg_path), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=noded_env({"NOTIFY_SOCKET": str(sock_path)}),
            cwd=ROOT,
        )
        log.close()
        pid = self.proc.pid
        try:
            while True:
                msg = await asyncio.wait_for(loop.sock_recv(sock, 4096), 300)
                if b"READY=1" in msg.split(b"\n"):
                    break
        finally:
            sock.close()
        ready_s = time.monotonic() - t0
        io_ready, rss_ready, cpu_ready = proc_io(pid), rss_mib(pid), cpu_s(pid)
        async with aiohttp.ClientSession() as s:
            # /readyz while the restore runs (component states only): /v1/status counts the store's rows,
            # and polled ten times a second its own reads would dominate bytes_read_at_restart.
            while True:
                rz = await get_json(s, self.api + "/readyz")
                if not str(rz["components"].get("p2p", "")).startswith("restoring"):
                    break
                await asyncio.sleep(0.1)
            while True:
                st = await get_json(s, self.api + "/v1/status")
                p2p = st["components"]["p2p"]
                if p2p.get("seeding", 0) >= seeding:
                    break
                await asyncio.sleep(0.1)
        settled_s = time.monotonic() - t0
        io, rss = proc_io(pid), rss_mib(pid)
        return {
            "ready_s": round(ready_s, 3),
            "cpu_at_ready_s": round(cpu_ready, 2),
            "load_average_1m": os.getloadavg()[0],
            "seeding_s": round(settled_s, 3),
            "rchar_at_ready": io_ready["rchar"],
            "rchar": io["rchar"],
            "read_bytes": io["read_bytes"],
            "rss_at_ready_mib": round(rss_ready, 1),
            "rss_mib": round(rss, 1),
            "restored": p2p.get("restored", 0),
            "restore_seconds": p2p.get("restore_seconds"),
        }

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Peer:
    """A peer's /v1/inventory: empty until `publish()`, then `n` cached items in pages of `limit`."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.published = False
        self.first_served: float | None = None
        self.pages_served = 0
        self._cache: dict[tuple[int, int], tuple[bytes, str]] = {}

    def _page(self, after: int, limit: int) -> tuple[bytes, str]:
        hit = self._cache.get((after, limit))
        if hit:
            return hit
        last = min(self.n, after + limit)
        items = []
        for i in range(after + 1, last + 1):
            h = hashlib.sha1(f"peer item {i}".encode()).hexdigest()
            items.append(
                {
                    "key": f"peer/p{i % 500:03d}/object-{i:07d}.csv",
                    "version": 1,
                    "state": "cached",
                    "size": 1_000_000 + i,
                    "md5": h[:32],
                    "sha256": None,
                    "infohash": h,
                    "seeding": True,
                    "verification": "md5",
                    "conflict": None,
                }
            )
        body = {"node": PEER, "items": items, "next": last if last < self.n else None}
        raw = json.dumps(body, separators=(",", ":")).encode()
        out = (raw, '"' + hashlib.sha256(raw).hexdigest()[:32] + '"')
        self._cache[(after, limit)] = out
        return out

    async def inventory(self, request: web.Request) -> web.Response:
        if not self.published:
            return web.json_response({"node": PEER, "items": [], "next": None})
        after, limit = int(request.query.get("after", "0")), int(request.query.get("limit", "1000"))
        raw, etag = self._page(after, min(limit, 1000))
        if self.first_served is None:
            self.first_served = time.monotonic()
        self.pages_served += 1
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=raw, content_type="application/json", headers={"ETag": etag})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/inventory", self.inventory)
        return app  # anything else (pieces, .torrent files): 404, so the node's pulls fail fast


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size = parse_size(args.item_size)
    peer = Peer(args.peer_items)
    runner = web.AppRunner(peer.app(), access_log=None)
    await runner.setup()
    pport = free_port()
    await web.TCPSite(runner, "127.0.0.1", pport).start()

    def config(dirname: str, with_peer: bool) -> tuple[Path, str]:
        d = tmp / dirname
        extra: dict[str, Any] = {}
        if with_peer:
            extra["peers"] = [
                {"name": PEER, "api_url": f"http://127.0.0.1:{pport}", "bittorrent": f"127.0.0.1:{free_port()}"}
            ]
        cfg = base_config(
            d,
            log={"format": "json", "level": "info"},
            cache={"budget": "100GB", "free_space_floor": "1MB"},
            http_mirror={"enabled": False},
            **extra,
        )
        cfg["bittorrent"]["peer_poll_interval"] = 1.0
        cfg["origins"]["max_items_per_origin"] = max(200_000, 2 * args.peer_items)
        return write_config(d, cfg), f"http://127.0.0.1:{cfg['api']['port']}"

    out: dict[str, Any] = {}
    # Baseline: an empty node, started twice like the measured one.
    cfg_path, api = config("empty", with_peer=False)
    empty = Node(cfg_path, api, tmp)
    for label in ("empty-first", "empty"):
        r = await empty.start(0, label)
        empty.stop()
    out["baseline_empty"] = r

    t0 = time.monotonic()
    build_fixture(tmp / "node" / "cache", tmp / "node" / "state", args.items, size)
    out["fixture_build_s"] = round(time.monotonic() - t0, 2)
    cfg_path, api = config("node", with_peer=True)
    node = Node(cfg_path, api, tmp)
    try:
        out["first_start"] = await node.start(args.items, "first")  # seed mode; resume data written at stop
        node.stop()
        resume = len(list((tmp / "node" / "state" / "resume").glob("*.fastresume")))
        out["resume_files"] = resume
        out["restart"] = await node.start(args.items, "restart")
        assert node.proc is not None
        pid = node.proc.pid

        # Adoption of the peer's inventory.
        peer.published = True
        async with aiohttp.ClientSession() as s:
            while True:
                st = await get_json(s, api + "/v1/status")
                known = sum(st["items"].values())
                if known >= args.items + args.peer_items:
                    break
                if node.proc.poll() is not None:
                    raise RuntimeError("node exited during adoption")
                await asyncio.sleep(0.05)
        assert peer.first_served is not None
        out["adopt_s"] = round(time.monotonic() - peer.first_served, 2)
        out["adopt_rss_mib"] = round(rss_mib(pid), 1)
        out["peer_pages_served"] = peer.pages_served
        out["items_by_state"] = st["items"]
    finally:
        node.stop()
        await runner.cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--item-size", default="64MiB", help="apparent size of each sparse cached file")
    ap.add_argument("--peer-items", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="noded-bench-scale-"))
    try:
        r = asyncio.run(bench(args, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    rs, base = r["restart"], r["baseline_empty"]
    print(f"fixture: {args.items} items of {args.item_size} (sparse) built in {r['fixture_build_s']} s")
    print(f"{'':26}{'empty node (baseline)':>22}{f'{args.items} items':>14}")
    rows = ("ready_s", "cpu_at_ready_s", "load_average_1m", "seeding_s", "rchar_at_ready", "rchar", "read_bytes")
    for k in (*rows, "rss_at_ready_mib", "rss_mib"):
        print(f"{k:26}{base[k]:>22}{rs[k]:>14}")
    print(f"first start (seed mode): ready {r['first_start']['ready_s']} s; resume files {r['resume_files']}")
    print(f"adopted {args.peer_items} peer items in {r['adopt_s']} s, RSS {r['adopt_rss_mib']} MiB")
    result = {
        "bench": "scale",
        "items": args.items,
        "restart_ready_s": rs["ready_s"],
        "restart_seeding_s": rs["seeding_s"],
        "restart_cpu_s": rs["cpu_at_ready_s"],
        "load_average_1m": rs["load_average_1m"],
        "bytes_read_at_restart": rs["rchar"],
        "read_bytes_at_restart": rs["read_bytes"],
        "rss_mib": rs["rss_mib"],
        "peer_items": args.peer_items,
        "adopt_s": r["adopt_s"],
        "adopt_rss_mib": r["adopt_rss_mib"],
        "baseline_empty_ready_s": base["ready_s"],
        "baseline_empty_cpu_s": base["cpu_at_ready_s"],
        "baseline_empty_bytes_read": base["rchar"],
        "baseline_empty_rss_mib": base["rss_mib"],
        "extra_bytes_read_vs_empty": rs["rchar"] - base["rchar"],
        "ratio_ready_vs_empty": round(rs["ready_s"] / base["ready_s"], 2),
        "first_start_ready_s": r["first_start"]["ready_s"],
        "fixture_build_s": r["fixture_build_s"],
        "targets": TARGETS,
        "met": {
            "restart_ready_s": rs["ready_s"] <= TARGETS["restart_ready_s"],
            "bytes_read_at_restart": rs["rchar"] <= TARGETS["bytes_read_at_restart"],
            "rss_mib": rs["rss_mib"] <= TARGETS["rss_mib"],
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
