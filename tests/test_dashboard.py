"""Acceptance 6: the dashboard, loaded in headless Chromium from a running node, renders the mirror list
and the traffic chart from live data. The screenshot is saved under artifacts/ for a human to look at."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, http_json
from tests.transparency_helpers import ZenodoOrigin, seed_item, wait_for

CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / "artifacts"
DATA = b"0123456789abcdef" * 512


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp}",
        "--virtual-time-budget=8000",
        "--window-size=1100,1100",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_dashboard_renders_live_mirrors_and_chart(noded_factory: Any, tmp_path: Path) -> None:
    origin = ZenodoOrigin(free_port(), files={"da.parquet": DATA})
    try:
        node = noded_factory(
            start=False,
            probe={"enabled": True, "interval": 0.5, "fail_threshold": 1},
            origins={"zenodo": {"enabled": True, "base_url": origin.base_url, "records": [origin.record_id]}},
            peers=[{"name": "amsterdam", "api_url": f"http://127.0.0.1:{free_port()}", "bittorrent": "127.0.0.1:7"}],
        )
        cfg = tomllib.loads(node.config.read_text())
        state_dir, cache_dir = Path(cfg["paths"]["state_dir"]), Path(cfg["paths"]["cache_dir"])
        seed_item(state_dir, cache_dir, "zenodo", "da.parquet", DATA, [origin.file_url("da.parquet")])
        now_hour = int(time.time() // 3600)
        conn = sqlite3.connect(state_dir / "noded.sqlite3")
        with conn:  # earlier hours of the day, as the pull pipeline and the seeding would have left them
            conn.executemany(
                "INSERT INTO traffic(hour, channel, direction, bytes) VALUES(?,?,?,?)",
                [(h, "zenodo", "in", (h % 24 + 1) * 50_000_000) for h in range(now_hour - 23, now_hour)]
                + [(h, "seed:netcup", "out", (24 - h % 24) * 30_000_000) for h in range(now_hour - 23, now_hour)],
            )
        conn.close()
        node.start()
        wait_for(
            lambda: (
                {m["name"]: m["status"] for m in node.get("/v1/mirrors")[1]["mirrors"]}
                == {"zenodo": "up", "amsterdam": "down"}
            ),
            what="mirror statuses",
        )
        body = {"mirror": "zenodo", "kind": "slow", "detail": "20 KB/s from Toronto"}
        assert http_json(node.api + "/v1/reports", "POST", body)[0] == 201

        dom = chromium(tmp_path / "profile-dom", "--dump-dom", node.api + "/")
        html = dom.stdout
        assert 'data-ready="1"' in html, dom.stderr[-2000:]
        assert re.search(r'<tr data-mirror="zenodo" data-status="up">', html)
        assert re.search(r'<tr data-mirror="amsterdam" data-status="down">', html)
        assert "Cannot connect to host" in html  # the reason is shown
        bars = re.findall(r'<rect [^>]*class="bar (in|out)"', html)
        assert len(bars) == 48  # 24 hours, in and out
        assert "20 KB/s from Toronto" in html  # the open report
        # Per dataset: where it lives and whether that copy is known to work.
        assert re.search(r'<tr data-dataset="da.parquet" data-verification="checksum">', html)
        assert re.search(r'<span class="status up" data-origin="zenodo" data-match="match"', html)
        assert "toronto (test)" in html

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        res = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", node.api + "/")
        assert shot.is_file() and shot.stat().st_size > 10_000, res.stderr[-2000:]
        node.stop()
    finally:
        origin.close()
