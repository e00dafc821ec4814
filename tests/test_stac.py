"""The organisation's STAC catalogue as an origin: a static JSON catalog and a stac-geoparquet file served
over loopback, read with pystac and stac-geoparquet into one item per asset with its locations."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from noded.core.component import Node
from noded.core.config import FetchConfig, StacConfig, parse_config
from noded.core.counters import Traffic
from noded.core.model import State
from noded.core.store import Store
from noded.origins.catalog.base import Limits
from noded.origins.catalog.stac import StacAdapter, parse_multihash
from noded.origins.fetch import HttpClient
from noded.origins.pipeline import Origins
from tests.conftest import base_config, to_toml
from tests.origin import Origin

MiB = 1024 * 1024


def md5_multihash(data: bytes) -> str:
    return "d50110" + hashlib.md5(data).hexdigest()  # md5 is code 0xd5: a two-byte varint


def sha256_multihash(data: bytes) -> str:
    return "1220" + hashlib.sha256(data).hexdigest()


def stac_item(item_id: str, assets: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/file/v2.1.0/schema.json",
            "https://stac-extensions.github.io/alternate-assets/v1.2.0/schema.json",
        ],
        "id": item_id,
        "geometry": {"type": "Polygon", "coordinates": [[[-114, 53], [-113, 53], [-113, 54], [-114, 54], [-114, 53]]]},
        "bbox": [-114, 53, -113, 54],
        "properties": {"datetime": "2025-01-01T00:00:00Z"},
        "links": [],
        "assets": assets,
    }


class Catalogue:
    """A static STAC catalog (catalog -> collection -> items) and the files its assets point to."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.raw: dict[str, bytes] = {}
        self.files = Origin()
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stac/{tail:.+}", self.doc)
        app.router.add_get("/{tail:.*}", self.files.handle)
        return app

    async def doc(self, request: web.Request) -> web.Response:
        name = request.match_info["tail"]
        if name in self.raw:
            return web.Response(body=self.raw[name], content_type="application/octet-stream")
        if name not in self.docs:
            raise web.HTTPNotFound()
        return web.json_response(self.docs[name])


@pytest.fixture
async def cat(aiohttp_server: Any) -> Catalogue:
    c = Catalogue()
    server = await aiohttp_server(c.app())
    c.base = str(server.make_url("")).rstrip("/")
    return c


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(FetchConfig(retry_initial=0.01, max_attempts=2), Traffic())
    await client.start()
    yield client
    await client.close()


def publish(cat: Catalogue) -> dict[str, bytes]:
    """Two good datasets (one with an alternate) and every kind of bad asset, in a static catalog."""
    a, b = os.urandom(MiB + 1), os.urandom(MiB + 2)
    cat.files.add("/sc/dataforcanada/ca-orthoimagery-labs/a.pmtiles", a)
    cat.files.add("/zenodo/records/1/files/a.pmtiles", a)
    cat.files.add("/sc/dataforcanada/ca-orthoimagery-labs/b.parquet", b)
    base = cat.base
    good = stac_item(
        "a",
        {
            "data": {
                "href": f"{base}/sc/dataforcanada/ca-orthoimagery-labs/a.pmtiles",
                "roles": ["data"],
                "file:size": len(a),
                "file:checksum": md5_multihash(a),
                "alternate": {"zenodo": {"href": f"{base}/zenodo/records/1/files/a.pmtiles"}},
            },
            "thumbnail": {"href": f"{base}/thumb.png", "roles": ["thumbnail"]},
        },
    )
    mixed = stac_item(
        "b",
        {
            "data": {
                # relative to the item document: resolved against its URL
                "href": "../../sc/dataforcanada/ca-orthoimagery-labs/b.parquet",
                "file:size": len(b),
                "file:checksum": sha256_multihash(b),
                "alternate": {
                    "wrong": {"href": f"{base}/elsewhere/b.parquet", "file:size": len(b) + 1},
                    "evil": {"href": "file:///etc/passwd"},
                },
            },
            "bad-hash": {"href": f"{base}/x/c.bin", "file:checksum": "12200bad"},
            "not-hex": {"href": f"{base}/x/d.bin", "file:checksum": "zz"},
            "hostile": {"href": "javascript:alert(1)"},
            "creds": {"href": "http://user:pw@127.0.0.1/x/e.bin"},
        },
    )
    cat.docs["catalog.json"] = {
        "type": "Catalog",
        "stac_version": "1.0.0",
        "id": "d4c",
        "description": "Data for Canada",
        "links": [
            {"rel": "child", "href": "./collection.json"},
            {"rel": "child", "href": "http://127.0.0.2:9/stac/elsewhere.json"},  # another host: not followed
        ],
    }
    cat.docs["collection.json"] = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": "ortho",
        "description": "orthoimagery",
        "license": "CC-BY-4.0",
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
        "links": [{"rel": "item", "href": "./items/a.json"}, {"rel": "item", "href": "./items/b.json"}],
    }
    cat.docs["items/a.json"] = good
    cat.docs["items/b.json"] = mixed
    return {"a.pmtiles": a, "b.parquet": b}


def test_multihash_parsing() -> None:
    data = b"abc"
    assert parse_multihash(md5_multihash(data)) == ("md5", hashlib.md5(data).hexdigest())
    assert parse_multihash("1114" + hashlib.sha1(data).hexdigest()) == ("sha1", hashlib.sha1(data).hexdigest())
    assert parse_multihash(sha256_multihash(data)) == ("sha256", hashlib.sha256(data).hexdigest())
    assert parse_multihash("a0e40220" + "00" * 32) is None  # blake2b-256: well formed, not one we compare
    for bad in ("12200bad", "zz", "", "12", "1220" + "00" * 31, "1214" + "00" * 20, 42):
        with pytest.raises(ValueError):
            parse_multihash(bad)


async def test_static_catalog_assets_become_items_with_locations(cat: Catalogue, http: HttpClient) -> None:
    data = publish(cat)
    cfg = StacConfig(enabled=True, catalogs=[f"{cat.base}/stac/catalog.json"])
    listing = await StacAdapter(cfg, http, Limits()).list()
    by_key: dict[str, list[Any]] = {}
    for e in listing.entries:
        by_key.setdefault(e.key, []).append(e)
    assert set(by_key) == {"a.pmtiles", "b.parquet"}  # the thumbnail is not a dataset
    a = by_key["a.pmtiles"]
    assert [e.urls[0] for e in a] == [
        f"{cat.base}/sc/dataforcanada/ca-orthoimagery-labs/a.pmtiles",
        f"{cat.base}/zenodo/records/1/files/a.pmtiles",
    ]
    assert all(e.md5 == hashlib.md5(data["a.pmtiles"]).hexdigest() and e.size == MiB + 1 for e in a)
    (b,) = by_key["b.parquet"]
    assert b.sha256 == hashlib.sha256(data["b.parquet"]).hexdigest()
    assert b.urls == (f"{cat.base}/sc/dataforcanada/ca-orthoimagery-labs/b.parquet",)
    reasons = {r.key: r.reason for r in listing.rejected}
    assert "conflicts with its asset" in reasons["b/data alternate wrong"]
    assert "scheme 'file'" in reasons["b/data alternate evil"]
    assert "digest" in reasons["b/bad-hash"] and "not hex" in reasons["b/not-hex"]
    assert "scheme 'javascript'" in reasons["b/hostile"] and "credentials" in reasons["b/creds"]
    assert any("leaves the catalog's host" in r for r in reasons.values())


async def test_stac_geoparquet_file_is_read_like_the_json_catalog(cat: Catalogue, http: HttpClient) -> None:
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import parse_stac_items_to_arrow

    data = publish(cat)
    items = [cat.docs["items/a.json"], cat.docs["items/b.json"]]
    # In a geoparquet file there is no document to resolve a relative href against: make it absolute.
    items[1]["assets"]["data"]["href"] = f"{cat.base}/sc/dataforcanada/ca-orthoimagery-labs/b.parquet"
    table = parse_stac_items_to_arrow(items).read_all()
    buf = Path(os.environ.get("TMPDIR", "/tmp")) / f"stac-{os.getpid()}-{id(cat)}.parquet"
    try:
        pq.write_table(table, buf)
        cat.raw["items.parquet"] = buf.read_bytes()
    finally:
        buf.unlink(missing_ok=True)
    cfg = StacConfig(enabled=True, geoparquet=[f"{cat.base}/stac/items.parquet"])
    listing = await StacAdapter(cfg, http, Limits()).list()
    keys = [(e.key, e.urls[0]) for e in listing.entries]
    assert keys == [
        ("a.pmtiles", f"{cat.base}/sc/dataforcanada/ca-orthoimagery-labs/a.pmtiles"),
        ("a.pmtiles", f"{cat.base}/zenodo/records/1/files/a.pmtiles"),
        ("b.parquet", f"{cat.base}/sc/dataforcanada/ca-orthoimagery-labs/b.parquet"),
    ]
    assert listing.entries[2].sha256 == hashlib.sha256(data["b.parquet"]).hexdigest()
    assert {r.key for r in listing.rejected} >= {"b/bad-hash", "b/hostile", "b/data alternate wrong"}


async def test_a_catalogued_dataset_is_pulled_and_verified_from_its_locations(tmp_path: Path, cat: Catalogue) -> None:
    data = publish(cat)
    # The primary location is down: the alternate serves it.
    cat.files.blobs["/sc/dataforcanada/ca-orthoimagery-labs/a.pmtiles"].fault = lambda b, r, n: "status:404"
    cfg = parse_config(
        to_toml(
            base_config(
                tmp_path,
                origins={"stac": {"enabled": True, "catalogs": [f"{cat.base}/stac/catalog.json"]}},
                fetch={"retry_initial": 0.01, "max_attempts": 2},
            )
        )
    )
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    o = Origins(Node(cfg=cfg, store=store))
    await o.open()
    try:
        await o.refresh_all()
        item = await store.run(store.get_current, "a.pmtiles")
        assert item is not None and item.verification == "checksum" and len(item.urls) == 2
        assert {loc["url"] for loc in await store.run(store.locations, "a.pmtiles")} == set(item.urls)
        await o.pull(item)
        item = await store.run(store.get_current, "a.pmtiles")
        assert item is not None and item.state == State.CACHED
        assert o.layout.final_path("a.pmtiles").read_bytes() == data["a.pmtiles"]
        assert "catalog:stac" not in o.node.problems
    finally:
        await o.stop()
        await store.close()
