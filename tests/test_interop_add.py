"""`noded add` and POST /v1/add: a dataset from the swarm, and bad input that stops nothing.

A plain libtorrent session seeds a file and announces it to Debian's opentracker; the running noded is
given only a magnet with that tracker (`noded add MAGNET --wait`), fetches the metadata and the bytes,
verifies and caches them, and seeds them. Before that the same daemon is given a malformed magnet, a
hostile .torrent, a magnet whose only tracker is unreachable and one whose tracker answers garbage:
each is refused with a reason that names the problem, and the good add afterwards still works.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import libtorrent as lt
import pytest

from noded.p2p import torrent as T
from tests.conftest import ROOT, NodedProcess, free_port, noded_env
from tests.p2p_helpers import content, raw_session
from tests.tracker import opentracker, opentracker_missing

pytestmark = pytest.mark.skipif(opentracker_missing() is not None, reason=str(opentracker_missing()))

TOKEN = "swarm-add-token-0123456789"
SIZE = 2 * 1024 * 1024 + 999


class GarbageTracker(http.server.BaseHTTPRequestHandler):
    """A tracker that answers every announce with bytes that are not bencode; it also serves the
    .torrent files put in `FILES` (path -> bytes), and 404 for any other path."""

    FILES: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = b"<html>definitely not a tracker response</html>"
        if self.path.endswith(".torrent"):
            if self.path not in self.FILES:
                self.send_error(404)
                return
            body = self.FILES[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def garbage_tracker() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), GarbageTracker)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/announce"
    finally:
        srv.shutdown()
        srv.server_close()


garbage = pytest.fixture(garbage_tracker)


def make_torrent(src: Path, tracker: str) -> tuple[bytes, str]:
    pieces, md5s = T.hash_files([src])
    info = T.single_file_info(src.name, src.stat().st_size, md5s[0], pieces, source="Data for Canada")
    return T.encode_torrent(info, trackers=[tracker]), T.infohash_of(info)


def seed(torrent: bytes, directory: Path) -> Any:
    """A plain libtorrent seeder on loopback that announces to the torrent's tracker."""
    ses = raw_session()
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = str(directory)
    atp.flags |= lt.torrent_flags.seed_mode
    ses.add_torrent(atp)
    return ses


def add(node: NodedProcess, body: dict[str, Any]) -> tuple[int, Any]:
    return node.get("/v1/add", method="POST", body=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def test_add_from_swarm_and_bad_input(noded_factory: Any, tmp_path: Path, garbage: str) -> None:
    data = content(SIZE, 51)
    src_dir = tmp_path / "seeder"
    src_dir.mkdir()
    (src_dir / "swarm.pmtiles").write_bytes(data)
    _, ih = make_torrent(src_dir / "swarm.pmtiles", "http://127.0.0.1:1/announce")
    with opentracker([ih]) as tracker:
        torrent, _ = make_torrent(src_dir / "swarm.pmtiles", tracker)
        node = noded_factory(
            env={"NODED_API_TOKEN": TOKEN},
            bittorrent={"metadata_timeout": 6.0, "peer_stall_timeout": 30.0},
        )
        # 1. Bad input, each refused with its reason.
        status, body = add(node, {"source": "magnet:?xt=urn:btih:nothex&dn=x"})
        assert status == 400 and "neither 40 hex nor 32 base32" in body["error"]["message"]
        hostile = lt.bencode(
            {b"info": {b"length": 5, b"name": b"../../etc/passwd", b"piece length": 16384, b"pieces": b"\0" * 20}}
        )
        status, body = add(node, {"torrent": base64.b64encode(bytes(hostile)).decode()})
        assert status == 400 and "unsafe name" in body["error"]["message"]
        status, body = add(node, {"source": "ftp://example.invalid/x.torrent"})
        assert status == 400 and "not a magnet link" in body["error"]["message"]
        dead = f"http://127.0.0.1:{free_port()}/announce"
        status, body = add(node, {"source": f"magnet:?xt=urn:btih:{'1' * 40}&tr={quote(dead, safe='')}"})
        assert status == 422, body
        msg = body["error"]["message"]
        assert msg.startswith(f"no metadata for {'1' * 40}") and dead in msg, msg
        status, body = add(node, {"source": f"magnet:?xt=urn:btih:{'2' * 40}&tr={quote(garbage, safe='')}"})
        assert status == 422, body
        assert garbage in body["error"]["message"], body
        _, st = node.get("/v1/status")
        assert st["components"]["swarm"]["rejected"] == 5 and st["components"]["p2p"]["state"] == "running"

        # 2. A magnet with only a tracker: metadata and bytes from the swarm, verified and cached.
        ses = seed(torrent, src_dir)
        try:
            uri = f"magnet:?xt=urn:btih:{ih}&tr={quote(tracker, safe='')}"
            cmd = [sys.executable, "-m", "noded", "-c", str(node.config), "add", uri, "--wait", "--timeout", "90"]
            env = noded_env({"NODED_API_TOKEN": TOKEN})
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=200)
            assert out.returncode == 0, out.stdout + out.stderr + node.output()[-3000:]
            assert f"added swarm.pmtiles  {ih}" in out.stdout
        finally:
            del ses
        status, item = node.get("/v1/items/swarm.pmtiles")
        assert status == 200 and item["state"] == "cached" and item["origin"] == "swarm"
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
        cached = Path(tmp_path / "toronto" / "cache" / "swarm.pmtiles").read_bytes()
        assert hashlib.sha256(cached).digest() == hashlib.sha256(data).digest()
        # Cached like any other item: seeded under the same infohash, with the metadata noded fetched.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            items = node.get("/v1/inventory")[1]["items"]
            if any(i["infohash"] == ih and i["seeding"] for i in items):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not seeding: {items}")
        status, served = node.get(f"/v1/torrents/{ih}.torrent")
        assert status == 200 and T.parse_torrent(served).infohash == ih and tracker in T.parse_torrent(served).trackers
        assert node.stop() == 0


def test_add_by_infohash_torrent_file_and_url(noded_factory: Any, tmp_path: Path, garbage: str) -> None:
    """A bare infohash (metadata through the configured tracker), a .torrent file given to the CLI and
    a .torrent's URL: each fetched from the swarm, verified and cached; a URL that answers 404 is refused."""
    src_dir = tmp_path / "seeder"
    src_dir.mkdir()
    datas = {n: content(SIZE + i, 60 + i) for i, n in enumerate(("by-hash.bin", "by-file.bin", "by-url.bin"))}
    ihs = {}
    for n, d in datas.items():
        (src_dir / n).write_bytes(d)
        ihs[n] = make_torrent(src_dir / n, "http://127.0.0.1:1/announce")[1]
    with opentracker(ihs.values()) as tracker:
        torrents = {n: make_torrent(src_dir / n, tracker)[0] for n in datas}
        seeders = [seed(t, src_dir) for t in torrents.values()]
        node = noded_factory(
            env={"NODED_API_TOKEN": TOKEN},
            bittorrent={"trackers": [tracker], "metadata_timeout": 30.0, "peer_stall_timeout": 30.0},
        )
        try:
            base = garbage.removesuffix("/announce")
            GarbageTracker.FILES["/by-url.torrent"] = torrents["by-url.bin"]
            status, body = add(node, {"source": f"{base}/missing.torrent"})
            assert status == 400 and "HTTP 404" in body["error"]["message"], body
            status, body = add(node, {"source": ihs["by-hash.bin"].upper()})
            assert status == 202 and body["key"] == "by-hash.bin", body
            status, body = add(node, {"source": f"{base}/by-url.torrent"})
            assert status == 202 and body["key"] == "by-url.bin", body
            tfile = tmp_path / "by-file.torrent"
            tfile.write_bytes(torrents["by-file.bin"])
            cmd = [sys.executable, "-m", "noded", "-c", str(node.config), "add", str(tfile), "--wait"]
            env = noded_env({"NODED_API_TOKEN": TOKEN})
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=200)
            assert out.returncode == 0, out.stdout + out.stderr + node.output()[-3000:]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                states = {n: node.get(f"/v1/items/{n}")[1].get("state") for n in datas}
                if all(s == "cached" for s in states.values()):
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"not all cached: {states}\n{node.output()[-3000:]}")
            for n, d in datas.items():
                item = node.get(f"/v1/items/{n}")[1]
                assert item["sha256"] == hashlib.sha256(d).hexdigest() and item["infohash"] == ihs[n]
        finally:
            GarbageTracker.FILES.clear()
            del seeders
        assert node.stop() == 0


def test_add_torrent_served_by_a_web_seed_alone(noded_factory: Any, tmp_path: Path) -> None:
    """A .torrent with no tracker and one web seed (another noded's HTTP copy): fetched over HTTP by
    libtorrent, verified piece by piece and cached; the web seed counts what it sent."""
    from noded.cache.layout import CacheLayout
    from noded.core.config import load_config
    from noded.core.store import Store
    from tests.interop_clients import only_web_seed
    from tests.p2p_helpers import put_cached_sync

    data = content(SIZE, 71)
    a = noded_factory("amsterdam", start=False)
    cfg_a = load_config(a.config)
    store = Store(cfg_a.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    put_cached_sync(store, CacheLayout(cfg_a.paths.cache_dir, cfg_a.paths.state_dir), "web/seeded.bin", data)
    store.close_sync()
    a.start()
    deadline = time.monotonic() + 30
    while not (items := [i for i in a.get("/v1/inventory")[1]["items"] if i["seeding"]]):
        assert time.monotonic() < deadline, a.output()[-2000:]
        time.sleep(0.2)
    ih = items[0]["infohash"]
    web_seed = f"http://127.0.0.1:{cfg_a.http_mirror.port}/web/seeded.bin"
    torrent = only_web_seed(a.get(f"/v1/torrents/{ih}.torrent")[1], web_seed)
    b = noded_factory("toronto", env={"NODED_API_TOKEN": TOKEN}, bittorrent={"peer_stall_timeout": 30.0})
    status, body = add(b, {"torrent": base64.b64encode(torrent).decode()})
    assert status == 202 and body["key"] == "seeded.bin" and body["infohash"] == ih, body
    deadline = time.monotonic() + 60
    while (item := b.get("/v1/items/seeded.bin")[1])["state"] != "cached":
        assert time.monotonic() < deadline and item["state"] != "failed", (item, b.output()[-3000:])
        time.sleep(0.3)
    assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["origin"] == "swarm"
    totals = a.get("/v1/traffic")[1]["totals_since_start"]
    assert totals["webseed"]["out"]["bytes"] >= SIZE, totals
    assert b.stop() == 0 and a.stop() == 0
