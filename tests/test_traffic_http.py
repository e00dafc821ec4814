"""HTTP traffic channels count the bytes that really moved, aborted and retried transfers included:
.torrent downloads from the API (curl, and a client leaving midway), origin pulls with broken bodies,
and R2 pushes whose part breaks midway (through a proxy that measures what reached the server)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from noded.api import torrents as torrent_routes
from noded.api.app import ApiServer
from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.config import Config, FetchConfig
from noded.core.counters import Traffic
from noded.core.store import Store
from noded.origins.fetch import HttpClient
from noded.p2p import torrent as T
from noded.r2.push import R2Pusher
from tests.conftest import base_config
from tests.origin import Origin
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync
from tests.r2_fixtures import (
    BUCKET,
    PREFIX,
    CountingMotoServer,
    add_cached_item,
    payload,
    r2_config,
    r2_env,  # noqa: F401 - fixture
    s3_client,
    s3server,  # noqa: F401 - fixture
)

MiB = 1024 * 1024


def kernel_send_buffer_max() -> int:
    """The most a TCP socket may hold unsent (net.ipv4.tcp_wmem's maximum)."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


# -- API: .torrent downloads ----------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Node, str, int]]:
    """A node's API serving the .torrent of a large dataset (8 MiB of piece hashes: a 6.4 TiB file)."""
    cfg = make_config(tmp_path, api={"bind": "127.0.0.1", "port": 0})
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    item = await node.store.run(put_cached_sync, node.store, layout, "big/mosaic.tif", content(1000, 1))
    n_pieces = 8 * MiB // 20
    pieces = hashlib.shake_256(b"pieces").digest(20 * n_pieces)
    info = T.single_file_info("mosaic.tif", n_pieces * 16 * MiB, "0" * 32, pieces, source="Data for Canada")
    ih = T.infohash_of(info)
    data = T.encode_torrent(info)
    layout.torrent_path(ih).write_bytes(data)
    await node.store.run(node.store.update_item, item.id, infohash=ih, seeding=True)
    server = ApiServer(node, [torrent_routes.setup])
    await server.start()
    try:
        yield node, f"http://127.0.0.1:{server.port}/v1/torrents/{ih}.torrent", len(data)
    finally:
        await server.stop()
        await node.store.close()


async def settled(node: Node, channel: str) -> Any:
    """The channel's outgoing counter once the response has finished (counted whole or aborted)."""
    for _ in range(200):
        c = node.traffic.totals.get((channel, "out"))
        if c is not None and c.errors:
            return c
        await asyncio.sleep(0.05)
    raise AssertionError(f"no aborted response counted on {channel}")


async def test_a_torrent_downloaded_whole_by_curl_counts_its_size(api: tuple[Node, str, int], tmp_path: Path) -> None:
    node, url, size = api
    out = tmp_path / "got.torrent"
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "-f", "-o", str(out), url)
    assert await proc.wait() == 0
    assert out.stat().st_size == size
    head = await asyncio.to_thread(subprocess.run, ["curl", "-sS", "-f", "-I", url], capture_output=True, check=True)
    assert f"Content-Length: {size}".lower() in head.stdout.decode().lower()
    await asyncio.sleep(0.3)
    c = node.traffic.totals[("api", "out")]
    # The GET's body, once; the HEAD carries none.
    assert c.bytes == size and c.errors == 0
    assert node.traffic.totals[("api", "in")].requests == 2


async def test_a_client_leaving_midway_is_charged_what_went_out(api: tuple[Node, str, int]) -> None:
    node, url, size = api
    host, port, path = re.fullmatch(r"http://([^:]+):(\d+)(/.*)", url).groups()  # type: ignore[union-attr]
    sock = socket.socket()
    # A small receive window, so the node cannot push the whole body into socket buffers.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = 0
    while got < MiB:
        got += len(await reader.read(1 << 16))
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # the client goes away mid-body (a reset)
    c = await settled(node, "api")
    assert c.errors == 1
    # At least what the client read, less what went out after the last count (a 128 KiB slice and what
    # the transport held then); at most that plus what sat in the two sockets' buffers when it left.
    assert got - 256 * 1024 <= c.bytes <= got + rcvbuf + kernel_send_buffer_max(), (got, c.bytes)
    assert c.bytes < size


# -- origin pulls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ranges", [True, False])
async def test_an_origin_pull_counts_every_byte_received_broken_bodies_included(
    aiohttp_server: Any, tmp_path: Path, ranges: bool
) -> None:
    """A body that breaks midway (the server closes after 700 KiB) counts what arrived: with ranges the
    retry continues from there; without, the pull starts again and the broken attempt still counts."""
    data = os.urandom(3 * MiB)
    origin = Origin()
    broken = 2 if ranges else 1  # the segment after the probe's, or the one whole-body request
    origin.add("/a", data, ranges=ranges, fault=lambda b, r, n: f"truncate:{700 * 1024}" if n == broken else None)
    server: TestServer = await aiohttp_server(origin.app())
    traffic = Traffic()
    cfg = FetchConfig(segment_size=MiB, segments_per_item=1, retry_initial=0.05, retry_max=0.2, max_attempts=6)
    client = HttpClient(cfg, traffic)
    await client.start()
    try:
        result = await client.download(str(server.make_url("/a")), tmp_path / "p", channel="zenodo")
    finally:
        await client.close()
    assert result.md5 == hashlib.md5(data).hexdigest()
    counted = traffic.totals[("zenodo", "in")]
    assert counted.bytes == origin.sent("/a")  # every byte the origin wrote, once
    if ranges:
        assert counted.bytes == len(data)
    else:
        assert counted.bytes == len(data) + 700 * 1024


# -- R2 pushes ------------------------------------------------------------------------------------


class BodyMeter:
    """A TCP proxy in front of the S3 server that reads each request's framing and counts the body bytes
    that reach it. `cut` names a request (a regex on its request line) whose body is cut after `cut_at`
    bytes, the first time: the client's connection is reset as a network failure would."""

    def __init__(self, upstream: tuple[str, int], cut: str, cut_at: int) -> None:
        self.upstream = upstream
        self.cut = re.compile(cut.encode())
        self.cut_at = cut_at
        self.body_bytes = 0
        self.cuts = 0
        self.requests: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._lsock = socket.socket()
        # Small receive buffers (inherited by accepted sockets): little sits unread when a body is cut.
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.setblocking(False)
        self.port = self._lsock.getsockname()[1]

    def start(self) -> None:
        self._spawn(self._accept())

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._lsock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._lsock)
            conn.setblocking(False)
            self._spawn(self._serve(conn))

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket()
        up.setblocking(False)
        try:
            await loop.sock_connect(up, self.upstream)
            back = asyncio.create_task(self._pipe(up, client))
            try:
                await self._requests(client, up)
            finally:
                back.cancel()
                await asyncio.gather(back, return_exceptions=True)
        except OSError:
            pass
        finally:
            client.close()
            up.close()

    async def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(src, 1 << 16):
                await loop.sock_sendall(dst, data)

    async def _requests(self, client: socket.socket, up: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await loop.sock_recv(client, 1 << 16)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n", 1)[0]
            self.requests.append(line)
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            left = int(m.group(1)) if m else 0
            cut = self.cut_at if self.cuts == 0 and self.cut.search(line) else None
            await loop.sock_sendall(up, head + b"\r\n\r\n")
            sent = 0
            while left:
                if not buf:
                    want = min(left, 1 << 16)
                    if cut is not None:
                        want = min(want, cut - sent)
                    buf = await loop.sock_recv(client, want)
                    if not buf:
                        return
                piece, buf = buf[:left], buf[left:]
                if cut is not None:
                    piece, buf = piece[: cut - sent], b""
                self.body_bytes += len(piece)
                sent += len(piece)
                left -= len(piece)
                await loop.sock_sendall(up, piece)
                if cut is not None and sent >= cut:
                    self.cuts += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return


async def test_an_r2_part_broken_midway_counts_what_reached_the_server(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
    r2_env: dict[str, str],  # noqa: F811
) -> None:
    host, port = s3server.get_host_and_port()
    meter = BodyMeter((host, int(port)), r"^PUT \S*partNumber=1\b", cut_at=MiB)
    meter.start()
    r2 = r2_config(f"http://127.0.0.1:{meter.port}", part_size="16MiB")
    cfg = Config.model_validate(base_config(tmp_path, r2=r2))
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    node = Node(cfg=cfg, store=store)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = payload(20 * MiB, 4)  # parts of 16 and 4 MiB
    item = await store.run(add_cached_item, store, layout, "big/dem.tif", data)
    pusher = R2Pusher(node)
    await pusher.start()
    try:
        for _ in range(600):
            row = await store.run(store.get_item, item.id)
            if row is not None and row.pushed:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not pushed: {pusher.status()}")
    finally:
        await pusher.stop()
        await store.close()
        await meter.close()
    assert meter.cuts == 1
    got = s3_client(s3server.endpoint).get_object(Bucket=BUCKET, Key=PREFIX + "big/dem.tif")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    counted = node.traffic.totals[("r2", "out")]
    assert counted.requests == len(meter.requests)
    # The bytes of every request body that reached the server, the cut attempt's first MiB included
    # (counting the cut part whole would be 15 MiB more). Counted is what the connection handed to its
    # socket: at most one 256 KiB block less (not yet confirmed sent), at most what the two sockets
    # still held when the connection was reset more.
    assert meter.body_bytes >= len(data) + MiB
    slack = kernel_send_buffer_max() + 256 * 1024
    assert meter.body_bytes - 256 * 1024 <= counted.bytes <= meter.body_bytes + slack, (counted, meter.body_bytes)
