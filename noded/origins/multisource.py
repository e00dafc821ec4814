"""One item's bytes from every healthy HTTP location at once.

`MultiPull` spreads the segments of one partial file over several locations of the same content
(origins, R2's public URL, a peer's web seed). Every location runs up to its host's connection cap of
workers; a worker takes the lowest segment nobody holds, so a location that streams faster comes back
for more sooner and ends up with a share of the file in proportion to its throughput. When no segment
is left, an idle worker looks at the outstanding ones: a holder that has stalled, or that would finish
its remainder much later than this worker could, loses the tail of its segment from the byte it
reached (split so both end together; a stalled holder keeps nothing and its connection is closed).

The partial file and `<partial>.state` are the ones the single-location engine uses: segments are
written at their offsets, checkpointed (fdatasync, then an atomic JSON write), and resumed on the next
start whichever location wrote them. The hashes follow the contiguous written prefix, each byte read
back once. When the torrent's piece hashes are known, each piece is checked before it is fed to the
whole-file hashes: a piece that does not match is fetched again from another location, the locations
whose bytes in it differ from the good copy are dropped for this pull and reported, and their
segments go to the others from the byte they reached.

Politeness holds across all locations: every request takes its host's connection slot and passes the
host's gate (pacing, Retry-After, backoff), and every byte goes through the node's download bucket.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noded.core.hashing import StreamHasher, feed_range
from noded.core.logs import get_logger
from noded.core.model import PIECE_LENGTH, HashResult
from noded.origins.bodies import BodyResponse, TransportError
from noded.origins.fetch import (
    CHUNK,
    RETRYABLE_STATUS,
    HostState,
    HttpClient,
    PullState,
    Retryable,
    Segment,
    _content_range,
    _discard,
    _finish,
    _load_state,
    _PartialFile,
    parse_retry_after,
    plan_segments,
)
from noded.origins.sources import FetchError, HostWaiting

log = get_logger("noded.multisource")

STALL_SECONDS = 3.0  # a holder that delivered nothing for this long loses its segment to an idle worker
MIN_STEAL = 256 * 1024  # a remainder smaller than this is left to its holder (unless it stalled)
STEAL_MARGIN = 1.3  # the holder must be this many times slower than the idle worker to lose its tail
RATE_WINDOW = 0.5  # seconds per throughput sample
LOCATION_FAILURES = 2  # consecutive failed requests after which a location is dropped for this pull
IDLE_RECHECK = 0.25  # how often an idle worker looks again for work to take over
SEGMENTS_PER_CONNECTION = 8  # a file is cut into about this many segments per connection
MIN_SEGMENT = 4 * 1024 * 1024  # below this, requests cost more than finer shares gain

# Reports a location whose bytes did not match: (location name, reason).
OnBadBytes = Callable[[str, str], Awaitable[None]]


# -- pure policy ---------------------------------------------------------------------------------
def split_point(pos: int, end: int, holder_rate: float, taker_rate: float, stalled: bool) -> int:
    """Where a segment's remainder [pos, end) is cut so holder and taker end together: the holder
    keeps its share in proportion to its rate (nothing when it stalled)."""
    if stalled or holder_rate <= 0:
        return pos
    share = holder_rate / (holder_rate + max(taker_rate, 1.0))
    return pos + int((end - pos) * share)


def worth_stealing(
    remaining: int, holder_rate: float, taker_rate: float, stalled: bool, margin: float = STEAL_MARGIN
) -> bool:
    """Is handing the tail of a segment to an idle worker likely to end the pull sooner?"""
    if remaining <= 0:
        return False
    if stalled:
        return True
    if remaining < MIN_STEAL or taker_rate <= 0:
        return False
    if holder_rate <= 0:
        return False  # not measured yet: give it time (a stall is caught by the clock)
    return remaining / holder_rate > margin * (remaining / taker_rate) + 0.2


def pieces_overlapping(
    extents: Sequence[tuple[int, int, str]], start: int, end: int
) -> dict[str, list[tuple[int, int]]]:
    """Which location wrote which parts of [start, end)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for a, b, name in extents:
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            out.setdefault(name, []).append((lo, hi))
    return out


# -- runtime -------------------------------------------------------------------------------------
@dataclass
class Location:
    name: str  # the origin that lists it (its traffic channel)
    url: str
    host: HostState
    label: str = ""  # how logs and status name it
    bytes: int = 0
    requests: int = 0
    failures: int = 0
    dropped: str = ""  # why it is no longer used for this pull
    resting_until: float = 0.0  # monotonic: after a stalled connection, no new request before this
    bad_bytes: bool = False
    etag: str | None = None
    rate: float = 0.0  # bytes/s, all its connections together
    _win_start: float = 0.0
    _win_bytes: int = 0

    def count(self, n: int, now: float) -> None:
        self.bytes += n
        self._win_bytes += n
        if self._win_start == 0.0:
            self._win_start = now
        dt = now - self._win_start
        if dt >= RATE_WINDOW:
            sample = self._win_bytes / dt
            self.rate = sample if self.rate == 0 else 0.5 * self.rate + 0.5 * sample
            self._win_start, self._win_bytes = now, 0

    def current_rate(self, now: float) -> float:
        # A location that went quiet shows it, instead of its last busy sample.
        if self._win_start and now - self._win_start > 2 * RATE_WINDOW + STALL_SECONDS:
            return 0.0
        return self.rate

    def status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "origin": self.name,
            "location": self.label,
            "url": self.url,
            "bytes": self.bytes,
            "rate_Bps": round(self.current_rate(now)),
            "requests": self.requests,
        }
        if self.dropped:
            out["dropped"] = self.dropped
        return out


@dataclass(eq=False)
class Worker:
    loc: Location
    seg: Segment | None = None
    task: asyncio.Task[None] | None = None  # the current segment's request
    started: float = 0.0  # when the current request began streaming
    last_byte: float = 0.0
    inflight_end: int = 0  # end of the write in progress (a split never cuts below it)
    rate: float = 0.0  # bytes/s of this connection (last samples)
    _win_start: float = 0.0
    _win_bytes: int = 0

    def count(self, n: int, now: float) -> None:
        self.last_byte = now
        self._win_bytes += n
        dt = now - self._win_start
        if dt >= RATE_WINDOW:
            sample = self._win_bytes / dt
            self.rate = sample if self.rate == 0 else 0.5 * self.rate + 0.5 * sample
            self._win_start, self._win_bytes = now, 0

    def stalled(self, now: float) -> bool:
        return self.seg is not None and now - max(self.last_byte, self.started) > STALL_SECONDS


class MultiPull(_PartialFile):
    """Fetch one item into `partial` from several (name, url) locations of the same content."""

    def __init__(
        self,
        client: HttpClient,
        locations: Sequence[tuple[str, str]],
        partial: Path,
        *,
        size: int,
        want_sha1: bool = False,
        pieces: tuple[int, bytes] | None = None,
        on_bad_bytes: OnBadBytes | None = None,
        connections_per_location: int | None = None,
    ) -> None:
        if not locations:
            raise ValueError("no location to pull from")
        self.c = client
        self.partial = partial
        self.size = size
        self.want_sha1 = want_sha1
        self.pieces = pieces if pieces is not None and _pieces_fit(pieces, size) else None
        self.on_bad_bytes = on_bad_bytes
        self.locations = [Location(name, url, client.host(url)) for name, url in locations]
        names = [loc.name for loc in self.locations]
        for loc in self.locations:
            # One origin may list several URLs (an asset and its alternates): they are told apart by host.
            loc.label = loc.name if names.count(loc.name) == 1 else f"{loc.name}@{loc.host.name}"

        self.per_location = connections_per_location or client.cfg.segments_per_item
        self.state: PullState | None = None
        self.fd = -1
        self.hashed = 0
        self.finished = False
        self.progress = asyncio.Event()  # for the hasher: bytes written
        self.changed = asyncio.Event()  # for idle workers: a segment freed or a location dropped
        self.workers: list[Worker] = []
        self.extents: list[tuple[int, int, str]] = []  # (start, end, location label): who wrote which bytes
        self.started = time.monotonic()
        self.repaired_pieces: list[int] = []
        self._fd_users: set[concurrent.futures.Future[Any]] = set()
        self._waits: list[HostWaiting] = []
        # Body threads admit each read's bytes for writing under this lock, and a split of a segment is
        # decided under it: a cut never falls inside a write under way (a read still waiting holds nothing).
        self._claims = threading.Lock()

    # -- what others see -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        st = self.state
        done = sum(s.done for s in st.segments) if st is not None else 0
        return {
            "size": self.size,
            "bytes_done": done,
            "hashed": self.hashed,
            "seconds": round(now - self.started, 1),
            "locations": [loc.status(now) for loc in self.locations],
        }

    def bytes_by_location(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for loc in self.locations:
            out[loc.label] = out.get(loc.label, 0) + loc.bytes
        return out

    def dropped(self) -> dict[str, str]:
        return {loc.label: loc.dropped for loc in self.locations if loc.dropped}

    def bad_locations(self) -> list[str]:
        """Origins with a location whose bytes did not match."""
        return sorted({loc.name for loc in self.locations if loc.bad_bytes})

    # -- the pull --------------------------------------------------------------------------------
    async def run(self) -> HashResult:
        st = await self.c._run_io(_load_state, self.partial)
        if st is not None and (not st.ranges or st.size != self.size):
            st = None
        if st is None:
            await self.c._run_io(_discard, self.partial)
            st = PullState(
                self.locations[0].url, self.size, None, None, True, plan_segments(self.size, self._seg_size())
            )
        else:
            log.info("fetch.resume", url=st.url, have=sum(s.done for s in st.segments), size=st.size, multi=True)
            # Validators of whichever location wrote the state mean nothing to the others.
            st.url, st.etag, st.last_modified = self.locations[0].url, None, None
        self.state = st
        hasher = StreamHasher(want_sha1=self.want_sha1)
        hash_task: asyncio.Task[None] | None = None
        ckpt_task: asyncio.Task[None] | None = None
        loops: list[asyncio.Task[None]] = []
        try:
            self.fd = await self.c._run_io(self._open)
            hash_task = asyncio.create_task(self._hash(hasher))
            ckpt_task = asyncio.create_task(self._checkpoint_loop())
            for loc in self.locations:
                for _ in range(self.per_location):
                    w = Worker(loc)
                    self.workers.append(w)
                    loops.append(asyncio.create_task(self._work(w)))
            waiters: set[asyncio.Task[None]] = {hash_task, *loops}
            # The hasher ends the pull (everything written and verified). A worker loop ends when
            # all is written or its location is dropped; one ending with an error (the disk) ends the pull.
            while True:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if hash_task in done:
                    break
                for t in done:
                    waiters.discard(t)
                    err = t.exception()
                    if err is not None:
                        raise err
                if all(loc.dropped for loc in self.locations) or (waiters == {hash_task} and not self._all_written()):
                    raise self._all_failed()
            await hash_task
            result = await hasher.finish()
            if result.size != self.size:
                raise FetchError(f"got {result.size} bytes, expected {self.size}")
            self.finished = True
            await self.c._run_io(_finish, self.partial)
            return result
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._wind_down((ckpt_task, hash_task), hasher)

    def _seg_size(self) -> int:
        # Several segments per connection, none above the configured size: a slow location then holds
        # back the contiguous prefix the hashers follow for one small segment's time, not a large one's.
        n = max(1, len(self.locations) * self.per_location * SEGMENTS_PER_CONNECTION)
        return max(min(MIN_SEGMENT, self.c.cfg.segment_size), min(self.c.cfg.segment_size, -(-self.size // n)))

    def _all_failed(self) -> Exception:
        if self._waits and all("asks to wait" in loc.dropped or "waiting" in loc.dropped for loc in self.locations):
            return min(self._waits, key=lambda w: w.until)
        why = "; ".join(f"{loc.name} {loc.url}: {loc.dropped}" for loc in self.locations)
        return FetchError(f"every location failed: {why}", retryable=True)

    def _open(self) -> int:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)
        return fd

    # -- choosing work ---------------------------------------------------------------------------
    def _free_segment(self, me: Worker) -> Segment | None:
        """The lowest segment that is neither complete nor held (the hasher waits on the lowest); none
        for a location with a stalled connection, which would likely stall on it too."""
        assert self.state is not None
        if not self._may_take_over(me, time.monotonic()):
            return None
        held = {id(w.seg) for w in self.workers if w.seg is not None}
        for s in self.state.segments:
            if not s.complete and id(s) not in held:
                return s
        return None

    def _steal(self, me: Worker) -> Segment | None:
        """Endgame: the tail of the outstanding segment that would finish last, when this worker
        is likely to bring it in sooner; None when nothing is worth taking."""
        assert self.state is not None
        now = time.monotonic()
        if not self._may_take_over(me, now):
            return None
        mine = self._my_rate(me)
        best: tuple[float, Worker] | None = None
        for w in self.workers:
            seg = w.seg
            if seg is None or w is me or seg.complete:
                continue
            pos = max(seg.start + seg.done, w.inflight_end)
            remaining = seg.end - pos
            stalled = w.stalled(now)
            if not worth_stealing(remaining, w.rate, mine, stalled):
                continue
            eta = float("inf") if stalled or w.rate <= 0 else remaining / w.rate
            if best is None or eta > best[0]:
                best = (eta, w)
        if best is None:
            return None
        w = best[1]
        seg = w.seg
        assert seg is not None
        stalled = w.stalled(now)
        with self._claims:
            pos = max(seg.start + seg.done, w.inflight_end)
            cut = max(pos, split_point(pos, seg.end, w.rate, mine, stalled))
            if cut >= seg.end:
                return None
            tail = Segment(cut, seg.end)
            seg.end = cut
        st = self.state
        st.segments.insert(bisect.bisect_left([s.start for s in st.segments], cut), tail)
        log.info(
            "fetch.endgame",
            partial=self.partial.name,
            taken_from=w.loc.url,
            by=me.loc.url,
            start=cut,
            end=tail.end,
            stalled=stalled,
        )
        if seg.complete and w.task is not None:
            w.task.cancel()  # the loser: nothing left to it (a stalled connection is closed)
        if stalled:
            # A stall counts as a failure of its location (two in a row drop it), and the location
            # rests a while instead of stalling on the next segment at once.
            w.loc.resting_until = now + 2 * STALL_SECONDS
            self._failed(w.loc, Retryable(f"no byte for {STALL_SECONDS:g}s"))
        return tail

    # -- a worker: one connection's worth of segments from one location -----------------------
    async def _work(self, w: Worker) -> None:
        loc = w.loc
        h = loc.host
        while not loc.dropped:
            if self._free_segment(w) is None and not self._steal_candidate_exists(w):
                if self._all_written():
                    return
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), IDLE_RECHECK)
                continue
            async with h.sem:
                try:
                    await self.c._gate(h, loc.url)
                except HostWaiting as e:
                    self._waits.append(e)
                    self._drop(loc, f"host asks to wait: {e}")
                    return
                except FetchError as e:
                    self._drop(loc, str(e))
                    return
                seg = self._free_segment(w) or self._steal(w)
                if seg is not None:
                    await self._run_segment(w, seg)
                    continue
            await asyncio.sleep(IDLE_RECHECK)  # taken by another worker meanwhile: look again soon

    async def _run_segment(self, w: Worker, seg: Segment) -> None:
        """One request for `seg` on `w`'s connection slot (held by the caller)."""
        loc = w.loc
        h = loc.host
        w.seg = seg
        w.started = w.last_byte = w._win_start = time.monotonic()
        w._win_bytes = 0
        w.task = asyncio.create_task(self._request(w, seg))
        h.active += 1
        try:
            await asyncio.wait({w.task})
        except asyncio.CancelledError:
            # The pull is ending: the request goes too, after its write (no byte lands later).
            w.task.cancel()
            await asyncio.wait({w.task})
            raise
        finally:
            h.active -= 1
        task, w.task, w.seg = w.task, None, None
        self._poke()  # the segment is free again or complete
        if task.cancelled():
            return  # its tail was taken over, or the location dropped
        err = task.exception()
        if err is None:
            loc.failures = 0
            return
        if isinstance(err, OSError):
            raise err  # the disk, not the location: every location would hit it
        self._failed(loc, err)

    def _steal_candidate_exists(self, me: Worker) -> bool:
        now = time.monotonic()
        if not self._may_take_over(me, now):
            return False
        mine = self._my_rate(me)
        for w in self.workers:
            seg = w.seg
            if seg is None or w is me or seg.complete:
                continue
            remaining = seg.end - max(seg.start + seg.done, w.inflight_end)
            if worth_stealing(remaining, w.rate, mine, w.stalled(now)):
                return True
        return False

    def _poke(self) -> None:
        self.progress.set()
        self.changed.set()

    def _my_rate(self, me: Worker) -> float:
        """What an idle worker can expect to get: its own last rate, else its location's per connection."""
        if me.rate:
            return me.rate
        busy = sum(1 for w in self.workers if w.loc is me.loc and w.seg is not None)
        return me.loc.rate / max(1, busy)

    def _may_take_over(self, me: Worker, now: float) -> bool:
        # A location with a stalled connection of its own is no better place for another's tail.
        if now < me.loc.resting_until:
            return False
        return not any(w.loc is me.loc and w.stalled(now) for w in self.workers)

    def _all_written(self) -> bool:
        assert self.state is not None
        return all(s.complete for s in self.state.segments)

    def _failed(self, loc: Location, err: BaseException) -> None:
        loc.failures += 1
        if isinstance(err, FetchError | _Changed) or loc.failures >= LOCATION_FAILURES:
            self._drop(loc, str(err) or type(err).__name__)
        else:
            log.info("fetch.location_retry", url=loc.url, reason=str(err))

    def _drop(self, loc: Location, why: str) -> None:
        if loc.dropped:
            return
        loc.dropped = why[:300]
        log.warning("fetch.location_dropped", url=loc.url, origin=loc.name, reason=loc.dropped)
        for w in self.workers:
            if w.loc is loc and w.task is not None:
                w.task.cancel()  # its segments go to the others from the byte they reached
        self._poke()

    async def _request(self, w: Worker, seg: Segment) -> None:
        loc = w.loc
        h = loc.host
        start = seg.start + seg.done
        headers = {"Range": f"bytes={start}-{seg.end - 1}"}
        if loc.etag and not loc.etag.startswith("W/"):
            headers["If-Range"] = loc.etag
        started = time.monotonic()
        loc.requests += 1
        try:
            resp = await self.c.open_body(loc.url, headers)
            try:
                self.c.traffic.add(loc.name, "in", requests=1)
                self.c._note_headers(h, resp.headers)
                if resp.status in RETRYABLE_STATUS:
                    raise Retryable(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")))
                if resp.status != 206:
                    # 200 (no ranges, or If-Range saw another version) or a client error: not a segment source.
                    raise FetchError(f"HTTP {resp.status} to a range request")
                etag = resp.headers.get("ETag")
                if loc.etag is None:
                    loc.etag = etag
                elif etag and etag != loc.etag:
                    raise _Changed(f"ETag changed from {loc.etag} to {etag}")
                cr = _content_range(resp.headers.get("Content-Range"))
                if cr is None or cr[0] != start or cr[2] != self.size:
                    raise _Changed(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
                await self._consume(w, seg, resp)
                h.succeeded(started)
            finally:
                resp.release()  # a body not read to its end (its tail taken over) closes the connection
        except (TransportError, Retryable) as e:
            raise self.c._classify(h, loc.name, e, loc.url) from None

    async def _consume(self, w: Worker, seg: Segment, resp: BodyResponse) -> None:
        loop = asyncio.get_running_loop()

        def admit(pos: int, n: int) -> int:  # in the body thread, after a read, before its write
            with self._claims:
                take = max(0, min(n, seg.end - pos))  # never past the segment (its tail may have been taken)
                w.inflight_end = pos + take if take else 0
                return take

        def wrote(pos: int, n: int) -> None:  # in the body thread, after the write
            with self._claims:
                seg.done += n
                w.inflight_end = 0
            loop.call_soon_threadsafe(self._landed, w, pos, n)

        try:
            await self._pour(resp, seg, lambda pos: seg.end, wrote, admit)
        finally:
            w.inflight_end = 0
        if not seg.complete:
            raise Retryable(f"body ended at {seg.start + seg.done} of {seg.end}")

    def _landed(self, w: Worker, pos: int, n: int) -> None:
        """Bytes a body thread has written: who brought them, at what rate."""
        loc = w.loc
        self._record(pos, pos + n, loc.label)
        now = time.monotonic()
        loc.count(n, now)
        w.count(n, now)
        self.c.traffic.add(loc.name, "in", n)
        self.progress.set()

    def _record(self, start: int, end: int, name: str) -> None:
        ext = self.extents
        if ext and ext[-1][1] == start and ext[-1][2] == name:
            ext[-1] = (ext[-1][0], end, name)
            return
        # Most writes continue some worker's run: extend it instead of adding an entry.
        for i in range(len(ext) - 1, max(-1, len(ext) - 1 - 4 * len(self.workers)), -1):
            if ext[i][1] == start and ext[i][2] == name:
                ext[i] = (ext[i][0], end, name)
                return
        ext.append((start, end, name))

    # -- hashing, piece checks and checkpoints -----------------------------------------------------
    async def _hash(self, hasher: StreamHasher) -> None:
        st = self.state
        assert st is not None
        while True:
            self.progress.clear()
            frontier = st.frontier()
            if self.pieces is not None:
                plen = self.pieces[0]
                upto = min(self.size, self.hashed + plen)
                if frontier >= upto and upto > self.hashed:
                    i = self.hashed // plen
                    want = self.pieces[1][i * 20 : i * 20 + 20]
                    ok, data = await self._fd_call(None, _check_and_feed, hasher, self.fd, self.hashed, upto, want)
                    if not ok:
                        good = await self._repair(i, self.hashed, upto, want, data)
                        await self._fd_call(None, hasher.update_piece_sync, good, want)
                    self.hashed = upto
                    continue
            elif frontier > self.hashed:
                upto = min(frontier, self.hashed + 16 * CHUNK)
                await self._fd_call(None, feed_range, hasher, self.fd, self.hashed, upto)
                self.hashed = upto
                continue
            if self._all_written() and self.hashed >= self.size:
                return
            await self.progress.wait()

    async def _repair(self, index: int, start: int, end: int, want: bytes, have: bytes) -> bytes:
        """A piece whose sha1 differs: a good copy from another location, the culprits dropped."""
        by = pieces_overlapping(self.extents, start, end)
        order = sorted(
            (loc for loc in self.locations if not loc.dropped),
            key=lambda loc: (loc.label in by, -loc.rate),  # a location that wrote none of it first
        )
        good: bytes | None = None
        for loc in order:
            try:
                reply = await self.c.get_bytes(
                    loc.url,
                    channel=loc.name,
                    headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
                    max_bytes=end - start,
                )
            except (FetchError, HostWaiting) as e:
                log.info("fetch.piece_source_failed", url=loc.url, piece=index, reason=str(e))
                continue
            loc.bytes += len(reply.body)
            if reply.status == 206 and len(reply.body) == end - start and await _sha1(reply.body) == want:
                good = reply.body
                break
            log.info("fetch.piece_copy_bad", url=loc.url, piece=index)
        if good is None:
            raise FetchError(f"piece {index} does not match the published hash and no location has a good copy")
        culprits = sorted(
            name
            for name, spans in by.items()
            if any(have[a - start : b - start] != good[a - start : b - start] for a, b in spans)
        )
        await self._fd_call(None, os.pwrite, self.fd, good, start)
        self.repaired_pieces.append(index)
        reason = f"piece {index} did not match the published piece hash"
        log.warning("fetch.piece_repaired", partial=self.partial.name, piece=index, culprits=culprits)
        bad = [loc for loc in self.locations if loc.label in culprits]
        for loc in bad:
            loc.bad_bytes = True
            self._drop(loc, reason)
        if self.on_bad_bytes is not None:
            for name in dict.fromkeys(loc.name for loc in bad):  # the suspects table knows origins
                await self.on_bad_bytes(name, f"{reason} ({', '.join(loc.url for loc in bad if loc.name == name)})")
        return good


class _Changed(Exception):
    """The location serves another version of the resource than it did at the start of this pull."""


def _pieces_fit(pieces: tuple[int, bytes], size: int) -> bool:
    """Published piece hashes this pull can check piece by piece (the hashers' own piece length)."""
    plen, hashes = pieces
    return plen == PIECE_LENGTH and len(hashes) == 20 * max(1, -(-size // plen))


def _check_and_feed(hasher: StreamHasher, fd: int, start: int, end: int, want: bytes) -> tuple[bool, bytes]:
    """Blocking: read one piece once, check its sha1, and feed it to the whole-file hashes if it matches."""
    data = os.pread(fd, end - start, start)
    if len(data) != end - start:
        raise OSError(f"file ended at {start + len(data)}, expected {end} bytes")
    if hashlib.sha1(data, usedforsecurity=False).digest() != want:  # BitTorrent v1 piece hash, not security
        return False, data
    hasher.update_piece_sync(data, want)
    return True, b""


async def _sha1(data: bytes) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: hashlib.sha1(data, usedforsecurity=False).digest()
    )
