"""Helpers for the P2P tests: an in-process Node over a real store, and cached items put in place
exactly as the pull pipeline leaves them (publish, upsert, CACHED, piece hashes)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noded.cache.layout import CacheLayout, disk_bytes, publish
from noded.core.component import Node
from noded.core.config import Config, parse_config
from noded.core.model import PIECE_LENGTH, CatalogEntry, Item, State
from noded.core.store import Store
from noded.p2p import torrent as T
from noded.p2p.engine import P2PEngine
from noded.p2p.sync import PeerSync
from tests.conftest import base_config, deep_merge, to_toml


def make_config(tmp: Path, name: str = "toronto", **overrides: Any) -> Config:
    cfg = base_config(tmp, name=name)
    return parse_config(to_toml(deep_merge(cfg, overrides)))


def content(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


def put_cached_sync(
    store: Store, layout: CacheLayout, key: str, data: bytes, *, pieces: bool = True, origin: str = "sourcecoop"
) -> Item:
    """Blocking: place a verified item in the cache the way the pipeline does."""
    layout.ensure()
    md5 = hashlib.md5(data).hexdigest()
    item, _ = store.upsert_entry(
        CatalogEntry(origin=origin, key=key, urls=(f"http://127.0.0.1:9/{key}",), size=len(data), md5=md5)
    )
    partial = layout.partial_path(item.id, item.version)
    partial.write_bytes(data)
    st = publish(partial, layout.final_path(key))
    store.set_state(item.id, State.FETCHING)
    item = store.set_state(
        item.id,
        State.CACHED,
        sha256=hashlib.sha256(data).hexdigest(),
        disk_bytes=disk_bytes(st),
        mtime_ns=st.st_mtime_ns,
    )
    if pieces:
        raw, _ = T.hash_files([layout.final_path(key)])
        store.set_pieces(item.id, PIECE_LENGTH, raw)
    return item


async def open_node(cfg: Config) -> Node:
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    return Node(cfg=cfg, store=store)


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files' pages, so later reads show in /proc/PID/io (only clean pages go: sync first)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_session(port: int = 0, host: str = "127.0.0.1") -> Any:
    """A plain libtorrent session (the other side of a transfer), loopback only, no discovery."""
    import libtorrent as lt

    s = lt.high_performance_seed()
    s.update(
        {
            "listen_interfaces": f"{host}:{port}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": 0,
        }
    )
    return lt.session(s)


def leech(torrent: bytes, save_dir: Path, peer: tuple[str, int], timeout: float = 60) -> bool:
    """Blocking (run in a thread): download a torrent from one peer with a raw session."""
    import time
    import warnings

    import libtorrent as lt

    ses = raw_session()
    try:
        atp = lt.add_torrent_params()
        ti = lt.torrent_info(torrent)
        with warnings.catch_warnings():  # deprecated, but the one way to drop a torrent_info's url-list
            warnings.simplefilter("ignore", DeprecationWarning)
            ti.set_web_seeds([])
        atp.ti = ti
        atp.save_path = str(save_dir)
        h = ses.add_torrent(atp)
        deadline = time.monotonic() + timeout
        last_connect = 0.0
        while time.monotonic() < deadline:
            st = h.status()
            if st.is_seeding:
                return True
            if time.monotonic() - last_connect > 2:
                h.connect_peer(peer)
                last_connect = time.monotonic()
            time.sleep(0.1)
        return False
    finally:
        ses.pause()
        del ses


@dataclass
class SyncNode:
    """Node B of the P2P tests: a store, the BitTorrent engine and peer sync, started."""

    node: Node
    layout: CacheLayout
    engine: P2PEngine
    sync: PeerSync


@contextlib.asynccontextmanager
async def sync_node(cfg: Config) -> AsyncIterator[SyncNode]:
    """Start engine then sync on a fresh node; stop them in reverse and close the store."""
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    engine = P2PEngine(node, layout)
    sync = PeerSync(node, engine, layout)
    await engine.start()
    try:
        await sync.start()
        try:
            yield SyncNode(node, layout, engine, sync)
        finally:
            await sync.stop()
    finally:
        await engine.stop()
        await node.store.close()


def put_unverified_sync(store: Store, layout: CacheLayout, key: str, data: bytes) -> Item:
    """Blocking: a copy pulled from a location that publishes only a size and a multipart ETag, cached
    the way the pipeline commits it (md5 and sha256 of the bytes it received)."""
    layout.ensure()
    entry = CatalogEntry(
        origin="sourcecoop", key=key, urls=(f"http://127.0.0.1:9/{key}",), size=len(data), etag='"0f1e2d-3"'
    )
    item, _ = store.upsert_entry(entry)
    assert item.verification == "unverified"
    partial = layout.partial_path(item.id, item.version)
    partial.write_bytes(data)
    st = publish(partial, layout.final_path(key))
    store.set_state(item.id, State.FETCHING)
    return store.set_state(
        item.id,
        State.CACHED,
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        disk_bytes=disk_bytes(st),
        mtime_ns=st.st_mtime_ns,
    )
