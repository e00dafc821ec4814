"""`noded check-config` beside a running daemon: the ports that daemon holds are not a conflict, any
other process's are, and a daemon on another state directory is not "ours"."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from noded.core.config import EX_CONFIG
from tests.conftest import ROOT, NodedProcess, base_config, free_port, noded_env, to_toml, write_config


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "noded", "-c", str(config), "check-config"],
        capture_output=True,
        text=True,
        env=noded_env(),
        cwd=ROOT,
        timeout=60,
    )


def test_check_config_accepts_the_running_daemons_ports(noded_factory: Any, tmp_path: Path) -> None:
    node: NodedProcess = noded_factory("toronto")
    cfg = tomllib.loads(node.config.read_text())
    _, health = node.get("/healthz")
    assert health["status"] == "ok" and len(health["instance"]) == 32

    r = check(node.config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is valid" in r.stdout
    assert f"(pid {node.pid}) is running" in r.stdout
    assert f"api.port 127.0.0.1:{cfg['api']['port']}" in r.stdout
    assert f"http_mirror.port 127.0.0.1:{cfg['http_mirror']['port']}" in r.stdout

    # The same configuration edited to a port another process holds still fails, naming the key.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        edited = dict(cfg, http_mirror=dict(cfg["http_mirror"], port=taken))
        path = node.config.with_name("edited.toml")
        path.write_text(to_toml(edited))
        r = check(path)
        assert r.returncode == EX_CONFIG, r.stdout + r.stderr
        assert "http_mirror.port" in r.stderr and "already in use" in r.stderr
        assert "api.port" not in r.stderr  # still the daemon's own

    # Another state directory: the daemon holding those ports is not this configuration's.
    stranger = base_config(tmp_path / "other", api=cfg["api"], http_mirror=cfg["http_mirror"])
    r = check(write_config(tmp_path / "other", stranger))
    assert r.returncode == EX_CONFIG
    assert "api.port" in r.stderr and "already in use" in r.stderr
    assert "is running" not in r.stdout

    # Stopped: the record is gone, and the ports are free again.
    assert node.stop() == 0
    assert not (Path(cfg["paths"]["state_dir"]) / "noded.instance").exists()
    r = check(node.config)
    assert r.returncode == 0 and "is running" not in r.stdout


def test_a_stale_record_proves_nothing(tmp_path: Path) -> None:
    """A record left by a crashed daemon, whose port another process now holds, is not believed."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = base_config(tmp_path, api={"port": port}, http_mirror={"port": free_port()})
        state = Path(cfg["paths"]["state_dir"])
        state.mkdir(parents=True)
        record = {"id": "0" * 32, "pid": 1, "listens": {"api.port": ["127.0.0.1", port]}}
        (state / "noded.instance").write_text(json.dumps(record))
        r = check(write_config(tmp_path, cfg))
        assert r.returncode == EX_CONFIG
        assert "api.port" in r.stderr and "already in use" in r.stderr
