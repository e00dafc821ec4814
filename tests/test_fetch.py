"""The HTTP pull engine against a real aiohttp origin with injected faults (server-side logs)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from noded.core.config import FetchConfig
from noded.core.counters import Traffic
from noded.origins.fetch import HostState, HttpClient, state_path
from noded.origins.sources import FetchError, HostWaiting
from tests.origin import Blob, ConnectionCountingProxy, Origin, cancel_when

MiB = 1024 * 1024


def fcfg(**kw: Any) -> FetchConfig:
    base: dict[str, Any] = {
        "segment_size": MiB,
        "segments_per_item": 3,
        "max_connections_per_host": 4,
        "retry_initial": 0.05,
        "retry_max": 0.2,
        "max_attempts": 6,
        "read_timeout": 5,
        "connect_timeout": 5,
        "host_failure_threshold": 50,
    }
    base.update(kw)
    return FetchConfig(**base)


async def serve(aiohttp_server: Any, origin: Origin) -> TestServer:
    return await aiohttp_server(origin.app())


async def pull(server: TestServer, path: str, partial: Path, cfg: FetchConfig | None = None, **kw: Any) -> Any:
    traffic = Traffic()
    client = HttpClient(cfg or fcfg(), traffic)
    await client.start()
    try:
        return await client.download(str(server.make_url(path)), partial, channel="test", **kw), traffic
    finally:
        await client.close()


def check(result: Any, data: bytes) -> None:
    assert result.size == len(data)
    assert result.md5 == hashlib.md5(data).hexdigest()
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    L = 16 * MiB
    assert result.pieces == b"".join(hashlib.sha1(data[i : i + L]).digest() for i in range(0, len(data), L))


async def test_segmented_download_hashes_every_byte_once(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 17)
    origin = Origin()
    origin.add("/d/a.bin", data, rate=20 * MiB)
    server = await serve(aiohttp_server, origin)
    partial = tmp_path / "p" / "1-1"
    result, traffic = await pull(server, "/d/a.bin", partial, expected_size=len(data))
    check(result, data)
    assert partial.read_bytes() == data
    assert not state_path(partial).exists()
    ranges = sorted(e.range for e in origin.log if e.range)
    assert len(ranges) == 6 and all(e.status == 206 for e in origin.log)
    assert origin.sent("/d/a.bin") == len(data)  # no byte served twice
    assert origin.max_in_flight >= 2  # segments really ran in parallel
    assert traffic.totals[("test", "in")].bytes == len(data)
    assert traffic.totals[("test", "in")].requests == 6
    assert all(e.user_agent and "noded" in e.user_agent for e in origin.log)


@pytest.mark.parametrize("fault", ["truncate", "reset"])
async def test_broken_body_resumes_from_the_break(aiohttp_server: Any, tmp_path: Path, fault: str) -> None:
    data = os.urandom(3 * MiB)
    origin = Origin()
    # The request for the segment at 1 MiB breaks after 300 KiB (its retry asks from the break on).
    first_try = f"bytes={MiB}-"
    origin.add(
        "/a", data, fault=lambda b, r, n: f"{fault}:{300 * 1024}" if r.headers["Range"].startswith(first_try) else None
    )
    server = await serve(aiohttp_server, origin)
    result, traffic = await pull(server, "/a", tmp_path / "p", expected_size=len(data))
    check(result, data)
    # The retry starts where the written bytes stopped (a reset may lose what was still in flight).
    starts = [int(e.range[6:].split("-")[0]) for e in origin.log if e.range and e.range.endswith(f"-{2 * MiB - 1}")]
    assert len(starts) == 2 and MiB <= starts[1] <= MiB + 300 * 1024, [e.range for e in origin.log]
    assert origin.sent("/a") - len(data) <= 300 * 1024  # at most the broken tail was served twice
    assert traffic.totals[("test", "in")].errors >= 1


async def test_stalled_read_times_out_and_retries(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "stall:1000" if n == 1 else None)
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/a", tmp_path / "p", cfg=fcfg(read_timeout=0.5), expected_size=len(data))
    check(result, data)
    assert any(e.range == "bytes=1000-1048575" for e in origin.log)


async def test_429_retry_after_is_honoured(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(MiB // 2)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "status:429:2" if n == 1 else None)
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/a", tmp_path / "p")
    check(result, data)
    first, second = origin.log[0], origin.log[1]
    assert first.status == 429 and second.status == 206
    assert second.start - first.start >= 2.0  # measured by the server, not the client


async def test_503_storm_then_recovery(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "status:503" if n <= 4 else None)
    server = await serve(aiohttp_server, origin)
    result, traffic = await pull(server, "/a", tmp_path / "p")
    check(result, data)
    assert [e.status for e in origin.log] == [503, 503, 503, 503, 206]
    assert traffic.totals[("test", "in")].errors == 4


async def test_endless_503_fails_cleanly_and_backs_off_the_host(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    origin.add("/a", os.urandom(MiB), fault=lambda b, r, n: "status:503")
    server = await serve(aiohttp_server, origin)
    cfg = fcfg(max_attempts=4, host_failure_threshold=2, retry_initial=0.1)
    client = HttpClient(cfg, Traffic())
    await client.start()
    try:
        with pytest.raises(FetchError):
            await client.download(str(server.make_url("/a")), tmp_path / "p", channel="test")
        host = client.hosts[f"127.0.0.1:{server.port}"]
        assert host.failures == 4 and host.status()["backoff_seconds"] > 0
    finally:
        await client.close()
    assert len(origin.log) == 4  # max_attempts, no more
    # Host-level backoff: the gaps between attempts grow once the threshold is reached.
    gaps = [b.start - a.start for a, b in zip(origin.log, origin.log[1:], strict=False)]
    assert gaps[-1] >= 0.1


async def test_etag_change_mid_download_restarts_cleanly(aiohttp_server: Any, tmp_path: Path) -> None:
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)

    def swap(blob: Blob, request: Any, n: int) -> None:
        if n == 2:  # the file is replaced upstream while we are in the middle of it
            blob.data, blob.etag = new, '"v2"'
        return None

    origin = Origin()
    origin.add("/a", old, etag='"v1"', last_modified="Thu, 02 Jan 2025 00:00:00 GMT", fault=swap)
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/a", tmp_path / "p", cfg=fcfg(segments_per_item=1))
    check(result, new)  # never a mix of both versions
    assert any(e.if_range == '"v1"' and e.status == 200 for e in origin.log)


async def test_per_host_cap_is_never_exceeded(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    blobs = {f"/f{i}": os.urandom(2 * MiB) for i in range(4)}
    for path, data in blobs.items():
        origin.add(path, data, rate=8 * MiB)
    server = await serve(aiohttp_server, origin)
    proxy = await ConnectionCountingProxy(server.port).start()  # counts TCP connections at the origin side
    client = HttpClient(fcfg(max_connections_per_host=2, segment_size=MiB // 2, segments_per_item=4), Traffic())
    await client.start()
    base = f"http://127.0.0.1:{proxy.port}"
    try:
        results = await asyncio.gather(
            *(client.download(base + p, tmp_path / p.strip("/"), channel="t") for p in blobs)
        )
    finally:
        await client.close()
        await proxy.close()
    for r, data in zip(results, blobs.values(), strict=True):
        check(r, data)
    assert origin.max_in_flight == 2  # requests in flight
    assert proxy.max_open == 2  # and TCP connections open at once
    assert len(origin.log) == 4 * 4  # 4 files of 4 segments each


async def test_resume_after_interruption_reuses_bytes_on_disk(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    origin = Origin()
    blob = origin.add("/a", data, rate=MiB // 2)
    server = await serve(aiohttp_server, origin)
    partial = tmp_path / "p"
    task = asyncio.create_task(pull(server, "/a", partial, cfg=fcfg(segments_per_item=2)))
    await asyncio.sleep(1.6)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state_path(partial).exists()
    served_before = origin.sent("/a")
    assert 0 < served_before < len(data)
    blob.rate = None
    result, _ = await pull(server, "/a", partial, cfg=fcfg(segments_per_item=2))
    check(result, data)
    resumed = [e for e in origin.log[-4:] if e.if_range == blob.etag]
    assert resumed and all(e.status == 206 for e in resumed)
    assert origin.sent("/a") - len(data) < 2 * MiB  # less than 2 segments served twice


async def test_server_without_ranges(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    origin = Origin()
    origin.add("/a", data, ranges=False)
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/a", tmp_path / "p")
    check(result, data)
    assert len(origin.log) == 1 and origin.log[0].status == 200


async def test_missing_file_is_not_retried(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    server = await serve(aiohttp_server, origin)
    with pytest.raises(FetchError) as e:
        await pull(server, "/nope", tmp_path / "p")
    assert not e.value.retryable


async def test_empty_file(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    origin.add("/e", b"")
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/e", tmp_path / "p", expected_size=0)
    check(result, b"")
    assert (tmp_path / "p").read_bytes() == b""


async def test_size_differing_from_the_listing_fails_before_the_transfer(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    origin.add("/a", os.urandom(3 * MiB))
    server = await serve(aiohttp_server, origin)
    with pytest.raises(FetchError, match="listing says"):
        await pull(server, "/a", tmp_path / "p", expected_size=2 * MiB)
    assert origin.sent("/a") <= MiB  # only (part of) the first probe range went over the wire


async def test_retry_after_zero_still_waits_the_minimum_backoff(aiohttp_server: Any, tmp_path: Path) -> None:
    origin = Origin()
    origin.add("/a", os.urandom(MiB), fault=lambda b, r, n: "status:503:0")
    server = await serve(aiohttp_server, origin)
    cfg = fcfg(max_attempts=12, retry_initial=0.1, retry_max=0.1, host_failure_threshold=100)
    with pytest.raises(FetchError):
        await pull(server, "/a", tmp_path / "p", cfg=cfg)
    assert len(origin.log) == 12  # the configured attempts, no more
    gaps = [b.start - a.start for a, b in zip(origin.log, origin.log[1:], strict=False)]
    assert min(gaps) >= 0.1  # measured by the server: Retry-After 0 never means "hammer"
    assert origin.log[-1].start - origin.log[0].start >= 11 * 0.1


async def test_503_storm_with_retry_after_zero_then_recovery(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "status:503:0" if n <= 11 else None)
    server = await serve(aiohttp_server, origin)
    cfg = fcfg(max_attempts=12, retry_initial=0.05, retry_max=0.05)
    result, _ = await pull(server, "/a", tmp_path / "p", cfg=cfg)
    check(result, data)
    assert [e.status for e in origin.log] == [503] * 11 + [206]
    assert origin.log[-1].start - origin.log[0].start >= 11 * 0.05


def test_a_response_started_before_the_storm_does_not_end_the_outage() -> None:
    client = HttpClient(fcfg(host_failure_threshold=2), Traffic())
    h = HostState(sem=asyncio.Semaphore(1), name="h")
    began = time.monotonic()
    client._failed(h, None, "HTTP 503")
    client._failed(h, None, "HTTP 503")
    assert h.failures == 2 and h.waiting() > 0
    h.succeeded(began)  # in flight since before the failures: says nothing about the host now
    assert h.failures == 2
    h.succeeded(time.monotonic())
    assert h.failures == 0


async def test_a_long_retry_after_holds_the_host_and_says_until_when(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(MiB // 2)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "status:429:200" if n == 1 else None)
    server = await serve(aiohttp_server, origin)
    client = HttpClient(fcfg(host_backoff_max_wait=1, max_retry_after=600), Traffic())
    await client.start()
    try:
        before = time.time()
        with pytest.raises(HostWaiting) as err:
            await client.download(str(server.make_url("/a")), tmp_path / "p", channel="test")
        assert before + 199 <= err.value.until <= time.time() + 201
        st = client.hosts[f"127.0.0.1:{server.port}"].status()
        assert st["waiting_until"] >= before + 199 and "Retry-After 200" in st["reason"]
    finally:
        await client.close()
    assert len(origin.log) == 1  # nobody asked again while the host said to wait


async def test_a_retry_after_beyond_the_maximum_fails_this_location_at_once(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    origin = Origin()
    origin.add("/a", os.urandom(1000), fault=lambda b, r, n: "status:503:7200")
    server = await serve(aiohttp_server, origin)
    with pytest.raises(FetchError) as err:
        await pull(server, "/a", tmp_path / "p", cfg=fcfg(max_retry_after=60))
    assert not isinstance(err.value, HostWaiting) and "max_retry_after" in str(err.value)
    assert len(origin.log) == 1


async def test_downloads_never_ask_for_compression(aiohttp_server: Any, tmp_path: Path) -> None:
    data = b"highly compressible " * 50_000
    origin = Origin()
    origin.add("/a", data, gzip_when_asked=True)
    server = await serve(aiohttp_server, origin)
    result, _ = await pull(server, "/a", tmp_path / "p", expected_size=len(data))
    check(result, data)
    assert all(e.accept_encoding == "identity" for e in origin.log)


async def test_a_host_limited_below_the_global_cap_gets_no_more_connections(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    origin = Origin()
    blobs = {f"/f{i}": os.urandom(MiB) for i in range(3)}
    for path, data in blobs.items():
        origin.add(path, data, rate=8 * MiB)
    server = await serve(aiohttp_server, origin)
    proxy = await ConnectionCountingProxy(server.port).start()
    client = HttpClient(fcfg(max_connections_per_host=6, segment_size=MiB // 4, segments_per_item=4), Traffic())
    base = f"http://127.0.0.1:{proxy.port}"
    client.limit_host(base, 2)  # what the Zenodo adapter asks for by default
    await client.start()
    try:
        results = await asyncio.gather(
            *(client.download(base + p, tmp_path / p.strip("/"), channel="t") for p in blobs)
        )
    finally:
        await client.close()
        await proxy.close()
    for r, data in zip(results, blobs.values(), strict=True):
        check(r, data)
    assert origin.max_in_flight == 2 and proxy.max_open <= 2


async def test_a_pull_cancelled_during_a_stall_stops_at_once_and_keeps_its_bytes(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """The body is received by a worker thread blocked in recv: cancelling the pull must abort that
    read (not wait for the read timeout) and record what had arrived."""
    data = os.urandom(2 * MiB)
    origin = Origin()
    origin.add("/a", data, fault=lambda b, r, n: "stall:300000" if n == 1 else None)
    server = await serve(aiohttp_server, origin)
    partial = tmp_path / "p"
    cfg = fcfg(read_timeout=120, segment_size=2 * MiB, segments_per_item=1)
    task = asyncio.create_task(pull(server, "/a", partial, cfg=cfg))
    await cancel_when(task, lambda: bool(origin.log) and origin.log[0].sent >= 300000)
    st = json.loads(state_path(partial).read_bytes())
    assert st["segments"][0]["done"] == 300000
    assert partial.read_bytes()[:300000] == data[:300000]


async def test_servers_that_close_every_connection_and_redirect(aiohttp_server: Any, tmp_path: Path) -> None:
    """`Connection: close` after each response and a relative redirect before the data: the body
    transport opens a new connection each time and follows the redirect for every segment."""
    from aiohttp import web

    data = os.urandom(3 * MiB + 5)
    origin = Origin()
    origin.add("/a", data)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/old":
            raise web.HTTPFound("/a")
        return await origin.handle(request)

    @web.middleware
    async def close_each(request: web.Request, handler: Any) -> web.StreamResponse:
        resp: web.StreamResponse = await handler(request)
        resp.force_close()
        return resp

    app = web.Application(middlewares=[close_each])
    app.router.add_route("GET", "/{tail:.*}", handle)
    server = await aiohttp_server(app)
    result, traffic = await pull(server, "/old", tmp_path / "p", expected_size=len(data))
    check(result, data)
    assert len(origin.log) == 4  # one request per 1 MiB segment, each after its redirect
    assert traffic.totals[("test", "in")].bytes == len(data)


async def test_the_download_bucket_limits_bodies_received_by_threads(aiohttp_server: Any, tmp_path: Path) -> None:
    """The node's `down` bucket is taken for every body byte, by the threads that receive them."""
    import threading

    from noded.origins.schedule import TokenBucket

    class Recording(TokenBucket):
        def __init__(self, rate: int) -> None:
            super().__init__(rate)
            self.taken: dict[str, int] = {}

        def reserve(self, nbytes: int) -> float:
            name = threading.current_thread().name.split("_")[0]
            self.taken[name] = self.taken.get(name, 0) + nbytes
            return super().reserve(nbytes)

    data = os.urandom(3 * MiB)
    origin = Origin()
    origin.add("/a", data)
    server = await serve(aiohttp_server, origin)
    bucket = Recording(4 * MiB)
    client = HttpClient(fcfg(), Traffic(), down=bucket)
    await client.start()
    try:
        result = await client.download(str(server.make_url("/a")), tmp_path / "p", channel="test")
    finally:
        await client.close()
    check(result, data)
    assert bucket.taken == {"fetch-body": len(data)}


async def test_a_chunked_body_without_length_is_received_whole(aiohttp_server: Any, tmp_path: Path) -> None:
    """A server that streams with chunked transfer encoding and no Content-Length (no ranges either)."""
    from aiohttp import web

    data = os.urandom(2 * MiB + 12345)

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 300_000):
            await resp.write(data[i : i + 300_000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/c", handle)
    server = await aiohttp_server(app)
    result, traffic = await pull(server, "/c", tmp_path / "p")
    check(result, data)
    assert traffic.totals[("test", "in")].bytes == len(data)


async def test_body_and_hash_threads_run_below_the_event_loop() -> None:
    """Receiving and hashing yield the CPU to the loop thread (the API's answers), not the reverse."""
    import threading

    from noded.core.hashing import StreamHasher
    from noded.core.priority import BULK_NICE

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    client = HttpClient(fcfg(), Traffic())
    await client.start()
    hasher = StreamHasher()
    try:
        body = await asyncio.wrap_future(client.body_threads.submit(nice))
        md5 = hasher._a.submit(nice).result()
        sha = hasher._b.submit(nice).result()
    finally:
        hasher.close()
        await client.close()
    assert body == md5 == sha == min(19, nice() + BULK_NICE)
    assert nice() == os.getpriority(os.PRIO_PROCESS, 0)  # the loop thread kept the process's priority


async def test_a_pull_cancelled_while_the_host_withholds_the_head_closes_the_connection(aiohttp_server: Any) -> None:
    """A host that accepted the request and never answers: cancelling the pull aborts the thread's
    wait for the head (the socket is shut down) instead of leaving it for the read timeout."""
    from aiohttp import web

    seen: list[web.Request] = []

    async def silent(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/a", silent)
    server = await aiohttp_server(app)
    client = HttpClient(fcfg(read_timeout=120), Traffic())
    await client.start()
    try:
        task = asyncio.create_task(client.download(str(server.make_url("/a")), Path("/nonexistent/p"), channel="t"))
        for _ in range(250):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        transport = seen[0].transport
        for _ in range(250):
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.02)
        assert transport is None or transport.is_closing()  # closed by the client, not 120 s later
    finally:
        await client.close()
