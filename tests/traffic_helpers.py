"""A second libtorrent session as the other side of a transfer, and a node that seeds, for the traffic tests."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libtorrent as lt

from tests.p2p_helpers import raw_session

BLOCK = 16 * 1024


@dataclass
class Client:
    """A libtorrent client listening on its own address and port, downloading (or seeding) one torrent."""

    host: str
    port: int
    save_dir: Path
    ses: Any = None
    handle: Any = None
    received: int = 0  # payload bytes downloaded, read after the transfer
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def start(self, torrent: bytes, *, seed_mode: bool = False, download_limit: int = 0) -> None:
        self.ses = raw_session(self.port, self.host)
        self.ses.apply_settings({"alert_mask": int(lt.alert_category.stats)})
        ti = lt.torrent_info(torrent)
        with warnings.catch_warnings():  # deprecated, but the one way to drop a torrent_info's url-list
            warnings.simplefilter("ignore", DeprecationWarning)
            ti.set_web_seeds([])
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(self.save_dir)
        if seed_mode:
            atp.flags |= lt.torrent_flags.seed_mode
        self.handle = self.ses.add_torrent(atp)
        if download_limit:
            self.handle.set_download_limit(download_limit)

    def status(self) -> Any:
        return self.handle.status()

    def wait(self, *, until: int | None = None, peer: tuple[str, int] | None = None, timeout: float = 120) -> bool:
        """Blocking: until the download completes (or `until` payload bytes arrived)."""
        deadline = time.monotonic() + timeout
        last_connect = 0.0
        while time.monotonic() < deadline:
            st = self.handle.status()
            if (until is None and st.is_seeding) or (until is not None and st.total_payload_download >= until):
                return True
            if peer is not None and time.monotonic() - last_connect > 2:
                self.handle.connect_peer(peer)
                last_connect = time.monotonic()
            time.sleep(0.05)
        return False

    def drop(self) -> None:
        """Blocking: close every connection of the torrent, then read what the session moved in all (the
        torrent's own totals restart at a pause; the session's do not)."""
        self.handle.pause()
        self.ses.remove_torrent(self.handle)
        time.sleep(0.2)  # the removal is asynchronous
        self.ses.post_session_stats()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.ses.wait_for_alert(500)
            for a in self.ses.pop_alerts():
                if isinstance(a, lt.session_stats_alert):
                    self.received = int(a.values["net.recv_payload_bytes"])
                    self.sent = int(a.values["net.sent_payload_bytes"])
                    return
        raise RuntimeError("no session_stats_alert")

    def close(self) -> None:
        if self.ses is not None:
            self.ses.pause()
            self.ses = None
