"""The BitTorrent clients people run, from Debian, for interop tests and benchmarks: transmission-daemon
(tests/third_party.py), qbittorrent-nox and aria2c, each inside a network namespace on a veth pair
(tests/third_party.VethNamespace), so noded, the tracker and the client talk over a real link and no
byte leaves the machine. DHT, local peer discovery, peer exchange and UPnP are off in every client.

Every client has the same small interface: `add_magnet(uri)`, `add_torrent(bytes)`, `wait_done(ih)`,
and `path(name)` of the downloaded file; processes are started and killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Protocol

from noded.cache.layout import CacheLayout
from noded.core.config import load_config
from noded.core.store import Store
from tests.conftest import NodedProcess
from tests.p2p_helpers import put_cached_sync
from tests.third_party import Transmission, VethNamespace


class Client(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def add_magnet(self, uri: str) -> None: ...
    def add_torrent(self, data: bytes) -> None: ...
    def wait_done(self, infohash: str, timeout: float) -> None: ...
    def path(self, name: str) -> Path: ...
    def log(self) -> str: ...


def missing(client: str) -> str | None:
    exe = {"transmission": "transmission-daemon", "qbittorrent": "qbittorrent-nox", "aria2": "aria2c"}[client]
    return None if shutil.which(exe) else f"{exe} missing (apt-get install {exe.replace('aria2c', 'aria2')})"


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TransmissionClient:
    name = "transmission"

    def __init__(self, ns: VethNamespace, root: Path) -> None:
        self.t = Transmission(ns, root)
        self._ids: dict[str, int] = {}

    def start(self) -> None:
        self.t.start()

    def stop(self) -> None:
        self.t.stop()

    def add_magnet(self, uri: str) -> None:
        self.t.add(url=uri)

    def add_torrent(self, data: bytes) -> None:
        self.t.add(metainfo=data)

    def wait_done(self, infohash: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ts = self.t.rpc("torrent-get", fields=["hashString", "percentDone", "error", "errorString"])["torrents"]
            for t in ts:
                if t["hashString"] == infohash and t["percentDone"] >= 1.0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"transmission did not finish {infohash}: {ts}\n{self.t.log()}")

    def path(self, name: str) -> Path:
        return self.t.downloads / name

    def log(self) -> str:
        return self.t.log()


class QbittorrentClient:
    """qbittorrent-nox with a throw-away profile; its Web API needs no login from the namespace."""

    name = "qbittorrent"

    def __init__(self, ns: VethNamespace, root: Path, peer_port: int = 6882, web_port: int = 8080) -> None:
        self.ns = ns
        self.root = root
        self.downloads = root / "downloads"
        self.peer_port = peer_port
        self.web_port = web_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://{self.ns.ns_ip}:{self.web_port}/api/v2"

    def start(self) -> None:
        conf = self.root / "profile" / "qBittorrent" / "config"
        conf.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)
        (conf / "qBittorrent.conf").write_text(
            "[LegalNotice]\nAccepted=true\n\n"
            "[BitTorrent]\n"
            f"Session\\Port={self.peer_port}\n"
            f"Session\\DefaultSavePath={self.downloads}\n"
            "Session\\DHTEnabled=false\nSession\\LSDEnabled=false\nSession\\PeXEnabled=false\n"
            "Session\\QueueingSystemEnabled=false\nSession\\AnonymousModeEnabled=false\n"
            "Session\\GlobalMaxSeedingMinutes=-1\nSession\\Encryption=0\n\n"
            "[Preferences]\n"
            "Connection\\UPnP=false\n"
            f"WebUI\\Port={self.web_port}\nWebUI\\Address=*\nWebUI\\LocalHostAuth=false\n"
            "WebUI\\AuthSubnetWhitelistEnabled=true\nWebUI\\AuthSubnetWhitelist=0.0.0.0/0\n"
            "WebUI\\HostHeaderValidation=false\nWebUI\\CSRFProtection=false\n"
        )
        self._log = open(self.root / "qbittorrent.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, "qbittorrent-nox", f"--profile={self.root / 'profile'}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self._get("app/version")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise TimeoutError("qbittorrent-nox Web API did not come up:\n" + self.log())

    def stop(self) -> None:
        _kill(self.proc)
        self.proc = None

    def _get(self, path: str, **query: str) -> Any:
        url = f"{self.api}/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"[", b"{") else raw.decode()

    def _post(self, path: str, fields: dict[str, str], files: dict[str, bytes] | None = None) -> str:
        boundary = uuid.uuid4().hex
        parts = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for k, data in (files or {}).items():
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="torrents"; filename="{k}"\r\n'
                "Content-Type: application/x-bittorrent\r\n\r\n"
            )
            parts.append(head.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{self.api}/{path}", data=body, method="POST")
        req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def add_magnet(self, uri: str) -> None:
        out = self._post("torrents/add", {"urls": uri, "savepath": str(self.downloads)})
        assert out.strip() == "Ok.", out

    def add_torrent(self, data: bytes, save_path: Path | None = None, skip_checking: bool = False) -> None:
        fields = {"savepath": str(save_path or self.downloads), "skip_checking": str(skip_checking).lower()}
        out = self._post("torrents/add", fields, {"x.torrent": data})
        assert out.strip() == "Ok.", out

    def info(self, infohash: str) -> dict[str, Any]:
        ts = self._get("torrents/info", hashes=infohash)
        return dict(ts[0]) if ts else {}

    def wait_done(self, infohash: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        t: dict[str, Any] = {}
        while time.monotonic() < deadline:
            t = self.info(infohash)
            if t and t.get("progress", 0) >= 1.0 and t.get("state") not in ("checkingUP", "checkingDL"):
                return
            time.sleep(0.2)
        raise AssertionError(f"qbittorrent did not finish {infohash}: {t}\n{self.log()}")

    def path(self, name: str) -> Path:
        return self.downloads / name

    def log(self) -> str:
        try:
            return (self.root / "qbittorrent.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class Aria2Client:
    """aria2c, one run per download: it exits once the file is complete (no seeding)."""

    name = "aria2"

    def __init__(self, ns: VethNamespace, root: Path, peer_port: int = 6883) -> None:
        self.ns = ns
        self.root = root
        self.downloads = root / "downloads"
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.downloads.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        _kill(self.proc)
        self.proc = None

    def _run(self, target: str) -> None:
        cmd = [
            "ip", "netns", "exec", self.ns.name, "aria2c",
            f"--dir={self.downloads}", f"--listen-port={self.peer_port}",
            "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
            "--seed-time=0", "--bt-save-metadata=false", "--follow-torrent=mem", "--file-allocation=none",
            "--check-integrity=true", "--console-log-level=warn", "--summary-interval=0",
            f"--log={self.root / 'aria2.log'}", "--log-level=info",
            target,
        ]  # fmt: skip
        self._out = open(self.root / "aria2.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)

    def add_magnet(self, uri: str) -> None:
        self._run(uri)

    def add_torrent(self, data: bytes) -> None:
        p = self.root / f"{uuid.uuid4().hex}.torrent"
        p.write_bytes(data)
        self._run(str(p))

    def wait_done(self, infohash: str, timeout: float) -> None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"aria2c did not finish {infohash} in {timeout}s\n{self.log()}") from None
        assert rc == 0, f"aria2c exited {rc}\n{self.log()}"

    def path(self, name: str) -> Path:
        return self.downloads / name

    def log(self) -> str:
        out = []
        for f in ("aria2.out", "aria2.log"):
            with contextlib.suppress(OSError):
                out.append((self.root / f).read_text(errors="replace")[-3000:])
        return "\n".join(out)


def make_client(kind: str, ns: VethNamespace, root: Path) -> Client:
    if kind == "transmission":
        return TransmissionClient(ns, root)
    if kind == "qbittorrent":
        return QbittorrentClient(ns, root)
    return Aria2Client(ns, root)


def namespace_or_skip() -> VethNamespace:
    import pytest

    from tests.third_party import netns_available

    why = netns_available()
    if why:
        pytest.skip(why)
    ns = VethNamespace()
    try:
        ns.up()
    except subprocess.CalledProcessError as e:
        ns.down()
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode(errors='replace')}")
    return ns


def _info(torrent: bytes) -> bytes:
    import libtorrent as lt

    return bytes(lt.torrent_info(torrent).info_section())


def strip_url_list(torrent: bytes) -> bytes:
    """The same torrent without its BEP 19 web seeds (the info dict, hence the infohash, unchanged)."""
    from noded.p2p import torrent as T

    return T.encode_with_info(_info(torrent), trackers=T.announce_urls(torrent))


def only_web_seed(torrent: bytes, web_seed: str) -> bytes:
    """The same torrent with no tracker and one web seed: only HTTP can serve it."""
    from noded.p2p import torrent as T

    return T.encode_with_info(_info(torrent), web_seeds=[web_seed])


def magnet_without(uri: str, *params: str) -> str:
    """A magnet with some parameters removed (e.g. ws=, so only the peer wire can serve it)."""
    parts = urllib.parse.urlsplit(uri)
    q = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in params]
    return "magnet:?" + urllib.parse.urlencode(q, safe=":/")


def seed_store(node: NodedProcess, key: str, data: bytes) -> None:
    cfg = load_config(node.config)
    store = Store(cfg.paths.state_dir / "noded.sqlite3")
    store.open_sync()
    put_cached_sync(store, CacheLayout(cfg.paths.cache_dir, cfg.paths.state_dir), key, data)
    store.close_sync()


def wait(pred: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
