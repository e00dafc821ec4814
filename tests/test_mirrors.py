"""One dataset, many locations: Source Cooperative, Zenodo, the Internet Archive and the published
torrent name one file; the node keeps one item with a location per origin, verifies every copy against
the strongest published value, fails over between locations and serves the result at /processed/<name>.

Real aiohttp servers speaking each service's shapes (S3 ListObjectsV2 XML with a multipart ETag under a
product prefix, Zenodo record JSON, archive.org metadata with string sizes), a torrent written by
py3createtorrent, real SQLite and files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from noded.core.component import Node
from noded.core.config import parse_config
from noded.core.model import Item, State
from noded.core.store import Store
from noded.origins.pipeline import Origins, suspects
from noded.p2p.torrent import parse_torrent
from noded.p2p.webseed import WebSeedServer
from tests.catalog_servers import ArchiveServer, ZenodoServer, ia_file, ia_metadata, s3_page, zenodo_file, zenodo_record
from tests.conftest import base_config, free_port, to_toml
from tests.origin import Origin
from tests.test_p2p_torrent import py3createtorrent

MiB = 1024 * 1024
PIECE = 16 * MiB
PRODUCT = "ca-orthoimagery-labs"
NAME = "ca-ab_test-2025_orthoimagery_2025_075mm.pmtiles"


def multipart_etag(data: bytes, part: int = 8 * MiB) -> str:
    """What S3 reports for a multipart upload: md5 of the parts' md5s, then -<parts>."""
    parts = [hashlib.md5(data[i : i + part]).digest() for i in range(0, len(data), part)]
    return hashlib.md5(b"".join(parts)).hexdigest() + f"-{len(parts)}"


class Mirrors:
    """Source Cooperative (account/product prefix, multipart ETags), Zenodo and archive.org on one server."""

    def __init__(self) -> None:
        self.zenodo = ZenodoServer()
        self.ia = ArchiveServer()
        self.sc_keys: list[tuple[str, int, str]] = []
        self.sc = Origin()  # Source Cooperative objects
        self.z = Origin()  # Zenodo file contents
        self.a = Origin()  # archive.org data node
        self.base = ""

    def app(self) -> web.Application:
        app = self.zenodo.app()
        app.router.add_get("/metadata/{ident}", self.ia.metadata)
        app.router.add_get("/download/{ident}/{name}", self.ia_download)
        app.router.add_get("/dataforcanada", self.sc_list)
        app.router.add_get("/dataforcanada/{tail:.+}", self.sc.handle)
        app.router.add_get("/ia800000/{tail:.+}", self.a.handle)
        app.router.add_route("GET", "/{tail:.*}", self.z.handle)
        return app

    async def sc_list(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        keys = [k for k in self.sc_keys if k[0].startswith(prefix)]
        return web.Response(body=s3_page(keys, None, None, name="dataforcanada"), content_type="application/xml")

    async def ia_download(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/ia800000/items/{request.match_info['ident']}/{request.match_info['name']}")

    def publish(
        self,
        name: str,
        data: bytes,
        *,
        sc: bytes | None = None,
        zenodo: bool = True,
        ia: bool = True,
        zenodo_md5: bool = True,
    ) -> None:
        """`name` at every origin; Source Cooperative may serve other bytes (`sc`) than the others."""
        etag = multipart_etag(data)
        self.sc_keys.append((f"{PRODUCT}/{name}", len(data), etag))
        self.sc.add(f"/dataforcanada/{PRODUCT}/{name}", sc if sc is not None else data, etag=f'"{etag}"')
        if zenodo:
            rid = 7
            z = zenodo_file(self.base, rid, name, data)
            if not zenodo_md5:
                z.pop("checksum")
            files = [f for f in self.zenodo.records.get(rid, {}).get("files", []) if f["key"] != name]
            self.zenodo.records[rid] = zenodo_record(self.base, rid, [*files, z])
            self.z.add(f"/api/records/{rid}/files/{name}/content", data)
        if ia:
            item = self.ia.items.get("d4c") or ia_metadata("d4c", [])
            item["files"] = [f for f in item["files"] if f["name"] != name] + [ia_file(name, data)]
            self.ia.items["d4c"] = item
            self.a.add(f"/ia800000/items/d4c/{name}", data)

    def url(self, origin: str, name: str) -> str:
        return {
            "sourcecoop": f"{self.base}/dataforcanada/{PRODUCT}/{name}",
            "zenodo": f"{self.base}/api/records/7/files/{name}/content",
            "ia": f"{self.base}/download/d4c/{name}",
        }[origin]


@pytest.fixture
async def mirrors(aiohttp_server: Any) -> Mirrors:
    m = Mirrors()
    server = await aiohttp_server(m.app())
    m.base = str(server.make_url("")).rstrip("/")
    return m


Factory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path, mirrors: Mirrors) -> AsyncIterator[Factory]:
    made: list[tuple[Origins, Store]] = []

    async def factory(**kw: Any) -> Origins:
        origins_cfg = {
            "sourcecoop": {"enabled": True, "endpoint": mirrors.base, "prefixes": [f"dataforcanada/{PRODUCT}/"]},
            "zenodo": {"enabled": True, "base_url": mirrors.base, "records": [7], "requests_per_minute": 6000},
            "ia": {"enabled": True, "base_url": mirrors.base, "identifiers": ["d4c"], "requests_per_minute": 6000},
            **kw.pop("origins", {}),
        }
        fetch = {"retry_initial": 0.05, "max_attempts": 2, "segment_size": "4MiB", **kw.pop("fetch", {})}
        data = base_config(tmp_path, origins=origins_cfg, fetch=fetch, **kw)
        cfg = parse_config(to_toml(data))
        store = Store(cfg.paths.state_dir / "noded.sqlite3")
        await store.open()
        o = Origins(Node(cfg=cfg, store=store))
        await o.open()
        made.append((o, store))
        return o

    yield factory
    for o, store in made:
        await o.stop()
        await store.close()


async def current(o: Origins, key: str) -> Item:
    item = await o.node.store.run(o.node.store.get_current, key)
    assert item is not None, key
    return item


def pulled(m: Mirrors) -> dict[str, int]:
    """File bytes each origin's server sent (listings and metadata are not counted)."""
    return {name: sum(e.sent for e in srv.log) for name, srv in (("sourcecoop", m.sc), ("zenodo", m.z), ("ia", m.a))}


def cache_files(o: Origins) -> list[str]:
    root = o.layout.root
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != ".noded"
    )


async def one_dataset_at_every_mirror(tmp_path: Path, mirrors: Mirrors, make: Factory, size: int) -> None:
    data_path = tmp_path / "src" / NAME
    data_path.parent.mkdir()
    with open(data_path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    data = data_path.read_bytes()
    mirrors.publish(NAME, data)
    torrent = py3createtorrent(
        data_path, tmp_path / f"{NAME}.torrent", "--webseed", mirrors.url("sourcecoop", NAME)
    )
    meta = parse_torrent(torrent)
    port = free_port()
    o = await make(http_mirror={"enabled": True, "port": port, "strip_prefix": "/processed"})
    await o.refresh_all()
    store = o.node.store
    await store.run(store.upsert_entry, meta.catalog_entry(), preference=o.node.cfg.origins.preference)
    rows = await store.run(store.items, limit=100)
    assert [(r.key, r.version) for r in rows] == [(NAME, 1)]  # one item, not one per origin
    locs = await store.run(store.locations, NAME)
    assert {loc["origin"] for loc in locs} == {"sourcecoop", "zenodo", "ia", "torrent"}
    assert all(loc["conflict"] is None for loc in locs)
    item = rows[0]
    # Source Cooperative's multipart ETag is no md5: the item borrows Zenodo's/IA's/the torrent's.
    assert item.md5 == hashlib.md5(data).hexdigest()
    sc = next(loc for loc in locs if loc["origin"] == "sourcecoop")
    assert sc["md5"] is None and sc["etag"].endswith(f"-{-(-size // (8 * MiB))}")
    assert item.verification == "checksum" and item.infohash == meta.infohash
    await o.pull(item)
    item = await current(o, NAME)
    assert item.state == State.CACHED and item.infohash == meta.infohash
    assert cache_files(o) == [NAME]  # one copy on disk, under the dataset's name
    counts = pulled(mirrors)
    assert sum(counts.values()) <= 1.01 * size, counts
    pieces = await store.run(store.get_pieces, item.id)
    assert pieces is not None and pieces[1] == meta.pieces  # the torrent's piece hashes, taken on the way in
    seed = WebSeedServer(o.node)
    await seed.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/processed/{NAME}"
            async with http.get(url, headers={"Range": "bytes=100-199"}) as resp:
                assert resp.status == 206 and await resp.read() == data[100:200]
            async with http.get(f"http://127.0.0.1:{port}/processed/{PRODUCT}/{NAME}") as resp:
                assert resp.status == 404
    finally:
        await seed.stop()


async def test_one_dataset_published_everywhere_is_one_item_pulled_once(
    tmp_path: Path, mirrors: Mirrors, make: Factory
) -> None:
    await one_dataset_at_every_mirror(tmp_path, mirrors, make, 2 * PIECE + 12345)


@pytest.mark.slow
async def test_one_gib_dataset_published_everywhere_is_one_item_pulled_once(
    tmp_path: Path, mirrors: Mirrors, make: Factory
) -> None:
    await one_dataset_at_every_mirror(tmp_path, mirrors, make, 1024 * MiB)


async def test_flipped_byte_at_source_cooperative_is_caught_by_a_borrowed_md5(
    mirrors: Mirrors, make: Factory
) -> None:
    data = os.urandom(PIECE + 3 * MiB)
    bad = bytearray(data)
    bad[PIECE + 5] ^= 0x01
    mirrors.publish(NAME, data, sc=bytes(bad))
    o = await make(fetch={"multi_location": False})  # the whole file from the preferred location
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    item = await current(o, NAME)
    assert item.state == State.CACHED
    assert hashlib.md5(o.layout.final_path(NAME).read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
    bad_copies = await o.node.store.run(suspects, o.node.store, NAME, item.version)
    assert set(bad_copies) == {"sourcecoop"} and "md5" in bad_copies["sourcecoop"]
    # Nothing corrupt reached the cache root; the bad bytes sit in quarantine.
    assert cache_files(o) == [NAME]


async def test_flipped_byte_is_repaired_by_refetching_only_the_bad_piece(
    tmp_path: Path, mirrors: Mirrors, make: Factory
) -> None:
    size = 3 * PIECE + 4321
    data = os.urandom(size)
    bad = bytearray(data)
    bad[PIECE + 5] ^= 0x01  # one flipped bit in piece 1
    mirrors.publish(NAME, data, sc=bytes(bad))
    src = tmp_path / NAME
    src.write_bytes(data)
    meta = parse_torrent(py3createtorrent(src, tmp_path / f"{NAME}.torrent"))
    o = await make(fetch={"multi_location": False})  # the whole file from the preferred location
    await o.refresh_all()
    store = o.node.store
    await store.run(store.upsert_entry, meta.catalog_entry(), preference=o.node.cfg.origins.preference)
    await o.pull(await current(o, NAME))
    item = await current(o, NAME)
    assert item.state == State.CACHED and item.md5 == hashlib.md5(data).hexdigest()
    assert o.layout.final_path(NAME).read_bytes() == data
    counts = pulled(mirrors)
    assert counts["sourcecoop"] <= size + PIECE  # the whole file once, from the preferred location
    assert sum(counts.values()) <= size + 2 * PIECE, counts  # plus the one bad piece from another
    assert counts["zenodo"] + counts["ia"] == PIECE
    # The location that served the bad bytes is suspect for this version: the next pull skips it.
    assert "sourcecoop" in await store.run(suspects, store, NAME, item.version)


async def test_no_checksum_anywhere_is_unverified_and_refused_under_require_checksum(
    mirrors: Mirrors, make: Factory
) -> None:
    data = os.urandom(MiB + 1)
    mirrors.publish(NAME, data, ia=False, zenodo_md5=False)
    o = await make(origins={"require_checksum": True})
    await o.refresh_all()
    item = await current(o, NAME)
    assert item.verification == "unverified" and item.public()["verification"] == "unverified"
    assert o.status()["unverified_items"] == 1
    await o.pull(item)
    item = await current(o, NAME)
    assert item.state == State.FAILED and "require_checksum" in (item.error or "")
    assert cache_files(o) == [] and sum(pulled(mirrors).values()) == 0


async def test_same_name_different_md5_is_a_visible_conflict_decided_by_preference(
    mirrors: Mirrors, make: Factory
) -> None:
    data = os.urandom(MiB)
    other = os.urandom(MiB)
    mirrors.publish(NAME, data, ia=False)
    mirrors.publish("other.bin", other, zenodo=False)
    # The archive lists NAME with other content (another md5).
    mirrors.ia.items["d4c"]["files"].append(ia_file(NAME, other))
    mirrors.a.add(f"/ia800000/items/d4c/{NAME}", other)
    o = await make(origins={"preference": ["zenodo", "sourcecoop", "ia"]})
    await o.refresh_all()
    item = await current(o, NAME)
    assert item.md5 == hashlib.md5(data).hexdigest()  # zenodo is trusted over ia
    assert item.conflict and "ia" in item.conflict and hashlib.md5(other).hexdigest() in item.conflict
    assert item.public()["conflict"] == item.conflict
    assert f"conflict:{NAME}" in o.node.problems
    # The disagreeing location is not a source for this item.
    assert mirrors.url("ia", NAME) not in item.urls
    await o.pull(item)
    assert o.layout.final_path(NAME).read_bytes() == data
    assert pulled(mirrors)["ia"] == 0
    # The archive fixes its listing: the conflict is over, and so is the problem.
    mirrors.ia.items["d4c"]["files"] = [f for f in mirrors.ia.items["d4c"]["files"] if f["name"] != NAME]
    mirrors.ia.items["d4c"]["files"].append(ia_file(NAME, data))
    await o.refresh_all()
    assert (await current(o, NAME)).conflict is None and f"conflict:{NAME}" not in o.node.problems


async def test_primary_down_mid_pull_finishes_from_the_next_location_at_the_byte_reached(
    mirrors: Mirrors, make: Factory
) -> None:
    size = 24 * MiB
    data = os.urandom(size)
    mirrors.publish(NAME, data)
    blob = mirrors.sc.blobs[f"/dataforcanada/{PRODUCT}/{NAME}"]
    # Source Cooperative delivers the first 10 MiB, then every request fails.
    blob.fault = lambda b, request, n: "truncate:10485760" if n == 1 else "status:503"
    # One location at a time (multi_location off): the failover path the multi-location pull falls back to.
    o = await make(
        fetch={"segments_per_item": 1, "segment_size": "64MiB", "host_failure_threshold": 100, "multi_location": False}
    )
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    item = await current(o, NAME)
    assert item.state == State.CACHED and o.layout.final_path(NAME).read_bytes() == data
    counts = pulled(mirrors)
    assert counts["sourcecoop"] >= 8 * MiB  # it got far before going down
    # The rest came from the next location, from about where the first stopped (the bytes of the
    # broken response's last read that never reached the disk are fetched again).
    assert sum(counts.values()) <= size + 4 * MiB, counts
    starts = [int(e.range.split("=")[1].split("-")[0]) for e in mirrors.z.log if NAME in e.path and e.range]
    assert starts and min(starts) >= 6 * MiB


async def test_every_location_failing_fails_with_each_reason(mirrors: Mirrors, make: Factory) -> None:
    data = os.urandom(MiB)
    mirrors.publish(NAME, data)
    for origin in (mirrors.sc, mirrors.z, mirrors.a):
        for blob in origin.blobs.values():
            blob.fault = lambda b, request, n: "status:404"
    o = await make()
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    item = await current(o, NAME)
    assert item.state == State.FAILED
    for name in ("sourcecoop", "zenodo", "ia"):
        assert f"{name}:" in (item.error or "")


async def test_an_origin_that_stops_listing_a_name_is_no_longer_a_location(mirrors: Mirrors, make: Factory) -> None:
    data = os.urandom(MiB)
    mirrors.publish(NAME, data)
    o = await make()
    await o.refresh_all()
    assert mirrors.url("ia", NAME) in (await current(o, NAME)).urls
    mirrors.ia.items["d4c"]["files"] = []
    await o.refresh_all()
    item = await current(o, NAME)
    assert mirrors.url("ia", NAME) not in item.urls
    assert {loc["origin"] for loc in await o.node.store.run(o.node.store.locations, NAME)} == {"sourcecoop", "zenodo"}


async def test_locate_lists_every_location_and_a_report_demotes_that_copy(
    tmp_path: Path, mirrors: Mirrors, make: Factory, aiohttp_client: Any
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from noded.api import locate as locate_routes
    from noded.api import reports as report_routes
    from noded.api.app import create_app

    data = os.urandom(MiB + 7)
    mirrors.publish(NAME, data, ia=False)
    other = os.urandom(MiB + 7)  # the archive lists this name with other content: a conflict
    mirrors.ia.items["d4c"] = ia_metadata("d4c", [ia_file(NAME, other)])
    src = tmp_path / NAME
    src.write_bytes(data)
    seed_target = f"http://127.0.0.2:{free_port()}/processed/{NAME}"  # a seed target in the published torrent
    meta = parse_torrent(
        py3createtorrent(src, tmp_path / "t.torrent", "--webseed", mirrors.url("sourcecoop", NAME), "--webseed",
                         seed_target)
    )  # fmt: skip
    o = await make(http_mirror={"enabled": True, "port": free_port(), "strip_prefix": "/processed"})
    await o.refresh_all()
    store = o.node.store
    await store.run(store.upsert_entry, meta.catalog_entry(), preference=o.node.cfg.origins.preference)
    await o.pull(await current(o, NAME))
    client = await aiohttp_client(create_app(o.node, [locate_routes.setup, report_routes.setup]))

    async def locate(ident: str) -> dict[str, Any]:
        resp = await client.get(f"/v1/locate/{ident}")
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    body = await locate(NAME)
    by_url = {p["url"]: p for p in body["places"]}
    assert body["places"][0]["kind"] == "node" and body["places"][0]["url"].endswith(f"/processed/{NAME}")
    assert by_url[mirrors.url("sourcecoop", NAME)]["match"] == "unknown"  # multipart ETag: nothing of its own
    assert by_url[mirrors.url("zenodo", NAME)]["match"] == "match"
    assert by_url[mirrors.url("ia", NAME)]["match"] == "conflict" and not by_url[mirrors.url("ia", NAME)]["working"]
    assert by_url[seed_target]["kind"] == "webseed"
    assert body["places"][-1]["url"] == mirrors.url("ia", NAME)  # a copy known to differ goes last
    assert all(p["reason"] for p in body["places"])
    ws = parse_qs(urlsplit(body["magnet"]).query)["ws"]
    assert set(ws) == {body["places"][0]["url"], mirrors.url("sourcecoop", NAME), mirrors.url("zenodo", NAME),
                       seed_target}  # fmt: skip
    assert body["infohash"] == meta.infohash
    # The dashboard's per-dataset view says the same.
    resp = await client.get("/v1/datasets")
    (ds,) = (await resp.json())["datasets"]
    assert ds["key"] == NAME and ds["verification"] == "checksum" and ds["conflict"]
    assert {(loc["origin"], loc["match"], loc["working"]) for loc in ds["locations"]} >= {
        ("sourcecoop", "unknown", True), ("zenodo", "match", True), ("ia", "conflict", False)}
    # Found by md5 and by infohash as well.
    assert (await locate(hashlib.md5(data).hexdigest()))["key"] == NAME
    assert (await locate(meta.infohash))["key"] == NAME
    # A community report against Zenodo's copy of this dataset demotes that copy, and only that one.
    resp = await client.post("/v1/reports", json={"mirror": "zenodo", "item": NAME, "kind": "corrupt"})
    assert resp.status == 201, await resp.text()
    body = await locate(NAME)
    z = next(p for p in body["places"] if p["url"] == mirrors.url("zenodo", NAME))
    assert z["item_reports"] == 1 and not z["working"] and "against this copy" in z["reason"]
    sc = next(p for p in body["places"] if p["url"] == mirrors.url("sourcecoop", NAME))
    assert sc["rank"] < z["rank"] and sc["working"]
    assert mirrors.url("zenodo", NAME) not in parse_qs(urlsplit(body["magnet"]).query)["ws"]
    # Re-probed clean after the report: the copy counts again.
    await store.run(
        lambda: store.conn.execute(
            "INSERT INTO probes(mirror, ts, ok, status) VALUES('zenodo', strftime('%s','now') + 1, 1, 'up')"
        )
    )
    body = await locate(NAME)
    assert mirrors.url("zenodo", NAME) in parse_qs(urlsplit(body["magnet"]).query)["ws"]


async def test_zenodo_releases_of_one_concept_the_newest_is_wanted_and_older_superseded(
    mirrors: Mirrors, make: Factory
) -> None:
    old, new = os.urandom(MiB), os.urandom(MiB + 1)
    base = mirrors.base
    mirrors.zenodo.records[301] = zenodo_record(base, 301, [zenodo_file(base, 301, NAME, old)], concept=300)
    mirrors.z.add(f"/api/records/301/files/{NAME}/content", old)
    o = await make(origins={"sourcecoop": {"enabled": False}, "ia": {"enabled": False},
                            "zenodo": {"enabled": True, "base_url": base, "records": [301],
                                       "requests_per_minute": 6000}})  # fmt: skip
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    v1 = await current(o, NAME)
    assert v1.state == State.CACHED and v1.version == 1
    # A second record of the same concept publishes a new release of the file; both records are listed.
    mirrors.zenodo.records[302] = zenodo_record(base, 302, [zenodo_file(base, 302, NAME, new)], concept=300)
    mirrors.z.add(f"/api/records/302/files/{NAME}/content", new)
    o.node.cfg.origins.zenodo.records.append(302)
    for _ in range(2):  # the listing order does not matter, and a second refresh changes nothing
        await o.refresh_all()
        v2 = await current(o, NAME)
        assert v2.version == 2 and v2.md5 == hashlib.md5(new).hexdigest()
        assert v2.conflict is None and not [p for p in o.node.problems if p.startswith("conflict:")]
        locs = {loc["url"]: loc for loc in await o.node.store.run(o.node.store.locations, NAME)}
        assert locs[f"{base}/api/records/301/files/{NAME}/content"]["superseded"]
        assert locs[f"{base}/api/records/302/files/{NAME}/content"]["superseded"] is None
    await o.pull(v2)
    assert (await current(o, NAME)).state == State.CACHED
    assert o.layout.final_path(NAME).read_bytes() == new
    old_row = await o.node.store.run(o.node.store.get_item, v1.id)
    assert old_row is not None and old_row.state == State.EVICTED and "superseded" in (old_row.error or "")


async def test_a_pinned_older_release_is_kept(mirrors: Mirrors, make: Factory) -> None:
    old, new = os.urandom(MiB), os.urandom(MiB + 1)
    base = mirrors.base
    mirrors.zenodo.records[301] = zenodo_record(base, 301, [zenodo_file(base, 301, NAME, old)], concept=300)
    mirrors.z.add(f"/api/records/301/files/{NAME}/content", old)
    o = await make(origins={"sourcecoop": {"enabled": False}, "ia": {"enabled": False},
                            "zenodo": {"enabled": True, "base_url": base, "records": [301],
                                       "requests_per_minute": 6000}})  # fmt: skip
    await o.refresh_all()
    await o.pull(await current(o, NAME))
    v1 = await current(o, NAME)
    await o.node.store.run(o.node.store.update_item, v1.id, pinned=True)
    mirrors.zenodo.records[301] = zenodo_record(base, 301, [], concept=300)
    mirrors.zenodo.records[302] = zenodo_record(base, 302, [zenodo_file(base, 302, NAME, new)], concept=300)
    mirrors.z.add(f"/api/records/302/files/{NAME}/content", new)
    o.node.cfg.origins.zenodo.records.append(302)
    await o.refresh_all()
    v2 = await current(o, NAME)
    assert v2.version == 2
    await o.pull(v2)
    v2 = await current(o, NAME)
    assert v2.state == State.FAILED and "pinned" in (v2.error or "")
    assert o.layout.final_path(NAME).read_bytes() == old
    assert (await o.node.store.run(o.node.store.get_item, v1.id)).state == State.CACHED  # type: ignore[union-attr]
