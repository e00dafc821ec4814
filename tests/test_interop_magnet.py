"""Magnets that find peers, and published torrents kept as published.

A running noded imports a published torrent (its own tracker, url-list and comment) whose bytes an
origin item also holds under another key: the stored and served .torrent stays the published one,
the session announces to the torrent's tracker and to the configured one (both Debian opentracker,
asked by scrape), a configured tracker nothing listens on is a problem in /v1/status and stops nothing,
and the magnets of /v1/locate, /v1/datasets and the RSS feed carry both trackers
as tr=, this node's public BitTorrent endpoint as x.pe= and its HTTP copy as ws=.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.p2p import torrent as T
from noded.p2p.rss import TORRENT_NS
from tests.conftest import free_port
from tests.interop_clients import seed_store, wait
from tests.p2p_helpers import content
from tests.tracker import opentracker, opentracker_missing, scrape

pytestmark = pytest.mark.skipif(opentracker_missing() is not None, reason=str(opentracker_missing()))

SIZE = 3 * 1024 * 1024 + 77


def published(src: Path, tracker: str) -> tuple[bytes, str]:
    """The organisation's torrent of `src` (py3createtorrent's info dict, tracker, web seed, comment)."""
    pieces, md5s = T.hash_files([src])
    info = T.single_file_info("census.pmtiles", src.stat().st_size, md5s[0], pieces, source="Data for Canada")
    raw = T.encode_torrent(
        info, trackers=[tracker], web_seeds=["http://127.0.0.1:9/census.pmtiles"], comment="published by the org"
    )
    # Published torrents come from py3createtorrent, not noded.
    raw = raw.replace(b"10:created by5:noded", b"10:created by16:py3createtorrent")
    return raw, T.infohash_of(info)


def test_published_torrent_kept_and_magnets_carry_trackers_peer_and_web_seed(
    noded_factory: Any, tmp_path: Path
) -> None:
    data = content(SIZE, 41)
    src = tmp_path / "census.pmtiles"
    src.write_bytes(data)
    # The trackers are outside the info dict: the infohash (opentracker's whitelist) is known before them.
    _, ih = published(src, "http://127.0.0.1:1/announce")
    with opentracker([ih]) as own, opentracker([ih]) as configured:
        raw, _ = published(src, own)
        tpath = tmp_path / "census.pmtiles.torrent"
        tpath.write_bytes(raw)
        public = f"203.0.113.7:{free_port()}"
        dead = f"http://127.0.0.1:{free_port()}/announce"  # nothing listens: a visible problem, nothing more
        node = noded_factory(
            start=False,
            bittorrent={"trackers": [configured, dead], "public_address": public},
            origins={"torrents": {"files": [str(tpath)]}},
        )
        # An origin item with the same bytes under another key: its torrent has the same infohash.
        seed_store(node, "stats/census.pmtiles", data)
        node.start()

        def seeding() -> bool:
            items = node.get("/v1/inventory")[1]["items"]
            return any(i["seeding"] and i["infohash"] == ih for i in items)

        wait(seeding, "the origin item seeding")
        # Seeding did not replace the published torrent: stored and served byte for byte.
        status, served = node.get(f"/v1/torrents/{ih}.torrent")
        assert status == 200 and served == raw
        assert (
            CacheLayout(tmp_path / "toronto" / "cache", tmp_path / "toronto" / "state").torrent_path(ih).read_bytes()
            == raw
        )
        # Announced to the torrent's own tracker and to the configured one.
        wait(lambda: scrape(own, ih).get("complete") == 1, "a seed on the torrent's own tracker")
        wait(lambda: scrape(configured, ih).get("complete") == 1, "a seed on the configured tracker")
        problems = wait(lambda: node.get("/v1/status")[1]["problems"].get("trackers"), "the dead tracker's problem")
        assert dead in problems and "refused" in problems.lower(), problems
        assert set(node.get("/v1/status")[1]["components"]["p2p"]["tracker_errors"]) == {dead}

        status, body = node.get("/v1/locate/stats/census.pmtiles")
        assert status == 200
        q = parse_qs(urlsplit(body["magnet"]).query)
        assert q["xt"] == [f"urn:btih:{ih}"] and q["dn"] == ["census.pmtiles"]
        assert set(q["tr"]) == {own, configured, dead}
        assert q["x.pe"] == [public]
        mirror = load_config(node.config).http_mirror
        assert f"http://127.0.0.1:{mirror.port}/stats/census.pmtiles" in q["ws"]
        assert T.parse_magnet(body["magnet"]).infohash == ih

        rows = node.get("/v1/datasets")[1]["datasets"]
        mags = {d["key"]: d.get("magnet") for d in rows}
        for key in ("stats/census.pmtiles", "census.pmtiles"):
            dq = parse_qs(urlsplit(mags[key]).query)
            assert set(dq["tr"]) == {own, configured, dead} and dq["x.pe"] == [public], mags[key]
        datasets_seeds = parse_qs(urlsplit(mags["stats/census.pmtiles"]).query)["ws"]
        assert f"http://127.0.0.1:{mirror.port}/stats/census.pmtiles" in datasets_seeds

        status, rss = node.get("/v1/torrents.rss")
        assert status == 200
        items = ET.fromstring(rss).findall("./channel/item")
        uris = [i.findtext(f"{{{TORRENT_NS}}}magnetURI") for i in items]
        assert uris and all(u for u in uris)
        rq = parse_qs(urlsplit(str(uris[0])).query)
        assert set(rq["tr"]) == {own, configured, dead} and rq["x.pe"] == [public]
        assert rq["ws"] and rq["ws"][0].startswith(f"http://127.0.0.1:{mirror.port}/")
        assert node.stop() == 0
