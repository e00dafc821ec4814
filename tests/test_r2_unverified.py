"""Under origins.require_checksum, R2 is not given a cached copy that no published checksum vouches
for; once a location publishes a checksum that agrees with the copy, it is pushed."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from noded.cache.layout import CacheLayout
from noded.core.component import Node
from noded.core.config import Config
from noded.core.model import CatalogEntry
from noded.core.store import Store
from noded.r2.push import R2Pusher
from tests.conftest import base_config, deep_merge
from tests.p2p_helpers import put_unverified_sync
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
    unverified = await store.run(put_unverified_sync, store, layout, KEY, data)
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
