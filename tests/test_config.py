"""Configuration: the example is valid; every bad case exits 78 naming the key."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from noded.core.config import EX_CONFIG, ConfigError, parse_config, parse_days, parse_hours
from tests.conftest import ROOT, base_config, noded_env, to_toml


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noded", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=noded_env(),
        cwd=ROOT,
        timeout=60,
    )


def test_example_config_is_valid(tmp_path: Path) -> None:
    # Copy it so its relative var/ directories land in the temp dir, not the checkout.
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.toml")
    r = run_cli(tmp_path / "config.toml", "check-config", "--skip-ports")
    assert r.returncode == 0, r.stderr
    assert "is valid" in r.stdout
    cfg = parse_config((ROOT / "config.example.toml").read_text(), tmp_path / "config.toml")
    assert cfg.peers[0].name == "amsterdam"
    assert cfg.cache.budget == 20 * 10**9
    assert cfg.paths.cache_dir == tmp_path / "var" / "cache"


def _with(tmp: Path, patch: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
    from tests.conftest import deep_merge

    cfg = base_config(tmp)
    cfg = deep_merge(cfg, patch or {})
    for section in drop:
        cfg.pop(section)
    return to_toml(cfg)


# (id, how to make the config bad, the key the message must name, a phrase it must contain)
BAD_CASES: list[tuple[str, Any, str, str]] = [
    ("wrong-type-port", {"api": {"port": "eighty"}}, "api.port", "integer"),
    ("port-out-of-range", {"api": {"port": 70000}}, "api.port", "less than or equal"),
    ("unknown-key", {"cache": {"budjet": "1GB"}}, "cache.budjet", "unknown key"),
    ("unknown-section", {"cachee": {"budget": "1GB"}}, "cachee", "unknown key"),
    ("missing-section", "drop:node", "node", "missing"),
    ("missing-key", "drop-key:cache.budget", "cache.budget", "missing"),
    ("bad-size", {"cache": {"budget": "lots"}}, "cache.budget", "expected a size"),
    ("watermarks-inverted", {"cache": {"high_watermark": 0.5, "low_watermark": 0.9}}, "cache", "low_watermark"),
    ("bad-bind-address", {"api": {"bind": "localhost:80"}}, "api.bind", "IP address"),
    (
        "bad-url",
        {"peers": [{"name": "amsterdam", "api_url": "ftp://x", "bittorrent": "h:1"}]},
        "peers.0.api_url",
        "http",
    ),
    (
        "bad-host-port",
        {"peers": [{"name": "amsterdam", "api_url": "http://x", "bittorrent": "nohost"}]},
        "peers.0.bittorrent",
        "host:port",
    ),
    ("bad-timetable-days", {"schedule": {"slots": [{"days": "funday", "hours": "08-18"}]}}, "schedule.slots.0", "days"),
    ("bad-timetable-hours", {"schedule": {"slots": [{"days": "mon", "hours": "25-99"}]}}, "schedule.slots.0", "hours"),
    ("bad-rate", {"schedule": {"default_down": "fast"}}, "schedule.default_down", "expected a size"),
    ("bad-timezone", {"schedule": {"timezone": "Mars/Olympus"}}, "schedule", "timezone"),
    ("bad-log-level", {"log": {"level": "loud"}}, "log.level", "debug"),
    ("bad-node-name", {"node": {"name": "Toronto Node"}}, "node.name", "lowercase"),
    (
        "duplicate-peer",
        {
            "peers": [
                {"name": "a", "api_url": "http://x", "bittorrent": "h:1"},
                {"name": "a", "api_url": "http://y", "bittorrent": "h:2"},
            ]
        },
        "<root>",
        "unique",
    ),
    ("unknown-origin-in-preference", {"origins": {"preference": ["sourcecoop", "ftp"]}}, "origins", "unknown"),
    ("bad-web-seed-template", {"bittorrent": {"web_seed_templates": ["https://x/static"]}}, "bittorrent", "{name}"),
    ("bad-public-address", {"bittorrent": {"public_address": "203.0.113.7"}}, "bittorrent", "public_address"),
    ("bad-dht-bootstrap", {"bittorrent": {"dht_bootstrap_nodes": ["router:x"]}}, "bittorrent", "dht_bootstrap_nodes"),
    ("metadata-timeout-zero", {"bittorrent": {"metadata_timeout": 0}}, "bittorrent.metadata_timeout", "greater than"),
    ("not-toml", "raw:[node\nname=", "<file>", "not valid TOML"),
    ("segment-size-zero", {"fetch": {"segment_size": 0}}, "fetch.segment_size", "greater than or equal"),
    (
        "zenodo-base-url-with-path",
        {"origins": {"zenodo": {"base_url": "https://zenodo.org/api"}}},
        "origins.zenodo.base_url",
        "no path",
    ),
    (
        "ia-base-url-with-path",
        {"origins": {"ia": {"base_url": "https://archive.org/details"}}},
        "origins.ia.base_url",
        "no path",
    ),
    (
        "ia-identifier-with-spaces",
        {"origins": {"ia": {"identifiers": ["good-one", "census 2021"]}}},
        "origins.ia.identifiers.1",
        "no spaces",
    ),
    (
        "reports-total-below-per-client",
        {"reports": {"per_client_per_hour": 20, "per_hour_total": 10}},
        "reports",
        "below per_client_per_hour",
    ),
    (
        "peer-poll-timeout-zero",
        {"bittorrent": {"peer_poll_timeout": 0}},
        "bittorrent.peer_poll_timeout",
        "greater than",
    ),
    (
        "sourcecoop-prefix-without-account",
        {"origins": {"sourcecoop": {"enabled": True, "prefixes": ["ca-orthoimagery-labs/"]}}},
        "origins.sourcecoop.prefixes",
        "account/product",
    ),
    (
        "sourcecoop-regional-endpoint-without-bucket",
        {"origins": {"sourcecoop": {"endpoint": "https://us-west-2.opendata.source.coop", "bucket": ""}}},
        "origins.sourcecoop.bucket",
        "data.source.coop proxy",
    ),
]


def _make_bad(tmp: Path, how: Any) -> str:
    if isinstance(how, dict):
        return _with(tmp, how)
    if how.startswith("drop:"):
        return _with(tmp, drop=(how[5:],))
    if how.startswith("drop-key:"):
        section, key = how[9:].split(".")
        cfg = base_config(tmp)
        cfg[section].pop(key)
        return to_toml(cfg)
    if how.startswith("raw:"):
        return how[4:]
    raise AssertionError(how)


@pytest.mark.parametrize(("case", "how", "key", "phrase"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, case: str, how: Any, key: str, phrase: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(_make_bad(tmp_path, how))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert key in r.stderr, r.stderr
    assert phrase.lower() in r.stderr.lower(), r.stderr


def test_run_with_bad_config_exits_78_and_lists_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(_with(tmp_path, {"api": {"port": "x"}, "cache": {"budjet": 1}, "log": {"level": "loud"}}))
    r = run_cli(cfg, "run")
    assert r.returncode == EX_CONFIG
    for key in ("api.port", "cache.budjet", "log.level"):
        assert key in r.stderr
    assert "(line " in r.stderr  # problems point at the line of the file


def test_missing_config_file(tmp_path: Path) -> None:
    r = run_cli(tmp_path / "nope.toml", "check-config")
    assert r.returncode == EX_CONFIG
    assert "does not exist" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; use a read-only mount instead")
def test_unwritable_cache_dir_as_user(tmp_path: Path) -> None:  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg = tmp_path / "config.toml"
    cfg.write_text(_with(tmp_path, {"paths": {"cache_dir": str(ro / "cache")}}))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG and "paths.cache_dir" in r.stderr


def test_uncreatable_cache_dir(tmp_path: Path) -> None:
    # A regular file in the way cannot become a directory, even for root.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cfg = tmp_path / "config.toml"
    cfg.write_text(_with(tmp_path, {"paths": {"cache_dir": str(blocker / "cache")}}))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG
    assert "paths.cache_dir" in r.stderr and "cannot create directory" in r.stderr


def test_budget_larger_than_filesystem(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(_with(tmp_path, {"cache": {"budget": "900000TB"}}))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG
    assert "cache.budget" in r.stderr and "larger than the filesystem" in r.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "config.toml"
        cfg.write_text(_with(tmp_path, {"api": {"port": port}}))
        r = run_cli(cfg, "run")
    assert r.returncode == EX_CONFIG
    assert "api.port" in r.stderr and "already in use" in r.stderr


def test_missing_torrent_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(_with(tmp_path, {"origins": {"torrents": {"files": [str(tmp_path / "missing.torrent")]}}}))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG and "origins.torrents.files" in r.stderr


def test_line_numbers_point_at_the_key(tmp_path: Path) -> None:
    text = _with(tmp_path, {"api": {"port": "eighty"}})
    with pytest.raises(ConfigError) as ei:
        parse_config(text, tmp_path / "c.toml")
    (p,) = ei.value.problems
    assert p.line is not None
    assert text.splitlines()[p.line - 1].startswith("port")


def test_timetable_parsing() -> None:
    assert parse_days("mon-fri") == frozenset(range(5))
    assert parse_days("sat,sun") == frozenset({5, 6})
    assert parse_days("fri-mon") == frozenset({4, 5, 6, 0})
    assert parse_hours("22-06") == frozenset({22, 23, 0, 1, 2, 3, 4, 5})
    assert parse_hours("09-17") == frozenset(range(9, 17))


def test_reload_plan_separates_live_keys(tmp_path: Path) -> None:
    from noded.core.reload import plan
    from tests.conftest import deep_merge

    base = base_config(tmp_path)
    a = parse_config(to_toml(base), tmp_path / "c.toml")
    changed = deep_merge(base, {"log": {"level": "warning"}, "api": {"port": 1, "cors_origins": ["https://x.org"]}})
    b = parse_config(to_toml(changed), tmp_path / "c.toml")
    running, applied, restart = plan(a, b)
    assert applied == ["api.cors_origins", "log.level"]
    assert restart == ["api.port"]
    assert running.api.port == a.api.port and running.api.cors_origins == ["https://x.org"]


def test_run_time_broken_values_are_refused_at_their_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    text = _with(tmp_path, {"fetch": {"segment_size": 0}})
    cfg.write_text(text)
    line = next(i for i, raw in enumerate(text.splitlines(), start=1) if raw.startswith("segment_size"))
    r = run_cli(cfg, "check-config")
    assert r.returncode == EX_CONFIG and f"fetch.segment_size (line {line})" in r.stderr, r.stderr
