"""R2 as an origin: an empty node lists R2, pulls an item and verifies it (moto over real HTTP)."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout, publish
from noded.core.config import Config
from noded.core.counters import Traffic
from noded.core.model import PIECE_LENGTH, State
from noded.core.store import Store
from noded.origins.sources import FetchError, Source
from noded.r2.client import R2Client, R2Credentials
from noded.r2.source import R2Source, entries_from_listing, list_catalog, normalise_key
from tests.conftest import base_config
from tests.r2_fixtures import (
    ACCESS_KEY,
    BUCKET,
    PREFIX,
    SECRET_KEY,
    CountingMotoServer,
    payload,
    r2_config,
    s3_client,
    s3server,  # noqa: F401 - fixture
)

MiB = 1024**2


def upload(server: CountingMotoServer, key: str, data: bytes, **meta: str) -> None:
    s3_client(server.endpoint).put_object(Bucket=BUCKET, Key=PREFIX + key, Body=data, Metadata=meta)


def sums(data: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def piece_hashes(data: bytes) -> bytes:
    return b"".join(hashlib.sha1(data[i : i + PIECE_LENGTH]).digest() for i in range(0, len(data), PIECE_LENGTH))


class EmptyNode:
    def __init__(self, tmp: Path, server: CountingMotoServer, **r2: Any) -> None:
        self.cfg = Config.model_validate(base_config(tmp, name="amsterdam", r2=r2_config(server.endpoint, **r2)))
        self.store = Store(self.cfg.paths.state_dir / "noded.sqlite3")
        self.layout = CacheLayout(self.cfg.paths.cache_dir, self.cfg.paths.state_dir)
        self.layout.ensure()
        self.traffic = Traffic()
        self.client = R2Client(self.cfg.r2, R2Credentials(ACCESS_KEY, SECRET_KEY), self.traffic)

    async def __aenter__(self) -> EmptyNode:
        await self.store.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.close()
        await self.store.close()


@pytest.mark.parametrize("via", ["s3", "public_url"])
async def test_empty_node_lists_pulls_and_verifies_from_r2(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
    via: str,
) -> None:
    data = payload(20 * MiB + 3, seed=31)  # two torrent pieces, the second short
    small = payload(4000, seed=32)
    upload(s3server, "can/census.parquet", data, **sums(data))
    upload(s3server, "can/readme.txt", small, **sums(small))
    public = None
    if via == "public_url":  # like an R2 bucket with public access: anonymous reads allowed
        public = f"{s3server.endpoint}/{BUCKET}"
        for key in ("can/census.parquet", "can/readme.txt"):
            s3_client(s3server.endpoint).put_object_acl(Bucket=BUCKET, Key=PREFIX + key, ACL="public-read")
    async with EmptyNode(tmp_path, s3server, public_url=public) as node:
        assert await node.store.run(node.store.counts_by_state) == {s.value: 0 for s in State}
        entries = await list_catalog(node.client, max_items=100, max_size=10 * 1024**3, public_url=public)
        by_key = {e.key: e for e in entries}
        assert set(by_key) == {"can/census.parquet", "can/readme.txt"}
        e = by_key["can/census.parquet"]
        assert (e.origin, e.size, e.sha256, e.md5) == ("r2", len(data), sums(data)["sha256"], sums(data)["md5"])
        item, _ = await node.store.run(node.store.upsert_entry, e)

        source = R2Source(node.cfg.r2, node.traffic, node.client if via == "s3" else None)
        assert isinstance(source, Source)
        try:
            assert await source.offers(item)
            await node.store.run(node.store.set_state, item.id, State.FETCHING)
            partial = node.layout.partial_path(item.id, item.version)
            result = await source.fetch(item, partial)
        finally:
            await source.close()
        assert result.size == len(data) and result.sha256 == sums(data)["sha256"] and result.md5 == sums(data)["md5"]
        assert result.pieces == piece_hashes(data)
        final = node.layout.final_path(item.key)
        publish(partial, final)
        await node.store.run(node.store.set_state, item.id, State.CACHED, sha256=result.sha256, md5=result.md5)
        assert final.read_bytes() == data
        assert node.traffic.totals[("r2", "in")].bytes == len(data)


async def test_corrupt_object_is_refused_as_suspect(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    data = payload(300_000, seed=33)
    bad = {"sha256": hashlib.sha256(b"something else").hexdigest()}
    upload(s3server, "bad.bin", data, **bad)
    async with EmptyNode(tmp_path, s3server) as node:
        [entry] = await list_catalog(node.client, max_items=10, max_size=10**9)
        item, _ = await node.store.run(node.store.upsert_entry, entry)
        source = R2Source(node.cfg.r2, node.traffic, node.client)
        try:
            with pytest.raises(FetchError) as ei:
                await source.fetch(item, node.layout.partial_path(item.id, 1))
        finally:
            await source.close()
        assert ei.value.suspect and not ei.value.retryable and "sha256" in str(ei.value)


async def test_other_version_and_missing_object_are_clear_errors(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
) -> None:
    data = payload(1000, seed=34)
    upload(s3server, "v.bin", data, **sums(data))
    async with EmptyNode(tmp_path, s3server) as node:
        [entry] = await list_catalog(node.client, max_items=10, max_size=10**9)
        item, _ = await node.store.run(node.store.upsert_entry, entry)
        other = type(item)(**{**{f: getattr(item, f) for f in item.__slots__}, "sha256": "ab" * 32})
        gone = type(item)(**{**{f: getattr(item, f) for f in item.__slots__}, "key": "nope.bin"})
        source = R2Source(node.cfg.r2, node.traffic, node.client)
        try:
            assert not await source.offers(other)
            with pytest.raises(FetchError, match="another version") as ei:
                await source.fetch(other, node.layout.partial_path(item.id, 1))
            assert not ei.value.suspect
            assert not await source.offers(gone)
            with pytest.raises(FetchError, match="not in R2"):
                await source.fetch(gone, node.layout.partial_path(item.id, 1))
        finally:
            await source.close()


def test_untrusted_listing_keys_are_confined_and_bounded() -> None:
    now = dt.datetime.now(dt.UTC)
    objects = [
        {"Key": PREFIX + "ok/a.parquet", "Size": 10, "ETag": '"' + "a" * 32 + '"', "LastModified": now},
        {"Key": PREFIX + "../etc/passwd", "Size": 1},
        {"Key": PREFIX + "a//b", "Size": 1},
        {"Key": PREFIX + "dir/", "Size": 0},
        {"Key": PREFIX + "x/./y", "Size": 1},
        {"Key": PREFIX + "ctl\x01", "Size": 1},
        {"Key": "other/z", "Size": 1},
        {"Key": PREFIX + "huge", "Size": 10**15},
        {"Key": PREFIX + "neg", "Size": -1},
        {"Key": PREFIX + "multi", "Size": 5, "ETag": '"' + "b" * 32 + '-3"'},
    ]
    entries, skipped = entries_from_listing(objects, prefix=PREFIX, public_url=None, max_items=10, max_size=10**12)
    assert [e.key for e in entries] == ["ok/a.parquet", "multi"]
    assert entries[0].md5 == "a" * 32 and entries[1].md5 is None  # a multipart ETag is not an md5
    assert len(skipped) == 8
    capped, why = entries_from_listing(objects[:1] * 5, prefix=PREFIX, public_url=None, max_items=2, max_size=100)
    assert len(capped) == 2 and "truncated" in why[-1]
    assert normalise_key(PREFIX + "a/b.c", PREFIX) == "a/b.c"
    assert normalise_key(PREFIX + "/abs", PREFIX) is None


async def test_a_broken_r2_body_is_a_clear_error_and_a_cancel_during_a_stall_stops_at_once(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    """R2's bodies are received by a thread: a body cut short fails the fetch with the byte counts,
    and a fetch cancelled while the body stalls aborts the read instead of waiting for its timeout."""
    import asyncio

    from tests.origin import Origin, cancel_when

    data = payload(3 * MiB, seed=35)
    origin = Origin()
    origin.add(f"/{PREFIX}t.bin", data, fault=lambda b, r, n: "truncate:1000000" if n == 1 else "stall:1000000")
    server = await aiohttp_server(origin.app())
    public = str(server.make_url("/")).rstrip("/")
    cfg = Config.model_validate(
        base_config(tmp_path, name="amsterdam", r2=r2_config("http://127.0.0.1:9", public_url=public, read_timeout=120))
    )
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    source = R2Source(cfg.r2, Traffic(), None)
    try:
        [entry], _ = entries_from_listing(
            [{"Key": PREFIX + "t.bin", "Size": len(data)}],
            prefix=PREFIX,
            public_url=public,
            max_items=9,
            max_size=10**9,
        )
        item, _ = await store.run(store.upsert_entry, entry)
        partial = tmp_path / "part"
        with pytest.raises(FetchError, match="sent 1000000 of 3145728"):
            await source.fetch(item, partial)
        task = asyncio.create_task(source.fetch(item, partial))
        await cancel_when(task, lambda: len(origin.log) == 2 and origin.log[1].sent >= 1000000)
    finally:
        await source.close()
        await store.close()
