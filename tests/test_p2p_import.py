"""Acceptance 6 end to end: configured published torrents become catalog items with their infohash,
md5 and web seeds intact; hostile torrent files and magnets are reported and skipped, never fatal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from noded.cache.layout import CacheLayout
from noded.core.model import State
from noded.p2p import torrent as T
from noded.p2p.importer import import_configured
from tests.conftest import FIXTURE_TORRENTS
from tests.p2p_helpers import make_config, open_node

fixtures = sorted(FIXTURE_TORRENTS.glob("*.torrent")) if FIXTURE_TORRENTS.is_dir() else []
needs_fixtures = pytest.mark.skipif(not fixtures, reason="../shared/fixtures/d4c-torrents absent")


def hostile_files(d: Path) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    bad = {
        "garbage.torrent": b"this is not bencode",
        "traversal.torrent": bytes(
            lt.bencode({b"info": {b"length": 5, b"name": b"../../x", b"piece length": 16384, b"pieces": b"\0" * 20}})
        ),
        "huge.torrent": bytes(
            lt.bencode({b"info": {b"length": 10**16, b"name": b"big", b"piece length": 16384, b"pieces": b"\0" * 20}})
        ),
    }
    out = []
    for name, data in bad.items():
        (d / name).write_bytes(data)
        out.append(d / name)
    return out


@needs_fixtures
async def test_import_published_and_reject_hostile(tmp_path: Path) -> None:
    bad = hostile_files(tmp_path / "bad")
    cfg = make_config(
        tmp_path,
        origins={
            "torrents": {
                "files": [str(p) for p in fixtures] + [str(p) for p in bad],
                "magnets": [
                    "magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=from-magnet.pmtiles",
                    "magnet:?xt=urn:btih:" + "cd" * 20 + "&dn=..%2Fescape",
                    "magnet:?xt=urn:btih:" + "ef" * 20,  # no name: no key
                ],
            }
        },
    )
    node = await open_node(cfg)
    layout = CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir)
    try:
        n, problems = await import_configured(node, layout)
        assert n == 10 and len(problems) == 5, problems
        assert "torrents" in node.problems
        for path in fixtures:
            meta = T.parse_torrent(path.read_bytes())
            item = await node.store.run(node.store.get_current, meta.name)
            assert item is not None and item.state == State.WANTED and item.origin == "torrent"
            assert item.infohash == meta.infohash == str(lt.torrent_info(path.read_bytes()).info_hashes().v1)
            assert item.md5 == meta.md5 and item.size == meta.total_size
            assert item.urls == list(meta.web_seeds) and len(item.urls) == 3
            # Kept verbatim: the stored .torrent is byte-identical, so we seed the published infohash.
            assert layout.torrent_path(meta.infohash).read_bytes() == path.read_bytes()
        magnet_item = await node.store.run(node.store.get_current, "from-magnet.pmtiles")
        assert magnet_item is not None and magnet_item.infohash == "ab" * 20
        # Idempotent: a second start imports the same items, no new versions.
        n2, _ = await import_configured(node, layout)
        assert n2 == 10
        counts = await node.store.run(node.store.counts_by_state)
        assert counts["wanted"] == 10
    finally:
        await node.store.close()


def test_daemon_survives_hostile_torrent_config(noded_factory: Any, tmp_path: Path) -> None:
    bad = hostile_files(tmp_path / "bad")
    node = noded_factory("toronto", origins={"torrents": {"files": [str(p) for p in bad]}})
    status, body = node.get("/v1/status")
    assert status == 200
    assert "torrents" in body["problems"] and "3 torrent input(s) rejected" in body["problems"]["torrents"]
    assert body["components"]["p2p"]["state"] == "running"
    assert node.stop() == 0
