"""R2 as an origin inside the pull pipeline: listed by the R2 catalog adapter, pulled last (moto)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from noded.core.component import Node
from noded.core.config import Config
from noded.core.model import State
from noded.core.store import Store
from noded.origins.pipeline import Origins
from noded.r2.catalog import R2Origin
from tests.conftest import base_config
from tests.r2_fixtures import (
    ACCESS_KEY,
    BUCKET,
    PREFIX,
    SECRET_KEY,
    CountingMotoServer,
    r2_config,
    s3_client,
    s3server,  # noqa: F401 - fixture
)


async def test_r2_listing_and_source_plug_into_the_pipeline(
    tmp_path: Path,
    s3server: CountingMotoServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("R2_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("R2_SECRET_ACCESS_KEY", SECRET_KEY)
    data = os.urandom(3 * 1024 * 1024 + 1)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    s3_client(s3server.endpoint).put_object(Bucket=BUCKET, Key=PREFIX + "can/roads.pmtiles", Body=data, Metadata=meta)
    cfg = Config.model_validate(
        base_config(tmp_path, r2=r2_config(s3server.endpoint), origins={"r2": {"enabled": True}})
    )
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    o = Origins(Node(cfg=cfg, store=store))
    o.extensions.append(R2Origin(cfg, o.node.traffic))  # as the daemon plugs it in
    try:
        await o.open()
        assert [s.name for s in o.sources()] == ["r2"] and [a.name for a in o.adapters] == ["r2"]
        await o.refresh_all()
        item = await store.run(store.get_current, "can/roads.pmtiles")
        assert item is not None and item.origin == "r2" and item.sha256 == meta["sha256"]
        await o.pull(item)
        done: Any = await store.run(store.get_current, "can/roads.pmtiles")
        assert done.state == State.CACHED, done.error
        assert o.layout.final_path("can/roads.pmtiles").read_bytes() == data
        assert o.node.traffic.totals[("r2", "in")].bytes >= len(data)
    finally:
        await o.stop()
        await store.close()
    assert o.sources() == []  # stop() closed and removed the R2 source
