"""Acceptance 1 and 2: two noded daemons and one local origin.

1. A pulls an item from the origin; B gets it from A over BitTorrent; the origin served its bytes
   exactly once (server-side count); B's copy verifies.
2. Same with A stopped: B falls back to the origin.

These need the origins pipeline (noded/origins.py pulling WANTED items, with the sync component's
"peer" source placed first): they are skipped until it is merged.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import NodedProcess, free_port
from tests.p2p_helpers import content

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("noded.origins.pipeline") is None, reason="needs origins pipeline"),
]

BUCKET = "dataforcanada"
KEY = "ca-orthoimagery-labs/tiny.pmtiles"
DATA = content(3 * 1024 * 1024 + 5, 99)


class Origin:
    """A Source Cooperative-style S3 endpoint (ListObjectsV2 XML + GET with Range) that counts bytes."""

    def __init__(self) -> None:
        self.bytes_served = 0
        self.gets = 0

    async def list_objects(self, request: web.Request) -> web.Response:
        md5 = hashlib.md5(DATA).hexdigest()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{BUCKET}</Name><Prefix>{request.query.get('prefix', '')}</Prefix><KeyCount>1</KeyCount>"
            "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
            f"<Contents><Key>{KEY}</Key><LastModified>2025-01-01T00:00:00.000Z</LastModified>"
            f'<ETag>"{md5}"</ETag><Size>{len(DATA)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
            "</ListBucketResult>"
        )
        return web.Response(text=xml, content_type="application/xml")

    async def get_object(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["key"] != KEY:
            raise web.HTTPNotFound()
        self.gets += 1
        start, end = 0, len(DATA) - 1
        rng = request.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a or 0), int(b) if b else len(DATA) - 1
        body = DATA[start : end + 1]
        if request.method == "GET":
            self.bytes_served += len(body)
        md5 = hashlib.md5(DATA).hexdigest()
        headers = {"ETag": f'"{md5}"', "Accept-Ranges": "bytes", "Content-Length": str(len(body))}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(DATA)}"
        return web.Response(body=body if request.method == "GET" else None, status=206 if rng else 200, headers=headers)


@pytest.fixture
async def origin() -> AsyncIterator[tuple[Origin, str]]:
    o = Origin()
    app = web.Application()
    app.router.add_get(f"/{BUCKET}", o.list_objects)
    app.router.add_get(f"/{BUCKET}/{{key:.+}}", o.get_object)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield o, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _node_cfg(origin_url: str, bt_port: int, peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "origins": {
            "refresh_interval": 2.0,
            "sourcecoop": {
                "enabled": True,
                "endpoint": origin_url,
                "bucket": BUCKET,
                "prefixes": ["ca-orthoimagery-labs/"],
            },
        },
        "bittorrent": {"listen_interfaces": f"127.0.0.1:{bt_port}"},
        "fetch": {"peer_wait": 30.0},
        "peers": peers,
    }


def wait_cached(node: NodedProcess, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = node.get("/v1/inventory?state=cached")
        if status == 200 and body["items"]:
            return dict(body["items"][0])
        time.sleep(0.3)
    raise AssertionError(f"item never cached:\n{node.output()[-4000:]}")


async def test_b_gets_item_from_a_and_origin_serves_once(noded_factory: Any, origin: tuple[Origin, str]) -> None:
    o, url = origin
    a_bt, b_bt = free_port(), free_port()
    a_api, b_api = free_port(), free_port()
    a = noded_factory(
        "toronto",
        start=False,
        api={"port": a_api},
        **_node_cfg(
            url,
            a_bt,
            [{"name": "amsterdam", "api_url": f"http://127.0.0.1:{b_api}", "bittorrent": f"127.0.0.1:{b_bt}"}],
        ),
    )
    b = noded_factory(
        "amsterdam",
        start=False,
        api={"port": b_api},
        **_node_cfg(
            url, b_bt, [{"name": "toronto", "api_url": f"http://127.0.0.1:{a_api}", "bittorrent": f"127.0.0.1:{a_bt}"}]
        ),
    )
    await asyncio.to_thread(a.start)
    await asyncio.to_thread(wait_cached, a)
    await asyncio.to_thread(b.start)
    got = await asyncio.to_thread(wait_cached, b)
    assert got["md5"] == hashlib.md5(DATA).hexdigest() and got["sha256"] == hashlib.sha256(DATA).hexdigest()
    cache_b = Path(b.config).parent / "cache" / KEY.split("/", 1)[1]  # keyed by dataset name
    assert hashlib.sha256(cache_b.read_bytes()).digest() == hashlib.sha256(DATA).digest()
    assert o.bytes_served == len(DATA)  # exactly once: A pulled it, B took it over BitTorrent
    _, traffic = b.get("/v1/status")
    assert traffic["components"]["sync"]["peers"]["toronto"]["up"]


async def test_b_falls_back_to_origin_when_a_is_down(noded_factory: Any, origin: tuple[Origin, str]) -> None:
    o, url = origin
    b = noded_factory(
        "amsterdam",
        start=False,
        **_node_cfg(
            url,
            free_port(),
            [
                {
                    "name": "toronto",
                    "api_url": f"http://127.0.0.1:{free_port()}",
                    "bittorrent": f"127.0.0.1:{free_port()}",
                }
            ],
        ),
    )
    await asyncio.to_thread(b.start)
    got = await asyncio.to_thread(wait_cached, b)
    assert got["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert o.bytes_served == len(DATA)
