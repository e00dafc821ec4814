"""Acceptance 1: probes against local servers that go down, come back, serve wrong content or answer
slowly move each mirror through up / degraded / down with the right reasons and hysteresis."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from noded.core.component import Node
from noded.core.config import parse_config
from noded.core.store import Store
from noded.transparency.mirror_state import MirrorStatus
from noded.transparency.probe import Prober
from tests.conftest import base_config, free_port, to_toml
from tests.transparency_helpers import PeerReadyz, ZenodoOrigin, seed_item

DATA = bytes(range(256)) * 40  # 10240 bytes: the probe reads the first 4096


def make_cfg(tmp: Path, **overrides: Any) -> Any:
    probe = {"enabled": False, "timeout": 2.0, "slow_seconds": 0.3, "fail_threshold": 3, "success_threshold": 2}
    probe.update(overrides.pop("probe", {}))
    return parse_config(to_toml(base_config(tmp, probe=probe, **overrides)))


@pytest.fixture
def origin() -> Any:
    o = ZenodoOrigin(free_port(), files={"da.parquet": DATA})
    yield o
    o.close()


async def _prober(tmp: Path, cfg: Any) -> tuple[Node, Prober]:
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    await store.open()
    node = Node(cfg=cfg, store=store)
    prober = Prober(node)
    await prober.start()
    return node, prober


@pytest.fixture
async def zenodo_prober(tmp_path: Path, origin: ZenodoOrigin) -> AsyncIterator[tuple[Prober, ZenodoOrigin]]:
    cfg = make_cfg(tmp_path, origins={"zenodo": {"enabled": True, "base_url": origin.base_url, "records": [1234]}})
    seed_item(cfg.paths.state_dir, cfg.paths.cache_dir, "zenodo", "da.parquet", DATA, [origin.file_url("da.parquet")])
    node, prober = await _prober(tmp_path, cfg)
    yield prober, origin
    await prober.stop()
    await node.store.close()


async def step(prober: Prober, name: str = "zenodo") -> tuple[MirrorStatus, str]:
    await prober.probe_all()
    s = prober.state(name)
    return s.status, s.reason


async def test_origin_goes_down_and_comes_back_with_hysteresis(zenodo_prober: tuple[Prober, ZenodoOrigin]) -> None:
    prober, origin = zenodo_prober
    st, why = await step(prober)
    assert st is MirrorStatus.UP and "bytes match" in why

    origin.mode = "error"
    assert await step(prober) == (MirrorStatus.DEGRADED, "HTTP 503 for da.parquet (1/3 failures before down)")
    st, why = await step(prober)
    assert st is MirrorStatus.DEGRADED and "2/3" in why
    st, why = await step(prober)
    assert st is MirrorStatus.DOWN and "HTTP 503" in why and "3 failures in a row" in why

    origin.mode = "ok"
    st, why = await step(prober)
    assert st is MirrorStatus.DOWN and why.startswith("recovering: 1/2 successes")
    st, _ = await step(prober)
    assert st is MirrorStatus.UP

    # Connection refused: the server is gone, then back on the same port.
    origin.server.stop_listening()
    st, why = await step(prober)
    assert st is MirrorStatus.DEGRADED and why.startswith("unreachable")
    origin.server.start()
    st, _ = await step(prober)
    assert st is MirrorStatus.UP

    m = next(x for x in prober.mirrors() if x["name"] == "zenodo")
    # 8 probes, 4 failures, all recorded in the store.
    assert m["uptime_24h"] == pytest.approx(0.5) and m["uptime_7d"] == pytest.approx(0.5)
    assert m["probe_errors"] == 4 and m["last_success"] is not None


async def test_wrong_content_missing_and_slow(zenodo_prober: tuple[Prober, ZenodoOrigin]) -> None:
    prober, origin = zenodo_prober
    await step(prober)
    origin.mode = "wrong"
    st, why = await step(prober)
    assert st is MirrorStatus.DEGRADED and "wrong content: first 4096 bytes of da.parquet differ" in why
    await step(prober)
    st, why = await step(prober)
    assert st is MirrorStatus.DOWN and "wrong content" in why

    origin.mode = "missing"
    st, why = await step(prober)
    assert st is MirrorStatus.DOWN and "missing: HTTP 404 for da.parquet" in why

    origin.mode = "ok"
    await step(prober)
    assert (await step(prober))[0] is MirrorStatus.UP

    origin.mode, origin.delay = "slow", 0.8  # slower than slow_seconds (0.3), well within the 2 s timeout
    st, why = await step(prober)
    assert st is MirrorStatus.DEGRADED and why.startswith("slow: ") and "> 300 ms" in why
    assert prober.state("zenodo").failures == 0  # slow is not a failure: it never counts towards down

    origin.delay = 3.0  # beyond the timeout: a failure
    st, why = await step(prober)
    assert st is MirrorStatus.DEGRADED and why.startswith("timeout after 2 s")
    origin.mode, origin.delay = "ok", 0.0
    assert (await step(prober))[0] is MirrorStatus.UP


async def test_size_and_etag_are_compared_with_the_catalog(tmp_path: Path, origin: ZenodoOrigin) -> None:
    cfg = make_cfg(tmp_path, origins={"zenodo": {"enabled": True, "base_url": origin.base_url}})
    # Not held locally: only the size and the ETag can be compared.
    seed_item(
        cfg.paths.state_dir,
        None,
        "zenodo",
        "da.parquet",
        DATA,
        [origin.file_url("da.parquet")],
        etag=f'"md5:{origin.etag(DATA)}"',
        cached=False,
    )
    node, prober = await _prober(tmp_path, cfg)
    try:
        st, why = await step(prober)
        assert st is MirrorStatus.UP and why == "da.parquet: size/ETag match"
        origin.files["da.parquet"] = DATA + b"x"  # republished under the same name
        st, why = await step(prober)
        assert st is MirrorStatus.DEGRADED and "wrong size for da.parquet: 10241 bytes, catalog says 10240" in why
        origin.files["da.parquet"] = bytes(reversed(DATA))  # same size, new content: the ETag tells
        st, why = await step(prober)
        assert st is MirrorStatus.DEGRADED and "ETag of da.parquet changed" in why
    finally:
        await prober.stop()
        await node.store.close()


async def test_peer_readyz_seed_tcp_and_state_survives_restart(tmp_path: Path) -> None:
    peer = PeerReadyz(free_port())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    bt_port = listener.getsockname()[1]
    cfg = make_cfg(
        tmp_path,
        probe={"fail_threshold": 2},
        peers=[{"name": "amsterdam", "api_url": peer.url, "bittorrent": "127.0.0.1:6881"}],
        seed_targets=[{"name": "netcup", "bittorrent": f"127.0.0.1:{bt_port}"}],
    )
    try:
        node, prober = await _prober(tmp_path, cfg)
        await prober.probe_all()
        assert prober.state("amsterdam").status is MirrorStatus.UP
        assert prober.state("netcup").status is MirrorStatus.UP
        assert "accepts connections" in prober.state("netcup").reason
        peer.ready = False
        listener.close()
        await prober.probe_all()
        await prober.probe_all()
        assert prober.state("amsterdam").status is MirrorStatus.DOWN
        assert "peer not ready (HTTP 503)" in prober.state("amsterdam").reason
        assert prober.state("netcup").status is MirrorStatus.DOWN
        assert prober.state("netcup").reason.startswith("unreachable")
        await prober.stop()
        await node.store.close()

        # A restart keeps the status (no flap to unknown) and needs successes to come back up.
        node, prober = await _prober(tmp_path, cfg)
        assert prober.state("amsterdam").status is MirrorStatus.DOWN
        assert prober.state("amsterdam").last_success is not None
        peer.ready = True
        await prober.probe_all()
        assert prober.state("amsterdam").status is MirrorStatus.DOWN
        await prober.probe_all()
        assert prober.state("amsterdam").status is MirrorStatus.UP
        await prober.stop()
        await node.store.close()
    finally:
        peer.close()
        listener.close()
