"""Eviction policy: pure functions, state in -> plan out. No I/O here.

The cache (noded/cache.py) feeds `plan()` with cached items in least-recently-used order, one lean tuple
per item (a SQL cursor streams them, so a million rows never become a million objects), and executes
the plan. An item is evictable only if it is not pinned, not in use, and durable elsewhere (pushed to
R2 and confirmed, or listed by an origin with the same checksum); the policy never plans anything else.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

BLOCK = 4096  # allocation unit assumed when estimating the blocks a file of n bytes will take


class Candidate(NamedTuple):
    """One cached item as the policy sees it. Rows must arrive ordered by (last_access, id)."""

    id: int
    disk_bytes: int
    pinned: int  # 0/1 (SQLite integers, kept as they come)
    durable: int  # 0/1: pushed=1, or an origin lists the same checksum


PINNED = "pinned"
IN_USE = "in use (fetching, pushing or being verified)"
NOT_DURABLE = "not durable elsewhere (not confirmed in R2 and no origin lists the same checksum)"


def why_not(c: Candidate | tuple[int, int, int, int], in_use: Collection[int]) -> str | None:
    """None when the item is evictable, else the reason it is kept."""
    if c[2]:
        return PINNED
    if c[0] in in_use:
        return IN_USE
    if not c[3]:
        return NOT_DURABLE
    return None


def alloc_estimate(nbytes: int) -> int:
    """Blocks a file of `nbytes` will occupy once written (rounded up to whole blocks)."""
    return -(-max(0, nbytes) // BLOCK) * BLOCK


@dataclass(frozen=True, slots=True)
class Budget:
    budget: int
    high_watermark: float
    low_watermark: float
    free_space_floor: int

    @property
    def high_bytes(self) -> int:
        return int(self.budget * self.high_watermark)

    @property
    def low_bytes(self) -> int:
        return int(self.budget * self.low_watermark)


def bytes_to_free(b: Budget, committed: int, incoming: int = 0, fs_free: int | None = None, fs_pending: int = 0) -> int:
    """How many bytes must go so that `incoming` more fits.

    `committed` is what the cache holds or has promised (cached + partials + reservations). Crossing
    the high watermark evicts down to the low one (hysteresis: no eviction on every fetch). The
    filesystem's free space minus what reservations will still write (`fs_pending`) must stay above
    the floor, whatever the budget says.
    """
    need = 0
    if committed + incoming > b.high_bytes:
        need = committed + incoming - b.low_bytes
    if fs_free is not None:
        short = b.free_space_floor - (fs_free - fs_pending - incoming)
        need = max(need, short)
    return max(0, need)


@dataclass(slots=True)
class Plan:
    need: int
    evict: list[int] = field(default_factory=list)
    freed: int = 0
    scanned: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # reason -> how many items it held back
    truncated: bool = False  # stopped at max_items: execute this part, then plan again

    @property
    def sufficient(self) -> bool:
        return self.freed >= self.need

    def blocked_reason(self) -> str:
        """A sentence for status when the plan cannot free enough."""
        held = ", ".join(f"{n} {why}" for why, n in sorted(self.kept.items(), key=lambda kv: -kv[1]))
        return f"need {self.need} bytes but only {self.freed} are evictable" + (
            f"; kept: {held}" if held else "; no cached items"
        )


def plan(
    candidates: Iterable[tuple[int, int, int, int]],
    need: int,
    in_use: Collection[int] = (),
    max_items: int | None = None,
) -> Plan:
    """Pick items to evict, least recently used first, until `need` bytes are freed.

    `candidates` are (id, disk_bytes, pinned, durable) in LRU order. Consumes the iterable only as far
    as needed, so a cursor over a million rows stops early in the common case. `max_items` bounds one
    plan (the caller executes it and plans again), so no single plan holds the store for long.
    """
    p = Plan(need=need)
    if need <= 0:
        return p
    kept = p.kept
    evict = p.evict
    freed = 0
    scanned = 0
    for c in candidates:
        scanned += 1
        # Inline of why_not(): this loop is the hot path of a million-row plan.
        if c[2]:
            kept[PINNED] = kept.get(PINNED, 0) + 1
        elif c[0] in in_use:
            kept[IN_USE] = kept.get(IN_USE, 0) + 1
        elif not c[3]:
            kept[NOT_DURABLE] = kept.get(NOT_DURABLE, 0) + 1
        else:
            evict.append(c[0])
            freed += c[1]
            if freed >= need:
                break
            if max_items is not None and len(evict) >= max_items:
                p.truncated = True
                break
    p.freed = freed
    p.scanned = scanned
    return p
