"""HTTP validators, conditional requests and byte ranges (RFC 9110 sections 8.8, 13 and 14). Pure.

The rules every download route follows:
- `If-None-Match` (weak comparison) and, without it, `If-Modified-Since` answer 304; `If-Match` (strong)
  and, without it, `If-Unmodified-Since` answer 412.
- `If-Range` uses the strong comparison: a weak tag, a different tag or a date other than exactly the
  Last-Modified date means "the client's copy is stale", so Range is ignored and the full body is sent.
- `Range` with several ranges is served as `multipart/byteranges` (overlapping or adjacent ranges are
  merged); a header we cannot parse, or one with too many ranges, is ignored (200, full body). 416 only
  when no range is satisfiable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime

MAX_RANGES = 64  # more ranges than this in one request are ignored (a full 200 instead)

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


@dataclass(frozen=True, slots=True)
class Validators:
    """A representation's strong entity tag (quoted) and its modification time in whole seconds."""

    etag: str
    last_modified: int

    @property
    def last_modified_http(self) -> str:
        return http_date(self.last_modified)


def http_date(ts: float) -> str:
    return formatdate(int(ts), usegmt=True)


def parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch of an HTTP-date, or None when absent or not a date."""
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:  # obsolete formats without a zone are GMT by definition
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def parse_etags(value: str) -> tuple[bool, list[tuple[bool, str]]] | None:
    """(`*` given, [(weak, "tag")]) of an If-Match / If-None-Match value; None when malformed."""
    v = value.strip()
    if v == "*":
        return True, []
    out: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(v):
        m = _ETAG.match(v, pos)
        if m is None or m.end() == pos:
            return None
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return False, out


def _matches(value: str, etag: str, *, weak: bool) -> bool:
    parsed = parse_etags(value)
    if parsed is None:
        return False
    star, tags = parsed
    return star or any(t == etag and (weak or not w) for w, t in tags)


def precondition(headers: Mapping[str, str], v: Validators, method: str = "GET") -> int | None:
    """304 or 412 when the request's conditions say so, else None (go on and answer)."""
    get = headers.get
    if_match = get("If-Match")
    if if_match is not None:
        if not _matches(if_match, v.etag, weak=False):
            return 412
    else:
        ius = parse_http_date(get("If-Unmodified-Since"))
        if ius is not None and v.last_modified > ius:
            return 412
    inm = get("If-None-Match")
    if inm is not None:
        if _matches(inm, v.etag, weak=True):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        ims = parse_http_date(get("If-Modified-Since"))
        if ims is not None and v.last_modified <= ims:
            return 304
    return None


def if_range_allows(value: str | None, v: Validators) -> bool:
    """Whether Range may be honoured under this If-Range value (strong comparison only)."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith("W/"):
        return False  # a weak tag never matches in If-Range
    if value.startswith('"'):
        return value == v.etag
    return parse_http_date(value) == v.last_modified


def parse_ranges(value: str | None, size: int) -> list[tuple[int, int]] | None:
    """Inclusive (first, last) byte ranges to send, sorted and merged; [] when none is satisfiable (416);
    None when the header is absent, not a bytes range, malformed or too many ranges (send everything)."""
    if value is None:
        return None
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in spec.split(",")]
    parts = [p for p in parts if p]  # empty list elements are allowed by the list syntax
    if not parts or len(parts) > MAX_RANGES:
        return None
    wanted: list[tuple[int, int]] = []
    for p in parts:
        first_s, dash, last_s = p.partition("-")
        if not dash or (first_s and not first_s.isdigit()) or (last_s and not last_s.isdigit()):
            return None
        if not first_s:
            if not last_s:
                return None
            n = int(last_s)
            if n > 0 and size > 0:
                wanted.append((max(0, size - n), size - 1))
            continue
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
        if last_s and last < first:
            return None  # invalid byte-range-spec: the whole header is ignored
        if first < size:
            wanted.append((first, min(last, size - 1)))
    wanted.sort()
    merged: list[tuple[int, int]] = []
    for first, last in wanted:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


@dataclass(frozen=True, slots=True)
class MultipartPlan:
    """A multipart/byteranges body: (part header, first, last) for each part, the closing delimiter,
    and the exact total length."""

    content_type: str
    parts: list[tuple[bytes, int, int]]
    trailer: bytes
    length: int


def multipart_plan(ranges: list[tuple[int, int]], size: int, part_type: str, boundary: str) -> MultipartPlan:
    parts: list[tuple[bytes, int, int]] = []
    length = 0
    for i, (first, last) in enumerate(ranges):
        head = (
            ("\r\n" if i else "")
            + f"--{boundary}\r\nContent-Type: {part_type}\r\nContent-Range: bytes {first}-{last}/{size}\r\n\r\n"
        ).encode("latin-1")
        parts.append((head, first, last))
        length += len(head) + (last - first + 1)
    trailer = f"\r\n--{boundary}--\r\n".encode("latin-1")
    return MultipartPlan(f"multipart/byteranges; boundary={boundary}", parts, trailer, length + len(trailer))
