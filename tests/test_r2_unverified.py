"""Under origins.require_checksum, R2 is not given a cached copy that no published checksum vouches
for; once a location publishes a checksum that agrees with the copy, it is pushed."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from noded.cache.layout import CacheLayout, disk_bytes, publish
from noded.core.component import Node
from noded.core.config import Config
from noded.core.model import CatalogEntry, Item, State
from noded.core.store import Store
from noded.r2.push import R2Pusher
from tests.conftest import base_config, deep_merge
from tests.r2_fixtures import (
    BUCKET,
    PREFIX,
    CountingMotoServer,
    add_cached_item,
    payload,
    r2_config,
    r2_env,  # noqa: F401 - fixture
    s3server,  # noqa: F401 - fixture
)

KEY = "ortho/tile-9.tif"


def put_unverified_sync(store: Store, layout: CacheLayout, data: bytes) -> Item:
    """Blocking: a copy from a location publishing only a size, cached with the hashes of its bytes."""
    layout.ensure()
    item, _ = store.upsert_entry(
        CatalogEntry(origin="sourcecoop", key=KEY, urls=(f"http://127.0.0.1:9/{KEY}",), size=len(data), etag='"9-2"')
    )
    partial = layout.partial_path(item.id, item.version)
    partial.write_bytes(data)
    st = publish(partial, layout.final_path(KEY))
    store.set_state(item.id, State.FETCHING)
    return store.set_state(
        item.id,
        State.CACHED,
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        disk_bytes=disk_bytes(st),
        mtime_ns=st.st_mtime_ns,
    )


async def pushed(store: Store, item_id: int, timeout: float = 30) -> bool:
    for _ in range(int(timeout * 20)):
        row = await store.run(store.get_item, item_id)
        if row is not None and row.pushed:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_an_unverified_copy_is_pushed_only_once_a_matching_checksum_is_known(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
    r2_env: dict[str, str],  # noqa: F811
) -> None:
    raw = deep_merge(base_config(tmp_path, r2=r2_config(s3server.endpoint)), {"origins": {"require_checksum": True}})
    cfg = Config.model_validate(raw)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    node = Node(cfg=cfg, store=store)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    data = payload(300_000, 9)
    unverified = await store.run(put_unverified_sync, store, layout, data)
    verified = await store.run(add_cached_item, store, layout, "ortho/index.json", payload(1000, 1))
    pusher = R2Pusher(node)
    await pusher.start()
    try:
        assert await pushed(store, verified.id)
        node.notify("cached")
        await asyncio.sleep(1.0)  # another pass: still nothing for the unverified copy
        row = await store.run(store.get_item, unverified.id)
        assert row is not None and not row.pushed and row.error is None
        keys = {r.path for r in s3server.counting.requests}
        assert f"/{BUCKET}/{PREFIX}{KEY}" not in keys  # not even a HEAD

        zenodo = CatalogEntry(
            origin="zenodo", key=KEY, urls=(f"http://127.0.0.1:9/z/{KEY}",), size=len(data),
            md5=hashlib.md5(data).hexdigest(),
        )  # fmt: skip
        merged, _ = await store.run(store.upsert_entry, zenodo)
        assert merged.verification == "checksum"
        node.notify("cached")
        assert await pushed(store, unverified.id)
    finally:
        await pusher.stop()
        await store.close()
