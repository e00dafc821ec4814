"""`noded run` in volunteer mode: a torrent catalogue, no R2 credentials, no whole-item pulls. An item nobody
seeds is taken from its HTTP web seed, but only the pieces this node chose, and it advertises them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from aiohttp import web

from noded.p2p import torrent as T
from tests.conftest import NodedProcess, base_config, free_port, write_config
from tests.p2p_helpers import content

PL = 64 * 1024
DATA = content(8 * PL, 21)


class WebSeed:
    """The item's HTTP origin: serves Range requests and counts the bytes it sent."""

    def __init__(self) -> None:
        self.sent = 0
        self.full_gets = 0

    async def get(self, request: web.Request) -> web.StreamResponse:
        rng = request.http_range
        start, stop = rng.start or 0, rng.stop if rng.stop is not None else len(DATA)
        if request.headers.get("Range") is None:
            self.full_gets += 1
            body = DATA
            resp = web.Response(body=body)
        else:
            body = DATA[start:stop]
            resp = web.Response(body=body, status=206)
            resp.headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(DATA)}"
        self.sent += len(body)
        return resp


async def test_volunteer_daemon_takes_only_its_pieces_from_an_unseeded_item(tmp_path: Path) -> None:
    seed = WebSeed()
    app = web.Application()
    app.router.add_get("/processed/lonely.parquet", seed.get)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    src = tmp_path / "lonely.parquet"
    src.write_bytes(DATA)
    raw, md5s = T.hash_files([src], piece_length=PL)
    info = T.single_file_info(src.name, len(DATA), md5s[0], raw, piece_length=PL, source="Data for Canada")
    tor = tmp_path / "lonely.torrent"
    tor.write_bytes(
        T.encode_torrent(info, trackers=[], web_seeds=[f"http://127.0.0.1:{port}/processed/lonely.parquet"])
    )
    ih = T.infohash_of(info)
    cfg = base_config(
        tmp_path / "vol",
        name="vol-1",
        origins={"inbox": {"dir": str(tmp_path / "vol" / "inbox")}, "torrents": {"files": [str(tor)]}},
        volunteer={"enabled": True, "budget": 4 * PL, "interval": 0.5, "allow_local_trackers": True},
    )
    node = NodedProcess(write_config(tmp_path / "vol", cfg), env={"R2_ACCESS_KEY_ID": "", "R2_SECRET_ACCESS_KEY": ""})
    node.start()
    try:
        deadline = time.monotonic() + 60
        held: list[int] = []
        while time.monotonic() < deadline:
            _, inv = await asyncio.to_thread(node.get, "/v1/inventory/pieces")
            _, st = await asyncio.to_thread(node.get, "/v1/status")
            vol = st["components"]["volunteer"]
            if inv["items"] and vol["rounds"] > 1 and not vol["missing_pieces"]:
                held = inv["items"][0]["pieces"]
                break
            await asyncio.sleep(0.5)
        assert len(held) == 4, (inv, vol)
        assert inv["items"][0]["infohash"] == ih
        # Only the chosen pieces came from the origin (BEP 19 range requests), never the whole file.
        assert seed.full_gets == 0
        assert 4 * PL <= seed.sent < 8 * PL
        path = tmp_path / "vol" / "cache" / ".noded" / "partial" / f"pieces-{ih}"
        with path.open("rb") as f:
            for i in held:
                f.seek(i * PL)
                assert hashlib.sha1(f.read(PL)).digest() == raw[i * 20 : (i + 1) * 20]
        # The pipeline pulled nothing whole: the item is still only wanted, and accounted per piece.
        _, item = await asyncio.to_thread(node.get, "/v1/items/lonely.parquet")
        assert item["state"] == "wanted"
        assert item["replicas"]["held_here"] == held
        assert item["replicas"]["pieces"]["count"] == 8
        assert st["replicas"]["below_k"] == 1
        assert vol["origin_items"] == 0  # web seeds off again once the pieces are here
        _, loc = await asyncio.to_thread(node.get, "/v1/locate/lonely.parquet")
        assert loc["partial_holders"] == [{"node": "vol-1", "pieces": 4, "local": True}]

        # A restart finds the held pieces in their file: the same ones are held, nothing is fetched again.
        node.stop()
        sent = seed.sent
        node.start()
        deadline = time.monotonic() + 60
        again: list[int] = []
        while time.monotonic() < deadline:
            _, inv = await asyncio.to_thread(node.get, "/v1/inventory/pieces")
            _, st = await asyncio.to_thread(node.get, "/v1/status")
            vol = st["components"]["volunteer"]
            if inv["items"] and vol["rounds"] > 1 and not vol["missing_pieces"]:
                again = inv["items"][0]["pieces"]
                break
            await asyncio.sleep(0.5)
        assert again == held
        assert seed.sent == sent
    finally:
        node.stop()
        await runner.cleanup()
