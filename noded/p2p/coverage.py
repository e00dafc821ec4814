"""What a volunteer node holds: pure selection policy, state in -> holdings out. No I/O here.

A volunteer has a budget far smaller than the archive. It should hold what the network is closest to
losing, down to single pieces, so that the network's minimum replica count rises as fast as possible.

Input per item: piece sizes, how many copies of each piece exist elsewhere (not counting this node), an
operator weight and a pin flag, and which pieces this node already holds. Output: the pieces to hold per
item (all of them for a whole item).

- **At-risk first.** Pieces are taken in ascending order of `others / weight`: with one more copy each,
  taking the rarest pieces first maximises the minimum (water filling). Within one rarity level smaller
  pieces go first (more pieces lifted per byte).
- **Hysteresis.** A piece this node already holds competes as if it had `hysteresis` fewer copies, so
  counts that wobble by less than half of that never swap holdings back and forth. Counts exclude this
  node, so a held piece with `c` other copies has `c + 1` in all: moving to a piece with `c - 1` others
  turns (c+1, c-1) into (c, c) and lifts the minimum; one with `c` others would only swap the shape. The
  default (0.5) moves exactly in the first case.
- **No herd.** Volunteers holding the same over-replicated piece would all move to the same rarer one
  in the same round (none sees the others' intent), and back in the next. With an `epoch` (the round),
  each holder of a piece with `k` other copies is free to release it with probability 1/(k+1), drawn
  from a hash of (node, item, piece, epoch): about one holder moves per round.
- **Pins** are held whole, before anything else, whatever the budget says (the cache never drops a pinned
  item; a pin larger than the budget is reported, not dropped). `weight <= 0` means "never hold".
- **Spread.** Ties are broken by a rendezvous hash of (node, item, piece), so volunteers that start at
  the same time from the same counts pick different pieces instead of all the same ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_HYSTERESIS = 0.5


@dataclass(frozen=True, slots=True)
class ItemState:
    """One catalogue item as the policy sees it."""

    key: str
    piece_sizes: tuple[int, ...]  # bytes of each piece (all equal but the last, in practice)
    others: tuple[int, ...]  # copies of each piece elsewhere in the network, this node excluded
    weight: float = 1.0  # operator priority: 2.0 aims for twice the copies, <= 0 never holds it
    pinned: bool = False
    held: frozenset[int] = frozenset()  # pieces this node holds now

    def __post_init__(self) -> None:
        if len(self.piece_sizes) != len(self.others):
            raise ValueError(f"{self.key}: {len(self.piece_sizes)} piece sizes but {len(self.others)} counts")
        if any(s < 0 for s in self.piece_sizes) or any(c < 0 for c in self.others):
            raise ValueError(f"{self.key}: negative piece size or replica count")

    @property
    def size(self) -> int:
        return sum(self.piece_sizes)

    @staticmethod
    def uniform(
        key: str,
        size: int,
        piece_length: int,
        others: Sequence[int] | int,
        weight: float = 1.0,
        pinned: bool = False,
        held: Iterable[int] = (),
    ) -> ItemState:
        """An item of `size` bytes cut into pieces of `piece_length` (the last one shorter)."""
        n = max(1, -(-size // piece_length)) if size > 0 else 0
        sizes = tuple(min(piece_length, size - i * piece_length) for i in range(n))
        counts = tuple([others] * n) if isinstance(others, int) else tuple(others)
        return ItemState(key, sizes, counts, weight, pinned, frozenset(held))


@dataclass(slots=True)
class Selection:
    hold: dict[str, frozenset[int]] = field(default_factory=dict)  # item key -> pieces to hold (non-empty)
    bytes: int = 0
    pinned_bytes: int = 0
    over_budget: bool = False  # the pins alone exceed the budget
    acquire_bytes: int = 0  # bytes to fetch that are not held yet
    release_bytes: int = 0  # bytes held now that the selection drops

    def whole(self, items: Mapping[str, ItemState]) -> list[str]:
        return [k for k, p in self.hold.items() if len(p) == len(items[k].piece_sizes)]


def spread(node: str, key: str, piece: int) -> int:
    """Rendezvous tie-break: a per-node pseudo-random order of pieces, the same at every run."""
    digest = hashlib.blake2b(f"{node}\0{key}\0{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def may_release(node: str, key: str, piece: int, others: int, epoch: int) -> bool:
    """This round's draw: is this holder of the piece one that may let it go? (probability 1/(others+1))"""
    draw = spread(node, f"{key}\0{epoch}", piece) / 2**64
    return draw * (others + 1) < 1.0


def select(
    items: Iterable[ItemState],
    budget: int,
    node: str,
    hysteresis: float = DEFAULT_HYSTERESIS,
    epoch: int | None = None,
) -> Selection:
    """Choose the pieces to hold within `budget` bytes (pins excepted, see the module docstring)."""
    items = list(items)
    sel = Selection()
    ranked: list[tuple[float, int, int, str, int]] = []
    for it in items:
        if it.pinned:
            sel.hold[it.key] = frozenset(range(len(it.piece_sizes)))
            sel.pinned_bytes += it.size
            continue
        if it.weight <= 0:
            continue
        for i, (size, others) in enumerate(zip(it.piece_sizes, it.others, strict=True)):
            if i in it.held:
                keep = epoch is not None and not may_release(node, it.key, i, others, epoch)
                # Not this holder's turn to move: it keeps the piece ahead of anything else.
                level = float("-inf") if keep else (others - hysteresis) / it.weight
            else:
                level = others / it.weight
            ranked.append((level, size, spread(node, it.key, i), it.key, i))
    sel.bytes = sel.pinned_bytes
    sel.over_budget = sel.pinned_bytes > budget
    ranked.sort()
    chosen: dict[str, set[int]] = {}
    room = budget - sel.bytes
    for _level, size, _tie, key, i in ranked:
        if room <= 0:
            break
        if size <= room:
            chosen.setdefault(key, set()).add(i)
            room -= size
            sel.bytes += size
    for key, pieces in chosen.items():
        sel.hold[key] = frozenset(pieces)
    _acq, _rel, sel.acquire_bytes, sel.release_bytes = plan_changes(items, sel)
    return sel


def plan_changes(
    items: Iterable[ItemState], sel: Selection
) -> tuple[dict[str, frozenset[int]], dict[str, frozenset[int]], int, int]:
    """(pieces to acquire, pieces to release, acquire bytes, release bytes), item by item."""
    acquire: dict[str, frozenset[int]] = {}
    release: dict[str, frozenset[int]] = {}
    a_bytes = r_bytes = 0
    for it in items:
        want = sel.hold.get(it.key, frozenset())
        add = want - it.held
        drop = it.held - want
        if add:
            acquire[it.key] = add
            a_bytes += sum(it.piece_sizes[i] for i in add)
        if drop:
            release[it.key] = drop
            r_bytes += sum(it.piece_sizes[i] for i in drop if i < len(it.piece_sizes))
    return acquire, release, a_bytes, r_bytes


def network_min(items: Iterable[ItemState], hold: Mapping[str, Iterable[int]] | None = None) -> int | None:
    """The network's minimum copies of any piece once this node holds `hold` (None: no pieces)."""
    best: int | None = None
    for it in items:
        mine = set(hold.get(it.key, ())) if hold is not None else set(it.held)
        for i, others in enumerate(it.others):
            n = others + (1 if i in mine else 0)
            best = n if best is None or n < best else best
    return best
