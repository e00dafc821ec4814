"""`noded run` as a real subprocess talking sd_notify to a test NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from tests.conftest import NodedProcess, base_config, http_json, to_toml, write_config


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket; records (time, message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float = 20, count: int = 1) -> list[tuple[float, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines(prefix)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"no {count}x {prefix!r}; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._t.join(2)


def test_ready_status_watchdog_and_graceful_stop(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    cfg = write_config(tmp_path, base_config(tmp_path))
    node = NodedProcess(cfg, env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"})
    try:
        node.start(wait_ready=False)
        listener.wait_for("READY=1", timeout=30)
        # READY=1 is sent only once the store is open and the API serves: /readyz answers at once.
        status, body = node.get("/readyz", timeout=2)
        assert status == 200, body
        assert body["components"]["store"] == "running"

        # WATCHDOG_USEC=1s -> pings every 0.5 s.
        pings = listener.wait_for("WATCHDOG=1", count=3, timeout=10)
        assert len(pings) >= 3

        # STATUS lines arrive and change as the node does something (API traffic shows in the rates).
        listener.wait_for("STATUS=", count=2)
        for _ in range(50):
            http_json(node.api + "/v1/status")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({m for _, m in listener.lines("STATUS=")}) < 2:
            time.sleep(0.1)
        statuses = {m for _, m in listener.lines("STATUS=")}
        assert len(statuses) >= 2, statuses
        assert any("cached" in s and "peers up" in s for s in statuses)

        t0 = time.monotonic()
        rc = node.stop(signal.SIGTERM, timeout=10)
        assert rc == 0, node.output()
        assert time.monotonic() - t0 < 10
        assert listener.lines("STOPPING=1")
        events = [e["event"] for e in node.log_events()]
        assert events.index("daemon.stopping") < events.index("daemon.stopped")
        # Components stop in reverse order of starting.
        started = [e["component"] for e in node.log_events() if e["event"] == "component.started"]
        stopped = [e["component"] for e in node.log_events() if e["event"] == "component.stopped"]
        assert stopped == list(reversed(started))
    finally:
        node.kill()
        listener.close()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, base_config(tmp_path))
    node = NodedProcess(cfg).start()
    try:
        assert node.stop(signal.SIGINT) == 0
    finally:
        node.kill()


def test_sighup_reloads_what_it_can_and_names_the_rest(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    cfg = write_config(tmp_path, data)
    node = NodedProcess(cfg).start()
    try:
        data["log"]["level"] = "info"
        data["api"]["max_body_bytes"] = 1234  # needs a restart
        data["schedule"] = {"default_down": "10MB/s"}
        cfg.write_text(to_toml(data))
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        ev = None
        while time.monotonic() < deadline and ev is None:
            ev = next((e for e in node.log_events() if e["event"] == "config.reloaded"), None)
            time.sleep(0.1)
        assert ev is not None, node.output()
        assert set(ev["applied"]) == {"log.level", "schedule.default_down"}
        assert ev["restart_required"] == ["api.max_body_bytes"]
        # A broken file on SIGHUP is rejected; the node keeps running on the old config.
        cfg.write_text("[node\n")
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e["event"] == "config.reload_rejected" for e in node.log_events()
        ):
            time.sleep(0.1)
        assert any(e["event"] == "config.reload_rejected" for e in node.log_events())
        assert node.get("/readyz")[0] == 200
        assert node.stop() == 0
    finally:
        node.kill()
