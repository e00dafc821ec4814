"""Partial holding: a volunteer keeps and seeds a subset of an item's pieces, and learns what the swarm has.

A held item is a torrent in the node's libtorrent session whose piece priorities are 0 for every piece not
held, so libtorrent downloads only the held ones and seeds them. Its file lives at
`<cache>/.noded/partial/pieces-<infohash>`: inside the partial area, so the cache counts its allocated
blocks (sparse, so only the held pieces take space) in the budget, and never serves it over HTTP.

Swarm counts come from libtorrent as well: `scrape_tracker()` and its `scrape_reply_alert` (BEP 48
seeders/leechers), and `piece_availability()` (connected peers having each piece). Calls that wait for
libtorrent's thread (status with pieces, availability) run in an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt

from noded.cache.layout import CacheLayout
from noded.core.logs import get_logger
from noded.p2p.session import TorrentSession

log = get_logger("noded.p2p.pieces")

PRIORITY_HOLD = 4  # libtorrent's default priority
PRIORITY_SKIP = 0


@dataclass
class Scrape:
    seeders: int
    leechers: int
    at: float


@dataclass
class Holding:
    infohash: str
    num_pieces: int
    want: frozenset[int]
    path: Path
    web_seeds: tuple[str, ...] = ()


def holding_path(layout: CacheLayout, infohash: str) -> Path:
    return layout.partial_dir / f"pieces-{infohash}"


def priorities(num_pieces: int, want: frozenset[int]) -> list[int]:
    return [PRIORITY_HOLD if i in want else PRIORITY_SKIP for i in range(num_pieces)]


def _params(data: bytes, path: Path, want: frozenset[int], web_seeds: bool) -> Any:
    ti = lt.torrent_info(data)
    if not web_seeds:
        # set_web_seeds is deprecated in 2.1 but is the one call that drops a torrent_info's url-list.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ti.set_web_seeds([])
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(path.parent)
    atp.renamed_files = {0: path.name}
    atp.piece_priorities = priorities(ti.num_pieces(), want)
    atp.flags &= ~lt.torrent_flags.auto_managed
    atp.flags &= ~lt.torrent_flags.paused
    return atp


def _have(handle: Any) -> frozenset[int]:
    st = handle.status(lt.status_flags_t.query_pieces)
    return frozenset(i for i, b in enumerate(st.pieces) if b)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_holes(path: Path, ranges: Iterable[tuple[int, int]]) -> bool:
    """Give the blocks of byte ranges back to the filesystem (the file keeps its size). False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    try:
        for off, length in ranges:
            if length <= 0:
                continue
            if fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, length) != 0:
                err = ctypes.get_errno()
                log.warning("p2p.punch_hole_failed", path=str(path), error=os.strerror(err))
                return False
        return True
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class PieceHolder:
    """Holds piece subsets of torrents in a session it shares with the engine."""

    def __init__(self, session: TorrentSession, layout: CacheLayout) -> None:
        self.session = session
        self.layout = layout
        self.holdings: dict[str, Holding] = {}
        self.scrapes: dict[str, Scrape] = {}
        # Payload moved by torrents since taken out of the session (their counters start again when re-added).
        self.retired_down = 0
        self.retired_up = 0
        session.subscribe("scrape_reply_alert", self._on_scrape)

    def _on_scrape(self, a: Any) -> None:
        ih = self.session.infohash_of(a.handle)
        if ih:
            self.scrapes[ih] = Scrape(int(a.complete), int(a.incomplete), time.time())

    async def hold(self, infohash: str, torrent: bytes, want: frozenset[int], *, web_seeds: bool = False) -> None:
        """Hold exactly `want` (piece indices) of this torrent: download those, seed them, skip the rest."""
        h = self.session.handles.get(infohash)
        cur = self.holdings.get(infohash)
        if h is not None and cur is not None:
            if cur.want == want:
                return
            dropped = cur.want - want
            if dropped:
                await self._drop(cur, dropped, want)
            else:
                h.prioritize_pieces(priorities(cur.num_pieces, want))  # asynchronous in libtorrent
            cur.want = want
            return
        if h is not None:
            raise ValueError(f"{infohash} is already in the session as a whole item")
        path = holding_path(self.layout, infohash)
        loop = asyncio.get_running_loop()
        atp = await loop.run_in_executor(None, _params, torrent, path, want, web_seeds)
        num = int(atp.ti.num_pieces())
        bad = [i for i in want if not 0 <= i < num]
        if bad:
            raise ValueError(f"{infohash} has {num} pieces; cannot hold {sorted(bad)[:5]}")
        await self.session.add(atp, infohash)
        self.holdings[infohash] = Holding(infohash, num, want, path)
        log.info("p2p.hold_pieces", infohash=infohash, pieces=len(want), of_pieces=num)

    def _retire(self, infohash: str) -> None:
        ts = self.session.states.get(infohash)
        if ts is not None:
            self.retired_down += ts.downloaded
            self.retired_up += ts.uploaded

    async def _drop(self, hold: Holding, dropped: frozenset[int], want: frozenset[int]) -> None:
        """Really let pieces go: a priority of 0 only stops downloading, libtorrent would keep and seed them.

        The torrent leaves the session with its resume data, the dropped pieces' bytes are punched out of
        the sparse file (the budget gets them back), and it comes back with those pieces cleared from its
        have-bitfield: no recheck, and peers are never offered a piece that is gone.
        """
        ih = hold.infohash
        raw = await self.session.resume_data(ih)
        if raw is None:
            raise RuntimeError(f"{ih}: no resume data; pieces not dropped")
        self._retire(ih)
        await self.session.remove(ih)
        atp = lt.read_resume_data(raw)
        have = list(atp.have_pieces)
        for i in dropped:
            if i < len(have):
                have[i] = False
        atp.have_pieces = have
        atp.verified_pieces = []
        atp.piece_priorities = priorities(hold.num_pieces, want)
        atp.flags &= ~lt.torrent_flags.auto_managed
        atp.flags &= ~lt.torrent_flags.paused
        ti = atp.ti
        if ti is None:
            raise RuntimeError(f"{ih}: resume data without the info dict; pieces not dropped")
        piece_length, total = int(ti.piece_length()), int(ti.total_size())
        ranges = [(i * piece_length, min(piece_length, total - i * piece_length)) for i in sorted(dropped)]
        await asyncio.get_running_loop().run_in_executor(None, punch_holes, hold.path, ranges)
        await self.session.add(atp, ih)
        log.info("p2p.pieces_dropped", infohash=ih, pieces=len(dropped), kept=len(want))

    async def release(self, infohash: str) -> bool:
        """Stop holding the torrent and delete its partial file."""
        h = self.holdings.pop(infohash, None)
        if h is None:
            return False
        self._retire(infohash)
        await self.session.remove(infohash, delete_files=True)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.get_running_loop().run_in_executor(None, h.path.unlink)
        self.scrapes.pop(infohash, None)
        return True

    async def have(self, infohash: str) -> frozenset[int]:
        """Pieces of the torrent this node has, verified (from libtorrent's status)."""
        h = self.session.handles.get(infohash)
        if h is None:
            return frozenset()
        return await asyncio.get_running_loop().run_in_executor(None, _have, h)

    async def availability(self, infohash: str) -> list[int] | None:
        """Connected peers having each piece (this node excluded); None when not in the session."""
        h = self.session.handles.get(infohash)
        if h is None:
            return None
        return list(await asyncio.get_running_loop().run_in_executor(None, h.piece_availability))

    async def have_all(self, infohashes: Iterable[str]) -> dict[str, frozenset[int]]:
        """`have()` for many torrents in one executor call."""
        handles = [(ih, self.session.handles.get(ih)) for ih in infohashes]

        def read() -> dict[str, frozenset[int]]:
            return {ih: _have(h) for ih, h in handles if h is not None}

        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def availability_all(self, infohashes: Iterable[str]) -> dict[str, list[int]]:
        """`availability()` for many torrents in one executor call."""
        handles = [(ih, self.session.handles.get(ih)) for ih in infohashes]

        def read() -> dict[str, list[int]]:
            return {ih: list(h.piece_availability()) for ih, h in handles if h is not None}

        return await asyncio.get_running_loop().run_in_executor(None, read)

    def set_web_seeds(self, infohash: str, urls: Iterable[str]) -> None:
        """Switch the torrent's HTTP web seeds (BEP 19) to `urls` (asynchronous in libtorrent)."""
        hold = self.holdings.get(infohash)
        h = self.session.handles.get(infohash)
        new = tuple(urls)
        if hold is None or h is None or hold.web_seeds == new:
            return
        for u in set(hold.web_seeds) - set(new):
            h.remove_url_seed(u)
        for u in set(new) - set(hold.web_seeds):
            h.add_url_seed(u)
        hold.web_seeds = new

    def scrape(self, infohash: str) -> bool:
        """Ask the torrent's trackers for seeders/leechers; the answer lands in `scrapes`."""
        h = self.session.handles.get(infohash)
        if h is None:
            return False
        h.scrape_tracker()  # asynchronous: a scrape_reply_alert follows
        return True

    def inventory(self) -> dict[str, list[int]]:
        """infohash -> pieces held (as wanted), for the inventory other nodes poll."""
        return {ih: sorted(h.want) for ih, h in self.holdings.items()}
