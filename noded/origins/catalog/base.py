"""What a catalog adapter is, and the shared validation of the untrusted listings they read.

An adapter turns one origin into `CatalogEntry`s. Each entry is checked on its own (a bad key or a
bad checksum rejects that entry, logged with the reason); a page that cannot be parsed, or a listing
that exceeds its bounds, is a `CatalogError` for that origin only, and the caller keeps what it knew.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from noded.core import jsonread
from noded.core.model import CatalogEntry
from noded.origins.catalog.keys import KeyError_, normalise_key

_HEX = {32: re.compile(r"^[0-9a-f]{32}$"), 40: re.compile(r"^[0-9a-f]{40}$"), 64: re.compile(r"^[0-9a-f]{64}$")}


class CatalogError(Exception):
    """A page or listing of one origin that cannot be used (malformed, too large, HTTP error)."""


class ListingBound(CatalogError):
    """The listing as a whole exceeds its bounds (pages, entries): no part of it is used."""


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str


class HttpGetter(Protocol):
    """The slice of the HTTP client adapters need (fetch.HttpClient provides it)."""

    async def get_bytes(
        self,
        url: str,
        *,
        channel: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int,
    ) -> HttpReply: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_entries: int = 200_000  # per origin and refresh
    max_item_size: int = 5 * 1000**4
    max_page_bytes: int = 64 * 1024**2
    max_pages: int = 10_000


@dataclass(slots=True)
class Rejected:
    key: str  # truncated for logging
    reason: str


@dataclass(slots=True)
class Listing:
    origin: str
    entries: list[CatalogEntry] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    pages: int = 0


@runtime_checkable
class Adapter(Protocol):
    name: str

    def owns(self, url: str) -> bool:
        """True when a download URL belongs to this origin (so its fetch source may use it)."""
        ...

    async def list(self) -> Listing:
        """The whole current listing; raises CatalogError when it cannot be trusted as a whole."""
        ...


def is_hex(value: str, length: int) -> bool:
    """`value` is a lowercase hex digest of `length` characters (32 md5, 40 sha1, 64 sha256)."""
    return _HEX[length].fullmatch(value) is not None  # fullmatch: "$" alone would let a trailing newline in


def parse_json(body: bytes, what: str) -> Any:
    """A JSON body (already within the page byte cap) through the bounded reader, or CatalogError naming
    what it was. Catalogues nest deeper (GeoJSON geometries) and carry longer decimals than peers."""
    try:
        return jsonread.loads(body, jsonread.JsonLimits(max_bytes=max(1, len(body)), max_number_chars=100), what)
    except jsonread.JsonInputError as e:
        raise CatalogError(str(e)) from None


def checksum(value: Any, length: int) -> str | None:
    """A lowercase hex digest of the given length, None when absent; ValueError when malformed."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _HEX[length].match(value.strip().lower()):
        raise ValueError(f"malformed {length * 4}-bit checksum {str(value)[:80]!r}")
    return value.strip().lower()


def size_value(value: Any, limit: int) -> int | None:
    """Sizes arrive as ints or as strings (the Internet Archive); absent sizes are allowed."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("size is a boolean")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"size {value[:40]!r} is not a number")
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"size {value!r} is not a non-negative integer")
    if value > limit:
        raise ValueError(f"size {value} exceeds the limit of {limit} bytes")
    return value


class EntryCollector:
    """Validates entries one by one, drops duplicates after normalisation, enforces the count bound."""

    def __init__(self, origin: str, limits: Limits) -> None:
        self.listing = Listing(origin)
        self.limits = limits
        self._seen: dict[str, tuple[Any, set[tuple[str, ...]]]] = {}  # key -> (raw key, URLs listed)
        self._units = 0
        self._unit_errors: list[str] = []

    async def unit(self, what: str, work: Awaitable[None]) -> None:
        """List one record/identifier/prefix: if it fails, it alone is rejected with the reason (the
        rest of the listing is used), unless the listing as a whole is out of bounds."""
        self._units += 1
        try:
            await work
        except ListingBound:
            raise
        except Exception as e:  # an HTTP failure, a withdrawn record, a malformed page: this unit only
            self.reject(what, str(e) or type(e).__name__)
            self._unit_errors.append(f"{what}: {e}")

    def finish(self) -> Listing:
        """The listing; a CatalogError when every unit failed (nothing to trust, e.g. the origin is down)."""
        if self._units and len(self._unit_errors) == self._units:
            raise CatalogError("; ".join(self._unit_errors)[:2000])
        return self.listing

    def reject(self, raw_key: Any, reason: str) -> None:
        self.listing.rejected.append(Rejected(str(raw_key)[:120], reason))

    def page(self, nbytes: int) -> None:
        self.listing.pages += 1
        if self.listing.pages > self.limits.max_pages:
            raise ListingBound(f"more than {self.limits.max_pages} pages")
        if nbytes > self.limits.max_page_bytes:
            raise CatalogError(f"a page of {nbytes} bytes exceeds {self.limits.max_page_bytes}")

    def add(
        self,
        raw_key: Any,
        *,
        urls: tuple[str, ...],
        prefix: str = "",
        size: Any = None,
        md5: Any = None,
        sha1: Any = None,
        sha256: Any = None,
        etag: str | None = None,
        mtime: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CatalogEntry | None:
        try:
            key = normalise_key(raw_key, prefix=prefix)
            entry = CatalogEntry(
                origin=self.listing.origin,
                key=key,
                urls=urls,
                size=size_value(size, self.limits.max_item_size),
                md5=checksum(md5, 32),
                sha1=checksum(sha1, 40),
                sha256=checksum(sha256, 64),
                etag=etag,
                mtime=mtime,
                extra=extra or {},
            )
        except (KeyError_, ValueError) as e:
            self.reject(raw_key, str(e))
            return None
        # The same name at another URL is one more location of that dataset (two products, two records);
        # two spellings that normalise alike, or the same URL twice, are duplicates.
        seen = self._seen.get(key)
        if seen is not None and (seen[0] != raw_key or urls in seen[1]):
            self.reject(raw_key, f"duplicate of key {key[:120]!r} after normalisation")
            return None
        if len(self.listing.entries) >= self.limits.max_entries:
            raise ListingBound(f"more than {self.limits.max_entries} entries")
        self._seen.setdefault(key, (raw_key, set()))[1].add(urls)
        self.listing.entries.append(entry)
        return entry
