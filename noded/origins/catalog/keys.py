"""Normalisation and confinement of item keys taken from untrusted listings.

A key becomes a relative POSIX path that is safe to join under the cache root: NFC-normalised,
no empty, '.' or '..' segments, no absolute paths, no control characters or backslashes, bounded
length per segment (ext4 allows 255 bytes) and in total. Pure: no I/O.
"""

from __future__ import annotations

import unicodedata

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
RESERVED_FIRST = ".noded"  # the cache's internal area (layout.INTERNAL)


class KeyError_(ValueError):
    """A listing key that cannot be stored safely."""


def normalise_key(raw: str, *, prefix: str = "") -> str:
    """The safe form of `raw` (optionally under `prefix`), or KeyError_ naming the reason."""
    if not isinstance(raw, str):
        raise KeyError_(f"key is not a string: {type(raw).__name__}")
    if len(raw) > 4 * MAX_KEY_BYTES:  # cheap early bound before any work on hostile input
        raise KeyError_(f"key is {len(raw)} characters long (max {MAX_KEY_BYTES} bytes)")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 for c in raw):
        raise KeyError_("key contains NUL or control characters")
    if "\\" in raw:
        raise KeyError_("key contains a backslash")
    if raw.startswith("/"):
        raise KeyError_("key is an absolute path")
    key = unicodedata.normalize("NFC", raw)
    segments = key.split("/")
    if prefix:
        segments = [s for s in prefix.split("/") if s] + segments
    for s in segments:
        if s in ("", ".", ".."):
            raise KeyError_(f"key has an empty, '.' or '..' segment: {raw[:200]!r}")
        if len(s.encode()) > MAX_SEGMENT_BYTES:
            raise KeyError_(f"a key segment is longer than {MAX_SEGMENT_BYTES} bytes")
    if segments[0] == RESERVED_FIRST:
        raise KeyError_(f"key starts with the reserved name {RESERVED_FIRST!r}")
    out = "/".join(segments)
    if len(out.encode()) > MAX_KEY_BYTES:
        raise KeyError_(f"key is longer than {MAX_KEY_BYTES} bytes")
    return out


def dataset_name(object_key: str) -> str:
    """The dataset's name inside a product: the object key without its first (product) segment.

    `<product>/<name>` -> `<name>`; `<product>/<dir>/<name>` -> `<dir>/<name>` (multi-file datasets keep
    their inner layout); a key with no product segment is its own name.
    """
    product, sep, rest = object_key.partition("/")
    if product in ("", ".", ".."):
        return object_key  # not a product: the key rules reject the whole key
    return rest if sep and rest else object_key
