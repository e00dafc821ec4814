"""Hostile input against a real daemon: client bodies and headers, and peers that answer badly.

Every case must end in a clear 4xx (API) or a per-peer problem (sync), never a 500, a traceback in the
log, or a loop that stops for everyone.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import libtorrent as lt
import pytest
from aiohttp import web

from noded.api.app import build_status
from noded.core import component
from noded.core.model import CatalogEntry
from noded.origins.sources import FetchError
from noded.p2p import torrent as T
from noded.p2p.sync import PeerSync
from tests.conftest import NodedProcess, free_port, http_json
from tests.p2p_helpers import make_config, sync_node

TOKEN = "chaos-token-0123456789"


def _post(node: NodedProcess, path: str, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return http_json(node.api + path, method="POST", body=raw, headers=hdrs)


def _report(**extra: Any) -> dict[str, Any]:
    return {"mirror": "toronto", "kind": "unreachable", "detail": "chaos", **extra}


def _no_traceback(node: NodedProcess) -> None:
    events = node.log_events()
    unhandled = [e for e in events if e.get("event") == "api.unhandled" or "exception" in e]
    assert not unhandled, unhandled[:3]
    assert "Traceback" not in node.output()


def test_hostile_request_bodies_get_4xx_and_no_traceback(noded_factory: Any) -> None:
    node = noded_factory(env={"NODED_API_TOKEN": TOKEN}, reports={"per_client_per_hour": 100, "per_hour_total": 100})

    cases: list[tuple[str, bytes, int, str]] = [
        # 20,000 deep fits the 64 KiB body cap: refused for its depth, not its size.
        ("nested deep", b'{"detail": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "nested"),
        ("nested past the body cap", b"[" * 100_000 + b"]" * 100_000, 413, "too large"),
        ("huge integer", json.dumps(_report())[:-1].encode() + b', "n": ' + b"9" * 10_000 + b"}", 400, "number"),
        ("huge float", b'{"mirror": "toronto", "kind": "slow", "detail": 1e999999}', 400, "number"),
        ("NaN", b'{"mirror": "toronto", "kind": "slow", "detail": NaN}', 400, "NaN"),
        ("lone surrogate", b'{"mirror": "toronto", "kind": "slow", "detail": "bad \\ud800 here"}', 400, "surrogate"),
        ("lone surrogate in a key", b'{"\\udfff": 1}', 400, "surrogate"),
        ("not UTF-8", b'{"mirror": "toronto", "kind": "slow", "detail": "\xff\xfe"}', 400, "UTF-8"),
        ("UTF-8 encoded surrogate", b'{"mirror": "toronto", "kind": "slow", "detail": "\xed\xa0\x80"}', 400, "UTF-8"),
        ("truncated", b'{"mirror": "toronto", "kind": ', 400, "malformed"),
    ]
    for name, raw, code, words in cases:
        status, body = _post(node, "/v1/reports", raw)
        assert status == code, (name, status, body)
        assert words in body["error"]["message"], (name, body)

    # The same reader guards the token-protected bodies.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body = http_json(
        node.api + "/v1/schedule", method="PUT", body=b'{"seconds": ' + b"1" * 5000 + b"}", headers=auth
    )
    assert status == 400 and "number" in body["error"]["message"], body

    # An Authorization header that is not UTF-8 (sent as raw bytes) is a refused token, not a crash.
    for value in (b"Bearer \xff\xfe\xfd", b"Bearer \xed\xa0\x80", b"\xc3\x28 \xa0\xa1"):
        conn = http.client.HTTPConnection(node.api.removeprefix("http://"), timeout=10)
        conn.putrequest("POST", "/v1/catalog/refresh")
        conn.putheader("Authorization", value)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        assert resp.status in (401, 403), (value, resp.status, raw)
        assert json.loads(raw)["error"]["status"] == resp.status

    # Other headers that are not UTF-8, on the read endpoints: never a 500.
    for path in ("/v1/inventory", "/v1/status", "/v1/reports", "/v1/items"):
        for header in ("If-None-Match", "Origin", "Range", "Accept", "Content-Type"):
            conn = http.client.HTTPConnection(node.api.removeprefix("http://"), timeout=10)
            conn.putrequest("GET", path)
            conn.putheader(header, b"\xff\xfe \xed\xa0\x80")
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            conn.close()
            assert resp.status < 500, (path, header, resp.status)

    # Nothing was stored from the refused bodies; a good report still goes through.
    status, body = http_json(node.api + "/v1/reports")
    assert status == 200 and body["reports"] == [], body
    status, body = _post(node, "/v1/reports", json.dumps(_report(detail="ok \U0001f600")).encode())
    assert status == 201, body
    _no_traceback(node)
    assert node.proc is not None and node.proc.poll() is None

    # Every background loop of the daemon runs supervised, and none had to restart.
    _, st = http_json(node.api + "/v1/status")
    loops = st["loops"]
    expected = {
        "cache", "watch-events", "watch-tick", "traffic-flush", "loop-lag", "reverify", "schedule",
        "catalog-refresh", "pull-loop", "p2p-updates", "p2p-seed", "p2p-resume", "p2p-targets",
        "lag-monitor", "status-loop",
    }  # fmt: skip
    assert expected <= set(loops), sorted(loops)
    assert all(h["state"] == "running" and h["crashes"] == 0 for h in loops.values()), loops


def _post_from(node: NodedProcess, source: str, report: dict[str, Any]) -> int:
    host, port = node.api.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    conn.request("POST", "/v1/reports", body=json.dumps(report), headers={"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_report_rate_limit_holds_across_addresses(noded_factory: Any) -> None:
    """Per address, and in total: five addresses at two reports each cannot get past a total of five."""
    node = noded_factory(reports={"per_client_per_hour": 2, "per_hour_total": 5})
    got = {src: [_post_from(node, src, _report()) for _ in range(3)] for src in (f"127.0.0.{i}" for i in range(2, 7))}
    accepted = sum(codes.count(201) for codes in got.values())
    assert accepted == 5, got
    assert all(codes.count(201) <= 2 for codes in got.values()), got
    assert got["127.0.0.2"] == [201, 201, 429], got  # the per-address limit first
    assert got["127.0.0.6"] == [429, 429, 429], got  # then the total
    _, body = http_json(node.api + "/v1/reports")
    assert len(body["reports"]) == 5
    _no_traceback(node)


# -- peers that answer badly -------------------------------------------------------------------


def _inv_item(key: str, size: int, n: int) -> dict[str, Any]:
    return {"key": key, "state": "cached", "infohash": f"{n:040x}", "size": size, "md5": None}


class FakePeer:
    """An aiohttp server speaking /v1/inventory the way a peer does, or, by `mode`, the way a hostile one does."""

    def __init__(self, mode: str, items: list[dict[str, Any]] | None = None) -> None:
        self.mode = mode
        self.items = items or []
        self.requests = 0
        self.open = 0  # inventory requests being answered right now
        self.sent_max = 0  # most bytes written in one answer
        self.torrent: bytes = b""
        self.torrent_pause = 0.5  # seconds between the torrent's first 64 KiB and the rest
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakePeer:
        app = web.Application()
        app.router.add_get("/v1/inventory", self.inventory)
        app.router.add_get("/v1/torrents/{name}", self.torrent_file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def inventory(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.open += 1
        try:
            return await self._answer(request)
        finally:
            self.open -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "good":
            return web.json_response({"items": self.items, "next": None})
        if self.mode == "deep":
            return web.Response(body=b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        sent = 0
        try:
            if self.mode == "slow":  # one byte every 20 s, for ever
                while True:
                    await resp.write(b" ")
                    await asyncio.sleep(20)
            # "flood": an inventory page that never ends (200 MiB at most), no Content-Length.
            entry = json.dumps(_inv_item("flood/" + "x" * 200, 1, 1)).encode() + b","
            chunk = entry * (65536 // len(entry))
            await resp.write(b'{"items": [')
            while sent < 200 * 1024 * 1024:
                await resp.write(chunk)
                sent += len(chunk)
                self.sent_max = max(self.sent_max, sent)
        except (ConnectionError, RuntimeError):
            pass  # the daemon hung up: what it read is in sent_max
        return resp

    async def torrent_file(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-bittorrent"})
        resp.content_length = len(self.torrent)
        await resp.prepare(request)
        # The first 64 KiB, a pause, then the rest: a reader that takes what is buffered gets a cut file.
        await resp.write(self.torrent[:65536])
        await asyncio.sleep(self.torrent_pause)
        await resp.write(self.torrent[65536:])
        return resp


async def _status(api: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(api + "/v1/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def _until(what: str, check: Any, api: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = await _status(api)
        if check(st):
            return st
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s; last status {json.dumps(st)[:3000]}")


@pytest.mark.slow
async def test_hostile_peers_are_a_problem_of_their_own(noded_factory: Any) -> None:
    """Peers that answer JSON nested 100,000 deep, an endless page, a byte every 20 s, too many items, or
    items over max_item_size: each is down with its reason, the good peer is polled on regardless and
    only its acceptable items are adopted, and a peer that recovers is up again (its loop still runs)."""
    good_items = [_inv_item("good/a.bin", 1000, 1), _inv_item("good/huge.bin", 2 * 1000**4, 2)]
    peers = {
        "good": FakePeer("good", good_items),
        "deep": FakePeer("deep"),
        "flood": FakePeer("flood"),
        "slow": FakePeer("slow"),
        "many": FakePeer("good", [_inv_item(f"many/{i}.bin", 10, 100 + i) for i in range(6)]),
    }
    for p in peers.values():
        await p.start()
    try:
        node = noded_factory(
            "amsterdam",
            start=False,
            peers=[{"name": n, "api_url": p.api, "bittorrent": f"127.0.0.1:{free_port()}"} for n, p in peers.items()],
            bittorrent={"peer_poll_interval": 0.5, "peer_poll_timeout": 5.0, "peer_stall_timeout": 2.0},
            origins={"max_item_size": "1TB", "max_items_per_origin": 5},
        )
        await asyncio.to_thread(node.start)

        # While the slow peer holds its first answer open, the good one is polled again and again.
        slow, good = peers["slow"], peers["good"]
        deadline = time.monotonic() + 30
        while slow.open == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert slow.open == 1, "the daemon never asked the slow peer"
        first = good.requests
        deadline = time.monotonic() + 60
        while slow.open == 1 and good.requests < first + 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert good.requests >= first + 3, "polling of the good peer waited for the slow one"

        def settled(st: dict[str, Any]) -> bool:
            view = st["components"]["sync"]["peers"]
            return bool(view["good"]["up"]) and all(view[n]["error"] for n in ("deep", "flood", "slow", "many"))

        st = await _until("every hostile peer down with a reason", settled, node.api)
        view = st["components"]["sync"]["peers"]
        assert "nested 100001 deep" in view["deep"]["error"], view
        assert "too large" in view["flood"]["error"], view
        assert "did not finish within 5s" in view["slow"]["error"], view
        assert "larger than 5 items" in view["many"]["error"], view
        assert st["components"]["sync"]["state"] == "running"
        for n in ("deep", "flood", "slow", "many"):
            assert n in st["problems"]["peers"], st["problems"]
        # The endless page was read up to the cap (8 MiB) plus what sockets buffer, not to its end.
        assert 0 < peers["flood"].sent_max < 40 * 1024 * 1024, peers["flood"].sent_max

        # Adoption: the good peer's item within max_item_size only; nothing from the peer with too many.
        _, body = await asyncio.to_thread(http_json, node.api + "/v1/items?limit=1000")
        keys = {i["key"] for i in body["items"]}
        assert "good/a.bin" in keys and "good/huge.bin" not in keys, keys
        assert not any(k.startswith(("many/", "flood/")) for k in keys), keys

        # The peer that sent the deep answer recovers: its loop is still polling it.
        peers["deep"].items = [_inv_item("deep/ok.bin", 10, 9)]
        peers["deep"].mode = "good"
        st = await _until("the recovered peer up", lambda s: s["components"]["sync"]["peers"]["deep"]["up"], node.api)
        assert all(h["crashes"] == 0 for n, h in st["loops"].items() if n.startswith("peer-poll:")), st["loops"]
        assert set(st["loops"]) >= {f"peer-poll:{n}" for n in peers}, st["loops"]
        _no_traceback(node)
    finally:
        for p in peers.values():
            await p.stop()


async def test_crashed_loop_is_shown_then_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault inside the peer-sync loop (here injected in adoption) is counted in status, the sync
    component shows "restarting" (never "running") while the loop waits out its backoff, and the loop
    then resumes and does its work."""
    monkeypatch.setattr(component, "BACKOFF_MIN", 2.0)
    real_adopt = PeerSync._adopt
    faults = 0

    async def adopt_failing_once(self: PeerSync, peer: Any, items: Any) -> None:
        nonlocal faults
        if faults == 0:
            faults += 1
            raise RuntimeError("fault injected in adoption")
        await real_adopt(self, peer, items)

    monkeypatch.setattr(PeerSync, "_adopt", adopt_failing_once)
    peer = await FakePeer("good", [_inv_item("x/a.bin", 10, 1)]).start()
    cfg = make_config(
        tmp_path / "b",
        name="amsterdam",
        peers=[{"name": "toronto", "api_url": peer.api, "bittorrent": f"127.0.0.1:{free_port()}"}],
        bittorrent={"peer_poll_interval": 0.2},
    )
    try:
        async with sync_node(cfg) as b:
            node = b.node
            node.components["sync"] = b.sync
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            restarting: dict[str, Any] = {}
            while time.monotonic() < deadline:
                st = await build_status(node)
                state = st["components"]["sync"]["state"]
                seen.add(state)
                if state == "restarting":
                    restarting = st
                    break
                await asyncio.sleep(0.05)
            assert restarting, seen
            assert restarting["loops"]["peer-poll:toronto"]["crashes"] == 1
            assert "fault injected in adoption" in restarting["problems"]["loop peer-poll:toronto"]
            assert "running" not in {restarting["components"]["sync"]["state"]}

            # After the backoff the loop runs again, and adopts what the first round could not.
            while time.monotonic() < deadline + 30:
                st = await build_status(node)
                if await node.store.run(node.store.get_current, "x/a.bin") is not None:
                    break
                await asyncio.sleep(0.1)
            assert await node.store.run(node.store.get_current, "x/a.bin") is not None, st
            assert st["components"]["sync"]["state"] == "running"
            assert st["loops"]["peer-poll:toronto"]["state"] == "running"
    finally:
        await peer.stop()


async def test_large_torrent_from_peer_is_read_whole(tmp_path: Path) -> None:
    """A torrent for a 200 GB item with 3,000 web seeds (well over what a socket buffers) arrives in two
    parts: it is read whole; one that trickles, or is over the torrent cap, is refused with a clear reason."""
    size = 200 * 1000**3
    piece = 16 * 1024 * 1024
    info = T.single_file_info(
        "big.bin", size, None, os.urandom(20 * T.num_pieces(size, piece)), piece_length=piece, source=None
    )
    data = T.encode_torrent(info, web_seeds=[f"http://127.0.0.1:9/seed{i}/big.bin" for i in range(3000)])
    ih = T.infohash_of(info)
    assert len(data) > 300_000
    peer = FakePeer("good", [{"key": "big.bin", "state": "cached", "infohash": ih, "size": size, "md5": None}])
    peer.torrent = data
    await peer.start()
    cfg = make_config(
        tmp_path / "b",
        name="amsterdam",
        peers=[{"name": "toronto", "api_url": peer.api, "bittorrent": f"127.0.0.1:{free_port()}"}],
        bittorrent={"mirror_peers": False, "peer_poll_timeout": 3.0},
    )
    try:
        async with sync_node(cfg) as b:
            await b.sync.poll_all()
            store = b.node.store
            item, _ = await store.run(store.upsert_entry, CatalogEntry("sourcecoop", "big.bin", (), size, None))
            meta = await b.sync.source._torrent(item, b.sync.holders(item))
            assert meta.infohash == ih and meta.total_size == size and len(meta.web_seeds) == 3000

            # A peer that sends the rest 20 s later holds the pull up only until the deadline.
            peer.torrent_pause = 20
            with pytest.raises(FetchError, match="not received within 3s"):
                await b.sync.source._torrent(item, b.sync.holders(item))

            peer.torrent_pause = 0
            peer.torrent = b"d4:info" + b"x" * (T.MAX_TORRENT_BYTES + 10)
            with pytest.raises(FetchError, match="too large"):
                await b.sync.source._torrent(item, b.sync.holders(item))
    finally:
        await peer.stop()


def test_torrent_with_duplicate_info_keys_is_refused() -> None:
    """noded (a Python dict: the last) and libtorrent (the first) would read different names."""
    pieces = os.urandom(20)
    info = b"d6:lengthi5e4:name5:a.bin4:name5:b.bin12:piece lengthi16384e6:pieces20:" + pieces + b"e"
    data = b"d4:info" + info + b"e"
    assert lt.torrent_info(data).name() == "a.bin"
    assert lt.bdecode(data)[b"info"][b"name"] == b"b.bin"
    with pytest.raises(T.TorrentError, match="twice"):
        T.parse_torrent(data)
    # The same key in two different dictionaries (two files' "length") is fine; twice in one file's is not.
    ok = T.encode_torrent(
        T.multi_file_info("d", [T.FileSpec(("a",), 3), T.FileSpec(("b",), 4)], os.urandom(20), source=None)
    )
    assert T.parse_torrent(ok).total_size == 7
    bad = ok.replace(b"d6:lengthi3e", b"d6:lengthi3e6:lengthi9e", 1)
    with pytest.raises(T.TorrentError, match="length"):
        T.parse_torrent(bad)
