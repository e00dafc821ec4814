"""Shared test helpers: free ports, config files, and a real `noded run` subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FIXTURE_TORRENTS = SHARED / "fixtures" / "d4c-torrents"


_GIVEN: set[int] = set()
_RANDOM = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, chosen outside the kernel's ephemeral range and never twice per session.

    A port from bind(0) is an ephemeral one: before the daemon under test binds it, the kernel can hand
    it out as the local port of some outgoing connection (another daemon's peer poll), and the daemon
    then refuses to start ("already in use"; seen in CI).
    """
    lo, hi = _ephemeral_range()
    first, last = (10_000, lo - 1) if lo > 12_000 else (hi + 1, 65_535)
    for _ in range(500):
        port = _RANDOM.randint(first, last)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # a crowded machine: fall back to the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for test configs (tables, arrays of tables, scalars, lists)."""
    scalars = {
        k: v
        for k, v in data.items()
        if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))
    }
    out = []
    if prefix and scalars:
        out.append(f"[{prefix}]")
    out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in data.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            sub = to_toml(v, name)
            if sub.strip():
                out.append(sub)
            elif not any(isinstance(x, dict) for x in v.values()):
                out.append(f"[{name}]")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for entry in v:
                out.append(f"[[{name}]]")
                out += [f"{a} = {_toml_value(b)}" for a, b in entry.items()]
    return "\n".join(out) + "\n"


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(tmp: Path, name: str = "toronto", **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"name": name, "region": "test"},
        "paths": {"cache_dir": str(tmp / "cache"), "state_dir": str(tmp / "state")},
        "cache": {"budget": "1GB", "free_space_floor": "1MB"},
        "api": {"bind": "127.0.0.1", "port": free_port()},
        "http_mirror": {"bind": "127.0.0.1", "port": free_port()},
        "log": {"format": "json", "level": "debug"},
        "origins": {"inbox": {"dir": str(tmp / "inbox")}},
        "bittorrent": {
            "listen_interfaces": f"127.0.0.1:{free_port()}",
            "dht": False,
            "lsd": False,
            "upnp": False,
            "natpmp": False,
        },
        "probe": {"enabled": False},
    }
    return deep_merge(cfg, overrides)


def write_config(tmp: Path, cfg: dict[str, Any], name: str = "config.toml") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / name
    p.write_text(to_toml(cfg))
    return p


def noded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def http_json(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


class NodedProcess:
    """`python -m noded run` as a real subprocess, stdout captured to a file."""

    def __init__(
        self, config: Path, env: dict[str, str] | None = None, log: Path | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.prefix = list(prefix)  # a command the daemon runs under (e.g. unshare with tighter limits)
        self.env = noded_env(env)
        self.log_path = log or config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        cfg_text = config.read_text()
        import tomllib

        data = tomllib.loads(cfg_text)
        self.api = f"http://{data['api']['bind']}:{data['api']['port']}"

    def start(self, wait_ready: bool = True, timeout: float = 30) -> NodedProcess:
        self._logf = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "noded", "-c", str(self.config), "run"],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(ROOT),
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"noded exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = http_json(self.api + "/readyz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"noded not ready after {timeout}s:\n{self.output()[-4000:]}")

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return http_json(self.api + path, **kw)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture
def noded_factory(tmp_path: Path) -> Iterator[Any]:
    """Make and start nodes; every node left running is killed at teardown."""
    procs: list[NodedProcess] = []

    def make(
        name: str = "toronto",
        start: bool = True,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        **overrides: Any,
    ) -> NodedProcess:
        d = tmp_path / name
        cfg = base_config(d, name=name, **overrides)
        p = NodedProcess(write_config(d, cfg), env=env, prefix=prefix)
        procs.append(p)
        if start:
            p.start()
        return p

    yield make
    for p in procs:
        p.kill()
