"""Interop with the BitTorrent clients people run: transmission-daemon, qbittorrent-nox and aria2c from
Debian as downloaders, Debian's opentracker as the tracker, each client in a network namespace on a
veth pair (noded and the tracker on the host side).

Each client, given only what noded hands out, completes a download with the same sha256:
- `magnet`: the magnet from /v1/locate with its ws= removed (tr= and x.pe= are all it has), over the
  peer wire;
- `torrent`: noded's .torrent with the url-list removed (its announce is all it has), over the peer wire;
- `webseed`: the torrent with no tracker and noded's HTTP copy as its only web seed.
noded's traffic channels say which way the bytes went. Then qBittorrent seeds a file and
`noded add <magnet>` fetches it through the tracker.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from noded.core.config import load_config
from noded.p2p import torrent as T
from tests.conftest import ROOT, NodedProcess, free_port, noded_env
from tests.interop_clients import (
    QbittorrentClient,
    magnet_without,
    make_client,
    missing,
    namespace_or_skip,
    only_web_seed,
    seed_store,
    strip_url_list,
    wait,
)
from tests.p2p_helpers import content
from tests.tracker import opentracker, opentracker_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(opentracker_missing() is not None, reason=str(opentracker_missing())),
]

SIZE = 256 * 1024 * 1024 + 12345  # a dataset-sized file, not a multiple of the piece size
TOKEN = "interop-token-0123456789"
CLIENTS = ["transmission", "qbittorrent", "aria2"]


def infohash_for(path: Path) -> str:
    """The infohash noded will seed a cached file under (its py3createtorrent-identical info dict)."""
    pieces, md5s = T.hash_files([path])
    return T.infohash_of(T.single_file_info(path.name, path.stat().st_size, md5s[0], pieces, source="Data for Canada"))


def sent(node: NodedProcess, channel: str) -> int:
    totals = node.get("/v1/traffic")[1]["totals_since_start"]
    return int(totals.get(channel, {}).get("out", {}).get("bytes", 0))


def start_node(noded_factory: Any, host: str, tracker: str, **extra: Any) -> NodedProcess:
    return noded_factory(
        start=False,
        env={"NODED_API_TOKEN": TOKEN},
        api={"bind": host, "port": free_port(host)},
        http_mirror={"bind": host, "port": free_port(host)},
        bittorrent={"listen_interfaces": f"{host}:{free_port(host)}", "trackers": [tracker], **extra},
    )


@pytest.mark.parametrize("how", ["magnet", "torrent", "webseed"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_client_downloads_from_noded(noded_factory: Any, tmp_path: Path, kind: str, how: str) -> None:
    if missing(kind):
        pytest.skip(str(missing(kind)))
    ns = namespace_or_skip()
    try:
        host = ns.host_ip
        name = f"{kind}-{how}.bin"
        data = content(SIZE, CLIENTS.index(kind) * 10 + len(how))
        src = tmp_path / name
        src.write_bytes(data)
        ih = infohash_for(src)
        with opentracker([ih], host=host) as tracker:
            node = start_node(noded_factory, host, tracker)
            seed_store(node, f"interop/{name}", data)
            node.start()
            wait(
                lambda: any(i["seeding"] and i["infohash"] == ih for i in node.get("/v1/inventory")[1]["items"]),
                "noded seeding",
            )
            client = make_client(kind, ns, tmp_path / kind)
            client.start()
            try:
                if how == "magnet":
                    uri = magnet_without(node.get(f"/v1/locate/interop/{name}")[1]["magnet"], "ws")
                    assert f"tr={quote(tracker, safe=':/')}" in uri and "x.pe=" in uri, uri
                    client.add_magnet(uri)
                else:
                    status, torrent = node.get(f"/v1/torrents/{ih}.torrent")
                    assert status == 200
                    # The torrent noded made carries the configured tracker: all a client needs.
                    assert T.announce_urls(torrent) == [tracker]
                    if how == "torrent":
                        client.add_torrent(strip_url_list(torrent))
                    else:
                        mirror = load_config(node.config).http_mirror
                        client.add_torrent(only_web_seed(torrent, f"http://{host}:{mirror.port}/interop/{name}"))
                client.wait_done(ih, 180)
                got = client.path(name).read_bytes()
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            finally:
                client.stop()
            # The bytes went the way the case says (the accounting sweeps every 10 s).
            channel = "webseed" if how == "webseed" else "swarm"
            wait(lambda: sent(node, channel) >= SIZE, f"{SIZE} bytes on noded's {channel} channel", 30)
            assert node.stop() == 0
    finally:
        ns.down()


def test_noded_adds_magnet_seeded_by_qbittorrent(noded_factory: Any, tmp_path: Path) -> None:
    if missing("qbittorrent"):
        pytest.skip(str(missing("qbittorrent")))
    ns = namespace_or_skip()
    try:
        host = ns.host_ip
        data = content(SIZE, 77)
        seed_dir = tmp_path / "qb-seed"
        seed_dir.mkdir()
        src = seed_dir / "from-qbittorrent.bin"
        src.write_bytes(data)
        ih = infohash_for(src)
        with opentracker([ih], host=host) as tracker:
            pieces, md5s = T.hash_files([src])
            info = T.single_file_info(src.name, len(data), md5s[0], pieces, source="Data for Canada")
            torrent = T.encode_torrent(info, trackers=[tracker])
            qb = QbittorrentClient(ns, tmp_path / "qbittorrent")
            qb.start()
            try:
                qb.add_torrent(torrent, save_path=seed_dir, skip_checking=True)
                wait(lambda: qb.info(ih).get("state") in ("uploading", "stalledUP"), "qBittorrent seeding")
                node = start_node(noded_factory, host, tracker, peer_stall_timeout=60.0)
                node.start()
                uri = f"magnet:?xt=urn:btih:{ih}&tr={quote(tracker, safe='')}"
                cmd = [sys.executable, "-m", "noded", "-c", str(node.config), "add", uri, "--wait", "--timeout", "180"]
                out = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    env=noded_env({"NODED_API_TOKEN": TOKEN}),
                    cwd=str(ROOT),
                    timeout=400,
                )
                assert out.returncode == 0, out.stdout + out.stderr + node.output()[-3000:] + qb.log()
            finally:
                qb.stop()
        status, item = node.get("/v1/items/from-qbittorrent.bin")
        assert status == 200 and item["state"] == "cached" and item["sha256"] == hashlib.sha256(data).hexdigest()
        assert node.stop() == 0
    finally:
        ns.down()
