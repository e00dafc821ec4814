"""Acceptance 2 and 5 with a running node: exact byte counts per channel in /v1/traffic and /metrics
after known transfers, buckets surviving a restart, quiet hours following an injected load profile,
`promtool check metrics` on the live /metrics, and `noded status` showing mirrors and quiet hours."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, noded_env
from tests.transparency_helpers import PeerReadyz, ZenodoOrigin, seed_item, wait_for

DATA = bytes(range(256)) * 40  # 10240 bytes; a probe reads the first 4096
QUIET = {2, 3, 4}  # UTC hours the injected history leaves quiet


def inject_history(state_dir: Path) -> None:
    """A week of hourly buckets: heavy everywhere except QUIET hours, on a channel the probes don't use."""
    now_hour = int(time.time() // 3600)
    conn = sqlite3.connect(state_dir / "noded.sqlite3")
    with conn:
        conn.executemany(
            "INSERT INTO traffic(hour, channel, direction, bytes, requests, errors) VALUES(?,?,?,?,?,?)",
            [
                (h, "sourcecoop", "in", 1000 if h % 24 in QUIET else 10**9, 1, 0)
                for h in range(now_hour - 168, now_hour - 24)  # older than a day: the 24 h view stays clean
            ],
        )
    conn.close()


def refreshed(node: Any) -> bool:
    origins = node.get("/v1/status")[1]["components"].get("origins", {})
    return bool(origins.get("last_refresh", {}).get("zenodo", {}).get("ok"))


def catalog_bytes(origin: ZenodoOrigin) -> int:
    """Body size of the record listing, as the origins component counts it (headers excluded)."""
    with urllib.request.urlopen(f"{origin.base_url}/api/records/{origin.record_id}") as r:
        return len(r.read())


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


@pytest.fixture
def servers() -> Any:
    origin = ZenodoOrigin(free_port(), files={"da.parquet": DATA})
    peer = PeerReadyz(free_port())
    yield origin, peer
    origin.close()
    peer.close()


def test_exact_counts_restart_quiet_hours_promtool_and_status(noded_factory: Any, servers: Any) -> None:
    origin, peer = servers
    node = noded_factory(
        start=False,
        probe={"enabled": True, "interval": 3600.0},  # one round at start, then none during the test
        origins={"zenodo": {"enabled": True, "base_url": origin.base_url, "records": [1234]}},
        peers=[{"name": "amsterdam", "api_url": peer.url, "bittorrent": f"127.0.0.1:{free_port()}"}],
        traffic={"flush_interval": 0.3, "quiet_hours": 3},
    )
    cfg = tomllib.loads(node.config.read_text())
    state_dir, cache_dir = Path(cfg["paths"]["state_dir"]), Path(cfg["paths"]["cache_dir"])
    seed_item(state_dir, cache_dir, "zenodo", "da.parquet", DATA, [origin.file_url("da.parquet")])
    inject_history(state_dir)
    node.start()

    wait_for(lambda: node.get("/v1/mirrors")[1]["probe"]["rounds"] >= 1, what="first probe round")
    # The origins component lists the record once at start: one catalog GET on the same channel.
    wait_for(lambda: refreshed(node), what="first catalog refresh")
    cat = catalog_bytes(origin)
    status, tr = node.get("/v1/traffic")
    assert status == 200
    since = tr["totals_since_start"]
    assert since["zenodo"]["in"] == {"bytes": 4096 + cat, "requests": 1, "errors": 0}
    assert since["zenodo"]["out"] == {"bytes": 0, "requests": 1, "errors": 0}
    assert since["peer:amsterdam"]["in"]["bytes"] == peer.served >= len(peer.body())
    assert tr["totals_24h"]["zenodo"] == {"in": 4096 + cat, "out": 0}
    assert tr["totals_24h"]["peer:amsterdam"] == {"in": peer.served, "out": 0}
    assert len(tr["last_24h"]) == 24 and tr["last_24h"][-1]["channels"]["zenodo"]["in"] == 4096 + cat
    assert set(tr["quiet_hours"]) == QUIET
    assert tr["limits"] == {"down": None, "up": None, "slot": None, "timezone": "UTC"}

    _, text = node.get("/metrics")
    text = text.decode()
    assert metric(text, "noded_traffic_bytes_total", channel="zenodo", direction="in") == 4096 + cat
    assert metric(text, "noded_traffic_bytes_total", channel="peer:amsterdam", direction="in") == peer.served
    assert metric(text, "noded_mirror_up", mirror="zenodo") == 1
    assert metric(text, "noded_mirror_status", mirror="amsterdam", status="up") == 1
    assert metric(text, "noded_items", state="cached") == 1
    assert metric(text, "noded_cache_budget_bytes") is None  # no labels: matched below
    assert re.search(r"^noded_cache_budget_bytes 1e\+09$", text, re.M)
    assert re.search(r"^noded_event_loop_lag_seconds_count \d", text, re.M)
    assert re.search(r"^noded_probe_rounds 1\.0$", text, re.M)  # components' numeric status fields
    assert "da.parquet" not in text  # never a label per item
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    out = subprocess.run(
        [sys.executable, "-m", "noded", "status", "--url", node.api],
        capture_output=True,
        text=True,
        env=noded_env(),
        cwd=ROOT,
        check=True,
    ).stdout
    assert re.search(r"^zenodo\s+up\s", out, re.M) and re.search(r"^amsterdam\s+up\s", out, re.M)
    assert "quiet hours (UTC, coming day): " in out
    assert "zenodo" in out

    assert node.stop() == 0
    # The counts are in the store, and come back after a restart.
    node.start()
    wait_for(lambda: node.get("/v1/mirrors")[1]["probe"]["rounds"] >= 1, what="first probe round after restart")
    wait_for(lambda: refreshed(node), what="catalog refresh after restart")
    _, tr2 = node.get("/v1/traffic")
    assert tr2["totals_since_start"]["zenodo"]["in"]["bytes"] == 4096 + cat  # this run's probe and listing
    assert tr2["totals_24h"]["zenodo"]["in"] == 2 * (4096 + cat)  # plus the first run's, from the buckets
    assert tr2["totals_24h"]["peer:amsterdam"]["in"] == peer.served >= 2 * len(peer.body())
    assert set(tr2["quiet_hours"]) == QUIET
    node.stop()
