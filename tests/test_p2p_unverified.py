"""Under origins.require_checksum, a cached copy that no published checksum vouches for is not offered
over BitTorrent (checked with a real libtorrent peer), and is seeded once a matching checksum is known."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from noded.api import locate as locate_routes
from noded.api.app import create_app
from noded.cache.layout import CacheLayout
from noded.core.model import CatalogEntry
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine
from tests.conftest import free_port
from tests.p2p_helpers import content, make_config, open_node, put_unverified_sync
from tests.traffic_helpers import Client

MiB = 1024 * 1024
KEY = "ortho/tile-7.tif"


def torrent_of(path: Path, source: str) -> tuple[str, bytes]:
    """The torrent the node would build for the file (the same info dictionary, so the same infohash)."""
    raw, md5s = T.hash_files([path])
    info = T.single_file_info(path.name, path.stat().st_size, md5s[0], raw, source=source)
    return T.infohash_of(info), T.encode_torrent(info, trackers=(), web_seeds=())


async def test_unverified_copy_is_not_seeded_until_a_matching_checksum_is_published(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "node", origins={"require_checksum": True})
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = content(3 * MiB + 123, 5)
    item = await node.store.run(put_unverified_sync, node.store, layout, KEY, data)
    ih, tor = torrent_of(layout.final_path(KEY), cfg.bittorrent.source_tag)
    # Seeded by an earlier run, before the rule applied: not restored, and the row says so.
    await node.store.run(node.store.update_item, item.id, infohash=ih, seeding=True)
    engine = P2PEngine(node, layout)
    await engine.start()
    client = Client("127.0.0.3", free_port("127.0.0.3"), tmp_path / "client")
    try:
        assert engine.restored == 0
        assert await engine.seed_pending() == 0
        row = await node.store.run(node.store.get_item, item.id)
        assert row is not None and not row.seeding and ih not in engine.session.handles
        port = engine.session.listen_port
        assert port
        await asyncio.to_thread(client.start, tor)
        # A real peer that knows the torrent asks the node for it, again and again: nothing comes.
        assert not await asyncio.to_thread(client.wait, peer=("127.0.0.1", port), timeout=5)
        st = client.status()
        assert st.total_payload_download == 0 and st.num_peers == 0

        # Zenodo publishes the file's md5, and it matches the bytes held: the copy is verified now.
        zenodo = CatalogEntry(
            origin="zenodo",
            key=KEY,
            urls=(f"http://127.0.0.1:9/records/1/files/{KEY}",),
            size=len(data),
            md5=hashlib.md5(data).hexdigest(),
        )
        merged, new_version = await node.store.run(node.store.upsert_entry, zenodo)
        assert not new_version and merged.verification == "checksum" and merged.conflict is None
        assert await engine.seed_pending() == 1
        row = await node.store.run(node.store.get_item, item.id)
        assert row is not None and row.seeding and row.infohash == ih
        assert await asyncio.to_thread(client.wait, peer=("127.0.0.1", port), timeout=60)
        got = (tmp_path / "client" / Path(KEY).name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    finally:
        client.close()
        await engine.stop()
        await node.store.close()


async def test_a_seeded_copy_stops_being_offered_when_the_rule_is_turned_on(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "node")
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    item = await node.store.run(put_unverified_sync, node.store, layout, KEY, content(MiB, 6))
    engine = P2PEngine(node, layout)
    await engine.start()
    try:
        assert await engine.seed_pending() == 1  # without the rule, a size-checked copy is seeded
        row = await node.store.run(node.store.get_item, item.id)
        assert row is not None and row.seeding and row.infohash in engine.session.handles
        node.cfg = make_config(tmp_path / "node", origins={"require_checksum": True})
        await engine.reload(node.cfg)
        await engine.seed_pending()
        row = await node.store.run(node.store.get_item, item.id)
        assert row is not None and not row.seeding and row.infohash not in engine.session.handles
    finally:
        await engine.stop()
        await node.store.close()


@pytest.mark.parametrize("strict", [True, False])
async def test_locate_never_calls_an_unverified_copy_here_verified(
    tmp_path: Path, aiohttp_client: Any, strict: bool
) -> None:
    cfg = make_config(tmp_path / "node", origins={"require_checksum": strict})
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    try:
        await node.store.run(put_unverified_sync, node.store, layout, KEY, content(1000, 8))
        client = await aiohttp_client(create_app(node, [locate_routes.setup]))
        r = await client.get(f"/v1/locate/{KEY}")
        assert r.status == 200
        body = await r.json()
        assert body["verification"] == "unverified"
        here = [p for p in body["places"] if p["kind"] == "node"]
        if strict:
            assert here == []  # the web seed refuses it: not offered
        else:
            assert len(here) == 1 and here[0]["match"] == "unknown"
            assert "unverified copy" in here[0]["reason"] and "verified copy" not in here[0]["reason"].replace(
                "unverified copy", ""
            )
    finally:
        await node.store.close()
