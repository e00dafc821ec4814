"""Rendezvous hashing: one owner per item, agreed by every node, stable as nodes come and go."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from noded.origins.rendezvous import decide, rank

names = st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True), min_size=1, max_size=6, unique=True)


@given(key=st.text(min_size=1, max_size=50), nodes=names)
def test_every_node_agrees_on_the_owner(key: str, nodes: list[str]) -> None:
    owners = {rank(key, list(reversed(nodes)))[0], rank(key, nodes)[0], rank(key, sorted(nodes))[0]}
    assert len(owners) == 1


@given(key=st.text(min_size=1, max_size=50), nodes=names, extra=st.from_regex(r"[A-Z]{1,8}", fullmatch=True))
def test_adding_a_node_moves_only_items_it_now_owns(key: str, nodes: list[str], extra: str) -> None:
    before = rank(key, nodes)[0]
    after = rank(key, [*nodes, extra])[0]
    assert after in (before, extra)


def test_ownership_is_spread_across_nodes() -> None:
    counts = {"toronto": 0, "amsterdam": 0}
    for i in range(2000):
        counts[rank(f"dataset-{i}.pmtiles", counts)[0]] += 1
    assert 800 < counts["toronto"] < 1200, counts


def test_decisions() -> None:
    key = next(f"k{i}" for i in range(100) if rank(f"k{i}", ["toronto", "amsterdam"])[0] == "amsterdam")
    # The owner is up: wait for it; after peer_wait, pull from the origin ourselves.
    assert decide(key, "toronto", ["amsterdam"], [], waited=0, peer_wait=600).action == "wait"
    assert decide(key, "toronto", ["amsterdam"], [], waited=601, peer_wait=600).action == "origin"
    # The owner is down: pull now.
    assert decide(key, "toronto", [], [], waited=0, peer_wait=600).action == "origin"
    # A peer holds it: take it over BitTorrent whoever owns it.
    d = decide(key, "toronto", [], ["amsterdam"], waited=0, peer_wait=600)
    assert (d.action, d.owner) == ("peer", "amsterdam")
    # The owner itself never waits.
    assert decide(key, "amsterdam", ["toronto"], [], waited=0, peer_wait=600).action == "origin"


def test_a_peer_counts_as_down_only_after_failing_for_the_grace() -> None:
    from types import SimpleNamespace

    from noded.daemon import peer_not_down, peers_settled

    view = SimpleNamespace(up=False, down_since=None)
    sync = SimpleNamespace(peers={"amsterdam": view})
    # Not polled yet: not down, and not settled (a starting node waits for its first round).
    assert peer_not_down(sync, "amsterdam", grace=90, now=1000)
    assert not peers_settled(sync, grace=90, now=1000)
    # One refused poll (the peer may be starting at the same moment): still not down.
    view.down_since = 1000
    assert peer_not_down(sync, "amsterdam", grace=90, now=1010)
    assert not peers_settled(sync, grace=90, now=1010)
    # Failing for the whole grace: down, and settled.
    assert not peer_not_down(sync, "amsterdam", grace=90, now=1090)
    assert peers_settled(sync, grace=90, now=1090)
    # Up again.
    view.up, view.down_since = True, None
    assert peer_not_down(sync, "amsterdam", grace=90, now=2000) and peers_settled(sync, grace=90, now=2000)
    assert not peer_not_down(sync, "unknown", grace=90)
