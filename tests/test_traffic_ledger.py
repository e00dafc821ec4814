"""The pure accounting policy: per-connection deltas by endpoint or peer id, closed connections,
paused torrents, carried read skew and reconciliation with the session counters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from noded.p2p.ledger import SWARM, UNATTRIBUTED, Directory, Ledger, PeerReading, TorrentReading, node_fingerprint

IH = "ab" * 20
TARGET = ("127.0.0.2", 6881)


def ledger() -> Ledger:
    return Ledger(
        Directory(
            endpoints={TARGET: "seed:netcup", ("127.0.0.5", 7000): "peer:amsterdam"},
            fingerprints={node_fingerprint("amsterdam").encode(): "peer:amsterdam"},
        )
    )


def peer(address: str, port: int, up: int, down: int = 0, pid: bytes = b"-qB4650-" + b"x" * 12) -> PeerReading:
    return PeerReading(address, port, pid, up, down)


def totals(charges: list[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for ch, d, n in charges:
        out[(ch, d)] = out.get((ch, d), 0) + n
    return out


def test_same_address_other_port_is_not_the_seed_target() -> None:
    led = ledger()
    got = led.torrent(TorrentReading(IH, 300, 0, (peer(*TARGET, 100), peer("127.0.0.2", 51000, 200))))
    assert totals(got) == {("seed:netcup", "out"): 100, (SWARM, "out"): 200}


def test_a_peer_node_is_known_by_its_peer_id_from_any_port() -> None:
    led = ledger()
    fp = node_fingerprint("amsterdam").encode()
    pid = fp + b"r" * (20 - len(fp))
    got = led.torrent(TorrentReading(IH, 0, 500, (peer("127.0.0.9", 40000, 0, 500, pid=pid),)))
    assert totals(got) == {("peer:amsterdam", "in"): 500}


def test_a_connection_closing_between_readings_charges_its_channel() -> None:
    led = ledger()
    led.torrent(TorrentReading(IH, 100, 0, (peer(*TARGET, 100),)))
    # The target's connection sent 50 more bytes and closed before the next reading.
    got = led.torrent(TorrentReading(IH, 150, 0, ()))
    assert totals(got) == {("seed:netcup", "out"): 50}


def test_closed_connections_of_two_channels_are_unattributed_not_guessed() -> None:
    led = ledger()
    led.torrent(TorrentReading(IH, 200, 0, (peer(*TARGET, 100), peer("127.0.0.2", 51000, 100))))
    got = led.torrent(TorrentReading(IH, 260, 0, ()))
    assert totals(got) == {(UNATTRIBUTED, "out"): 60}


def test_a_connection_opened_and_closed_between_readings_is_known_by_its_disconnect() -> None:
    led = ledger()
    led.closed(IH, *TARGET, b"-qB4650-" + b"x" * 12)
    assert totals(led.torrent(TorrentReading(IH, 70, 0, ()))) == {("seed:netcup", "out"): 70}


def test_a_paused_torrent_starts_from_zero_and_a_new_connection_on_an_endpoint_too() -> None:
    led = ledger()
    led.torrent(TorrentReading(IH, 1000, 0, (peer(*TARGET, 1000),)))
    got = led.torrent(TorrentReading(IH, 30, 0, (peer(*TARGET, 30),)))
    assert totals(got) == {("seed:netcup", "out"): 30}


def test_session_bytes_no_torrent_explains_are_unattributed() -> None:
    led = ledger()
    led.torrent(TorrentReading(IH, 100, 0, (peer("127.0.0.3", 1, 100),)))
    led.session(180, 0, at=10.0)
    assert led.settle(now=10.5) == []  # too fresh: the torrents may not have folded its bytes in yet
    assert led.settle(now=12.0) == [(UNATTRIBUTED, "out", 80)]
    assert led.settle(now=13.0) == []


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 1 << 16), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_channels_add_up_to_the_torrent_totals_whatever_the_skew(steps: list[tuple[int, int, int, bool]]) -> None:
    """Connections come and go and peer counters run ahead of the torrent's; the sum never drifts."""
    led = ledger()
    conns: dict[int, int] = {}
    torrent_total = 0
    shown = 0  # libtorrent's torrent total: it lags, but never goes back (short of a pause)
    charged = 0
    for port, sent, skew, close in steps:
        conns[port] = conns.get(port, 0) + sent
        torrent_total += sent
        if close:
            conns.pop(port)
        live = tuple(peer("127.0.0.2", 50000 + p, up) for p, up in conns.items())
        # The torrent total lags behind its connections by up to `skew` bytes.
        shown = max(shown, torrent_total - skew)
        charged += sum(n for _, _, n in led.torrent(TorrentReading(IH, shown, 0, live)))
        assert charged <= torrent_total
    live = tuple(peer("127.0.0.2", 50000 + p, up) for p, up in conns.items())
    final = led.torrent(TorrentReading(IH, torrent_total, 0, live))
    charged += sum(n for _, _, n in final)
    assert charged == torrent_total
