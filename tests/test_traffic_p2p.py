"""BitTorrent payload accounting against a second libtorrent session over loopback: every byte the
other side received is counted once, in the right channel, and the channels add up to the session's
payload counters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.config import Config
from noded.core.counters import Traffic
from noded.core.model import Item
from noded.p2p.engine import P2PEngine
from noded.p2p.ledger import SETTLE_AFTER, UNATTRIBUTED
from noded.transparency.traffic import TrafficRecorder
from tests.conftest import free_port
from tests.p2p_helpers import content, make_config, open_node, put_cached_sync
from tests.traffic_helpers import BLOCK, Client

MiB = 1024 * 1024


@dataclass
class Seeder:
    node: Node
    layout: CacheLayout
    engine: P2PEngine
    recorder: TrafficRecorder
    item: Item
    infohash: str
    torrent: bytes
    before: dict[str, int]  # bytes counted per direction before this engine started (an earlier run)

    @property
    def endpoint(self) -> tuple[str, int]:
        port = self.engine.session.listen_port
        assert port
        return ("127.0.0.1", port)


async def start_seeder(cfg: Config, data: bytes | None, node: Node | None = None) -> Seeder:
    """A node seeding one cached item (put in place when `data` is given), with its traffic recorder."""
    if node is None:
        node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    if data is not None:
        await node.store.run(put_cached_sync, node.store, layout, "layers/t.pmtiles", data)
    recorder = TrafficRecorder(node)
    await recorder.start()
    engine = P2PEngine(node, layout)
    await engine.start()
    await engine.seed_pending()
    item = (await node.store.run(node.store.items))[0]
    assert item.infohash and item.seeding
    torrent = layout.torrent_path(item.infohash).read_bytes()
    before = {d: sum(counted(node.traffic, d).values()) for d in ("out", "in")}
    return Seeder(node, layout, engine, recorder, item, item.infohash, torrent, before)


async def stop_seeder(s: Seeder) -> None:
    await s.engine.stop()
    await s.recorder.stop()


@contextlib.asynccontextmanager
async def seeding(cfg: Config, data: bytes) -> AsyncIterator[Seeder]:
    s = await start_seeder(cfg, data)
    try:
        yield s
    finally:
        await stop_seeder(s)
        await s.node.store.close()


def counted(traffic: Traffic, direction: str) -> dict[str, int]:
    return {ch: c.bytes for (ch, d), c in traffic.totals.items() if d == direction and c.bytes}


async def reconciled(s: Seeder) -> None:
    """Once the transfers are over, the channels add up exactly to the session's payload counters."""
    await s.engine.account_now()
    await asyncio.sleep(SETTLE_AFTER)  # libtorrent folds connection bytes into torrents on a 1 s tick
    await s.engine.account_now()
    await asyncio.sleep(SETTLE_AFTER)
    await s.engine.account_now()
    counters = await s.engine.session.payload_counters()
    assert counters is not None
    ledger = s.engine.ledger
    for direction, total in zip(("out", "in"), counters, strict=True):
        assert sum(counted(s.node.traffic, direction).values()) - s.before[direction] == total, (direction, ledger)
        assert ledger.attributed[direction] + ledger.unattributed[direction] == total


def cfg_for(tmp: Path, **over: Any) -> Config:
    return make_config(tmp, bittorrent={"listen_interfaces": f"127.0.0.1:{free_port()}", "dht": False, "lsd": False,
                                        "upnp": False, "natpmp": False, **over.pop("bittorrent", {})}, **over)


@pytest.mark.parametrize(
    ("size", "limit"),
    [(1 * MiB, 0), (48 * MiB, 0), (6 * MiB, 3 * MiB)],
    ids=["1MiB", "48MiB", "6MiB-throttled"],
)
async def test_upload_to_one_client_is_counted_once_in_swarm(tmp_path: Path, size: int, limit: int) -> None:
    async with seeding(cfg_for(tmp_path / "a"), content(size, size)) as s:
        client = Client("127.0.0.3", free_port("127.0.0.3"), tmp_path / "c")
        await asyncio.to_thread(client.start, s.torrent, download_limit=limit)
        try:
            assert await asyncio.to_thread(client.wait, peer=s.endpoint)
            await asyncio.to_thread(client.drop)
            await reconciled(s)
        finally:
            client.close()
        out = counted(s.node.traffic, "out")
        assert abs(out.get("swarm", 0) - client.received) <= BLOCK, out
        assert client.received >= size
        assert set(out) == {"swarm"}, out


async def test_client_disconnecting_midway_is_counted_to_what_it_received(tmp_path: Path) -> None:
    size = 16 * MiB
    async with seeding(cfg_for(tmp_path / "a"), content(size, 5)) as s:
        # Throttled on the sending side, so nothing much waits in socket buffers when the client goes.
        s.engine.session.handles[s.infohash].set_upload_limit(4 * MiB)
        client = Client("127.0.0.3", free_port("127.0.0.3"), tmp_path / "c")
        await asyncio.to_thread(client.start, s.torrent)
        try:
            assert await asyncio.to_thread(client.wait, until=size // 3, peer=s.endpoint)
            await asyncio.to_thread(client.drop)
            for _ in range(50):  # the node sees the connection close
                if not s.engine.session.states.get(s.infohash) or not s.engine.session.states[s.infohash].num_peers:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)
            await reconciled(s)
        finally:
            client.close()
        out = counted(s.node.traffic, "out")
        assert size // 3 <= client.received < size
        assert abs(out.get("swarm", 0) - client.received) <= BLOCK, (out, client.received)
        assert UNATTRIBUTED not in out


async def test_two_clients_behind_one_address_one_a_seed_target(tmp_path: Path) -> None:
    size = 8 * MiB
    host = "127.0.0.2"
    target_port, other_port = free_port(host), free_port(host)
    cfg = cfg_for(
        tmp_path / "a",
        bittorrent={"seed_target_interval": 1.0},
        seed_targets=[{"name": "netcup", "bittorrent": f"{host}:{target_port}"}],
    )
    async with seeding(cfg, content(size, 7)) as s:
        target = Client(host, target_port, tmp_path / "t")
        other = Client(host, other_port, tmp_path / "o")
        await asyncio.to_thread(target.start, s.torrent)
        await asyncio.to_thread(other.start, s.torrent)
        try:
            s.engine.offer_to_targets()  # the target is reached by the node, on its listen port
            s.engine.session.connect_peer(s.infohash, host, other_port)
            done = await asyncio.gather(asyncio.to_thread(target.wait), asyncio.to_thread(other.wait))
            assert all(done)
            await asyncio.to_thread(target.drop)
            await asyncio.to_thread(other.drop)
            await reconciled(s)
        finally:
            target.close()
            other.close()
        out = counted(s.node.traffic, "out")
        # The clients may also trade pieces between themselves (PEX): only what came from the node counts.
        from_node_target = target.received - other.sent
        from_node_other = other.received - target.sent
        assert abs(out.get("seed:netcup", 0) - from_node_target) <= BLOCK, (out, from_node_target)
        assert abs(out.get("swarm", 0) - from_node_other) <= BLOCK, (out, from_node_other)
        assert from_node_target > 0 and from_node_other > 0
        assert set(out) == {"seed:netcup", "swarm"}, out


async def test_download_from_a_seed_target_is_counted_in_its_channel(tmp_path: Path) -> None:
    """The other direction: the node takes a file from a seed target; `in` equals what the target sent."""
    import libtorrent as lt

    size = 12 * MiB
    data = content(size, 9)
    host, port = "127.0.0.2", free_port("127.0.0.2")
    cfg = cfg_for(tmp_path / "a", seed_targets=[{"name": "netcup", "bittorrent": f"{host}:{port}"}])
    async with seeding(cfg, content(MiB, 1)) as s:
        # The target seeds a file the node does not have.
        src = tmp_path / "target"
        src.mkdir()
        (src / "big.bin").write_bytes(data)
        tor = await asyncio.to_thread(_torrent_of, src / "big.bin")
        target = Client(host, port, src)
        await asyncio.to_thread(target.start, tor, seed_mode=True)
        try:
            atp = lt.add_torrent_params()
            atp.ti = lt.torrent_info(tor)
            atp.save_path = str(tmp_path / "into")
            ih = str(atp.ti.info_hashes().v1)
            await s.engine.session.add(atp, ih)
            for _ in range(600):
                s.engine.session.connect_peer(ih, host, port)
                s.engine.session.post_updates()
                await asyncio.sleep(0.1)
                st = s.engine.session.states.get(ih)
                if st is not None and st.is_seeding:
                    break
            assert (tmp_path / "into" / "big.bin").read_bytes() == data
            await s.engine.session.remove(ih)  # the final reading happens on the way out
            await asyncio.to_thread(target.drop)
            await reconciled(s)
        finally:
            target.close()
        got = counted(s.node.traffic, "in")
        assert abs(got.get("seed:netcup", 0) - target.sent) <= BLOCK, (got, target.sent)
        assert target.sent >= size
        assert set(got) == {"seed:netcup"}, got


async def test_restart_mid_transfer_counts_every_byte_once_in_the_store(tmp_path: Path) -> None:
    """Counters flushed on stop; after the restart the transfer resumes; the hourly buckets hold exactly
    what the client received, counted once."""
    size = 24 * MiB
    cfg = cfg_for(tmp_path / "a")
    s = await start_seeder(cfg, content(size, 13))
    client = Client("127.0.0.3", free_port("127.0.0.3"), tmp_path / "c")
    try:
        s.engine.session.handles[s.infohash].set_upload_limit(6 * MiB)
        await asyncio.to_thread(client.start, s.torrent)
        assert await asyncio.to_thread(client.wait, until=size // 3, peer=s.endpoint)
        await stop_seeder(s)  # what the daemon does on SIGTERM: p2p stops, then the recorder flushes
        before = (await asyncio.to_thread(client.status)).total_payload_download
        assert before < size
        s = await start_seeder(cfg, None, node=s.node)
        s.engine.session.connect_peer(s.infohash, client.host, client.port)  # both sides try to reconnect
        assert await asyncio.to_thread(client.wait, peer=s.endpoint)
        await asyncio.to_thread(client.drop)
        await reconciled(s)
        await stop_seeder(s)
        stored = await s.node.store.run(_stored_out, s.node)
        assert abs(stored.get("swarm", 0) - client.received) <= 2 * BLOCK, (stored, client.received)
        assert set(stored) == {"swarm"}, stored
    finally:
        client.close()
        await s.node.store.close()


def _stored_out(node: Node) -> dict[str, int]:
    rows = node.store.conn.execute("SELECT channel, SUM(bytes) FROM traffic WHERE direction='out' GROUP BY channel")
    return {ch: int(n) for ch, n in rows if n}


def _torrent_of(path: Path) -> bytes:
    from noded.p2p import torrent as T

    raw, md5s = T.hash_files([path])
    info = T.single_file_info(path.name, path.stat().st_size, md5s[0], raw, source="Data for Canada")
    return T.encode_torrent(info, trackers=(), web_seeds=())


async def test_dashboard_chart_and_offpeak_profile_read_the_p2p_counters(tmp_path: Path) -> None:
    """The 24 h chart (/v1/traffic last_24h) and the off-peak profile see the bytes the client received."""
    from noded.transparency.offpeak import hour_of_week, load_profile
    from noded.transparency.traffic import hourly_load

    size = 4 * MiB
    async with seeding(cfg_for(tmp_path / "a"), content(size, 21)) as s:
        client = Client("127.0.0.3", free_port("127.0.0.3"), tmp_path / "c")
        await asyncio.to_thread(client.start, s.torrent)
        try:
            assert await asyncio.to_thread(client.wait, peer=s.endpoint)
            await asyncio.to_thread(client.drop)
            await reconciled(s)
        finally:
            client.close()
        await s.recorder.flush()
        report = await s.recorder.report()
        hours_out = sum(h["out"] for h in report["last_24h"])
        swarm_out = sum(h["channels"].get("swarm", {}).get("out", 0) for h in report["last_24h"])
        assert abs(hours_out - client.received) <= BLOCK, (report["last_24h"][-2:], client.received)
        assert swarm_out == hours_out
        assert report["totals_24h"]["swarm"]["out"] == swarm_out
        # The profile behind the quiet-hour advice: the hour's load, once that hour is complete.
        store = s.node.store
        loads, first = await store.run(hourly_load, store, 0)
        assert first is not None
        last = max(loads)
        profile = load_profile(loads, first, last + 1)
        assert abs(sum(loads.values()) - client.received) <= BLOCK
        assert last - first < 168  # a fresh store: this hour of the week occurred once
        assert profile[hour_of_week(last)] == loads[last]
