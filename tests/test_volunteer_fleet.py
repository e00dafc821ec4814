"""A small volunteer fleet on loopback: opentracker, one full seed, four volunteer nodes with real libtorrent
sessions and half the archive each. They spread the pieces between them from what the tracker and their
peers report; after the full seed leaves, a fresh client downloads every item from the volunteers alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from noded.api import items as item_routes
from noded.api import torrents as torrent_routes
from noded.api.app import build_status, create_app
from noded.core.component import Node
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine
from noded.p2p.volunteer import Volunteer
from tests.conftest import free_port
from tests.p2p_helpers import content, make_config, open_node, raw_session
from tests.tracker import opentracker, opentracker_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(opentracker_missing() is not None, reason=str(opentracker_missing())),
]

PL = 64 * 1024
PIECES = [4, 4, 4, 8]  # the last item is larger than the share of any budget
VOLUNTEERS = 4


@dataclass
class Archive:
    dir: Path
    names: list[str]
    data: dict[str, bytes]
    torrents: dict[str, bytes]  # name -> .torrent
    infohash: dict[str, str]

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.data.values())


def make_archive(root: Path, tracker: str | None = None) -> Archive:
    root.mkdir(parents=True, exist_ok=True)
    a = Archive(root, [], {}, {}, {})
    for k, n in enumerate(PIECES):
        name = f"layer-{k}.parquet"
        data = content(n * PL - 100 * k, 50 + k)
        (root / name).write_bytes(data)
        raw, md5s = T.hash_files([root / name], piece_length=PL)
        info = T.single_file_info(name, len(data), md5s[0], raw, piece_length=PL, source="Data for Canada")
        a.names.append(name)
        a.data[name] = data
        a.infohash[name] = T.infohash_of(info)
        a.torrents[name] = T.encode_torrent(info, trackers=[tracker] if tracker else [], web_seeds=[])
    return a


def seed_all(ses: Any, a: Archive) -> None:
    for name in a.names:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(a.torrents[name])
        atp.save_path = str(a.dir)
        atp.flags |= lt.torrent_flags.seed_mode
        ses.add_torrent(atp)


@dataclass
class Vol:
    node: Node
    engine: P2PEngine
    volunteer: Volunteer


@contextlib.asynccontextmanager
async def volunteer_node(tmp: Path, name: str, torrent_files: list[Path], budget: int) -> AsyncIterator[Vol]:
    cfg = make_config(
        tmp / name,
        name=name,
        origins={"torrents": {"files": [str(p) for p in torrent_files]}},
        bittorrent={"listen_interfaces": f"127.0.0.1:{free_port()}"},
        volunteer={
            "enabled": True,
            "budget": budget,
            "interval": 1.0,
            "scrape_interval": 1.0,
            "allow_local_trackers": True,
        },
    )
    node = await open_node(cfg)
    engine = P2PEngine(node)
    await engine.start()
    vol = Volunteer(node, engine)
    await vol.start()
    node.components.update({"p2p": engine, "volunteer": vol})
    try:
        yield Vol(node, engine, vol)
    finally:
        await vol.stop()
        await engine.stop()
        await node.store.close()


async def settled(vols: list[Vol]) -> bool:
    """Every volunteer has all the pieces it chose, and its last round changed nothing."""
    for v in vols:
        sel = v.volunteer.last_selection
        if sel is None or sel.acquire_bytes or sel.release_bytes:
            return False
        for ih, h in v.volunteer.holder.holdings.items():
            if h.want and not h.want <= await v.volunteer.holder.have(ih):
                return False
    return True


def copies_per_piece(vols: list[Vol], a: Archive) -> dict[tuple[str, int], int]:
    out = {(n, i): 0 for n, p in zip(a.names, PIECES, strict=True) for i in range(p)}
    for v in vols:
        for ih, key, pieces in v.volunteer.partial_holdings():
            assert a.infohash[key] == ih
            for i in pieces:
                out[(key, i)] += 1
    return out


def fetch_all(a: Archive, out: Path, timeout: float) -> dict[str, str]:
    """Blocking: a fresh libtorrent client downloads every item through the tracker; name -> md5."""
    ses = raw_session()
    try:
        handles = {}
        for name in a.names:
            atp = lt.add_torrent_params()
            atp.ti = lt.torrent_info(a.torrents[name])
            atp.save_path = str(out)
            handles[name] = ses.add_torrent(atp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(h.status().is_seeding for h in handles.values()):
            time.sleep(0.2)
        done = {}
        for name, h in handles.items():
            if h.status().is_seeding:
                done[name] = hashlib.md5((out / name).read_bytes()).hexdigest()
        return done
    finally:
        ses.pause()
        del ses


async def test_volunteers_keep_every_piece_after_the_full_seed_leaves(tmp_path: Path) -> None:
    probe = make_archive(tmp_path / "probe")  # infohashes do not depend on the tracker list
    with opentracker(probe.infohash.values()) as announce:
        a = make_archive(tmp_path / "seed", announce)
        assert a.infohash == probe.infohash
        tdir = tmp_path / "torrents"
        tdir.mkdir()
        files = []
        for name, tor in a.torrents.items():
            (tdir / f"{name}.torrent").write_bytes(tor)
            files.append(tdir / f"{name}.torrent")
        seeder = raw_session()
        seed_all(seeder, a)
        budget = a.size // 2
        async with contextlib.AsyncExitStack() as stack:
            vols = []
            for n in range(VOLUNTEERS):  # one after another, as volunteers join a real network
                vols.append(await stack.enter_async_context(volunteer_node(tmp_path, f"vol-{n}", files, budget)))
                await asyncio.sleep(1.0)
            deadline = time.monotonic() + 150
            streak = 0
            while streak < 3:
                assert time.monotonic() < deadline, [v.volunteer.status() for v in vols]
                streak = streak + 1 if await settled(vols) else 0
                await asyncio.sleep(1.0)
            copies = copies_per_piece(vols, a)
            for v in vols:
                st = v.volunteer.status()
                assert st["held_bytes"] <= budget
                assert st["crashes"] == 0
            assert min(copies.values()) >= 1, copies

            # Replica accounting is visible on the API (item, status) of a volunteer.
            app = create_app(vols[0].node, [item_routes.setup, torrent_routes.setup])
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                r = await client.get(f"/v1/items/{a.names[3]}")
                assert r.status == 200
                body = await r.json()
                assert body["replicas"]["pieces"]["count"] == PIECES[3]
                assert body["replicas"]["swarm"]["seeders"] is not None
                r = await client.get("/v1/inventory/pieces")
                inv = await r.json()
                assert {e["key"] for e in inv["items"]} <= set(a.names)
                status = await build_status(vols[0].node)
                assert status["replicas"]["items"] == len(PIECES)
                assert status["replicas"]["sentence"].endswith("copies")

            # The full seed leaves; a fresh client gets every item from the volunteers alone.
            seeder.pause()
            del seeder
            got = await asyncio.to_thread(fetch_all, a, tmp_path / "fresh", 120)
            assert sorted(got) == sorted(a.names)
            for name in a.names:
                assert got[name] == hashlib.md5(a.data[name]).hexdigest()
