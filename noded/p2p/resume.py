"""Fast resume: how a seeded item re-enters the session after a restart without a recheck.

Items in the cache were verified by us (or by libtorrent while downloading), so they are added with
libtorrent's resume data when we have it, else in seed mode. Neither makes libtorrent read the files;
a file whose size or mtime changed behind our back is not trusted (the cache's verify handles it).
The functions here read small files: call them in an executor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core.safefs import Realpath, lstat_regular


@dataclass(frozen=True, slots=True)
class SeedPlan:
    """Everything needed to add one cached item to the session, gathered off the loop. `torrent` is
    None when the resume data (`params`, parsed) carries the torrent's info dictionary itself."""

    item_id: int
    infohash: str
    torrent: bytes | None
    save_path: Path
    resume: bytes | None
    params: Any = None


def seed_params(plan: SeedPlan, trackers: Sequence[str] = ()) -> Any:
    """add_torrent_params for a verified item: resume data if present, else seed mode. Never a recheck.
    `trackers` are announced to besides the torrent's own (libtorrent merges the two lists)."""
    atp: Any = plan.params
    if atp is None and plan.resume:
        atp = parse_resume(plan.resume)
    if atp is not None and plan.torrent is not None:
        atp.ti = lt.torrent_info(plan.torrent)
    if atp is None:
        if plan.torrent is None:
            raise ValueError(f"no torrent for {plan.infohash}")
        atp = lt.add_torrent_params()
        atp.flags |= lt.torrent_flags.seed_mode
        atp.ti = lt.torrent_info(plan.torrent)
    ti = atp.ti
    atp.save_path = str(plan.save_path)
    if trackers:
        have = set(atp.trackers) | {t.url for t in ti.trackers()}
        atp.trackers = [*atp.trackers, *(t for t in trackers if t not in have)]
    # Active always: the cache decides what we hold, not libtorrent's queue.
    atp.flags &= ~lt.torrent_flags.auto_managed
    atp.flags &= ~lt.torrent_flags.paused
    return atp


def parse_resume(resume: bytes) -> Any:
    """libtorrent's add_torrent_params from resume data, or None when it cannot be read (seed mode is
    just as safe for a verified item)."""
    try:
        return lt.read_resume_data(resume)
    except RuntimeError:
        return None


def _info_in_resume(atp: Any, infohash: str) -> bool:
    """The resume data holds the info dictionary of this very torrent (saved with `save_info_dict`)."""
    ti = atp.ti
    return ti is not None and ti.is_valid() and str(ti.info_hashes().v1) == infohash


def _read(path: Path) -> bytes:
    """A small file of noded's own, whole (os.read: no buffered reader for a file read once)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_plan(
    layout: CacheLayout,
    item_id: int,
    infohash: str,
    final: Path,
    size: int | None,
    mtime_ns: int | None,
    realpath: Realpath = os.path.realpath,
) -> SeedPlan | str:
    """A SeedPlan, or the reason this item cannot be seeded as it is. The .torrent is read only when the
    resume data lacks the info dictionary (or cannot be read). Blocking. `realpath`: see
    `noded.core.safefs.DirRealpaths`."""
    try:
        st = lstat_regular(final, layout.root, realpath)
    except FileNotFoundError:
        return f"cached file {final} is missing"
    except OSError as e:  # a symlink or a special file: libtorrent would follow it
        return f"cached file refused: {e}"
    if size is not None and st.st_size != size:
        return f"cached file {final} has {st.st_size} bytes, expected {size}"
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        return f"cached file {final} changed since it was verified (mtime)"
    resume: bytes | None = None
    params: Any = None
    with contextlib.suppress(FileNotFoundError):
        resume = _read(layout.resume_path(infohash))
    if resume:
        params = parse_resume(resume)
        if params is not None and _info_in_resume(params, infohash):
            return SeedPlan(item_id, infohash, None, final.parent, resume, params)
    try:
        torrent = _read(layout.torrent_path(infohash))
    except FileNotFoundError:
        return f"torrent file for {infohash} is missing"
    return SeedPlan(item_id, infohash, torrent, final.parent, resume, params)


def remove_files(layout: CacheLayout, infohash: str, *, torrent_too: bool) -> None:
    """Forget an item's resume data (and its .torrent). Blocking."""
    paths = [layout.resume_path(infohash)]
    if torrent_too:
        paths.append(layout.torrent_path(infohash))
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
