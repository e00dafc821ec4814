"""Who pulls an item from its origin when several nodes want it: rendezvous (highest random weight) hashing.

Every node ranks the nodes that want an item by a hash of (item key, node name) and the first fetches from the
origin; the others wait for it to appear in that node's inventory and then take it over BitTorrent, falling back
to the origin themselves when the owner is down or has not delivered within `peer_wait`. No coordinator, the same
answer on every node, and adding a node moves only the items it now ranks first for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass


def weight(key: str, node: str) -> int:
    digest = hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, nodes: Iterable[str]) -> list[str]:
    """Nodes best first for this key (ties, which need a 64-bit collision, broken by name)."""
    return sorted(set(nodes), key=lambda n: (-weight(key, n), n))


@dataclass(frozen=True)
class Decision:
    action: str  # "origin" (pull it now), "wait" (the owner will), "peer" (a peer holds it: take it over BitTorrent)
    owner: str
    reason: str


def decide(
    key: str, me: str, peers_up: Iterable[str], holders: Iterable[str], waited: float, peer_wait: float
) -> Decision:
    """Pure decision for one wanted item.

    peers_up: peers whose API answered recently; holders: peers whose inventory lists the item as cached;
    waited: seconds this node has already deferred the item to its owner.
    """
    holders = [h for h in holders if h != me]
    if holders:
        best = rank(key, holders)[0]
        return Decision("peer", best, f"{best} holds it")
    up = set(peers_up) - {me}
    owner = rank(key, [me, *up])[0]
    if owner == me:
        return Decision("origin", me, "this node ranks first among the nodes that are up")
    if waited >= peer_wait:
        return Decision("origin", owner, f"{owner} has not delivered within {peer_wait:.0f}s")
    return Decision("wait", owner, f"{owner} ranks first and is up; waiting for it to fetch from the origin")
