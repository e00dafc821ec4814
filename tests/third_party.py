"""A real third-party BitTorrent client for tests: transmission-daemon (Debian) in its own network
namespace, joined to the host by a veth pair (transmission 3.00 ignores peers at 127.0.0.1).

Namespaces and links get unique names and are always deleted at teardown; the daemon is started
and killed by pid. Traffic stays on the veth pair the test creates.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def netns_available() -> str | None:
    """None when namespaces and transmission-daemon are usable, else the reason to skip."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("transmission-daemon"):
        return "ip or transmission-daemon missing (apt-get install iproute2 transmission-daemon)"
    return None


class VethNamespace:
    """A namespace `name` with address `ns_ip`, reachable from the host at `host_ip`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(1000):03d}"
        self.name = f"p2pt{tag}"
        self.host_if = f"vh{tag}"
        self.ns_if = f"vn{tag}"
        a, b = 100 + os.getpid() % 100, random.randrange(1, 250)
        self.host_ip = f"10.{a}.{b}.1"
        self.ns_ip = f"10.{a}.{b}.2"

    def up(self) -> None:
        cmds = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            ["ip", "link", "set", self.ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Transmission:
    """transmission-daemon inside a namespace, driven over its JSON RPC."""

    def __init__(self, ns: VethNamespace, root: Path) -> None:
        self.ns = ns
        self.root = root
        self.conf = root / "conf"
        self.downloads = root / "downloads"
        self.rpc_port = 9091
        self.peer_port = 51413
        self.proc: subprocess.Popen[bytes] | None = None
        self._sid = ""

    @property
    def url(self) -> str:
        return f"http://{self.ns.ns_ip}:{self.rpc_port}/transmission/rpc"

    def start(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        settings = {
            "download-dir": str(self.downloads),
            "incomplete-dir-enabled": False,
            "rpc-bind-address": self.ns.ns_ip,
            "rpc-port": self.rpc_port,
            "rpc-authentication-required": False,
            "rpc-whitelist-enabled": False,
            "rpc-host-whitelist-enabled": False,
            "peer-port": self.peer_port,
            "peer-port-random-on-start": False,
            "bind-address-ipv4": self.ns.ns_ip,
            "dht-enabled": False,
            "lpd-enabled": False,
            "pex-enabled": False,
            "utp-enabled": False,
            "port-forwarding-enabled": False,
            "ratio-limit-enabled": False,
            "idle-seeding-limit-enabled": False,
            "speed-limit-up-enabled": False,
            "speed-limit-down-enabled": False,
            "encryption": 1,
            "message-level": 2,
        }
        (self.conf / "settings.json").write_text(json.dumps(settings))
        self._log = open(self.root / "transmission.log", "ab")  # noqa: SIM115
        prefix = ["ip", "netns", "exec", self.ns.name] if self.ns.name else []
        self.proc = subprocess.Popen(
            [*prefix, "transmission-daemon", "-f", "-g", str(self.conf)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.rpc("session-get")
                return
            time.sleep(0.2)
        raise TimeoutError("transmission-daemon RPC did not come up:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return (self.root / "transmission.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def rpc(self, method: str, **arguments: Any) -> dict[str, Any]:
        body = json.dumps({"method": method, "arguments": arguments}).encode()
        for _ in range(3):
            req = urllib.request.Request(self.url, data=body, method="POST")
            req.add_header("X-Transmission-Session-Id", self._sid)
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    out = json.loads(r.read())
                if out.get("result") != "success":
                    raise RuntimeError(f"transmission {method}: {out.get('result')}")
                return dict(out.get("arguments", {}))
            except urllib.error.HTTPError as e:
                if e.code == 409:
                    self._sid = e.headers.get("X-Transmission-Session-Id", "")
                    continue
                raise
        raise RuntimeError("transmission RPC session id dance failed")

    def add(self, *, url: str | None = None, metainfo: bytes | None = None, download_dir: Path | None = None) -> int:
        args: dict[str, Any] = {"download-dir": str(download_dir or self.downloads)}
        if url:
            args["filename"] = url
        if metainfo:
            args["metainfo"] = base64.b64encode(metainfo).decode()
        out = self.rpc("torrent-add", **args)
        t = out.get("torrent-added") or out.get("torrent-duplicate")
        assert t, out
        return int(t["id"])

    def torrent(self, tid: int) -> dict[str, Any]:
        fields = [
            "id",
            "name",
            "percentDone",
            "status",
            "error",
            "errorString",
            "haveValid",
            "peersConnected",
            "webseedsSendingToUs",
            "rateDownload",
            "hashString",
        ]
        ts = self.rpc("torrent-get", ids=[tid], fields=fields)["torrents"]
        assert ts, f"no torrent {tid}"
        return dict(ts[0])

    def wait_done(self, tid: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        t: dict[str, Any] = {}
        while time.monotonic() < deadline:
            t = self.torrent(tid)
            if t["percentDone"] >= 1.0:
                return t
            time.sleep(0.3)
        raise AssertionError(f"transmission did not finish: {t}\n{self.log()}")


@pytest.fixture
def transmission(tmp_path: Path) -> Iterator[Transmission]:
    why = netns_available()
    if why:
        pytest.skip(why)
    ns = VethNamespace()
    try:
        ns.up()
    except subprocess.CalledProcessError as e:
        ns.down()
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode(errors='replace')}")
    t = Transmission(ns, tmp_path / "transmission")
    try:
        t.start()
        yield t
    finally:
        t.stop()
        ns.down()
