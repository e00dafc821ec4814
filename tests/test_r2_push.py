"""The R2 pusher in-process against moto's S3 server over real HTTP, with a real SQLite store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.config import Config
from noded.core.model import Item, State
from noded.core.store import Store
from noded.origins.schedule import TokenBucket
from noded.r2.push import R2Pusher, backoff_delay, needs_rehash, record_upload
from tests.conftest import base_config
from tests.r2_fixtures import (
    BUCKET,
    PREFIX,
    CountingMotoServer,
    Request,
    add_cached_item,
    payload,
    r2_config,
    r2_env,  # noqa: F401 - fixture
    s3_client,
    s3server,  # noqa: F401 - fixture
)

MiB = 1024**2

Factory = Callable[..., "asyncio.Future[tuple[Node, R2Pusher]]"]


class Env:
    def __init__(self, tmp: Path, server: CountingMotoServer) -> None:
        self.tmp = tmp
        self.server = server
        self.s3 = s3_client(server.endpoint)
        self.store: Store | None = None
        self.pushers: list[R2Pusher] = []

    async def node(self, **r2: Any) -> Node:
        cfg = Config.model_validate(base_config(self.tmp, r2=r2_config(self.server.endpoint, **r2)))
        if self.store is None:
            self.store = Store(cfg.paths.state_dir / "noded.sqlite3")
            await self.store.open()
        self.layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
        return Node(cfg=cfg, store=self.store)

    async def add(self, key: str, data: bytes, **kw: Any) -> Item:
        assert self.store is not None
        return await self.store.run(add_cached_item, self.store, self.layout, key, data, **kw)

    async def pusher(self, node: Node, up: TokenBucket | None = None) -> R2Pusher:
        p = R2Pusher(node, up=up)
        self.pushers.append(p)
        await p.start()
        return p

    async def item(self, item_id: int) -> Item:
        assert self.store is not None
        it = await self.store.run(self.store.get_item, item_id)
        assert it is not None
        return it

    async def until(self, pred: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            v = pred()
            if asyncio.iscoroutine(v):
                v = await v
            if v:
                return v
            await asyncio.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}")

    async def pushed(self, *items: Item, timeout: float = 30) -> None:
        async def all_pushed() -> bool:
            return all([(await self.item(i.id)).pushed for i in items])

        await self.until(all_pushed, timeout, "items pushed")

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        r = self.s3.get_object(Bucket=BUCKET, Key=PREFIX + key)
        return r["Body"].read(), r["Metadata"]


@pytest.fixture
async def env(tmp_path: Path, s3server: CountingMotoServer, r2_env: dict[str, str]) -> AsyncIterator[Env]:  # noqa: F811
    e = Env(tmp_path, s3server)
    try:
        yield e
    finally:
        for p in e.pushers:
            await p.stop()
        if e.store is not None:
            await e.store.close()


def lengths(reqs: list[Request]) -> list[int]:
    return [r.length for r in sorted(reqs, key=lambda r: int(r.query["partNumber"][0]))]


async def test_small_and_multipart_uploads_land_with_bytes_and_metadata(env: Env) -> None:
    node = await env.node()
    small = payload(1 * MiB + 17, seed=1)
    big = payload(3 * 5 * MiB + 123, seed=2)
    a = await env.add("can/small.parquet", small)
    b = await env.add("can/big.pmtiles", big)
    p = await env.pusher(node)
    await env.pushed(a, b)

    for key, data in (("can/small.parquet", small), ("can/big.pmtiles", big)):
        got, meta = env.get(key)
        assert got == data
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    srv = env.server.counting
    assert [r.path for r in srv.ops("PutObject")] == [f"/{BUCKET}/{PREFIX}can/small.parquet"]
    # Equal parts of 5 MiB, the remainder last.
    assert lengths(srv.ops("UploadPart")) == [5 * MiB, 5 * MiB, 5 * MiB, 123]
    assert len(srv.ops("CompleteMultipartUpload")) == 1
    assert env.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX).get("Uploads", []) == []
    st = p.status()
    assert st["pushed"] == 2 and st["in_use"] == [] and st["bytes_uploaded"] == len(small) + len(big)
    assert node.traffic.totals[("r2", "out")].bytes >= len(small) + len(big)
    assert (await env.item(a.id)).error is None
    assert "r2" not in node.problems


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def completed_crcs(req: Request) -> dict[int, str]:
    """Part number -> ChecksumCRC32 named in a CompleteMultipartUpload body."""
    parts = re.findall(rb"<Part>(.*?)</Part>", req.body, re.S)
    out = {}
    for p in parts:
        n = int(re.search(rb"<PartNumber>(\d+)</PartNumber>", p).group(1))  # type: ignore[union-attr]
        crc = re.search(rb"<ChecksumCRC32>([^<]*)</ChecksumCRC32>", p)
        out[n] = crc.group(1).decode() if crc else ""
    return out


async def test_every_part_carries_its_crc32_header_and_the_completion_names_them(env: Env) -> None:
    node = await env.node()
    data = payload(3 * 5 * MiB + 123, seed=31)
    it = await env.add("crc/big.pmtiles", data)
    await env.pusher(node)
    await env.pushed(it)
    srv = env.server.counting
    [create] = srv.ops("CreateMultipartUpload")
    assert create.headers.get("x-amz-checksum-algorithm") == "CRC32"
    sent = {}
    for r in srv.ops("UploadPart"):
        n = int(r.query["partNumber"][0])
        # A header over the signed body, never botocore's aws-chunked trailer (R2 refuses that).
        assert "x-amz-trailer" not in r.headers and "aws-chunked" not in r.headers.get("content-encoding", "")
        sent[n] = r.headers["x-amz-checksum-crc32"]
    want = {n: crc32_b64(data[(n - 1) * 5 * MiB : n * 5 * MiB]) for n in (1, 2, 3, 4)}
    assert sent == want
    [complete] = srv.ops("CompleteMultipartUpload")
    assert completed_crcs(complete) == want
    assert env.get("crc/big.pmtiles")[0] == data


async def test_uploads_keep_to_the_timetables_up_rate_measured_at_the_server(env: Env) -> None:
    node = await env.node()
    data = payload(3 * 5 * MiB, seed=35)
    it = await env.add("slow/up.bin", data)
    await env.pusher(node, up=TokenBucket(5 * MiB))  # 15 MiB at 5 MiB/s: the last part after ~3 s
    await env.pushed(it)
    starts = sorted(r.start for r in env.server.counting.ops("UploadPart"))
    assert len(starts) == 3
    # A lower bound only: a loaded machine can make it slower, never faster than the limit allows.
    assert starts[-1] - starts[0] >= 1.5
    assert env.get("slow/up.bin")[0] == data


async def test_part_checksums_can_be_turned_off_for_stores_that_refuse_them(env: Env) -> None:
    node = await env.node(part_checksum="none")
    data = payload(2 * 5 * MiB + 1, seed=32)
    it = await env.add("nocrc.bin", data)
    await env.pusher(node)
    await env.pushed(it)
    srv = env.server.counting
    for r in srv.ops("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
        assert not any(h.startswith("x-amz-checksum") for h in r.headers), r.headers
    [complete] = srv.ops("CompleteMultipartUpload")
    assert completed_crcs(complete) == {1: "", 2: "", 3: ""}
    assert env.get("nocrc.bin")[0] == data


async def test_parts_grow_with_the_file_and_stay_equal(env: Env) -> None:
    node = await env.node(part_size="6MiB", multipart_threshold="8MiB")
    data = payload(20 * MiB, seed=3)
    it = await env.add("x/y.tif", data)
    await env.pusher(node)
    await env.pushed(it)
    assert lengths(env.server.counting.ops("UploadPart")) == [6 * MiB, 6 * MiB, 6 * MiB, 2 * MiB]
    assert env.get("x/y.tif")[0] == data


async def test_pushing_an_unchanged_item_again_sends_no_put(env: Env) -> None:
    node = await env.node()
    a = await env.add("a.bin", payload(100_000, seed=4))
    b = await env.add("b.bin", payload(11 * MiB, seed=5))
    p1 = await env.pusher(node)
    await env.pushed(a, b)
    await p1.stop()
    assert env.store is not None
    for it in (a, b):  # e.g. a store restored from backup: the node does not know they are in R2
        await env.store.run(env.store.update_item, it.id, pushed=False)
    env.server.counting.clear()

    p2 = await env.pusher(await env.node())
    await env.pushed(a, b)
    srv = env.server.counting
    assert srv.ops("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload") == []
    assert len(srv.ops("HeadObject")) == 2
    assert p2.status()["skipped_identical"] == 2 and p2.status()["pushed"] == 0


async def test_create_only_never_overwrites_an_object_written_elsewhere(env: Env) -> None:
    foreign = b"written by another tool"
    env.s3.put_object(Bucket=BUCKET, Key=PREFIX + "taken.csv", Body=foreign, Metadata={"sha256": "0" * 64})
    node = await env.node(create_only=True)
    taken = await env.add("taken.csv", payload(5000, seed=6))
    free = await env.add("free.csv", payload(6000, seed=7))
    env.server.counting.clear()
    await env.pusher(node)
    await env.pushed(free)
    await env.until(lambda: env.item(taken.id), what="taken row")

    async def has_error() -> bool:
        return (await env.item(taken.id)).error is not None

    await env.until(has_error, what="error on the conflicting item")
    row = await env.item(taken.id)
    assert not row.pushed and "create_only" in (row.error or "")
    assert env.get("taken.csv")[0] == foreign
    assert [r.path for r in env.server.counting.ops("PutObject")] == [f"/{BUCKET}/{PREFIX}free.csv"]


async def test_overwrites_a_different_object_without_create_only(env: Env) -> None:
    env.s3.put_object(Bucket=BUCKET, Key=PREFIX + "stale.csv", Body=b"old", Metadata={"sha256": "1" * 64})
    node = await env.node()
    data = payload(7000, seed=8)
    it = await env.add("stale.csv", data)
    await env.pusher(node)
    await env.pushed(it)
    assert env.get("stale.csv")[0] == data


async def test_overloaded_r2_backs_off_reports_and_recovers(env: Env) -> None:
    node = await env.node(retry_initial=0.1, retry_max=1.0)
    it = await env.add("busy.gpkg", payload(2000, seed=9))
    failures = {"left": 3}

    def slow_down(req: Request) -> tuple[int, str] | None:
        if req.op == "PutObject" and failures["left"] > 0:
            failures["left"] -= 1
            return (503, "SlowDown")
        return None

    env.server.counting.rules.append(slow_down)
    seen: list[str] = []

    async def watch() -> None:
        while True:
            if "r2" in node.problems:
                seen.append(node.problems["r2"])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    p = await env.pusher(node)
    await env.pushed(it)
    watcher.cancel()
    assert any("503" in s and "SlowDown" in s for s in seen), seen
    # Cleared once the pass that pushed it ends (the item is marked pushed a moment before).
    async with asyncio.timeout(10):
        while "r2" in node.problems:
            await asyncio.sleep(0.01)
    assert len(env.server.counting.ops("PutObject")) == 4
    assert p.status()["attempt"] == 0
    assert node.traffic.totals[("r2", "out")].errors >= 3


async def test_startup_aborts_our_leftover_uploads_but_not_a_peers_running_one(env: Env) -> None:
    # moto reports every upload as initiated in 2010: without the age rule only our records count.
    node = await env.node(stale_upload_age=0)
    assert env.store is not None
    ours = env.s3.create_multipart_upload(Bucket=BUCKET, Key=PREFIX + "ours.bin")["UploadId"]
    theirs = env.s3.create_multipart_upload(Bucket=BUCKET, Key=PREFIX + "theirs.bin")["UploadId"]
    outside = env.s3.create_multipart_upload(Bucket=BUCKET, Key="elsewhere/x.bin")["UploadId"]
    await env.store.run(record_upload, env.store, ours, 99, PREFIX + "ours.bin")
    p = await env.pusher(node)
    await env.until(lambda: p.status()["state"] == "idle", what="first pass")
    left = {u["UploadId"] for u in env.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])}
    assert left == {theirs, outside}
    assert p.status()["aborted_uploads"] == 1


async def test_a_recorded_upload_resumes_with_only_the_missing_parts(env: Env) -> None:
    node = await env.node()
    assert env.store is not None
    data = payload(3 * 5 * MiB + 7, seed=18)
    it = await env.add("resume.bin", data)
    okey = PREFIX + "resume.bin"
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    uid = env.s3.create_multipart_upload(Bucket=BUCKET, Key=okey, Metadata=meta)["UploadId"]
    for n in (1, 3):  # what a killed run left behind
        env.s3.upload_part(
            Bucket=BUCKET, Key=okey, UploadId=uid, PartNumber=n, Body=data[(n - 1) * 5 * MiB : n * 5 * MiB]
        )
    await env.store.run(record_upload, env.store, uid, it.id, okey)
    env.server.counting.clear()
    await env.pusher(node)
    await env.pushed(it)
    srv = env.server.counting
    assert sorted(int(r.query["partNumber"][0]) for r in srv.ops("UploadPart")) == [2, 4]
    assert srv.ops("CreateMultipartUpload", "AbortMultipartUpload") == []
    # ListParts (moto's) reported no checksums for parts 1 and 3: the pusher computed them from its copy.
    [complete] = srv.ops("CompleteMultipartUpload")
    assert completed_crcs(complete) == {n: crc32_b64(data[(n - 1) * 5 * MiB : n * 5 * MiB]) for n in (1, 2, 3, 4)}
    assert env.get("resume.bin")[0] == data
    assert env.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX).get("Uploads", []) == []


async def test_a_recorded_upload_cut_differently_is_aborted_and_restarted(env: Env) -> None:
    node = await env.node()
    assert env.store is not None
    data = payload(3 * 5 * MiB + 7, seed=19)
    it = await env.add("recut.bin", data)
    okey = PREFIX + "recut.bin"
    uid = env.s3.create_multipart_upload(Bucket=BUCKET, Key=okey)["UploadId"]
    env.s3.upload_part(Bucket=BUCKET, Key=okey, UploadId=uid, PartNumber=1, Body=data[: 6 * MiB])  # 6, not 5 MiB
    await env.store.run(record_upload, env.store, uid, it.id, okey)
    await env.pusher(node)
    await env.pushed(it)
    assert len(env.server.counting.ops("AbortMultipartUpload")) == 1
    assert env.get("recut.bin")[0] == data
    assert env.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX).get("Uploads", []) == []


async def test_startup_aborts_stale_uploads_under_the_prefix_whoever_started_them(env: Env) -> None:
    node = await env.node(stale_upload_age=86400)
    old = env.s3.create_multipart_upload(Bucket=BUCKET, Key=PREFIX + "old.bin")["UploadId"]
    outside = env.s3.create_multipart_upload(Bucket=BUCKET, Key="elsewhere/x.bin")["UploadId"]
    p = await env.pusher(node)
    await env.until(lambda: p.status()["state"] == "idle", what="first pass")
    left = {u["UploadId"] for u in env.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])}
    assert old not in left and left == {outside}


async def test_parts_in_flight_are_bounded_by_count_and_bytes(env: Env) -> None:
    env.server.counting.rules.append(lambda r: 0.15 if r.op == "UploadPart" else None)
    node = await env.node(max_concurrency=4, max_buffer_bytes="10MiB")  # 2 parts of 5 MiB fit
    it = await env.add("wide.bin", payload(40 * MiB, seed=13))
    p1 = await env.pusher(node)
    await env.pushed(it)
    await p1.stop()
    assert env.server.counting.max_overlap("UploadPart") == 2
    env.server.counting.clear()
    node = await env.node(max_concurrency=3, max_buffer_bytes="1GiB")
    it2 = await env.add("wide2.bin", payload(40 * MiB, seed=14))
    await env.pusher(node)
    await env.pushed(it2)
    assert env.server.counting.max_overlap("UploadPart") == 3


async def test_items_being_read_are_marked_in_use(env: Env) -> None:
    node = await env.node(max_concurrency=1)
    it = await env.add("slow.bin", payload(12 * MiB, seed=10))
    env.server.counting.rules.append(lambda r: 0.3 if r.op == "UploadPart" else None)
    p = await env.pusher(node)
    await env.until(lambda: env.server.counting.ops("UploadPart"), what="first part")
    assert it.id in p.in_use and p.status()["in_use"] == [it.id]
    await env.pushed(it)
    await env.until(lambda: not p.in_use, what="in_use cleared")


def flip_byte(path: Path, offset: int, *, keep_mtime: bool) -> None:
    """One flipped byte, same size; with keep_mtime the change is silent (bit rot, not a write)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("size", [50_000, 12 * MiB], ids=["single", "multipart"])
@pytest.mark.parametrize(
    ("verified_ago", "keep_mtime"),
    [(None, True), (2 * 3600.0, True), (0.0, False)],
    ids=["never-verified", "silent-rot-verified-2h-ago", "written-after-recent-verification"],
)
async def test_bit_rot_after_verification_never_reaches_r2(
    env: Env, size: int, verified_ago: float | None, keep_mtime: bool
) -> None:
    node = await env.node()  # rehash_after: 1 h
    data = payload(size, seed=15)
    verified_at = None if verified_ago is None else time.time() - verified_ago
    it = await env.add("rotten.bin", data, verified_at=verified_at)
    flip_byte(env.layout.final_path("rotten.bin"), size - 10, keep_mtime=keep_mtime)

    async def has_error() -> bool:
        return (await env.item(it.id)).error is not None

    await env.pusher(node)
    await env.until(has_error, what="error on the rotten item")
    row = await env.item(it.id)
    assert not row.pushed and "sha256" in (row.error or "")
    assert env.s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("KeyCount") == 0
    assert env.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX).get("Uploads", []) == []
    assert env.server.counting.ops("CompleteMultipartUpload") == []


@pytest.mark.parametrize("rehash_after", [3600.0, 0.0], ids=["trusted", "always-rehash"])
async def test_a_copy_verified_moments_ago_is_not_read_a_second_time(env: Env, rehash_after: float) -> None:
    node = await env.node(rehash_after=rehash_after)
    small, big = payload(50_000, seed=33), payload(12 * MiB, seed=34)
    a = await env.add("fresh/small.bin", small, verified_at=time.time())
    b = await env.add("fresh/big.bin", big, verified_at=time.time())
    p = await env.pusher(node)
    await env.pushed(a, b)
    assert env.get("fresh/small.bin")[0] == small and env.get("fresh/big.bin")[0] == big
    assert p.status()["bytes_rehashed"] == (0 if rehash_after else len(small) + len(big))


def test_needs_rehash_policy() -> None:
    def item(verified_at: float | None, mtime_ns: int | None) -> Item:
        return Item(1, "k", 1, "inbox", State.CACHED, 10, None, None, "a" * 64, None, [], None, False, False,
                    False, 0.0, 4096, mtime_ns, None, 0.0, 0.0, verified_at)  # fmt: skip

    now = 1_000_000.0
    assert not needs_rehash(item(now - 5, 7), 7, now, 3600)  # just pulled, untouched
    assert needs_rehash(item(now - 5, 7), 8, now, 3600)  # written since
    assert needs_rehash(item(now - 3601, 7), 7, now, 3600)  # verified too long ago
    assert needs_rehash(item(None, 7), 7, now, 3600)  # never verified by this node
    assert needs_rehash(item(now - 5, None), 7, now, 3600)  # mtime never recorded
    assert needs_rehash(item(now - 5, 7), 7, now, 0)  # 0: always
    assert needs_rehash(item(now + 60, 7), 7, now, 3600)  # verified "in the future": clock jumped back


async def test_a_vanished_file_is_an_item_error_not_an_outage(env: Env) -> None:
    node = await env.node()
    gone = await env.add("gone.bin", payload(1000, seed=16))
    fine = await env.add("fine.bin", payload(1000, seed=17))
    env.layout.final_path("gone.bin").unlink()

    async def has_error() -> bool:
        return (await env.item(gone.id)).error is not None

    await env.pusher(node)
    await env.pushed(fine)
    await env.until(has_error, what="error on the vanished item")
    assert "cannot be read" in ((await env.item(gone.id)).error or "")
    assert "r2" not in node.problems


async def test_an_upload_counts_as_pushed_only_after_a_confirming_head(env: Env) -> None:
    node = await env.node()
    it = await env.add("unconfirmed.bin", payload(3000, seed=12))
    env.server.counting.rules.append(lambda r: (404, "NoSuchKey") if r.op == "HeadObject" else None)

    async def has_error() -> bool:
        return (await env.item(it.id)).error is not None

    await env.pusher(node)
    await env.until(has_error, what="error on the unconfirmed item")
    row = await env.item(it.id)
    assert len(env.server.counting.ops("PutObject")) == 1  # the bytes went up...
    assert not row.pushed and "HEAD after the upload" in (row.error or "")  # ...but nothing confirmed them


def test_backoff_doubles_with_jitter_and_caps() -> None:
    lows = [backoff_delay(n, 2.0, 300.0, rnd=0.0) for n in range(12)]
    highs = [backoff_delay(n, 2.0, 300.0, rnd=1.0) for n in range(12)]
    assert lows[:4] == pytest.approx([1.8, 3.6, 7.2, 14.4])
    assert all(b > a for a, b in zip(highs[:6], lows[1:7], strict=True))  # grows despite jitter
    assert max(highs) == 300.0
