"""Deterministic .torrent files, and validation of torrents and magnet links from outside.

The info dict is built exactly as py3createtorrent writes it with
`--piece-length 16384 --md5 --source "Data for Canada"`, so the same bytes give the same infohash on
every node and in the public swarm. Everything outside `info` (trackers, BEP 19 web seeds) does not
change the infohash. Bencoding and bdecoding use libtorrent (already a dependency, fuzzed upstream),
with explicit limits; the semantic checks (names, sizes, piece counts) are ours, because libtorrent
silently sanitises hostile paths where we must refuse them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import libtorrent as lt

from noded.core.model import PIECE_LENGTH, CatalogEntry
from noded.core.safefs import open_regular
from noded.origins.catalog.base import is_hex

MAX_TORRENT_BYTES = 16 * 1024 * 1024  # 5 TB at 16 MiB pieces is 6 MB of hashes; anything larger is hostile
MAX_FILES = 10_000
MAX_NAME_BYTES = 255
MAX_MAGNET_CHARS = 8192
MIN_PIECE_LENGTH = 16 * 1024
MAX_PIECE_LENGTH = 256 * 1024 * 1024
DEFAULT_MAX_TOTAL = 5 * 1000**4
CREATED_BY = "noded"
# Components we never accept in a name: they would escape or alias the directory they land in.
_BAD_COMPONENTS = {"", ".", ".."}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_B32 = re.compile(r"^[A-Z2-7]{32}$")


class TorrentError(ValueError):
    """A torrent or magnet link we refuse; the message says why."""


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file of a torrent: path components under the torrent name, length, md5 (hex) if known."""

    path: tuple[str, ...]
    length: int
    md5: str | None = None


@dataclass(frozen=True, slots=True)
class TorrentMeta:
    """A validated torrent: what the node needs to catalogue, fetch and seed it."""

    infohash: str
    name: str
    piece_length: int
    num_pieces: int
    total_size: int
    files: tuple[FileSpec, ...]
    single_file: bool
    source: str | None
    web_seeds: tuple[str, ...]
    trackers: tuple[str, ...]
    pieces: bytes = field(repr=False)
    data: bytes = field(repr=False)  # the .torrent bytes as given (kept verbatim so the infohash holds)

    @property
    def md5(self) -> str | None:
        return self.files[0].md5 if self.single_file else None

    def catalog_entry(self, origin: str = "torrent") -> CatalogEntry:
        """Single-file torrents become one catalog item keyed by the torrent name."""
        if not self.single_file:
            raise TorrentError(f"{self.name}: multi-file torrents cannot be catalogued as one item")
        return CatalogEntry(
            origin=origin,
            key=self.name,
            urls=tuple(u for u in self.web_seeds if u.startswith(("http://", "https://"))),
            size=self.total_size,
            md5=self.md5,
            infohash=self.infohash,
            # The piece hashes let a copy from any location be checked, and repaired, piece by piece.
            extra={"trackers": list(self.trackers), "pieces": self.pieces, "piece_length": self.piece_length},
        )


@dataclass(frozen=True, slots=True)
class MagnetLink:
    infohash: str
    name: str | None
    trackers: tuple[str, ...]
    web_seeds: tuple[str, ...]


# -- building --------------------------------------------------------------------------------


def num_pieces(total: int, piece_length: int = PIECE_LENGTH) -> int:
    return max(1, math.ceil(total / piece_length))


def single_file_info(
    name: str, size: int, md5: str | None, pieces: bytes, *, piece_length: int = PIECE_LENGTH, source: str | None
) -> dict[bytes, Any]:
    """The info dict py3createtorrent writes for one file (keys: length, md5sum, name, piece length, pieces, source)."""
    check_name(name)
    if size <= 0:
        raise TorrentError(f"{name}: a torrent needs at least one byte (size {size})")
    if len(pieces) != 20 * num_pieces(size, piece_length):
        raise TorrentError(
            f"{name}: {len(pieces) // 20} piece hashes for {size} bytes; expected {num_pieces(size, piece_length)}"
        )
    info: dict[bytes, Any] = {
        b"length": size,
        b"name": name.encode(),
        b"piece length": piece_length,
        b"pieces": pieces,
    }
    if md5 is not None:
        info[b"md5sum"] = md5.lower().encode()
    if source:
        info[b"source"] = source.encode()
    return info


def multi_file_info(
    name: str, files: Sequence[FileSpec], pieces: bytes, *, piece_length: int = PIECE_LENGTH, source: str | None
) -> dict[bytes, Any]:
    """The info dict py3createtorrent writes for a directory; `files` in py3createtorrent order."""
    check_name(name)
    total = sum(f.length for f in files)
    if not files or total <= 0:
        raise TorrentError(f"{name}: a dataset torrent needs at least one non-empty file")
    if len(pieces) != 20 * num_pieces(total, piece_length):
        raise TorrentError(f"{name}: {len(pieces) // 20} piece hashes for {total} bytes")
    entries: list[dict[bytes, Any]] = []
    for f in files:
        for part in f.path:
            check_name(part)
        e: dict[bytes, Any] = {b"length": f.length, b"path": [p.encode() for p in f.path]}
        if f.md5 is not None:
            e[b"md5sum"] = f.md5.lower().encode()
        entries.append(e)
    info: dict[bytes, Any] = {b"files": entries, b"name": name.encode(), b"piece length": piece_length}
    info[b"pieces"] = pieces
    if source:
        info[b"source"] = source.encode()
    return info


def infohash_of(info: dict[bytes, Any]) -> str:
    return hashlib.sha1(lt.bencode(info)).hexdigest()  # noqa: S324 - BitTorrent v1 infohash is sha1 by definition


def encode_torrent(
    info: dict[bytes, Any], *, trackers: Sequence[str] = (), web_seeds: Sequence[str] = (), comment: str | None = None
) -> bytes:
    """The .torrent bytes. No creation date: every node writes the same file for the same item."""
    return bytes(lt.bencode(_outer(info, trackers, web_seeds, comment)))


_INFO_MARKER = b"\x00noded-info\x00"


def encode_with_info(info: bytes, *, trackers: Sequence[str] = (), web_seeds: Sequence[str] = ()) -> bytes:
    """A .torrent around an info dict given as its bencoded bytes, kept verbatim (so the infohash holds)."""
    out = bytes(lt.bencode(_outer(_INFO_MARKER, trackers, web_seeds, None)))
    encoded = str(len(_INFO_MARKER)).encode() + b":" + _INFO_MARKER
    if out.count(encoded) != 1:  # a tracker or web seed URL cannot hold a NUL byte; guard all the same
        raise TorrentError("cannot place the info dictionary")
    return out.replace(encoded, info, 1)


def bare_infohash(text: str) -> bool:
    """Is this a v1 infohash on its own (40 hex or 32 base32 digits)?"""
    t = text.strip()
    return is_hex(t.lower(), 40) or bool(_B32.match(t.upper()))


def _outer(info: Any, trackers: Sequence[str], web_seeds: Sequence[str], comment: str | None) -> dict[bytes, Any]:
    meta: dict[bytes, Any] = {b"info": info, b"created by": CREATED_BY.encode()}
    trackers = list(dict.fromkeys(trackers))
    if trackers:
        meta[b"announce"] = trackers[0].encode()
    if len(trackers) > 1:
        meta[b"announce-list"] = [[t.encode()] for t in trackers]
    seeds = list(dict.fromkeys(web_seeds))
    if seeds:
        meta[b"url-list"] = [u.encode() for u in seeds]
    if comment:
        meta[b"comment"] = comment.encode()
    return meta


def web_seed_urls(key: str, origin_urls: Iterable[str], templates: Iterable[str]) -> list[str]:
    """BEP 19 url-list: the item's origin URLs, then the configured mirror templates."""
    name = key.rsplit("/", 1)[-1]
    out = [u for u in origin_urls if u.startswith(("http://", "https://"))]
    out += [t.replace("{name}", name).replace("{key}", key) for t in templates]
    return list(dict.fromkeys(out))


def py3createtorrent_order(relpaths: Iterable[str]) -> list[str]:
    """py3createtorrent walks each directory sorted by lower-cased name: the same order as sorting the
    lower-cased path components as tuples."""
    return sorted(relpaths, key=lambda p: tuple(c.lower() for c in p.split("/")))


def hash_files(paths: Sequence[Path], piece_length: int = PIECE_LENGTH) -> tuple[bytes, list[str]]:
    """sha1 of each piece across the concatenated files, and each file's md5. Blocking: run in an executor."""
    pieces = bytearray()
    md5s: list[str] = []
    h = hashlib.sha1()  # noqa: S324 - piece hashes are sha1 by the BitTorrent v1 spec
    filled = 0
    chunk = 1024 * 1024
    for p in paths:
        m = hashlib.md5()  # noqa: S324 - the organisation publishes md5; not used for security
        with os.fdopen(open_regular(p), "rb") as f:  # never through a symlink
            while True:
                want = min(chunk, piece_length - filled)
                buf = f.read(want)
                if not buf:
                    break
                h.update(buf)
                m.update(buf)
                filled += len(buf)
                if filled == piece_length:
                    pieces += h.digest()
                    h = hashlib.sha1()  # noqa: S324
                    filled = 0
        md5s.append(m.hexdigest())
    if filled:
        pieces += h.digest()
    return bytes(pieces), md5s


def build_dataset_torrent(
    directory: Path, *, source: str | None, piece_length: int = PIECE_LENGTH
) -> tuple[dict[bytes, Any], list[str]]:
    """Info dict of a directory, exactly as py3createtorrent makes it. Blocking: run in an executor."""
    rel = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]
    rel = py3createtorrent_order(rel)
    pieces, md5s = hash_files([directory / r for r in rel], piece_length)
    files = [
        FileSpec(tuple(r.split("/")), (directory / r).stat().st_size, md5) for r, md5 in zip(rel, md5s, strict=True)
    ]
    return multi_file_info(directory.name, files, pieces, piece_length=piece_length, source=source), rel


# -- validation of outside input ---------------------------------------------------------------


def check_name(name: str) -> None:
    """A file or directory name from a torrent: one plain path component, nothing that escapes or hides."""
    if name in _BAD_COMPONENTS or "/" in name or "\\" in name:
        raise TorrentError(f"unsafe name {name!r} (empty, '.', '..' or a path separator)")
    if _CONTROL.search(name):
        raise TorrentError(f"unsafe name {name!r} (control characters)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise TorrentError(f"name too long ({len(name.encode())} bytes, limit {MAX_NAME_BYTES})")
    if name.startswith(".noded"):
        raise TorrentError(f"name {name!r} is reserved")


def _text(v: Any, what: str) -> str:
    if not isinstance(v, bytes):
        raise TorrentError(f"{what} must be a string")
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise TorrentError(f"{what} is not UTF-8") from None


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TorrentError(f"{what} must be an integer")
    return v


def _url_list(v: Any) -> list[str]:
    items = [v] if isinstance(v, bytes) else v if isinstance(v, list) else []
    out = []
    for u in items:
        if isinstance(u, bytes):
            s = u.decode("utf-8", "replace")
            if urlsplit(s).scheme in ("http", "https") and len(s) < 2048:
                out.append(s)
    return out


def _tracker_list(v: Any) -> list[str]:
    items = [v] if isinstance(v, bytes) else v if isinstance(v, list) else []
    out = []
    for u in items:
        if isinstance(u, bytes):
            t = u.decode("utf-8", "replace")
            if urlsplit(t).scheme in ("http", "https", "udp") and len(t) < 2048 and not _CONTROL.search(t):
                out.append(t)
    return out


def _trackers(decoded: dict[bytes, Any]) -> list[str]:
    """announce, then every tier of announce-list (BEP 12), each once."""
    out = _tracker_list(decoded.get(b"announce"))
    tiers = decoded.get(b"announce-list")
    for tier in tiers if isinstance(tiers, list) else []:
        out += _tracker_list(tier)
    return list(dict.fromkeys(out))


def announce_urls(data: bytes) -> list[str]:
    """The trackers a .torrent names (announce and announce-list); [] for anything unreadable."""
    try:
        decoded: Any = lt.bdecode(bytes(data))
    except RuntimeError:
        return []
    return _trackers(decoded) if isinstance(decoded, dict) else []


def published_elsewhere(data: bytes, infohash: str) -> bool:
    """Is this a readable .torrent for `infohash` that noded did not make (a published torrent)?"""
    try:
        decoded: Any = lt.bdecode(bytes(data))
        ih = str(lt.torrent_info(bytes(data)).info_hashes().v1)
    except RuntimeError:
        return False
    if not isinstance(decoded, dict) or ih != infohash:
        return False
    return decoded.get(b"created by") != CREATED_BY.encode()


def parse_torrent(data: bytes, *, max_total: int = DEFAULT_MAX_TOTAL) -> TorrentMeta:
    """Validate a .torrent from outside; raise TorrentError with a clear reason, never crash."""
    if not isinstance(data, bytes | bytearray):
        raise TorrentError("torrent must be bytes")
    if len(data) > MAX_TORRENT_BYTES:
        raise TorrentError(f"torrent file too large ({len(data)} bytes, limit {MAX_TORRENT_BYTES})")
    try:
        decoded: Any = lt.bdecode(bytes(data))
    except RuntimeError as e:
        raise TorrentError(f"not valid bencode: {e}") from None
    if not isinstance(decoded, dict) or not isinstance(decoded.get(b"info"), dict):
        raise TorrentError("not a torrent: no 'info' dictionary")
    info: dict[bytes, Any] = decoded[b"info"]
    name = _text(info.get(b"name"), "info.name")
    check_name(name)
    piece_length = _int(info.get(b"piece length"), "info.piece length")
    if not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH or piece_length & (piece_length - 1):
        raise TorrentError(f"piece length {piece_length} is not a power of two between 16 KiB and 256 MiB")
    pieces = info.get(b"pieces")
    if not isinstance(pieces, bytes) or len(pieces) % 20:
        raise TorrentError("info.pieces must be a string of 20-byte sha1 hashes")
    files: list[FileSpec] = []
    single = b"files" not in info
    if single:
        length = _int(info.get(b"length"), "info.length")
        md5 = info.get(b"md5sum")
        files.append(FileSpec((name,), length, _md5(md5) if md5 is not None else None))
    else:
        raw_files = info[b"files"]
        if not isinstance(raw_files, list) or not raw_files:
            raise TorrentError("info.files must be a non-empty list")
        if len(raw_files) > MAX_FILES:
            raise TorrentError(f"too many files ({len(raw_files)}, limit {MAX_FILES})")
        seen: set[tuple[str, ...]] = set()
        for i, f in enumerate(raw_files):
            if not isinstance(f, dict):
                raise TorrentError(f"info.files[{i}] must be a dictionary")
            parts = f.get(b"path")
            if not isinstance(parts, list) or not parts:
                raise TorrentError(f"info.files[{i}].path must be a non-empty list")
            path = tuple(_text(p, f"info.files[{i}].path") for p in parts)
            for p in path:
                check_name(p)
            if path in seen:
                raise TorrentError(f"info.files[{i}]: duplicate path {'/'.join(path)!r}")
            seen.add(path)
            md5 = f.get(b"md5sum")
            files.append(FileSpec(path, _int(f.get(b"length"), f"info.files[{i}].length"), _md5(md5) if md5 else None))
    if any(f.length < 0 for f in files):
        raise TorrentError("negative file length")
    total = sum(f.length for f in files)
    if total <= 0:
        raise TorrentError("torrent holds no bytes")
    if total > max_total:
        raise TorrentError(f"torrent size {total} exceeds the limit of {max_total} bytes")
    if len(pieces) // 20 != num_pieces(total, piece_length):
        raise TorrentError(
            f"{len(pieces) // 20} piece hashes for {total} bytes at piece length {piece_length}; "
            f"expected {num_pieces(total, piece_length)}"
        )
    # libtorrent re-parses with its own limits: the infohash comes from the raw info span it finds.
    try:
        limits: Any = {"max_pieces": num_pieces(total, piece_length) + 1}
        ti = lt.torrent_info(bytes(data), limits)
    except RuntimeError as e:
        raise TorrentError(f"libtorrent rejects the torrent: {e}") from None
    # A Python dict keeps the last of duplicate keys, libtorrent the first: the two would read different
    # names, sizes or hashes from one file, so a torrent with any is refused.
    dup = duplicate_key(bytes(ti.info_section()))
    if dup is not None:
        raise TorrentError(f"info dictionary has the key {dup[:60]!r} twice")
    source = info.get(b"source")
    trackers = _trackers(decoded)
    return TorrentMeta(
        infohash=str(ti.info_hashes().v1),
        name=name,
        piece_length=piece_length,
        num_pieces=len(pieces) // 20,
        total_size=total,
        files=tuple(files),
        single_file=single,
        source=_text(source, "info.source") if source is not None else None,
        web_seeds=tuple(_url_list(decoded.get(b"url-list"))),
        trackers=tuple(dict.fromkeys(trackers)),
        pieces=pieces,
        data=bytes(data),
    )


def duplicate_key(data: bytes) -> bytes | None:
    """The first key found twice in one dictionary of bencoded `data` (already well-formed: libtorrent
    parsed it), or None. Iterative, so deep nesting costs no recursion."""
    # One frame per open container: (keys seen, or None for a list; whether a dict's next token is a key).
    stack: list[tuple[set[bytes] | None, list[bool]]] = []

    def value_done() -> None:
        if stack and stack[-1][0] is not None:
            stack[-1][1][0] = not stack[-1][1][0]

    i, n = 0, len(data)
    while i < n:
        c = data[i : i + 1]
        if c == b"e":
            stack.pop()
            i += 1
            value_done()
        elif c in (b"d", b"l"):
            stack.append((set() if c == b"d" else None, [True]))
            i += 1
        elif c == b"i":
            i = data.index(b"e", i) + 1
            value_done()
        else:
            colon = data.index(b":", i)
            token = data[colon + 1 : colon + 1 + int(data[i:colon])]
            i = colon + 1 + len(token)
            if stack and stack[-1][0] is not None and stack[-1][1][0]:
                keys = stack[-1][0]
                if token in keys:
                    return token
                keys.add(token)
            value_done()
    return None


def _md5(v: Any) -> str:
    s = _text(v, "md5sum").lower()
    if not is_hex(s, 32):
        raise TorrentError(f"md5sum {s[:40]!r} is not 32 hex digits")
    return s


def parse_magnet(uri: str) -> MagnetLink:
    """Validate a magnet link (v1 btih only); raise TorrentError with the reason."""
    if not isinstance(uri, str) or len(uri) > MAX_MAGNET_CHARS:
        raise TorrentError(f"magnet link must be a string of at most {MAX_MAGNET_CHARS} characters")
    if _CONTROL.search(uri):
        raise TorrentError("magnet link contains control characters")
    parts = urlsplit(uri)
    if parts.scheme != "magnet" or not parts.query:
        raise TorrentError("not a magnet link (expected magnet:?xt=urn:btih:...)")
    q = parse_qs(parts.query, keep_blank_values=True, max_num_fields=200)
    xts = [x for x in q.get("xt", []) if x.lower().startswith("urn:btih:")]
    if len(xts) != 1:
        raise TorrentError("magnet link needs exactly one xt=urn:btih:<infohash>")
    h = xts[0][9:]
    if is_hex(h.lower(), 40):
        ih = h.lower()
    elif _B32.match(h.upper()):
        import base64

        ih = base64.b32decode(h.upper()).hex()
    else:
        raise TorrentError(f"magnet infohash {h[:60]!r} is neither 40 hex nor 32 base32 characters")
    names = q.get("dn", [])
    name = names[0] if names else None
    if name is not None:
        check_name(name)
    trackers = tuple(t for t in q.get("tr", []) if urlsplit(t).scheme in ("http", "https", "udp"))
    seeds = tuple(u for u in q.get("ws", []) if urlsplit(u).scheme in ("http", "https"))
    # libtorrent must agree (it is what will use the link).
    try:
        lt.parse_magnet_uri(uri)
    except RuntimeError as e:
        raise TorrentError(f"libtorrent rejects the magnet link: {e}") from None
    return MagnetLink(ih, name, trackers, seeds)
