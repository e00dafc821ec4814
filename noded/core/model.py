"""Plain data shared across components: items, their states and the allowed transitions.

Pure: no I/O here, so every component (and the tests) can use these types without sockets or disks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    """Lifecycle of the local copy of an item.

    Durability (pushed to R2) and seeding are facets of a cached copy, kept as flags on the row rather
    than as states: a copy can be pushed and seeded at once, and eviction must see both facts.
    """

    WANTED = "wanted"  # known at an origin (or a peer), not on this node
    FETCHING = "fetching"  # bytes are moving into the partial area
    CACHED = "cached"  # complete and verified under its final path
    EVICTED = "evicted"  # was cached, deleted to stay within budget; durable elsewhere
    FAILED = "failed"  # gave up for now (see error); retried on its own timer or when the cause clears
    QUARANTINED = "quarantined"  # bytes did not verify; kept aside, never served


TRANSITIONS: dict[State, frozenset[State]] = {
    State.WANTED: frozenset({State.FETCHING, State.CACHED, State.FAILED, State.WANTED}),
    State.FETCHING: frozenset({State.CACHED, State.FAILED, State.QUARANTINED, State.WANTED}),
    State.CACHED: frozenset({State.EVICTED, State.QUARANTINED, State.WANTED, State.CACHED}),
    State.EVICTED: frozenset({State.WANTED, State.FETCHING, State.CACHED}),
    State.FAILED: frozenset({State.WANTED, State.FETCHING, State.CACHED}),
    State.QUARANTINED: frozenset({State.WANTED, State.FETCHING, State.CACHED}),
}


class TransitionError(ValueError):
    pass


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"illegal item state change {old} -> {new}")


@dataclass(frozen=True, slots=True)
class Checksums:
    size: int | None = None
    md5: str | None = None
    sha1: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (("size", self.size), ("md5", self.md5), ("sha1", self.sha1), ("sha256", self.sha256))
            if v is not None
        }


PIECE_LENGTH = 16 * 1024 * 1024  # the organisation's torrents use 16 MiB pieces


@dataclass(frozen=True, slots=True)
class HashResult:
    """What one pass over an item's bytes yields."""

    size: int
    md5: str
    sha256: str
    pieces: bytes  # concatenated sha1 digests of each PIECE_LENGTH piece (the torrent's `pieces`)
    piece_length: int = PIECE_LENGTH
    sha1: str | None = None  # whole-file sha1, when computed (the Internet Archive publishes it)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One file as an origin lists it. Produced by catalog adapters from untrusted listings."""

    origin: str  # "sourcecoop" | "zenodo" | "ia" | "inbox" | "torrent" | "r2"
    key: str  # normalised relative path, safe to join under the cache root
    urls: tuple[str, ...]  # download URLs, best first
    size: int | None = None
    md5: str | None = None
    sha1: str | None = None
    sha256: str | None = None
    etag: str | None = None
    mtime: float | None = None
    infohash: str | None = None  # when the origin is a published torrent
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Item:
    """A row of the `items` table."""

    id: int
    key: str
    version: int
    origin: str
    state: State
    size: int | None
    md5: str | None
    sha1: str | None
    sha256: str | None
    etag: str | None
    urls: list[str]
    infohash: str | None
    pinned: bool
    pushed: bool
    seeding: bool
    last_access: float
    disk_bytes: int
    mtime_ns: int | None
    error: str | None
    created_at: float
    updated_at: float
    # When the file's bytes were last hashed and matched (pull, inbox, re-verification); None: never.
    verified_at: float | None = None
    # Why some location of this name disagrees with the trusted values (None: all agree).
    conflict: str | None = None
    # "checksum": some location publishes an md5/sha1/sha256 or piece hashes; "unverified": size only;
    # "local": the node's own inbox file.
    verification: str = "unverified"

    def public(self) -> dict[str, Any]:
        """The JSON shape of an item in the API."""
        return {
            "key": self.key,
            "version": self.version,
            "origin": self.origin,
            "state": self.state.value,
            "size": self.size,
            "md5": self.md5,
            "sha256": self.sha256,
            "infohash": self.infohash,
            "pinned": self.pinned,
            "pushed": self.pushed,
            "seeding": self.seeding,
            "last_access": self.last_access,
            "error": self.error,
            "verification": self.verification,
            "conflict": self.conflict,
        }

    def withheld(self, require_checksum: bool) -> bool:
        """Under `origins.require_checksum`, a copy no published checksum vouches for is neither served,
        seeded nor pushed: size alone cannot tell it from a damaged one."""
        return require_checksum and self.verification == "unverified"
