"""On-disk layout of the cache, and the atomic publish step.

    <cache_dir>/<key>                  complete, verified items (what readers and libtorrent see)
    <cache_dir>/.noded/partial/<id>-<version>   bytes in flight (same filesystem: rename is atomic)
    <cache_dir>/.noded/quarantine/<id>-<version> bytes that failed verification (never served)
    <state_dir>/torrents/<infohash>.torrent
    <state_dir>/resume/<infohash>.fastresume

Keys are confined to the cache root: `final_path` refuses anything that would land outside it. Its last
component is never resolved: readers open it with `noded.core.safefs` (no symlinks, regular files only).
"""

from __future__ import annotations

import os
from pathlib import Path

from noded.core.safefs import Realpath, open_regular

INTERNAL = ".noded"


class UnsafePath(ValueError):
    pass


class CacheLayout:
    def __init__(self, cache_dir: Path, state_dir: Path) -> None:
        self.root = cache_dir.resolve()
        self.state = state_dir.resolve()
        self.partial_dir = self.root / INTERNAL / "partial"
        self.quarantine_dir = self.root / INTERNAL / "quarantine"
        self.torrent_dir = self.state / "torrents"
        self.resume_dir = self.state / "resume"
        self._root_s = str(self.root)
        self._root_prefix = os.path.join(self._root_s, "")
        self._internal_s = str(self.root / INTERNAL)
        self._internal_prefix = os.path.join(self._internal_s, "")

    def ensure(self) -> None:
        for d in (self.root, self.partial_dir, self.quarantine_dir, self.torrent_dir, self.resume_dir):
            d.mkdir(parents=True, exist_ok=True)

    def final_path(self, key: str, realpath: Realpath = os.path.realpath) -> Path:
        """Where `key` lives. `realpath`: a `noded.core.safefs.DirRealpaths` shared by a pass over many
        keys, so that each directory is resolved once."""
        if not key or key.startswith("/") or "\0" in key:
            raise UnsafePath(f"unsafe key {key!r}")
        parts = key.split("/")
        if all(parts) and "." not in parts:
            # A plain key (no empty or "." component: nothing for pathlib to normalise), checked with
            # string operations: a restart checks every cached key, and pathlib's are most of the cost.
            name = parts[-1]
            if name == "..":
                raise UnsafePath(f"unsafe key {key!r}")
            parent = self._root_s + "/" + key[: -len(name) - 1] if len(parts) > 1 else self._root_s
            full = os.path.join(realpath(parent), name)
            internal = full == self._internal_s or full.startswith(self._internal_prefix)
            if not full.startswith(self._root_prefix) or internal:
                raise UnsafePath(f"key {key!r} escapes the cache root")
            return Path(full)
        p = self.root / key
        if p.name in ("", ".", ".."):
            raise UnsafePath(f"unsafe key {key!r}")
        # The directories are resolved (confinement), the file itself is not: a symlink put in place of a
        # cached file must be seen as one (lstat, O_NOFOLLOW), not as its target.
        p = Path(realpath(str(p.parent))) / p.name
        if not p.is_relative_to(self.root) or p == self.root or p.is_relative_to(self.root / INTERNAL):
            raise UnsafePath(f"key {key!r} escapes the cache root")
        return p

    def partial_path(self, item_id: int, version: int) -> Path:
        return self.partial_dir / f"{item_id}-{version}"

    def quarantine_path(self, item_id: int, version: int) -> Path:
        return self.quarantine_dir / f"{item_id}-{version}"

    def torrent_path(self, infohash: str) -> Path:
        if len(infohash) != 40 or not all(c in "0123456789abcdef" for c in infohash):
            raise UnsafePath(f"not a v1 infohash: {infohash!r}")
        return self.torrent_dir / f"{infohash}.torrent"

    def resume_path(self, infohash: str) -> Path:
        return self.resume_dir / f"{self.torrent_path(infohash).stem}.fastresume"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> os.stat_result:
    """fsync the bytes, rename into place, fsync the directory. Blocking: run in an executor."""
    fd = open_regular(partial)  # a symlink swapped in for the partial is never published
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    fsync_dir(final.parent)
    return final.stat()


def atomic_write(path: Path, data: bytes) -> None:
    """tmp + fsync + rename (resume data, torrents, checkpoints). Blocking: run in an executor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def disk_bytes(st: os.stat_result) -> int:
    """Bytes actually allocated (blocks), not the apparent size: sparse partials count as written."""
    return int(st.st_blocks) * 512
