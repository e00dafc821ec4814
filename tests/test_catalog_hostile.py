"""Hostile listings are rejected per entry or per page, logged, and never cost previously known items."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core.component import Node
from noded.core.config import SourceCoopConfig, parse_config
from noded.core.store import Store
from noded.origins.catalog.base import Limits
from noded.origins.catalog.keys import KeyError_, normalise_key
from noded.origins.catalog.sourcecoop import SourceCoopAdapter
from noded.origins.pipeline import Origins
from tests.catalog_servers import ArchiveServer, RawS3Server, ZenodoServer, ia_metadata, s3_page, zenodo_record
from tests.conftest import base_config, to_toml
from tests.origin import Origin

HOSTILE = [
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "a\x00b",
    "tab\there",
    "x" * 10_000,
    "a//b",
    ".noded/partial/1-1",
    "back\\slash",
    "./dot",
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_keys_are_refused(raw: str) -> None:
    with pytest.raises(KeyError_):
        normalise_key(raw)


def test_keys_are_nfc_normalised() -> None:
    assert normalise_key("cafe\u0301/x.parquet") == "caf\u00e9/x.parquet"
    assert normalise_key("d4c/2021 census.parquet") == "d4c/2021 census.parquet"


OriginsFactory = Callable[..., Any]


@pytest.fixture
async def make_origins(tmp_path: Path) -> AsyncIterator[OriginsFactory]:
    made: list[tuple[Origins, Store]] = []

    async def make(**origins_cfg: Any) -> Origins:
        cfg = parse_config(to_toml(base_config(tmp_path, origins=origins_cfg, fetch={"retry_initial": 0.05})))
        store = Store(cfg.paths.state_dir / "noded.sqlite3")
        await store.open()
        o = Origins(Node(cfg=cfg, store=store))
        await o.open()
        made.append((o, store))
        return o

    yield make
    for o, store in made:
        await o.stop()
        await store.close()


def known(o: Origins) -> set[str]:
    return {row[0] for row in o.node.store.conn.execute("SELECT key FROM items")}


async def test_hostile_zenodo_entries_rejected_one_by_one(
    aiohttp_server: Any, make_origins: OriginsFactory, tmp_path: Path
) -> None:
    z = ZenodoServer()
    server = await aiohttp_server(z.app())
    base = str(server.make_url("")).rstrip("/")
    files = []
    for key in [*HOSTILE, "good.parquet", "caf\u00e9.csv", "cafe\u0301.csv"]:
        files.append(
            {"key": key, "size": 3, "checksum": "md5:" + "0" * 32, "links": {"self": f"{base}/api/records/1/files/x"}}
        )
    files.append({"key": "badsum.csv", "size": 3, "checksum": "md5:zz", "links": {"self": f"{base}/x"}})
    files.append({"key": "negative.csv", "size": -5, "links": {"self": f"{base}/x"}})
    files.append({"key": "nolink.csv", "size": 5, "links": {}})
    z.records[1] = zenodo_record(base, 1, files)
    o = await make_origins(zenodo={"enabled": True, "base_url": base, "records": [1], "requests_per_minute": 6000})
    with capture_logs() as logs:
        await o.refresh_all()
    assert known(o) == {"good.parquet", "caf\u00e9.csv"}
    rejected = [e for e in logs if e["event"] == "catalog.entry_rejected"]
    assert len(rejected) == len(HOSTILE) + 4  # hostile keys, the NFD duplicate, bad md5, negative size, no link
    assert all(e["origin"] == "zenodo" and e["reason"] for e in rejected)
    assert any("duplicate" in e["reason"] for e in rejected)
    layout = CacheLayout(tmp_path / "cache", tmp_path / "state")
    for key in known(o):
        assert layout.final_path(key).is_relative_to(layout.root)


async def test_malformed_page_is_an_error_for_that_origin_only(
    aiohttp_server: Any, make_origins: OriginsFactory
) -> None:
    s3 = RawS3Server()
    s3.pages[""] = s3_page([("a.bin", 3, "0" * 32), ("b.bin", 4, "1" * 32)], None, "t2")
    s3.pages["t2"] = s3_page([("c.bin", 5, "2" * 32)], "t2", None)
    ia = ArchiveServer()
    s3_server = await aiohttp_server(s3.app())
    ia_server = await aiohttp_server(ia.app())
    ia.items["item"] = ia_metadata("item", [{"name": "ia.bin", "source": "original", "size": "3"}])
    o = await make_origins(
        sourcecoop={"enabled": True, "endpoint": str(s3_server.make_url("")).rstrip("/"), "bucket": "b"},
        ia={"enabled": True, "base_url": str(ia_server.make_url("")).rstrip("/"), "identifiers": ["item"]},
    )
    await o.refresh_all()
    assert known(o) == {"a.bin", "b.bin", "c.bin", "ia.bin"}
    # Page 2 now breaks off mid-document; the IA item breaks too, differently.
    s3.pages["t2"] = b'<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Conte'
    ia.raw["item"] = b'{"files": [{"name": "x", '
    with capture_logs() as logs:
        await o.refresh_all()
    failed = {e["origin"]: e["reason"] for e in logs if e["event"] == "catalog.refresh_failed"}
    assert set(failed) == {"sourcecoop", "ia"}
    assert "malformed" in failed["sourcecoop"] and "malformed JSON" in failed["ia"]
    assert known(o) == {"a.bin", "b.bin", "c.bin", "ia.bin"}  # nothing known was lost
    assert "catalog:sourcecoop" in o.node.problems
    # Once the origin is well again the problem clears.
    s3.pages["t2"] = s3_page([("c.bin", 5, "2" * 32)], "t2", None)
    await o.refresh_all()
    assert "catalog:sourcecoop" not in o.node.problems


async def test_xml_bomb_and_wrong_root_are_refused(aiohttp_server: Any, make_origins: OriginsFactory) -> None:
    s3 = RawS3Server()
    s3.pages[""] = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>&lol2;</Name></ListBucketResult>'
    )
    server = await aiohttp_server(s3.app())
    endpoint = str(server.make_url("")).rstrip("/")
    o = await make_origins(sourcecoop={"enabled": True, "endpoint": endpoint, "bucket": "b"})
    with capture_logs() as logs:
        await o.refresh_all()
    assert [e["origin"] for e in logs if e["event"] == "catalog.refresh_failed"] == ["sourcecoop"]
    s3.pages[""] = b"<Error><Code>AccessDenied</Code></Error>"
    with capture_logs() as logs:
        await o.refresh_all()
    assert "unexpected XML root" in next(e["reason"] for e in logs if e["event"] == "catalog.refresh_failed")
    assert known(o) == set()


async def test_a_million_entries_are_refused_without_losing_known_items(
    aiohttp_server: Any, make_origins: OriginsFactory
) -> None:
    ia = ArchiveServer()
    server = await aiohttp_server(ia.app())
    ia.items["big"] = ia_metadata("big", [{"name": "keep.bin", "source": "original", "size": "1"}])
    base = str(server.make_url("")).rstrip("/")
    o = await make_origins(ia={"enabled": True, "base_url": base, "identifiers": ["big"]})
    await o.refresh_all()
    assert known(o) == {"keep.bin"}
    files = ",".join(f'{{"name":"f{i}","source":"original"}}' for i in range(1_000_000))
    ia.raw["big"] = ('{"files":[' + files + "]}").encode()
    with capture_logs() as logs:
        await o.refresh_all()
    reason = next(e["reason"] for e in logs if e["event"] == "catalog.refresh_failed")
    assert "1000000 files" in reason
    assert known(o) == {"keep.bin"}


async def test_oversized_page_is_refused(aiohttp_server: Any, make_origins: OriginsFactory) -> None:
    z = ZenodoServer()
    server = await aiohttp_server(z.app())
    base = str(server.make_url("")).rstrip("/")
    z.records[1] = zenodo_record(base, 1, [])
    z.raw["/api/records/1"] = json.dumps({"files": [], "pad": "x" * (2 * 1024 * 1024)}).encode()
    o = await make_origins(
        max_page_bytes="1MiB", zenodo={"enabled": True, "base_url": base, "records": [1], "requests_per_minute": 6000}
    )
    with capture_logs() as logs:
        await o.refresh_all()
    assert "exceeds" in next(e["reason"] for e in logs if e["event"] == "catalog.refresh_failed")


def test_nothing_can_be_written_outside_the_cache_root(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache", tmp_path / "state")
    layout.ensure()
    for raw in ["ok/a.bin", "caf\u00e9.csv", "d4c/x y.parquet"]:
        assert layout.final_path(normalise_key(raw)).is_relative_to(layout.root)
    # A symlink planted inside the cache cannot carry a listed key outside it either.
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", layout.root / "link")
    with pytest.raises(UnsafePath):
        layout.final_path(normalise_key("link/passwd"))


async def test_hostile_source_cooperative_keys_are_rejected_alone_and_the_good_ones_mirrored(
    aiohttp_server: Any, make_origins: OriginsFactory
) -> None:
    s3 = RawS3Server()
    files = Origin()
    good = {f"good/{i}.bin": os.urandom(200 + i) for i in range(4)}
    for key, data in good.items():
        files.add(f"/b/{key}", data)
    rows = [(k, len(d), hashlib.md5(d).hexdigest()) for k, d in good.items()]
    bad = ["nul\x00key.bin", "x" * 5000, "../escape.bin", "good/../../up.bin"]
    # The NUL key cannot be written into XML raw: only encoding-type=url lets this page be read at all.
    s3.listings[""] = ([rows[0], (bad[0], 3, "0" * 32), rows[1], (bad[1], 3, "0" * 32)], "t2")
    s3.listings["t2"] = ([(bad[2], 3, "0" * 32), rows[2], (bad[3], 3, "0" * 32), rows[3]], None)
    app = s3.app()
    app.router.add_get("/b/{key:.+}", files.handle)
    server = await aiohttp_server(app)
    o = await make_origins(
        sourcecoop={"enabled": True, "endpoint": str(server.make_url("")).rstrip("/"), "bucket": "b"}
    )
    with capture_logs() as logs:
        await o.refresh_all()
    assert all("encoding-type=url" in p for _, p in s3.log.requests)
    assert o.last_refresh["sourcecoop"]["ok"] and o.last_refresh["sourcecoop"]["pages"] == 2
    rejected = [e for e in logs if e["event"] == "catalog.entry_rejected"]
    assert len(rejected) == len(bad) and all(e["reason"] for e in rejected)
    # Items are keyed by dataset name: the product segment ("good/") is not part of it.
    assert known(o) == {k.split("/", 1)[1] for k in good}
    for path, data in good.items():
        key = path.split("/", 1)[1]
        item = await o.node.store.run(o.node.store.get_current, key)
        assert item is not None
        await o.pull(item)
        assert o.layout.final_path(key).read_bytes() == data


async def test_source_cooperative_owns_only_its_own_prefixes_on_a_shared_base_url(tmp_path: Path) -> None:
    cfg = SourceCoopConfig(enabled=True, endpoint="https://h.example", bucket="", prefixes=["dataforcanada/prod/"])
    sc = SourceCoopAdapter(cfg, None, Limits())  # type: ignore[arg-type]
    assert sc.owns("https://h.example/dataforcanada/prod/a.parquet")
    assert not sc.owns("https://h.example/api/records/1/files/a/content")  # Zenodo on the same base URL
    assert not sc.owns("https://h.example/download/item/a.bin")


async def test_hostile_json_documents_fail_their_origin_only(aiohttp_server: Any, make_origins: OriginsFactory) -> None:
    """JSON nested 100,000 deep, a 10,000-digit number, a lone surrogate: the bounded reader refuses
    each as that origin's error; nothing known is lost."""
    ia = ArchiveServer()
    server = await aiohttp_server(ia.app())
    ia.items["item"] = ia_metadata("item", [{"name": "keep.bin", "source": "original", "size": "1"}])
    o = await make_origins(
        ia={"enabled": True, "base_url": str(server.make_url("")).rstrip("/"), "identifiers": ["item"]}
    )
    await o.refresh_all()
    assert known(o) == {"keep.bin"}
    bodies = {
        "nested": b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "number": b'{"files": [{"name": "x", "source": "original", "size": ' + b"9" * 10_000 + b"}]}",
        "surrogate": b'{"files": [{"name": "x\\udc80", "source": "original"}]}',
    }
    for words, raw in bodies.items():
        ia.raw["item"] = raw
        with capture_logs() as logs:
            await o.refresh_all()
        reason = next(e["reason"] for e in logs if e["event"] == "catalog.refresh_failed")
        assert words in reason, (words, reason)
        assert known(o) == {"keep.bin"}
