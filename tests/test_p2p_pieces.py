"""Partial holding with real libtorrent sessions on loopback: a node told to hold half the pieces of an
item downloads only those, keeps only those on disk, seeds them, and another client fetches them from it."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine
from noded.p2p.pieces import PieceHolder, allocated_bytes, holding_path
from tests.p2p_helpers import content, make_config, open_node, raw_session

PL = 64 * 1024
N = 8
DATA = content(N * PL - 1000, 7)  # eight pieces, the last one short


def make_torrent(path: Path) -> tuple[str, bytes]:
    path.write_bytes(DATA)
    raw, md5s = T.hash_files([path], piece_length=PL)
    info = T.single_file_info(path.name, len(DATA), md5s[0], raw, piece_length=PL, source="Data for Canada")
    return T.infohash_of(info), T.encode_torrent(info, trackers=[], web_seeds=[])


def add(ses: Any, torrent: bytes, save: Path, *, seed: bool) -> Any:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(torrent)
    atp.save_path = str(save)
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    return ses.add_torrent(atp)


def have(h: Any) -> frozenset[int]:
    return frozenset(i for i, b in enumerate(h.status(lt.status_flags_t.query_pieces).pieces) if b)


def piece(i: int) -> bytes:
    return DATA[i * PL : (i + 1) * PL]


async def test_half_the_pieces_are_fetched_kept_and_seeded(tmp_path: Path) -> None:
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    ih, tor = make_torrent(seed_dir / "half.parquet")
    seeder = raw_session()
    add(seeder, tor, seed_dir, seed=True)
    seed_port = seeder.listen_port()

    node = await open_node(make_config(tmp_path / "vol", name="vol-1"))
    engine = P2PEngine(node)
    await engine.start()
    holder = PieceHolder(engine.session, engine.layout)
    want = frozenset({1, 2, 5, 7})  # half, including the short last piece
    try:
        await holder.hold(ih, tor, want)
        deadline = time.monotonic() + 60
        while await holder.have(ih) != want:
            assert time.monotonic() < deadline, f"holds {sorted(await holder.have(ih))}"
            engine.session.connect_peer(ih, "127.0.0.1", seed_port)
            await asyncio.sleep(0.3)
        h = engine.session.handles[ih]
        st = await asyncio.to_thread(h.status)
        held_bytes = 3 * PL + (len(DATA) - 7 * PL)
        assert st.total_wanted == st.total_wanted_done == held_bytes
        assert not st.is_seeding  # it does not have (nor want) the whole item
        # Only the held pieces take space on disk: the file is sparse.
        path = holding_path(engine.layout, ih)
        assert held_bytes <= allocated_bytes(path) <= held_bytes + 2 * 4096
        assert st.total_payload_download <= held_bytes + PL  # at most one piece's worth of overhead
        with path.open("rb") as f:
            for i in want:
                f.seek(i * PL)
                assert f.read(PL) == piece(i)

        # The full seed leaves; a fresh client gets the held pieces from the volunteer alone.
        seeder.pause()
        del seeder
        port = engine.session.listen_port
        assert port
        other = raw_session()
        got_dir = tmp_path / "other"
        got_dir.mkdir()
        hc = add(other, tor, got_dir, seed=False)
        deadline = time.monotonic() + 60
        while (got := await asyncio.to_thread(have, hc)) != want:
            assert got <= want, "the client got a piece the volunteer does not hold"
            assert time.monotonic() < deadline, f"client holds {sorted(got)}"
            hc.connect_peer(("127.0.0.1", port))
            await asyncio.sleep(0.3)
        with (got_dir / "half.parquet").open("rb") as f:
            for i in want:
                f.seek(i * PL)
                assert hashlib.md5(f.read(PL)).digest() == hashlib.md5(piece(i)).digest()
        # The volunteer sees the client's pieces in its availability, and uploaded what it held.
        avail = await holder.availability(ih)
        assert avail is not None and len(avail) == N
        st = await asyncio.to_thread(h.status)
        assert st.total_payload_upload >= held_bytes
        other.pause()
        del other

        # Dropping pieces gives their blocks back and they are no longer had (nor offered to peers).
        await holder.hold(ih, tor, frozenset({1, 2}))
        assert holder.inventory() == {ih: [1, 2]}
        assert await holder.have(ih) == {1, 2}
        assert 2 * PL <= allocated_bytes(path) <= 2 * PL + 2 * 4096
        with path.open("rb") as f:
            f.seek(PL)
            assert f.read(2 * PL) == DATA[PL : 3 * PL]
        # Adding one back downloads it again (from a seed that returns).
        seeder2 = raw_session()
        add(seeder2, tor, seed_dir, seed=True)
        await holder.hold(ih, tor, frozenset({1, 2, 5}))
        deadline = time.monotonic() + 60
        while await holder.have(ih) != {1, 2, 5}:
            assert time.monotonic() < deadline
            engine.session.connect_peer(ih, "127.0.0.1", seeder2.listen_port())
            await asyncio.sleep(0.3)
        seeder2.pause()
        del seeder2
        assert await holder.release(ih)
        assert not path.exists() and ih not in engine.session.handles
    finally:
        await engine.stop()
        await node.store.close()
