"""How many copies of an item, and of each of its pieces, the network holds. Pure: no I/O here.

Three kinds of copy are counted, each from what this node already knows:

- **durable**: the organisation's locations that list the item's exact bytes (an origin listing with the
  same md5 or sha256 and size, R2 with the pushed flag). Whole copies. `durable_locations()` is the one
  place that decides this, so it can later read a locations table instead of the replicas rows.
- **nodes**: Smart Nodes and volunteers, from their inventories: a whole item, or the pieces they hold.
- **swarm**: BitTorrent peers: per piece, how many connected peers have it (`piece_availability`); where
  the torrent is not in our session, the seeders of the last tracker scrape. Scrapes are not used when
  availability is known: a fleet bench showed `complete=3` where only two peers held every piece (partial
  holders whose wanted pieces are all done were counted as seeders), which flattened every count.

A peer may be counted by more than one source (a Smart Node is also in the swarm), so the per-piece
count is `durable + max(nodes, swarm)`: an estimate that errs low, which is the safe side for a policy
that adds copies where they are fewest. This node's own copy is never included (the policy adds it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from noded.cache.db import DURABLE_LOCATIONS


def _same(a: str | None, b: str | None) -> bool:
    return bool(a and b and a.lower() == b.lower())


def durable_locations(
    *,
    md5: str | None,
    sha256: str | None,
    size: int | None,
    pushed: bool,
    replicas: Iterable[Mapping[str, Any]],
) -> list[str]:
    """Names of the durable locations holding exactly these bytes (the rule the cache's durability uses)."""
    out: set[str] = {"r2"} if pushed else set()
    for r in replicas:
        loc = r.get("location")
        if loc not in DURABLE_LOCATIONS:
            continue
        if not (_same(md5, r.get("md5")) or _same(sha256, r.get("sha256"))):
            continue
        rsize = r.get("size")
        if rsize is not None and size is not None and rsize != size:
            continue
        out.add(str(loc))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class ItemReplicas:
    key: str
    num_pieces: int
    durable: tuple[str, ...]
    nodes_whole: tuple[str, ...]  # nodes whose inventory lists the whole item
    nodes_partial: Mapping[str, frozenset[int]]  # node -> pieces it holds
    swarm_seeders: int | None  # from the last tracker scrape (None: never scraped)
    swarm_leechers: int | None
    availability: tuple[int, ...] | None  # connected peers having each piece (None: not in our session)
    pieces: tuple[int, ...]  # copies of each piece elsewhere, this node excluded

    @property
    def min_copies(self) -> int:
        return min(self.pieces) if self.pieces else len(self.durable)

    def public(self) -> dict[str, Any]:
        return {
            "copies": self.min_copies,
            "durable": list(self.durable),
            "nodes": {
                "whole": list(self.nodes_whole),
                "partial": {n: len(p) for n, p in sorted(self.nodes_partial.items())},
            },
            "swarm": {
                "seeders": self.swarm_seeders,
                "leechers": self.swarm_leechers,
                "connected_availability_min": min(self.availability) if self.availability else None,
            },
            "pieces": {
                "count": self.num_pieces,
                "min": min(self.pieces) if self.pieces else None,
                "mean": round(sum(self.pieces) / len(self.pieces), 3) if self.pieces else None,
                "copies": list(self.pieces) if self.num_pieces <= 4096 else None,
            },
        }


def count(
    key: str,
    num_pieces: int,
    *,
    durable: Sequence[str] = (),
    nodes: Mapping[str, frozenset[int] | None] | None = None,
    seeders: int | None = None,
    leechers: int | None = None,
    availability: Sequence[int] | None = None,
    me_seeding: bool = False,
) -> ItemReplicas:
    """Per-piece copies of one item. `nodes` maps a node to its pieces (None: the whole item).

    `seeders` from a scrape includes this node when it seeds the item (`me_seeding`), so one is taken off;
    it counts only where `availability` (connected peers, never ourselves) is unknown.
    """
    nodes = nodes or {}
    whole = tuple(sorted(n for n, p in nodes.items() if p is None))
    partial = {n: frozenset(i for i in p if 0 <= i < num_pieces) for n, p in nodes.items() if p is not None}
    avail = tuple(int(a) for a in availability) if availability is not None else None
    if avail is not None and len(avail) != num_pieces:
        avail = None  # a torrent with another piece count: not this item's
    seeds = max(0, (seeders or 0) - (1 if me_seeding else 0))
    per_piece = []
    for i in range(num_pieces):
        by_nodes = len(whole) + sum(1 for p in partial.values() if i in p)
        swarm = avail[i] if avail is not None else seeds
        per_piece.append(len(durable) + max(by_nodes, swarm))
    return ItemReplicas(
        key=key,
        num_pieces=num_pieces,
        durable=tuple(durable),
        nodes_whole=whole,
        nodes_partial=partial,
        swarm_seeders=seeders,
        swarm_leechers=leechers,
        availability=avail,
        pieces=tuple(per_piece),
    )


def summary(replicas: Iterable[ItemReplicas], k: int) -> dict[str, Any]:
    """For status and the dashboard: how many items have fewer than `k` copies of some piece."""
    n = below = zero = 0
    lowest: list[tuple[int, str]] = []
    for r in replicas:
        n += 1
        m = r.min_copies
        if m < k:
            below += 1
            lowest.append((m, r.key))
        if m == 0:
            zero += 1
    lowest.sort()
    return {
        "items": n,
        "k": k,
        "below_k": below,
        "no_copy": zero,
        "at_risk": [{"key": key, "copies": m} for m, key in lowest[:10]],
        "sentence": f"{below} items have fewer than {k} copies",
    }
