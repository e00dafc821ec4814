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
        """Blocking: read the final counters, then close every connection of the torrent."""
        st = self.handle.status()
        self.received, self.sent = int(st.total_payload_download), int(st.total_payload_upload)
        self.handle.pause()
        self.ses.remove_torrent(self.handle)

    def close(self) -> None:
        if self.ses is not None:
            self.ses.pause()
            self.ses = None
