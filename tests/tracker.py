"""opentracker (Debian) on 127.0.0.1 for tests and benchmarks: whitelisted infohashes, run as nobody."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.conftest import free_port


def opentracker_missing() -> str | None:
    if not shutil.which("opentracker"):
        return "opentracker missing (apt-get install opentracker)"
    return None


@contextlib.contextmanager
def opentracker(infohashes: Iterable[str], host: str = "127.0.0.1") -> Iterator[str]:
    """Start opentracker tracking only `infohashes`; yields its announce URL. Killed by pid at exit."""
    port = free_port(host)
    with tempfile.TemporaryDirectory(prefix="otrack-") as d:
        root = Path(d)
        os.chmod(root, 0o755)
        # The whitelist is read after chroot into -d, so its path is given from the new root.
        (root / "whitelist").write_text("".join(f"{ih}\n" for ih in infohashes))
        os.chmod(root / "whitelist", 0o644)
        cmd = ["opentracker", "-i", host, "-p", str(port), "-P", str(port), "-u", "nobody"]
        cmd += ["-d", str(root), "-w", "/whitelist"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"opentracker did not start (exit {proc.poll()})")
                time.sleep(0.05)
            yield f"http://{host}:{port}/announce"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def scrape(announce: str, infohash: str) -> dict[str, int]:
    """The tracker's scrape of one torrent (BEP 48): complete (seeds), incomplete, downloaded; {} if unknown."""
    import urllib.parse
    import urllib.request

    import libtorrent as lt

    url = announce.replace("/announce", "/scrape") + "?info_hash=" + urllib.parse.quote(bytes.fromhex(infohash))
    with urllib.request.urlopen(url, timeout=5) as r:
        body = lt.bdecode(r.read())
    files = body.get(b"files", {}) if isinstance(body, dict) else {}
    entry = files.get(bytes.fromhex(infohash), {})
    return {k.decode(): int(v) for k, v in entry.items() if isinstance(v, int)}
