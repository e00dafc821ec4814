"""SIGHUP, key by key: every configuration key is either applied in place or reported as needing a
restart (and keeps its running value until then), and what is reported is what the node does."""

from __future__ import annotations

import copy
import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from noded.cache.layout import CacheLayout
from noded.core.config import Config, ConfigError, load_config, parse_config
from noded.core.reload import changed_keys, config_keys, is_live, plan
from noded.core.store import Store
from noded.p2p import torrent as T
from tests.conftest import (
    ROOT,
    NodedProcess,
    base_config,
    free_port,
    http_json,
    noded_env,
    to_toml,
    write_config,
)
from tests.p2p_helpers import content, put_cached_sync

# Changes that the generic rules below cannot guess (lists of structured values, patterned strings).
EXPLICIT: dict[str, list[Any]] = {
    "api.cors_origins": [["https://maps.example.org"]],
    "origins.preference": [["zenodo", "sourcecoop", "r2", "ia"]],
    "origins.sourcecoop.prefixes": [["statcan/census"]],
    "origins.zenodo.records": [[1234]],
    "origins.zenodo.concepts": [[5678]],
    "origins.zenodo.communities": [["dataforcanada"]],
    "origins.ia.identifiers": [["dataforcanada-census"]],
    "origins.ia.collections": [["dataforcanada"]],
    "origins.ia.skip_suffixes": [["_thumb.jpg"]],
    "origins.stac.catalogs": [["https://stac.example.org/catalog.json"]],
    "origins.stac.geoparquet": [["https://stac.example.org/items.parquet"]],
    "origins.stac.skip_roles": [["thumbnail"]],
    "origins.torrents.files": [["/var/lib/noded/published/a.torrent"]],
    "origins.torrents.magnets": [["magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=layer.pmtiles"]],
    "peers": [[{"name": "amsterdam", "api_url": "http://127.0.0.1:9", "bittorrent": "127.0.0.1:9"}]],
    "seed_targets": [[{"name": "netcup", "bittorrent": "127.0.0.1:9"}]],
    "bittorrent.listen_interfaces": [f"127.0.0.1:{free_port()}"],
    "bittorrent.trackers": [["http://127.0.0.1:9/announce"]],
    "bittorrent.public_address": ["127.0.0.1:6881"],
    "bittorrent.dht_bootstrap_nodes": [["127.0.0.1:6881"]],
    "bittorrent.web_seed_templates": [["https://data.example.org/processed/{key}"], ["https://data.example.org/"]],
    "http_mirror.strip_prefix": ["/processed"],
    "schedule.timezone": ["America/Toronto"],
    "schedule.slots": [[{"days": "mon-fri", "hours": "0-6", "down": "10MB/s"}]],
    "schedule.default_down": ["10MB/s"],
    "schedule.default_up": ["5MB/s"],
    "volunteer.priorities": [{"census": 2.0}],
    "api.bind": ["127.0.0.2"],
    "http_mirror.bind": ["127.0.0.2"],
    "api.port": [free_port()],
    "http_mirror.port": [free_port()],
    "cache.quota": ["2GB"],
    "r2.public_url": ["https://r2.example.org"],
    "volunteer.budget": ["1GB"],
}


def _get(model: Any, key: str) -> Any:
    for part in key.split("."):
        model = getattr(model, part)
    return model


def _set(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    d = out
    *head, last = key.split(".")
    for part in head:
        d = d.setdefault(part, {})
    d[last] = value
    return out


def _literal_options(key: str) -> list[Any]:
    model: Any = Config
    *head, last = key.split(".")
    for part in head:
        model = model.model_fields[part].annotation
    ann = model.model_fields[last].annotation
    return list(typing.get_args(ann)) if typing.get_origin(ann) is typing.Literal else []


def _candidates(key: str, value: Any) -> list[Any]:
    out = list(EXPLICIT.get(key, []))
    out += [o for o in _literal_options(key) if o != value]
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, value - 1, value * 2]
    elif isinstance(value, float):
        out += [value + 1, value / 2, round(value * 0.99, 6)]
    elif isinstance(value, Path):
        out.append(str(value / "elsewhere"))
    elif isinstance(value, str):
        out += [value + "x", "x"]
    return out


def _changed(base: dict[str, Any], cfg: Config, key: str, tmp: Path) -> Config:
    """A valid configuration that differs from `cfg` at `key` (other keys may follow, e.g. enabling R2)."""
    for candidate in _candidates(key, _get(cfg, key)):
        try:
            new = parse_config(to_toml(_set(base, key, candidate)), tmp / "config.toml")
        except ConfigError:
            continue
        if key in changed_keys(cfg, new):
            return new
    raise AssertionError(f"no valid change known for config key {key!r}: add one to EXPLICIT")


def test_every_key_is_applied_or_reported_as_needing_a_restart(tmp_path: Path) -> None:
    base = base_config(tmp_path)
    cfg = parse_config(to_toml(base), tmp_path / "config.toml")
    keys = list(config_keys())
    assert len(keys) == len(set(keys)) > 100
    for key in keys:
        new = _changed(base, cfg, key, tmp_path)
        running, applied, restart = plan(cfg, new)
        changed = changed_keys(cfg, new)
        assert sorted(applied + restart) == sorted(changed), key
        assert not set(applied) & set(restart)
        assert (key in applied) == is_live(key) and (key in restart) == (not is_live(key))
        # What is applied runs with its new value; what needs a restart keeps the running one.
        for k in applied:
            assert _get(running, k) == _get(new, k), k
        for k in restart:
            assert _get(running, k) == _get(cfg, k), k
        # Reloading the same file again reports the restart-only keys again, and applies nothing new.
        _, again_applied, again_restart = plan(running, new)
        assert again_applied == [] and again_restart == restart


def _torrent_file(tmp: Path, name: str, seed: int) -> tuple[Path, str]:
    data = content(64 * 1024 + seed, seed)
    src = tmp / "published" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    pieces, _ = T.hash_files([src])
    info = T.single_file_info(name, len(data), hashlib.md5(data).hexdigest(), pieces, source=None)
    out = tmp / "published" / f"{name}.torrent"
    out.write_bytes(T.encode_torrent(info, web_seeds=[f"http://127.0.0.1:9/processed/{name}"]))
    return out, T.infohash_of(info)


class Listener:
    """A TCP endpoint standing in for a seed target: counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _wait(what: str, cond: Any, node: NodedProcess, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{node.output()[-3000:]}")


def _torrent_locations(node: NodedProcess, key: str) -> list[str]:
    _, body = node.get("/v1/datasets?limit=200")
    for d in body["datasets"]:
        if d["key"] == key:
            return [loc["url"] for loc in d["locations"] if loc["origin"] == "torrent"]
    return []


@pytest.mark.slow
def test_sighup_applies_and_reports_key_by_key(tmp_path: Path) -> None:
    a_file, _ = _torrent_file(tmp_path, "a.pmtiles", 1)
    b_file, _ = _torrent_file(tmp_path, "b.pmtiles", 2)
    data = base_config(
        tmp_path,
        bittorrent={"seed_target_interval": 3600.0},
        origins={"torrents": {"files": [str(a_file)]}},
        log={"level": "debug"},
    )
    cfg_path = write_config(tmp_path, data)
    # Something to seed, so there is something to offer a seed target.
    cfg = load_config(cfg_path)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    put_cached_sync(store, CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir), "seeded.bin", content(50_000, 3))
    store.close_sync()
    node = NodedProcess(cfg_path).start()
    target = Listener()
    try:
        _wait("a.pmtiles imported", lambda: node.get("/v1/items/a.pmtiles")[0] == 200, node)
        _wait("a.pmtiles's web seed listed", lambda: _torrent_locations(node, "a.pmtiles"), node)
        _wait("seeding", lambda: node.get("/v1/items/seeded.bin")[1].get("seeding"), node)
        assert node.get("/v1/status")[1]["reload"] is None
        old_port = data["api"]["port"]
        new_port = free_port()

        data["origins"]["torrents"]["files"] = [str(b_file)]  # a.pmtiles withdrawn, b.pmtiles added
        data["seed_targets"] = [{"name": "netcup", "bittorrent": f"127.0.0.1:{target.port}"}]
        data["bittorrent"]["seed_target_interval"] = 3.0
        data["log"]["level"] = "info"
        data["api"]["port"] = new_port
        cfg_path.write_text(to_toml(data))
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

        rep = _wait("the reload report", lambda: node.get("/v1/status")[1]["reload"], node)
        assert set(rep["applied"]) == {
            "origins.torrents.files",
            "seed_targets",
            "bittorrent.seed_target_interval",
            "log.level",
        }
        assert rep["restart_required"] == ["api.port"]
        assert rep["at"] > time.time() - 60
        ev = next(e for e in node.log_events() if e["event"] == "config.reloaded")
        assert (sorted(ev["applied"]), ev["restart_required"]) == (sorted(rep["applied"]), ["api.port"])

        # Applied: the new torrent is loaded, the removed one withdrawn, the new seed target contacted
        # now (the old interval was an hour).
        _wait("b.pmtiles imported", lambda: node.get("/v1/items/b.pmtiles")[0] == 200, node)
        assert _torrent_locations(node, "b.pmtiles") == ["http://127.0.0.1:9/processed/b.pmtiles"]
        _wait("a.pmtiles withdrawn", lambda: not _torrent_locations(node, "a.pmtiles"), node)
        _wait("the new seed target contacted", lambda: target.accepted > 0, node, timeout=10)
        # Needs a restart: the API still listens where it did, and not on the new port.
        assert http_json(f"http://127.0.0.1:{old_port}/healthz")[0] == 200
        with pytest.raises(OSError):
            http_json(f"http://127.0.0.1:{new_port}/healthz", timeout=2)
        # `noded status` finds the daemon where it listens (not at the file's new port) and says what waits.
        out = subprocess.run(
            [sys.executable, "-m", "noded", "-c", str(cfg_path), "status"],
            capture_output=True,
            text=True,
            env=noded_env(),
            cwd=ROOT,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "waiting for a restart: api.port" in out.stdout

        # The same file again: nothing new applied, the port change still waiting for a restart.
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        again = _wait(
            "a second report", lambda: (r := node.get("/v1/status")[1]["reload"])["at"] > rep["at"] and r, node
        )
        assert again["applied"] == [] and again["restart_required"] == ["api.port"]

        # A broken file is rejected, and the status says so; the node runs on.
        cfg_path.write_text("[node\n")
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        bad = _wait("the rejection", lambda: node.get("/v1/status")[1]["reload"].get("rejected"), node)
        assert bad and node.get("/readyz")[0] == 200
        assert node.stop() == 0
    finally:
        target.close()
        node.kill()
