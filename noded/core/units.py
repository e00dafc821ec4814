"""Parsing of human-written sizes and rates ("950GB", "50MB/s", "16MiB")."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "950GB", "16MiB", "512" (SI units are decimal)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 950GB or a number of bytes, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 950GB, got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"expected a size such as 950GB, 16MiB or 1048576, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_rate(value: int | str | None) -> int | None:
    """Bytes per second from "50MB/s", "0"/"off"/"unlimited"/None (None means no limit)."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("off", "unlimited", "none", ""):
            return None
        if v.endswith("/s"):
            value = value.strip()[:-2]
    n = parse_size(value)
    return None if n == 0 else n


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
