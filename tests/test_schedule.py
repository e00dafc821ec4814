"""Bandwidth timetable: pure slot policy, token buckets applied to pulls, reload via SIGHUP."""

from __future__ import annotations

import os
import signal
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from noded.core.config import FetchConfig, ScheduleConfig, ScheduleSlot
from noded.core.counters import Traffic
from noded.origins.fetch import HttpClient
from noded.origins.schedule import Schedule, TokenBucket, rates_at
from tests.conftest import base_config, write_config
from tests.origin import Origin

MiB = 1024 * 1024


def test_slots_first_match_wins_then_defaults() -> None:
    cfg = ScheduleConfig(
        timezone="America/Toronto",
        default_down="100MB/s",
        default_up=None,
        slots=[
            ScheduleSlot(days="mon-fri", hours="08-18", down="10MB/s", up="5MB/s"),
            ScheduleSlot(days="sat,sun", hours="all", down=None, up="50MB/s"),
        ],
    )
    # Monday 2025-01-06 14:00 UTC = 09:00 in Toronto: business hours.
    assert rates_at(cfg, datetime(2025, 1, 6, 14, 0, tzinfo=UTC)) == (10_000_000, 5_000_000)
    # Monday 12:00 UTC = 07:00 Toronto: before the slot, defaults apply.
    assert rates_at(cfg, datetime(2025, 1, 6, 12, 0, tzinfo=UTC)) == (100_000_000, None)
    assert rates_at(cfg, datetime(2025, 1, 11, 12, 0, tzinfo=UTC)) == (None, 50_000_000)


def test_hours_wrap_midnight() -> None:
    cfg = ScheduleConfig(slots=[ScheduleSlot(days="all", hours="22-06", down="1MB/s")])
    assert rates_at(cfg, datetime(2025, 1, 6, 23, 0, tzinfo=UTC))[0] == 1_000_000
    assert rates_at(cfg, datetime(2025, 1, 6, 5, 0, tzinfo=UTC))[0] == 1_000_000
    assert rates_at(cfg, datetime(2025, 1, 6, 6, 0, tzinfo=UTC))[0] is None


async def test_down_bucket_limits_a_pull_measured_at_the_server(aiohttp_server: Any, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    origin = Origin()
    origin.add("/a", data)
    server = await aiohttp_server(origin.app())
    bucket = TokenBucket(MiB)  # 1 MiB/s with a 1 s burst: 3 MiB need at least ~2 s
    client = HttpClient(FetchConfig(segment_size="1MiB", segments_per_item=3), Traffic(), bucket)
    await client.start()
    t0 = time.monotonic()
    try:
        await client.download(str(server.make_url("/a")), tmp_path / "p", channel="t")
    finally:
        await client.close()
    # A lower bound only: a loaded machine can make it slower, never faster than the limit allows.
    assert time.monotonic() - t0 >= 1.5


def test_listeners_hear_the_rates_now_and_on_every_change() -> None:
    sched = Schedule(ScheduleConfig(default_down="100MB/s"))
    heard: list[tuple[int | None, int | None]] = []
    sched.on_change(lambda down, up: heard.append((down, up)))
    assert heard == [(100_000_000, None)]
    sched.set_override(5_000_000, 1_000_000, 60)
    sched.set_override(5_000_000, 1_000_000, 30)  # same rates: nobody is called again
    sched.clear_override()
    assert heard == [(100_000_000, None), (5_000_000, 1_000_000), (100_000_000, None)]


def test_sighup_changes_the_rates_of_a_running_daemon(tmp_path: Path, noded_factory: Any) -> None:
    node = noded_factory(schedule={"default_down": "1MB/s", "default_up": "2MB/s"})
    status, body = node.get("/v1/status")
    assert status == 200 and body["components"]["schedule"]["down"] == 1_000_000
    cfg = base_config(tmp_path / "toronto", name="toronto", schedule={"default_down": "7MB/s"})
    old = tomllib.loads(Path(node.config).read_text())
    cfg["api"], cfg["http_mirror"], cfg["bittorrent"] = old["api"], old["http_mirror"], old["bittorrent"]
    write_config(tmp_path / "toronto", cfg)
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, body = node.get("/v1/status")
        if body["components"]["schedule"]["down"] == 7_000_000:
            break
        time.sleep(0.1)
    assert body["components"]["schedule"] == {"state": "running", "down": 7_000_000, "up": None}
    node.stop()


def test_api_overrides_the_timetable_for_a_while(noded_factory: Any) -> None:
    token = "s3cret-token-for-tests"
    node = noded_factory(schedule={"default_down": "1MB/s"}, env={"NODED_API_TOKEN": token})
    auth = {"Authorization": f"Bearer {token}"}
    status, body = node.get("/v1/schedule", method="PUT", body={"down": "5MB/s", "up": None, "seconds": 60})
    assert status == 401
    status, body = node.get("/v1/schedule", method="PUT", body={"down": "fast", "seconds": 60}, headers=auth)
    assert status == 400 and "down" in body["error"]["message"]
    status, body = node.get("/v1/schedule", method="PUT", body={"down": "5MB/s", "bogus": 1}, headers=auth)
    assert status == 400 and "bogus" in body["error"]["message"]
    status, body = node.get("/v1/schedule", method="PUT", body={"down": "5MB/s", "seconds": 60}, headers=auth)
    assert status == 200 and body["down"] == 5_000_000 and "override_until" in body
    _, body = node.get("/v1/schedule")
    assert body["down"] == 5_000_000 and body["timetable"]["default_down"] == 1_000_000
    status, body = node.get("/v1/schedule", method="DELETE", headers=auth)
    assert status == 200 and body["down"] == 1_000_000 and "override_until" not in body
    # A short override ends by itself.
    node.get("/v1/schedule", method="PUT", body={"down": None, "seconds": 0.3}, headers=auth)
    assert node.get("/v1/schedule")[1]["down"] is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and node.get("/v1/schedule")[1]["down"] != 1_000_000:
        time.sleep(0.1)
    assert node.get("/v1/schedule")[1]["down"] == 1_000_000
    status, body = node.get("/v1/catalog/refresh", method="POST", body={}, headers=auth)
    assert status == 202
    node.stop()
