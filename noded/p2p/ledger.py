"""Pure accounting of BitTorrent payload bytes into traffic channels (no I/O, no libtorrent).

Three readings feed it, each a running total kept by libtorrent:
- per torrent, `total_payload_upload/download` (reset to 0 when a torrent is paused);
- per connection, the peer's own `total_upload/download`, keyed by endpoint (address AND port) and peer id;
- for the session, `net.sent_payload_bytes` / `net.recv_payload_bytes`.

A connection's delta goes to its channel. What a torrent moved beyond its live connections' deltas came
from connections that closed between two readings: it goes to their channel when they all share one,
else to `unattributed`. Whatever the session moved beyond the sum of the torrents, as read a tick later
(a torrent that left without a final reading), is `unattributed` too. Readings are not atomic, so a
later reading may run ahead of an earlier one; the surplus is carried, never charged twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

UNATTRIBUTED = "unattributed"
SWARM = "swarm"
FINGERPRINT_PREFIX = "-ND"
SETTLE_AFTER = 1.5  # seconds: libtorrent's one-second tick, and some slack

Charge = tuple[str, str, int]  # (channel, direction, bytes)


def node_fingerprint(node_name: str) -> str:
    """The peer-id prefix a node announces, so its peers know its connections whatever port they use."""
    return f"{FINGERPRINT_PREFIX}{hashlib.sha1(node_name.encode()).hexdigest()[:11]}-"  # noqa: S324


@dataclass(frozen=True)
class PeerReading:
    address: str
    port: int
    pid: bytes
    up: int
    down: int


@dataclass(frozen=True)
class TorrentReading:
    infohash: str
    up: int
    down: int
    peers: tuple[PeerReading, ...]


@dataclass
class Directory:
    """Who is who: seed targets and peers by endpoint, peers also by the peer-id prefix they announce."""

    endpoints: dict[tuple[str, int], str] = field(default_factory=dict)
    fingerprints: dict[bytes, str] = field(default_factory=dict)

    def channel(self, address: str, port: int, pid: bytes) -> str:
        ch = self.endpoints.get((address, port))
        if ch is not None:
            return ch
        for prefix, ch in self.fingerprints.items():
            if pid.startswith(prefix):
                return ch
        return SWARM


@dataclass
class _Conn:
    up: int
    down: int
    channel: str


@dataclass
class Ledger:
    directory: Directory = field(default_factory=Directory)
    _torrents: dict[str, tuple[int, int]] = field(default_factory=dict)
    _conns: dict[tuple[str, str, int], _Conn] = field(default_factory=dict)
    _carry: dict[str, list[int]] = field(default_factory=dict)  # per torrent: [up, down] peers ran ahead
    _closed: dict[str, set[str]] = field(default_factory=dict)  # channels of connections seen closing
    attributed: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})
    unattributed: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})
    _session_readings: list[tuple[float, int, int]] = field(default_factory=list)

    def closed(self, infohash: str, address: str, port: int, pid: bytes) -> None:
        """A connection closed (peer_disconnected_alert): its last bytes may show only in the torrent total."""
        conn = self._conns.get((infohash, address, port))
        ch = conn.channel if conn is not None else self.directory.channel(address, port, pid)
        self._closed.setdefault(infohash, set()).add(ch)

    def torrent(self, r: TorrentReading) -> list[Charge]:
        """Charges for what moved since this torrent's previous reading."""
        last_up, last_down = self._torrents.get(r.infohash, (0, 0))
        # A paused torrent starts its totals again from 0.
        d_up = r.up - last_up if r.up >= last_up else r.up
        d_down = r.down - last_down if r.down >= last_down else r.down
        self._torrents[r.infohash] = (r.up, r.down)
        out: list[Charge] = []
        seen: set[tuple[str, str, int]] = set()
        peers_up = peers_down = 0
        for p in r.peers:
            key = (r.infohash, p.address, p.port)
            seen.add(key)
            conn = self._conns.get(key)
            if conn is None or p.up < conn.up or p.down < conn.down:  # a new connection on this endpoint
                conn = _Conn(0, 0, self.directory.channel(p.address, p.port, p.pid))
                self._conns[key] = conn
            pu, pd = p.up - conn.up, p.down - conn.down
            conn.up, conn.down = p.up, p.down
            if pu:
                out.append((conn.channel, "out", pu))
                peers_up += pu
            if pd:
                out.append((conn.channel, "in", pd))
                peers_down += pd
        gone = {self._conns.pop(k).channel for k in [k for k in self._conns if k[0] == r.infohash and k not in seen]}
        gone |= self._closed.pop(r.infohash, set())
        residual_channel = next(iter(gone)) if len(gone) == 1 else UNATTRIBUTED
        carry = self._carry.setdefault(r.infohash, [0, 0])
        for i, (direction, d_t, d_p) in enumerate((("out", d_up, peers_up), ("in", d_down, peers_down))):
            rest = d_t - d_p - carry[i]
            carry[i] = max(0, -rest)
            if rest > 0:
                out.append((residual_channel, direction, rest))
        for ch, direction, n in out:
            if ch == UNATTRIBUTED:
                self.unattributed[direction] += n
            else:
                self.attributed[direction] += n
        return out

    def forget(self, infohash: str) -> None:
        """The torrent left the session after its final reading."""
        self._torrents.pop(infohash, None)
        self._carry.pop(infohash, None)
        self._closed.pop(infohash, None)
        for k in [k for k in self._conns if k[0] == infohash]:
            del self._conns[k]

    def session(self, sent: int, recv: int, at: float) -> None:
        """Note the session's payload counters, read at monotonic time `at`. libtorrent folds a
        connection's bytes into its torrent's totals on its one-second tick, so the session runs ahead
        of the torrents: a reading is only compared with torrent readings taken `SETTLE_AFTER` later."""
        self._session_readings.append((at, sent, recv))

    def settle(self, now: float) -> list[Charge]:
        """Reconcile with the newest session reading old enough for the torrents read since (all of
        them, at `now`) to include its bytes: what no torrent explains is unattributed."""
        ripe = [r for r in self._session_readings if r[0] <= now - SETTLE_AFTER]
        if not ripe:
            return []
        _, sent, recv = ripe[-1]
        self._session_readings = [r for r in self._session_readings if r[0] > ripe[-1][0]]
        out: list[Charge] = []
        for direction, total in (("out", sent), ("in", recv)):
            missing = total - self.attributed[direction] - self.unattributed[direction]
            if missing > 0:
                self.unattributed[direction] += missing
                out.append((UNATTRIBUTED, direction, missing))
        return out
