"""Where the bytes of an item can come from: a peer over BitTorrent, an origin over HTTP, R2.

The pull pipeline asks each source in order whether it offers an item, then lets the first that does
write the complete file into the partial path. A source returns the hashes it took from the stream
(md5, sha256, and the sha1 of each torrent piece), so nothing is read twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from noded.core.model import HashResult, Item
from noded.origins.catalog.base import Adapter


class FetchError(Exception):
    """This source could not deliver the item now. `retryable` False means: do not try it again soon."""

    def __init__(self, message: str, *, retryable: bool = True, suspect: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        # The source served bytes that did not verify: its copy is suspect (mark it, try the next one).
        self.suspect = suspect


class HostWaiting(FetchError):
    """The host asked us to wait (Retry-After, X-RateLimit, backoff) longer than a pull should sit
    through: the item goes back to the queue until `until` (wall clock) instead of failing."""

    def __init__(self, host: str, until: float, reason: str) -> None:
        when = datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")
        super().__init__(f"host {host} asks to wait until {when} ({reason})", retryable=True)
        self.host = host
        self.until = until
        self.reason = reason


@runtime_checkable
class Source(Protocol):
    name: str

    async def offers(self, item: Item) -> bool:
        """Cheap check (no transfer): can this source serve the item right now?"""
        ...

    async def fetch(self, item: Item, partial: Path) -> HashResult:
        """Write the complete item to `partial`; return the hashes taken from the stream."""
        ...


class OriginExtension(Protocol):
    """An origin another stage provides (R2): the composition root adds it to the pipeline's
    `extensions`; the pipeline opens it with itself and closes it when it stops. `open` returns the
    source to try last and the adapter whose listing joins the catalogs (either may be None)."""

    name: str

    async def open(self) -> tuple[Source | None, Adapter | None]: ...

    async def close(self) -> None: ...
