"""The HTTP pull engine: ranges, segments, resume across restarts, retries, per-host politeness.

One `HttpClient` per node holds an aiohttp session and the state of every host it talks to: a cap
on concurrent connections, an optional request pacing (Zenodo and the Internet Archive throttle
guests), the `X-RateLimit-*`/`Retry-After` waits a host asked for, and a backoff for hosts that keep
failing, so a bad host is backed off as a whole instead of being hammered once per file.

`download()` writes an item into its partial file in fixed-size segments fetched in parallel
(Range + If-Range; each body is received by a worker thread, see `bodies`), checkpoints which bytes
are durably on disk into `<partial>.state` (fdatasync first, then an atomic JSON write), and on the
next start resumes from there: a resource whose ETag/Last-Modified changed restarts cleanly from
zero. The hashes follow the contiguous written prefix of the file, so each byte is hashed exactly
once while the transfer runs (the bytes are read back from the page cache right after they were
written; after a restart, the bytes kept on disk are hashed once at resume).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from noded.cache.layout import atomic_write
from noded.core.config import FetchConfig
from noded.core.counters import Traffic
from noded.core.hashing import StreamHasher, feed_range
from noded.core.logs import get_logger
from noded.core.model import HashResult
from noded.core.priority import bulk_thread
from noded.origins.bodies import BodyResponse, BodyTransport, TransportError, open_in
from noded.origins.catalog.base import HttpReply
from noded.origins.schedule import TokenBucket
from noded.origins.sources import FetchError, HostWaiting

log = get_logger("noded.fetch")
T = TypeVar("T")

CHUNK = 1024 * 1024  # read/write unit of a segment stream
REPORT_BYTES = 16 * CHUNK  # a body thread counts traffic and wakes the hasher this often
CHECKPOINT_SECONDS = 1.0  # how often durable progress is recorded (bounds re-download after a crash)
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 7 * 86400.0  # sanity bound on what a header can ask; fetch.max_retry_after is the policy
MAX_RESTARTS = 2  # restarts from zero when the resource changes under us
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Retryable(Exception):
    """A transient failure of one request; `retry_after` is what the server asked for, if anything."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChangedUpstream(Exception):
    """The resource changed (If-Range answered with the full body, or a different validator)."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), bounded."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), MAX_RETRY_AFTER)


@dataclass
class HostState:
    """Politeness towards one host (netloc), shared by catalog requests and downloads."""

    sem: asyncio.Semaphore
    name: str = ""
    min_interval: float = 0.0  # seconds between request starts (requests-per-minute pacing)
    next_slot: float = 0.0
    not_before: float = 0.0  # monotonic time before which no request starts
    wait_reason: str = ""  # why the host is held (Retry-After, X-RateLimit, backoff)
    # Failures of the current outage. An outage ends only with a success of a request that started
    # after its latest failure: a response already in flight when the storm began does not end it.
    failures: int = 0
    last_failure: float = 0.0  # monotonic
    last_success_wall: float = 0.0
    active: int = 0
    requests: int = 0

    def waiting(self, now: float | None = None) -> float:
        return max(0.0, self.not_before - (time.monotonic() if now is None else now))

    def hold(self, seconds: float, reason: str) -> None:
        until = time.monotonic() + seconds
        if until > self.not_before:
            self.not_before = until
            self.wait_reason = reason

    def until_wall(self) -> float:
        """The wall-clock time the host's wait ends (for status and the store)."""
        return time.time() + self.waiting()

    def succeeded(self, started: float) -> None:
        self.last_success_wall = time.time()
        if started > self.last_failure:
            self.failures = 0

    def status(self) -> dict[str, Any]:
        wait = self.waiting()
        out: dict[str, Any] = {"active": self.active, "failures": self.failures, "backoff_seconds": round(wait, 1)}
        if wait > 0:
            out["waiting_until"] = round(self.until_wall(), 3)
            out["reason"] = self.wait_reason
        return out


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes from `start` that are written

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def complete(self) -> bool:
        return self.end >= 0 and self.done >= self.length  # end < 0: length unknown until the stream ends


@dataclass
class PullState:
    """What `<partial>.state` records; `segments[i].done` only counts bytes known to be on disk."""

    url: str
    size: int | None
    etag: str | None = None
    last_modified: str | None = None
    ranges: bool = True
    segments: list[Segment] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PullState:
        d = json.loads(raw)
        segs = [Segment(int(s["start"]), int(s["end"]), int(s["done"])) for s in d.pop("segments")]
        return cls(**d, segments=segs)

    def frontier(self) -> int:
        """End of the contiguous written prefix."""
        for s in self.segments:
            if not s.complete:
                return s.start + s.done
        return self.segments[-1].end if self.segments else 0


def state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".state")


def plan_segments(size: int, segment_size: int) -> list[Segment]:
    if size == 0:
        return [Segment(0, 0)]
    return [Segment(a, min(a + segment_size, size)) for a in range(0, size, segment_size)]


class HttpClient:
    def __init__(self, cfg: FetchConfig, traffic: Traffic, down: TokenBucket | None = None) -> None:
        self.cfg = cfg
        self.traffic = traffic
        self.down = down or TokenBucket()
        self.hosts: dict[str, HostState] = {}
        self._pacing: dict[str, float] = {}
        self._limits: dict[str, int] = {}
        # (event, host or URL) -> when it was last logged, for the rate-limited warnings.
        self._last_log: dict[tuple[str, str], float] = {}
        self._session: aiohttp.ClientSession | None = None
        # File writes and syncs of all pulls; the store and hashing have their own threads.
        self._io: ThreadPoolExecutor | None = None
        # Dataset bodies: received by threads of their own, one per segment being received.
        self._bodies: BodyTransport | None = None
        self._body_threads: ThreadPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch-io")
        cfg = self.cfg
        self._bodies = BodyTransport(
            user_agent=cfg.user_agent,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_idle=cfg.max_connections_per_host,
        )
        # Threads are made on demand; the bound only has to exceed the segments received at once.
        self._body_threads = ThreadPoolExecutor(
            max_workers=min(256, 2 * cfg.max_concurrent_items * cfg.segments_per_item + 4),
            thread_name_prefix="fetch-body",
            initializer=bulk_thread,
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
        )
        # The semaphores cap requests per host; the connector caps sockets too (idle keep-alives included).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self.cfg.max_connections_per_host, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            # identity: a compressed body would not be the bytes the published checksums cover.
            headers={"User-Agent": self.cfg.user_agent, "Accept-Encoding": "identity"},
            auto_decompress=False,  # bytes on disk must be the bytes the checksum covers
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._io is not None:
            self._io.shutdown(wait=True, cancel_futures=True)
            self._io = None
        if self._body_threads is not None:
            self._body_threads.shutdown(wait=True, cancel_futures=True)
            self._body_threads = None
        if self._bodies is not None:
            self._bodies.close()
            self._bodies = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpClient is not started")
        return self._session

    @property
    def body_threads(self) -> ThreadPoolExecutor:
        if self._body_threads is None:
            raise RuntimeError("HttpClient is not started")
        return self._body_threads

    async def open_body(self, url: str, headers: dict[str, str]) -> BodyResponse:
        """Send a GET for a dataset body from a worker thread: the head is read, the body is not.
        Transport failures raise TransportError; the caller releases the response."""
        if self._bodies is None:
            raise RuntimeError("HttpClient is not started")
        return await open_in(self.body_threads, self._bodies, url, {"Accept-Encoding": "identity", **headers})

    def pace_host(self, host_or_url: str, requests_per_minute: int) -> None:
        """Space request starts to a host (e.g. Zenodo's guest limit of 60/min)."""
        host = urlsplit(host_or_url).netloc or host_or_url
        self._pacing[host] = 60.0 / requests_per_minute
        if host in self.hosts:
            self.hosts[host].min_interval = self._pacing[host]

    def limit_host(self, host_or_url: str, connections: int) -> None:
        """Fewer connections to one host than fetch.max_connections_per_host (Zenodo blocks above 2)."""
        host = urlsplit(host_or_url).netloc or host_or_url
        self._limits[host] = min(connections, self.cfg.max_connections_per_host)

    def host(self, url: str) -> HostState:
        netloc = urlsplit(url).netloc
        st = self.hosts.get(netloc)
        if st is None:
            st = HostState(
                sem=asyncio.Semaphore(self._limits.get(netloc, self.cfg.max_connections_per_host)),
                name=netloc,
                min_interval=self._pacing.get(netloc, 0.0),
            )
            self.hosts[netloc] = st
        return st

    # -- politeness ---------------------------------------------------------------------------
    def log_limited(self, event: str, about: str, **kw: Any) -> None:
        """A warning at most once per `fetch.log_interval` for each (event, about): storms stay readable."""
        now = time.monotonic()
        if now - self._last_log.get((event, about), -1e18) < self.cfg.log_interval:
            return
        if len(self._last_log) > 10_000:
            self._last_log.clear()  # bounded: forgetting only costs one extra log line
        self._last_log[(event, about)] = now
        log.warning(event, **kw)

    def _check_wait(self, h: HostState) -> None:
        """A wait the pull should not sit through: the item is re-queued, or another location tried."""
        wait = h.waiting()
        if wait > self.cfg.max_retry_after:
            raise FetchError(
                f"host {h.name} asks to wait {wait:.0f}s ({h.wait_reason}), more than fetch.max_retry_after",
                retryable=True,
            )
        if wait > self.cfg.host_backoff_max_wait:
            raise HostWaiting(h.name, h.until_wall(), h.wait_reason)

    async def _gate(self, h: HostState, url: str) -> None:
        """Wait for the host's backoff/rate-limit window and pacing slot (inside the connection cap)."""
        self._check_wait(h)
        wait = h.waiting()
        if wait > 0:
            self.log_limited(
                "fetch.host_wait", h.name, host=h.name, url=url, seconds=round(wait, 3), reason=h.wait_reason
            )
            await asyncio.sleep(wait)
        if h.min_interval:
            now = time.monotonic()
            slot = max(now, h.next_slot)
            h.next_slot = slot + h.min_interval
            if slot > now:
                await asyncio.sleep(slot - now)
        h.requests += 1

    def _note_headers(self, h: HostState, headers: Mapping[str, str] | Message) -> None:
        remaining = headers.get("X-RateLimit-Remaining")
        reset = headers.get("X-RateLimit-Reset")
        if remaining is not None and remaining.strip() == "0" and reset and reset.strip().isdigit():
            wait = min(max(0.0, int(reset) - time.time()), MAX_RETRY_AFTER)
            h.hold(wait, f"X-RateLimit-Remaining 0, reset in {wait:.0f}s")

    def _failed(self, h: HostState, retry_after: float | None, why: str = "") -> None:
        h.failures += 1
        h.last_failure = time.monotonic()
        if retry_after is not None:
            # Retry-After: 0 (or a tiny value) still waits the minimum backoff: no hammering.
            h.hold(max(retry_after, self.cfg.retry_initial), f"Retry-After {retry_after:g}s after {why}".strip())
        if h.failures >= self.cfg.host_failure_threshold:
            # The whole host waits, growing with each further failure of this outage, jittered against herds.
            n = h.failures - self.cfg.host_failure_threshold
            h.hold(self._backoff(n), f"{h.failures} failures in a row ({why})")

    def _wait(self, rs: RetryCallState) -> float:
        # Always at least the backoff; a Retry-After longer than it is enforced by the host gate.
        return self._backoff(rs.attempt_number - 1)

    def _backoff(self, n: int) -> float:
        """Doubling from retry_initial, capped at retry_max; jitter only upwards, so retry_initial is the minimum."""
        return float(min(self.cfg.retry_max, self.cfg.retry_initial * 2 ** min(n, 60) * random.uniform(1.0, 1.25)))

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(Retryable),
            reraise=True,
        )

    async def with_retries(self, url: str, once: Callable[[], Awaitable[T]]) -> T:
        """`once()` retried on Retryable with backoff; a FetchError once the attempts are spent."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    return await once()
        except Retryable as e:
            raise FetchError(f"GET {url} failed after {self.cfg.max_attempts} attempts: {e}") from None
        raise AssertionError("unreachable")

    def _classify(self, h: HostState, channel: str, e: BaseException, url: str = "") -> Retryable:
        """Turn a transport failure into a retryable error, counting it against the host."""
        self.traffic.add(channel, "in", errors=1)
        retry_after = e.retry_after if isinstance(e, Retryable) else None
        err = e if isinstance(e, Retryable) else Retryable(f"{type(e).__name__}: {e}")
        self._failed(h, retry_after, str(err))
        self.log_limited("fetch.retry", f"{h.name} {url}", host=h.name, url=url, reason=str(err), failures=h.failures)
        if retry_after is not None and retry_after > self.cfg.max_retry_after:
            raise FetchError(
                f"host {h.name} asks to wait {retry_after:.0f}s, more than fetch.max_retry_after", retryable=True
            )
        return err

    # -- small bodies (catalog pages) ---------------------------------------------------------
    async def get_bytes(
        self,
        url: str,
        *,
        channel: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int,
    ) -> HttpReply:
        h = self.host(url)
        return await self.with_retries(url, lambda: self._get_once(h, url, channel, params, headers, max_bytes))

    async def _get_once(
        self,
        h: HostState,
        url: str,
        channel: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        max_bytes: int,
    ) -> HttpReply:
        async with h.sem:
            await self._gate(h, url)
            started = time.monotonic()
            h.active += 1
            try:
                async with self.session.get(url, params=params, headers=headers) as resp:
                    self.traffic.add(channel, "in", requests=1)
                    self._note_headers(h, resp.headers)
                    if resp.status in RETRYABLE_STATUS:
                        raise Retryable(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")))
                    if (resp.content_length or 0) > max_bytes:
                        raise FetchError(f"GET {url}: body of {resp.content_length} bytes exceeds {max_bytes}")
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        buf += chunk
                        self.traffic.add(channel, "in", len(chunk))
                        if len(buf) > max_bytes:
                            raise FetchError(f"GET {url}: body exceeds {max_bytes} bytes", retryable=False)
                    body = bytes(buf)
                    h.succeeded(started)
                    return HttpReply(resp.status, dict(resp.headers), body, str(resp.url))
            except (aiohttp.ClientError, TimeoutError, Retryable) as e:
                raise self._classify(h, channel, e, url) from None
            finally:
                h.active -= 1

    # -- downloads ----------------------------------------------------------------------------
    async def download(
        self,
        url: str,
        partial: Path,
        *,
        channel: str,
        expected_size: int | None = None,
        want_sha1: bool = False,
        any_location: bool = False,
    ) -> HashResult:
        """Fetch `url` into `partial` (resuming if a matching state file exists); return its hashes.

        any_location: a state file left by another URL (another location of the same content, same
        size) is continued from the bytes it reached; the caller verifies the whole against a checksum.
        """
        for _ in range(MAX_RESTARTS + 1):
            try:
                return await _Pull(self, url, partial, channel, expected_size, want_sha1, any_location).run()
            except ChangedUpstream as e:
                log.warning("fetch.changed_upstream", url=url, host=urlsplit(url).netloc, reason=str(e))
                await self._run_io(_discard, partial)
        raise FetchError(f"{url} kept changing during the download", retryable=True)

    async def _run_io(self, fn: Any, *args: Any) -> Any:
        if self._io is None:
            raise RuntimeError("HttpClient is not started")
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)


def _discard(partial: Path) -> None:
    for p in (partial, state_path(partial)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _load_state(partial: Path) -> PullState | None:
    try:
        raw = state_path(partial).read_bytes()
        if not partial.exists():
            return None
        return PullState.from_json(raw)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a damaged state file only costs a fresh start


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


class _PartialFile:
    """What a pull keeps of its partial file, whether it takes the bytes from one location or from
    several: the open fd, the threads still using it, and the checkpoints of its segments."""

    c: HttpClient
    partial: Path
    state: PullState | None
    fd: int
    finished: bool
    progress: asyncio.Event  # set when bytes are written: wakes the hasher
    _fd_users: set[concurrent.futures.Future[Any]]

    def _track(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run a blocking call that uses `self.fd` in a thread, tracked until it really ends."""
        fut = (executor or _default_executor()).submit(fn, *args)
        self._fd_users.add(fut)
        fut.add_done_callback(self._fd_users.discard)
        return fut

    async def _fd_call(self, executor: Executor | None, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._track(executor, fn, *args))

    async def _pour(
        self,
        resp: BodyResponse,
        seg: Segment,
        end: Callable[[int], int],
        wrote: Callable[[int, int], None],
        admit: Callable[[int, int], int] | None = None,
    ) -> None:
        """The body into the segment's place from where the segment stands, received by a body
        thread; `end`, `wrote` and `admit` are called in that thread (see `BodyResponse.pour`), and
        the node's download bucket is taken there too.

        A cancelled pour aborts the connection and waits for its thread: when this returns or raises,
        nothing touches the response or the segment any more."""
        down = self.c.down

        def written(pos: int, n: int) -> None:
            wrote(pos, n)
            wait = down.reserve(n)
            if wait > 0:
                resp.pause(wait)

        fut = self._track(self.c.body_threads, resp.pour, self.fd, seg.start + seg.done, end, written, admit)
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            resp.abort()
            await asyncio.wait([asyncio.wrap_future(fut)])
            raise

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            await self.c._run_io(self._checkpoint)

    def _checkpoint(self) -> None:
        st = self.state
        if st is None or self.fd < 0:
            return
        # Take the counts before syncing: everything they cover is then surely on disk.
        snapshot = PullState(
            st.url,
            st.size,
            st.etag,
            st.last_modified,
            st.ranges,
            [Segment(s.start, s.end, s.done) for s in st.segments],
        )
        os.fdatasync(self.fd)
        atomic_write(state_path(self.partial), snapshot.to_json())

    def _final_checkpoint(self) -> None:
        """On failure or cancellation, record the progress made since the last checkpoint."""
        if not self.finished and self.state is not None and self.state.ranges and self.partial.exists():
            with contextlib.suppress(OSError):
                self._checkpoint()

    async def _wind_down(self, tasks: Iterable[asyncio.Task[Any] | None], hasher: StreamHasher) -> None:
        """The end of a pull, whatever its outcome: its checkpoint and hash tasks stopped, the hasher
        closed, the last checkpoint written and the fd closed. A cancelled await leaves its thread
        running, so the fd is closed only once no thread uses it."""
        started = [t for t in tasks if t is not None]
        for t in started:
            t.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        hasher.close()
        if self.fd >= 0:
            users = list(self._fd_users)
            if users:
                await asyncio.get_running_loop().run_in_executor(None, concurrent.futures.wait, users)
            await self.c._run_io(self._final_checkpoint)
            os.close(self.fd)
            self.fd = -1


class _Pull(_PartialFile):
    """One download attempt into one partial file."""

    def __init__(
        self,
        client: HttpClient,
        url: str,
        partial: Path,
        channel: str,
        expected_size: int | None,
        want_sha1: bool,
        any_location: bool = False,
    ) -> None:
        self.any_location = any_location
        self.c = client
        self.url = url
        self.partial = partial
        self.channel = channel
        self.expected_size = expected_size
        self.want_sha1 = want_sha1
        self.h = client.host(url)
        self.state: PullState | None = None
        self.fd = -1
        self.progress = asyncio.Event()
        self.hashed = 0
        self.finished = False
        self._fd_users: set[concurrent.futures.Future[Any]] = set()
        self._first: BodyResponse | None = None  # the probe's response, until a worker takes it
        self._started = 0.0  # when the probe's request was sent

    async def run(self) -> HashResult:
        cfg = self.c.cfg
        st = await self.c._run_io(_load_state, self.partial)
        if st is not None and st.url != self.url and self.any_location and st.ranges and st.size == self.expected_size:
            # Another location's bytes: continue them here. Its validators mean nothing at this URL.
            log.info("fetch.switch_location", old=st.url, new=self.url, have=sum(s.done for s in st.segments))
            st.url, st.etag, st.last_modified = self.url, None, None
        if st is not None and (
            st.url != self.url or not st.ranges or (self.expected_size is not None and st.size != self.expected_size)
        ):
            st = None  # without range support nothing can be resumed
        first: BodyResponse | None = None
        if st is None:
            await self.c._run_io(_discard, self.partial)
            st, first = await self._probe()
            if self.expected_size is not None and st.size is not None and st.size != self.expected_size:
                if first is not None:
                    self._release_first(first)
                # The listing is stale or the origin serves something else: no point in fetching it.
                msg = f"{self.url} is {st.size} bytes, the listing says {self.expected_size}"
                raise FetchError(msg, retryable=False)
        else:
            log.info("fetch.resume", url=self.url, have=sum(s.done for s in st.segments), size=st.size)
        self.state = st
        # The probe's open response goes to whichever worker starts first; if none ever starts (the
        # file cannot be opened, or cancelled at once), the finally below gives its connection slot back.
        self._first = first
        hash_task: asyncio.Task[None] | None = None
        ckpt_task: asyncio.Task[None] | None = None
        try:
            self.fd = await self.c._run_io(self._open, st.size)
            hasher = StreamHasher(want_sha1=self.want_sha1)
            hash_task = asyncio.create_task(self._hash(hasher))
            ckpt_task = asyncio.create_task(self._checkpoint_loop())
            pending = [s for s in st.segments if not s.complete]
            queue: asyncio.Queue[Segment] = asyncio.Queue()
            for s in pending:
                queue.put_nowait(s)
            workers = max(1, min(cfg.segments_per_item, len(pending)) if st.ranges else 1)
            tasks = [asyncio.create_task(self._worker(queue)) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self.progress.set()
            # Every byte is written: its flush to disk runs while the hashes catch up, so the fsync
            # before publishing finds little left to write.
            flushed = self._track(self.c._io, os.fdatasync, self.fd)
            await hash_task
            result = await hasher.finish()
            await asyncio.wrap_future(flushed)
            if st.size is not None and result.size != st.size:
                raise FetchError(f"{self.url}: got {result.size} bytes, expected {st.size}")
            if self.expected_size is not None and result.size != self.expected_size:
                raise FetchError(f"{self.url}: got {result.size} bytes, the listing says {self.expected_size}")
            self.finished = True
            await self.c._run_io(_finish, self.partial)
            return result
        finally:
            if self._first is not None:
                self._release_first(self._first)
                self._first = None
            await self._wind_down((ckpt_task, hash_task), hasher)

    def _open(self, size: int | None) -> int:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        if size is not None and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # sparse: only written blocks take space
        return fd

    # -- first request: learn size, validators and whether ranges work -------------------------
    async def _probe(self) -> tuple[PullState, BodyResponse | None]:
        seg = self.c.cfg.segment_size
        return await self.c.with_retries(self.url, lambda: self._probe_once(seg))

    async def _probe_once(self, seg: int) -> tuple[PullState, BodyResponse | None]:
        h = self.h
        # The slot is held past this function when the response is handed to the first worker.
        await h.sem.acquire()
        h.active += 1
        try:
            await self.c._gate(h, self.url)
            self._started = time.monotonic()
            try:
                resp = await self.c.open_body(self.url, {"Range": f"bytes=0-{seg - 1}"})
            except TransportError as e:
                raise self.c._classify(h, self.channel, e, self.url) from None
            self.c.traffic.add(self.channel, "in", requests=1)
            self.c._note_headers(h, resp.headers)
            etag = resp.headers.get("ETag")
            modified = resp.headers.get("Last-Modified")
            try:
                if resp.status in RETRYABLE_STATUS:
                    raise self.c._classify(
                        h,
                        self.channel,
                        Retryable(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After"))),
                        self.url,
                    )
                if resp.status == 416:
                    cr = _content_range(resp.headers.get("Content-Range"))
                    if cr is None and resp.headers.get("Content-Range", "").strip() == "bytes */0":
                        resp.release()
                        h.active -= 1
                        h.sem.release()
                        return PullState(self.url, 0, etag, modified, True, plan_segments(0, seg)), None
                    raise FetchError(f"{self.url}: HTTP 416 for the first bytes", retryable=False)
                if resp.status == 206:
                    cr = _content_range(resp.headers.get("Content-Range"))
                    if cr is None or cr[0] != 0 or cr[2] is None:
                        raise FetchError(f"{self.url}: unusable Content-Range {resp.headers.get('Content-Range')!r}")
                    size = cr[2]
                    st = PullState(self.url, size, etag, modified, True, plan_segments(size, seg))
                elif resp.status == 200:
                    # No range support: one stream; a restart then begins again at zero.
                    length = resp.content_length
                    whole = Segment(0, length if length is not None else -1)
                    st = PullState(self.url, length, etag, modified, False, [whole])
                else:
                    raise FetchError(
                        f"{self.url}: HTTP {resp.status}", retryable=resp.status not in (400, 401, 403, 404, 410)
                    )
            except BaseException:
                resp.release()
                raise
        except BaseException:
            h.active -= 1
            h.sem.release()
            raise
        h.succeeded(self._started)
        return st, resp

    # -- segment workers --------------------------------------------------------------------------
    async def _worker(self, queue: asyncio.Queue[Segment]) -> None:
        first, self._first = self._first, None
        try:
            while True:
                try:
                    seg = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    async for attempt in self.c._retrying():
                        with attempt:
                            if first is not None:
                                resp, first = first, None
                                await self._stream_first(seg, resp)
                            else:
                                await self._segment_once(seg)
                except Retryable as e:
                    raise FetchError(f"{self.url}: segment at {seg.start} failed after retries: {e}") from None
        finally:
            if first is not None:  # never streamed (nothing to do, or cancelled first)
                self._release_first(first)

    def _release_first(self, resp: BodyResponse) -> None:
        """Give back the probe's response and the connection slot it holds."""
        resp.release()
        self.h.active -= 1
        self.h.sem.release()

    async def _stream_first(self, seg: Segment, resp: BodyResponse) -> None:
        try:
            await self._consume(seg, resp)
            self.h.succeeded(self._started)
        except TransportError as e:
            raise self.c._classify(self.h, self.channel, e, self.url) from None
        finally:
            self._release_first(resp)

    async def _segment_once(self, seg: Segment) -> None:
        st = self.state
        assert st is not None
        h = self.h
        headers: dict[str, str] = {}
        if st.ranges:
            last = f"{seg.end - 1}" if seg.end > 0 else ""
            headers["Range"] = f"bytes={seg.start + seg.done}-{last}"
            validator = st.etag if st.etag and not st.etag.startswith("W/") else st.last_modified
            if validator:
                headers["If-Range"] = validator
        elif seg.done:
            # Without ranges a retry starts at zero, and the hashes already taken are void.
            raise ChangedUpstream("the server does not support ranges; starting again")
        async with h.sem:
            await self.c._gate(h, self.url)
            started = time.monotonic()
            h.active += 1
            try:
                resp = await self.c.open_body(self.url, headers)
                try:
                    self.c.traffic.add(self.channel, "in", requests=1)
                    self.c._note_headers(h, resp.headers)
                    if resp.status in RETRYABLE_STATUS:
                        raise Retryable(f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")))
                    if st.ranges:
                        if resp.status == 200:
                            raise ChangedUpstream("If-Range answered with the whole resource")
                        if resp.status == 416:
                            raise ChangedUpstream("range not satisfiable: the resource shrank")
                        if resp.status != 206:
                            raise FetchError(f"{self.url}: HTTP {resp.status}", retryable=resp.status >= 500)
                        etag = resp.headers.get("ETag")
                        if st.etag and etag and etag != st.etag:
                            raise ChangedUpstream(f"ETag changed from {st.etag} to {etag}")
                        cr = _content_range(resp.headers.get("Content-Range"))
                        if cr is None or cr[0] != seg.start + seg.done or (cr[2] is not None and cr[2] != st.size):
                            raise ChangedUpstream(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
                    elif resp.status != 200:
                        raise FetchError(f"{self.url}: HTTP {resp.status}", retryable=resp.status >= 500)
                    await self._consume(seg, resp)
                    h.succeeded(started)
                finally:
                    resp.release()
            except (TransportError, Retryable) as e:
                raise self.c._classify(h, self.channel, e, self.url) from None
            finally:
                h.active -= 1

    async def _consume(self, seg: Segment, resp: BodyResponse) -> None:
        """Write the body into the segment's place; short bodies are retried from where they stopped."""
        unknown = seg.end < 0
        loop = asyncio.get_running_loop()
        traffic, channel = self.c.traffic, self.channel
        pending = 0  # written, not yet counted; touched by the body thread only while it runs

        def wrote(pos: int, n: int) -> None:  # in the body thread
            nonlocal pending
            seg.done += n
            pending += n
            if pending >= REPORT_BYTES:
                traffic.add(channel, "in", pending)
                pending = 0
                loop.call_soon_threadsafe(self.progress.set)

        try:
            await self._pour(resp, seg, lambda pos: seg.end, wrote)
        finally:
            if pending:
                traffic.add(channel, "in", pending)
            self.progress.set()
        if unknown:
            seg.end = seg.start + seg.done  # a body without length ends where the stream ends
            assert self.state is not None
            self.state.size = seg.end
        elif not seg.complete:
            raise Retryable(f"body ended at {seg.start + seg.done} of {seg.end}")

    # -- hashing and checkpoints ----------------------------------------------------------------
    async def _hash(self, hasher: StreamHasher) -> None:
        st = self.state
        assert st is not None
        while True:
            self.progress.clear()  # before looking, so a wake-up between look and wait is not lost
            frontier = st.frontier()
            if frontier > self.hashed:
                upto = min(frontier, self.hashed + 16 * CHUNK)
                await self._fd_call(None, feed_range, hasher, self.fd, self.hashed, upto)
                self.hashed = upto
                continue
            if all(s.complete for s in st.segments) and st.size is not None and self.hashed >= st.size:
                return
            await self.progress.wait()


_HASH_FEEDER: ThreadPoolExecutor | None = None


def _default_executor() -> ThreadPoolExecutor:
    """Threads that read written bytes back into the hashers (one per concurrent pull is plenty)."""
    global _HASH_FEEDER
    if _HASH_FEEDER is None:
        _HASH_FEEDER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="hash-feed", initializer=bulk_thread)
    return _HASH_FEEDER


def _finish(partial: Path) -> None:
    """The bytes are complete: the state file is no longer needed (the caller publishes)."""
    with contextlib.suppress(FileNotFoundError):
        state_path(partial).unlink()
