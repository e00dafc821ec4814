"""Pure policy: mirror hysteresis, off-peak advice, locate ranking, report validation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noded.core.config import ScheduleConfig
from noded.transparency.locate import Candidate, magnet, rank
from noded.transparency.mirror_state import MirrorState, MirrorStatus, Outcome, advance
from noded.transparency.offpeak import hour_of_week, limits_in_force, load_profile, quiet_hours
from noded.transparency.reports import ReportInvalid, validate_report

OK = Outcome(True, 10.0, "fine")
SLOW = Outcome(True, 5000.0, "5000 ms > 2000 ms", slow=True)
FAIL = Outcome(False, None, "HTTP 503")


@given(st.lists(st.sampled_from([OK, SLOW, FAIL]), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_hysteresis_invariants(outcomes: list[Outcome], fail_t: int, ok_t: int) -> None:
    s = MirrorState()
    run_fail = run_ok = 0
    for i, o in enumerate(outcomes):
        prev = s
        s = advance(s, o, float(i), fail_threshold=fail_t, success_threshold=ok_t)
        run_fail = 0 if o.ok else run_fail + 1
        run_ok = run_ok + 1 if o.ok else 0
        # Down only after fail_t failures in a row, or staying down.
        if s.status is MirrorStatus.DOWN and prev.status is not MirrorStatus.DOWN:
            assert run_fail >= fail_t
        # Out of down only after ok_t successes in a row.
        if prev.status is MirrorStatus.DOWN and s.status is not MirrorStatus.DOWN:
            assert run_ok >= ok_t
        if not o.ok:
            assert s.status is not MirrorStatus.UP
        if s.status is MirrorStatus.UP:
            assert not o.slow
        assert s.reason


def test_first_failure_degrades_and_slow_degrades_at_once() -> None:
    s = advance(MirrorState(), OK, 0, fail_threshold=3, success_threshold=2)
    assert s.status is MirrorStatus.UP and s.last_success == 0
    s = advance(s, SLOW, 1, fail_threshold=3, success_threshold=2)
    assert (s.status, s.reason) == (MirrorStatus.DEGRADED, "slow: 5000 ms > 2000 ms")
    s = advance(s, FAIL, 2, fail_threshold=3, success_threshold=2)
    assert (s.status, s.reason) == (MirrorStatus.DEGRADED, "HTTP 503 (1/3 failures before down)")
    assert s.last_success == 1


def test_hour_of_week_monday_is_zero() -> None:
    monday = dt.datetime(2026, 11, 23, 5, tzinfo=dt.UTC)  # a Monday, 05:00 UTC
    assert hour_of_week(int(monday.timestamp() // 3600)) == 5
    sunday_late = dt.datetime(2026, 11, 22, 23, tzinfo=dt.UTC)
    assert hour_of_week(int(sunday_late.timestamp() // 3600)) == 167


def test_load_profile_averages_over_occurrences_counting_empty_hours() -> None:
    start = int(dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp() // 3600)  # a Monday 00:00
    loads = {start + 1: 100, start + 168 + 1: 300}  # Monday 01:00 in two weeks; third week empty
    prof = load_profile(loads, start, start + 3 * 168)
    assert prof[1] == pytest.approx(400 / 3)
    assert prof[0] == 0 and len(prof) == 168


def test_quiet_hours_follow_the_injected_profile() -> None:
    now = dt.datetime(2026, 11, 23, 10, 30, tzinfo=dt.UTC).timestamp()  # Monday 10:30
    busy = [1000.0] * 168
    for how in (14, 15, 16 + 24 * 0, 3 + 24):  # Mon 14, 15, 16 and Tue 03
        busy[how] = 10.0
    q = quiet_hours(busy, now, 4)
    assert [h % 24 for h in q] == [14, 15, 16, 3]
    # Shift the load: now Monday evening is quiet.
    shifted = [1000.0] * 168
    for how in (20, 21, 22, 23):
        shifted[how] = 1.0
    assert [h % 24 for h in quiet_hours(shifted, now, 4)] == [20, 21, 22, 23]
    assert quiet_hours([0.0] * 168, now, 4) == []  # no history, no advice
    with pytest.raises(ValueError):
        quiet_hours([1.0] * 24, now, 4)


def test_limits_in_force_first_matching_slot() -> None:
    sched = ScheduleConfig.model_validate(
        {
            "timezone": "America/Toronto",
            "default_down": "100MB/s",
            "slots": [{"days": "mon-fri", "hours": "08-18", "down": "10MB/s", "up": "5MB/s"}],
        }
    )
    monday_noon_toronto = dt.datetime(2026, 11, 23, 17, tzinfo=dt.UTC).timestamp()  # 12:00 EST
    lim = limits_in_force(sched, monday_noon_toronto)
    assert (lim.down, lim.up, lim.slot) == (10_000_000, 5_000_000, 0)
    evening = dt.datetime(2026, 11, 23, 23, 30, tzinfo=dt.UTC).timestamp()  # 18:30 EST
    assert limits_in_force(sched, evening).down == 100_000_000 and limits_in_force(sched, evening).slot is None


def _c(mirror: str, status: MirrorStatus, reports: int = 0, latency: float = 20.0) -> Candidate:
    return Candidate("origin", mirror, f"http://{mirror}/x", status, reports, latency)


def test_rank_down_last_and_reports_lower_a_mirror() -> None:
    r = rank([_c("sourcecoop", MirrorStatus.UP), _c("zenodo", MirrorStatus.UP, latency=80), _c("ia", MirrorStatus.UP)])
    assert [x.candidate.mirror for x in r] == ["sourcecoop", "ia", "zenodo"]
    r = rank([_c("sourcecoop", MirrorStatus.DOWN), _c("zenodo", MirrorStatus.UP), _c("ia", MirrorStatus.DEGRADED)])
    assert [x.candidate.mirror for x in r] == ["zenodo", "ia", "sourcecoop"]
    assert r[2].reason.startswith("down")
    r = rank([_c("sourcecoop", MirrorStatus.UP, reports=3), _c("zenodo", MirrorStatus.UP)])
    assert [x.candidate.mirror for x in r] == ["zenodo", "sourcecoop"]
    assert "3 open reports" in r[1].reason
    # Reports alone never rank a working mirror below a dead one.
    r = rank([_c("sourcecoop", MirrorStatus.UP, reports=1000), _c("zenodo", MirrorStatus.DOWN)])
    assert r[0].candidate.mirror == "sourcecoop"


def test_magnet_link() -> None:
    m = magnet("ab" * 20, "da.parquet", ["https://r2.example/da.parquet"], ["203.0.113.7:6881"])
    assert m.startswith("magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=da.parquet&ws=https://r2.example/da.parquet")
    assert m.endswith("&x.pe=203.0.113.7:6881")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected a JSON object"),
        ({"kind": "slow"}, "mirror is required"),
        ({"mirror": "nowhere", "kind": "slow"}, "unknown mirror 'nowhere'"),
        ({"mirror": "zenodo", "kind": "broken"}, "kind must be one of"),
        ({"mirror": "zenodo", "kind": "slow", "detail": "é" * 513}, "detail is longer than 1024 bytes"),
        ({"mirror": "zenodo", "kind": "corrupt"}, "a corrupt report needs the item key"),
        ({"mirror": "zenodo", "kind": "missing", "item": "../etc/passwd"}, "item must be an item key"),
        ({"mirror": "zenodo", "kind": "other", "extra": 1}, "unknown field(s) ['extra']"),
        ({"mirror": "zenodo", "kind": "other", "detail": "a\x00b"}, "detail contains control characters"),
    ],
)
def test_report_validation(body: object, message: str) -> None:
    with pytest.raises(ReportInvalid, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate_report(body, {"zenodo", "toronto"})


def test_valid_report() -> None:
    r = validate_report(
        {"mirror": "zenodo", "kind": "corrupt", "item": "/census/da.parquet", "detail": "é" * 512, "contact": " a@b "},
        {"zenodo"},
    )
    assert (r.item, r.contact, len(r.detail)) == ("census/da.parquet", "a@b", 512)


def test_traffic_rates_over_the_window_and_pending_buckets() -> None:
    from noded.core.counters import Traffic

    t = Traffic(window=10.0)
    t.add("zenodo", "in", 1000, now=100.0)
    t.add("zenodo", "in", 3000, now=105.0)
    t.add("peer:amsterdam", "out", 500, requests=1, now=106.0)
    assert t.rates(now=106.0) == {"zenodo": {"in": 400.0, "out": 0.0}, "peer:amsterdam": {"in": 0.0, "out": 50.0}}
    assert t.rates(now=112.0) == {"zenodo": {"in": 300.0, "out": 0.0}, "peer:amsterdam": {"in": 0.0, "out": 50.0}}
    assert t.rates(now=200.0) == {}
    t.add("zenodo", "in", 7, now=3600.0)  # the next hour: its own bucket
    p = t.take_pending()
    assert p[(0, "zenodo", "in")].bytes == 4000 and p[(1, "zenodo", "in")].bytes == 7
    assert t.take_pending() == {}
    t.restore_pending(p)  # a failed flush loses nothing
    assert t.snapshot_pending()[(0, "zenodo", "in")].bytes == 4000
    assert t.totals_by_channel()["zenodo"]["in"]["bytes"] == 4007


async def test_flush_merges_into_buckets_and_reads_never_double_count(tmp_path: Path) -> None:
    from noded.core.counters import Traffic
    from noded.core.store import Store
    from noded.transparency.traffic import buckets_since, flush_pending

    store = Store(tmp_path / "s.sqlite3")
    await store.open()
    try:
        t = Traffic()
        t.add("r2", "out", 100, requests=1, now=7200.0)
        assert (await store.run(buckets_since, store, t, 0))[(2, "r2", "out")].bytes == 100  # pending only
        assert await store.run(flush_pending, store, t) == 1
        t.add("r2", "out", 50, now=7300.0)
        merged = await store.run(buckets_since, store, t, 0)
        assert merged[(2, "r2", "out")].bytes == 150 and merged[(2, "r2", "out")].requests == 1
        await store.run(flush_pending, store, t)
        assert (await store.run(buckets_since, store, t, 0))[(2, "r2", "out")].bytes == 150
        assert (await store.run(buckets_since, store, t, 3)) == {}
    finally:
        await store.close()
    # A flush that cannot write puts the counts back.
    t.add("r2", "out", 9, now=7300.0)
    with pytest.raises(Exception, match="not open"):
        flush_pending(store, t)
    assert t.snapshot_pending()[(2, "r2", "out")].bytes == 9
