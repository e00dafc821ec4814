"""Filesystem watching: inbox files to publish, cache files changed behind noded's back.

A watchdog observer (its own thread) hands events to the loop with `call_soon_threadsafe`; all the
work happens on the loop, blocking steps in executors.

Inbox: a file is complete when its writer closes it after writing (inotify close-write) or when its
size and mtime have not changed for `origins.inbox.stable_seconds`. Hidden names and usual temporary
suffixes are skipped until renamed. Publishing: reserve room, move the file into the partial area
(rename on the same filesystem, else copy + fsync), hash it once off the loop, publish atomically into
the cache, record the item (origin "inbox", state CACHED, piece hashes), notify "cached" so the P2P and
R2 components take over. On failure the file goes back to the inbox, so nothing is lost.

Symlinks and special files (FIFOs, sockets, devices), and files under a symlinked directory, are never
read, moved or published, in the inbox or in the cache: they are left where they are (a cached item
replaced by one is moved aside to the quarantine area and fetched again), logged, and listed in
`node.problems["unsafe_files"]` until they are gone.

Cache: deletions and modifications of cached files (not of noded's own partial/quarantine area) are
checked against the store row (size and mtime_ns) after a short debounce; the cache marks them.

Without inotify (a shared host whose watches or instances have run out, ENOSPC/EMFILE) the watcher
polls instead: the inbox is listed every POLL_INBOX seconds and the cached files are stat'ed every
POLL_CACHE seconds, feeding the same stability and debounce checks; `node.problems["watch"]` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from noded.cache import db as cachedb
from noded.cache.accounting import Cache, CacheFull, _unlink
from noded.cache.layout import INTERNAL, UnsafePath, disk_bytes, fsync_dir, publish
from noded.core.component import Node, supervise
from noded.core.hashing import hash_file
from noded.core.logs import get_logger
from noded.core.model import CatalogEntry, HashResult, State
from noded.core.safefs import UnsafeFile, lstat_regular, open_regular

log = get_logger("noded.watch")

DEBOUNCE = 0.5  # seconds: let a burst of events for one path settle before looking at it
POLL_INBOX = 5.0  # seconds between inbox listings when inotify is unavailable
POLL_CACHE = 30.0  # seconds between stat passes over the cached files when inotify is unavailable
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".swp", "~")
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    # Opens and read-only closes only matter in the inbox (is a writer still holding the file?).
    FileOpenedEvent,
    FileClosedNoWriteEvent,
]


def is_temporary(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts) or rel.name.endswith(TEMP_SUFFIXES)


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # monotonic time the size/mtime was first seen unchanged


class _Forward(FileSystemEventHandler):
    """Runs on the observer thread: hands events over to the loop, less those the loop would ignore.

    `internal`: a directory whose events are dropped here (the cache's own area: a pull writing there
    makes an event per write, which the loop would only throw away); `readers`: whether opens and
    read-only closes are wanted."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[tuple[str, FileSystemEvent]],
        tag: str,
        *,
        internal: Path | None = None,
        readers: bool = True,
    ):
        self.loop = loop
        self.queue = queue
        self.tag = tag
        self.internal = None if internal is None else os.fsencode(internal) + b"/"
        self.readers = readers

    def _inside(self, path: bytes | str) -> bool:
        assert self.internal is not None
        return os.fsencode(path).startswith(self.internal)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not self.readers and isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return
        if self.internal is not None and self._inside(event.src_path):
            dest = getattr(event, "dest_path", "")
            if not dest or self._inside(dest):  # a move out of the area (publish) still counts
                return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, event))


def _stop_observer(observer: Any) -> None:
    """Stop what a failed start left running (emitters started before the one that failed)."""
    with contextlib.suppress(Exception):
        observer.stop()
        observer.join(5.0)


def _p(v: bytes | str) -> Path:
    return Path(os.fsdecode(v))


class Watcher:
    name = "watch"

    def __init__(self, node: Node, cache: Cache) -> None:
        self.node = node
        self.cache = cache
        self.inbox = node.cfg.origins.inbox.dir.resolve()
        self._observer: Any = None
        self._queue: asyncio.Queue[tuple[str, FileSystemEvent]] = asyncio.Queue()
        self._pending: dict[Path, _Pending | None] = {}  # None: closed after write, publish now
        # Inbox files some process holds open (inotify open minus close events) and when that last changed:
        # a writer stalled in the kernel (dirty-page throttling) leaves the size unchanged for seconds, and
        # must not be mistaken for a finished one.
        self._open: dict[Path, tuple[int, float]] = {}
        self._dirty: dict[Path, float] = {}  # cache paths to re-check, monotonic time of last event
        self._publishing: set[Path] = set()
        # Files whose publish failed, by (size, mtime_ns): not retried until they change (no busy loop).
        self._failed: dict[Path, tuple[int, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.failed = 0
        self.external = 0
        self.polling: str | None = None  # why the watcher polls instead of using inotify
        self._refused: dict[str, Path] = {}  # name shown in problems -> path, re-checked until it is gone
        self._last_refused_check = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.node.cfg
        observer = Observer()
        if cfg.origins.inbox.enabled:
            await loop.run_in_executor(None, lambda: self.inbox.mkdir(parents=True, exist_ok=True))
            observer.schedule(
                _Forward(loop, self._queue, "inbox"), str(self.inbox), recursive=True, event_filter=_EVENTS
            )
        if cfg.cache.watch_cache:
            root = self.cache.layout.root
            forward = _Forward(loop, self._queue, "cache", internal=root / INTERNAL, readers=False)
            observer.schedule(forward, str(root), recursive=True, event_filter=_EVENTS)
        # Adding inotify watches walks the trees: off the loop.
        try:
            await loop.run_in_executor(None, observer.start)
            self._observer = observer
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            await loop.run_in_executor(None, _stop_observer, observer)
            self._start_polling(e.strerror or str(e))
        if cfg.origins.inbox.enabled:
            for p in await loop.run_in_executor(None, self._existing_inbox_files):
                self._note_inbox(p, closed=False)
        self._tasks += [
            supervise(self._consume, "watch-events", self.node, self.name),
            supervise(self._tick, "watch-tick", self.node, self.name),
        ]

    def _start_polling(self, why: str) -> None:
        self.polling = (
            f"inotify unavailable ({why}): polling the inbox every {POLL_INBOX:.0f} s and the cache every "
            f"{POLL_CACHE:.0f} s; raise fs.inotify.max_user_watches/max_user_instances"
        )
        self.node.problems["watch"] = self.polling
        log.warning("watch.polling", reason=self.polling)
        self._tasks.append(supervise(self._poll, "watch-poll", self.node, self.name))

    async def _emitters_alive(self) -> None:
        """An emitter thread ends when a watch for a new directory cannot be added (the limit reached
        later): from then on its tree would go unwatched, so the watcher polls instead."""
        obs = self._observer
        if obs is None or all(e.is_alive() for e in list(obs.emitters)):
            return
        self._observer = None
        await asyncio.get_running_loop().run_in_executor(None, _stop_observer, obs)
        self._start_polling("an inotify emitter stopped, most likely at the watch limit")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._observer is not None:
            obs = self._observer
            self._observer = None
            obs.stop()
            await asyncio.get_running_loop().run_in_executor(None, obs.join, 5.0)

    def status(self) -> dict[str, Any]:
        return {
            "state": "stopped" if not self._tasks else "polling" if self.polling else "running",
            "inbox": self.node.cfg.origins.inbox.enabled,  # never the absolute path: the status is public
            "inbox_pending": len(self._pending),
            "publishing": len(self._publishing),
            "published": self.published,
            "failed": self.failed,
            "external_changes": self.external,
            "refused": sorted(self._refused),
        }

    def _existing_inbox_files(self) -> list[Path]:
        out = []
        for dirpath, dirs, files in os.walk(self.inbox):  # never descends into a symlinked directory
            out += [Path(dirpath) / f for f in files]
            out += [Path(dirpath) / d for d in dirs if os.path.islink(os.path.join(dirpath, d))]  # to refuse
        return out

    # -- symlinks and special files -----------------------------------------------------------
    def _refuse(self, where: str, path: Path, e: UnsafeFile) -> None:
        """Leave the file where it is, say so in the log and in the node's problems."""
        root = self.inbox if where == "inbox" else self.cache.layout.root
        name = f"{where}/{path.relative_to(root).as_posix()}"
        if name not in self._refused:
            log.error(f"{where}.refused", path=str(path), reason=e.kind)
        self._refused[name] = path
        self.cache.refuse(name, f"{e.kind}; left in place")

    async def _recheck_refused(self) -> None:
        """Forget refused files once they are gone; one replaced by a regular file is looked at again."""
        now = time.monotonic()
        if not self._refused or now - self._last_refused_check < 1.0:
            return
        self._last_refused_check = now
        items = list(self._refused.items())
        root = {"inbox": self.inbox, "cache": self.cache.layout.root}
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [_inspect(p, root[n.split("/", 1)[0]]) for n, p in items]
        )
        for (name, path), st in zip(items, found, strict=True):
            if isinstance(st, UnsafeFile):
                continue
            del self._refused[name]
            self.cache.unrefuse(name)
            if st is not None and name.startswith("inbox/"):
                self._note_inbox(path, closed=False)

    # -- polling, when inotify is unavailable ---------------------------------------------------
    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.node.cfg
        last_cache = time.monotonic()
        while True:
            await asyncio.sleep(POLL_INBOX)
            try:
                if cfg.origins.inbox.enabled:
                    for p in await loop.run_in_executor(None, self._existing_inbox_files):
                        if p not in self._pending and p not in self._publishing:
                            self._note_inbox(p, closed=False)
                if cfg.cache.watch_cache and time.monotonic() - last_cache >= POLL_CACHE:
                    last_cache = time.monotonic()
                    await self._poll_cache()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("watch.poll_failed", error=str(e), exc_info=True)

    async def _poll_cache(self) -> None:
        """Cached files whose size or mtime differ from their row become dirty paths, as an event would make
        them: _check_cache looks again after the debounce, against the row as it is then."""
        store = self.node.store
        rows = await store.run(cachedb.cached_rows, store)
        verdicts = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [self._verdict(key, size, mtime) for _i, key, _v, size, mtime, _d in rows]
        )
        now = time.monotonic()
        for (_i, key, *_rest), verdict in zip(rows, verdicts, strict=True):
            if verdict is None:
                continue
            with contextlib.suppress(UnsafePath):
                p = self.cache.layout.final_path(key)
                if p not in self.cache.own_ops:
                    self._dirty.setdefault(p, now)

    # -- events -------------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            tag, ev = await self._queue.get()
            try:
                if tag == "inbox":
                    self._inbox_event(ev)
                else:
                    self._cache_event(ev)
            except Exception as e:
                log.error("watch.event_failed", event=repr(ev), error=str(e))

    def _inbox_event(self, ev: FileSystemEvent) -> None:
        if isinstance(ev, FileMovedEvent):
            self._pending.pop(_p(ev.src_path), None)
            self._open.pop(_p(ev.src_path), None)
            self._note_inbox(_p(ev.dest_path), closed=True)  # a rename into place is a complete file
        elif isinstance(ev, FileDeletedEvent):
            self._pending.pop(_p(ev.src_path), None)
            self._open.pop(_p(ev.src_path), None)
        elif isinstance(ev, FileOpenedEvent):
            self._count_open(_p(ev.src_path), +1)
        elif isinstance(ev, FileClosedNoWriteEvent):
            self._count_open(_p(ev.src_path), -1)
        elif isinstance(ev, FileClosedEvent):
            self._count_open(_p(ev.src_path), -1)
            self._note_inbox(_p(ev.src_path), closed=True)
        elif isinstance(ev, FileCreatedEvent | FileModifiedEvent):
            self._note_inbox(_p(ev.src_path), closed=False)

    def _count_open(self, path: Path, delta: int) -> None:
        n = max(0, self._open.get(path, (0, 0.0))[0] + delta)
        if n:
            self._open[path] = (n, time.monotonic())
        else:
            self._open.pop(path, None)

    def stable_for(self, path: Path) -> float:
        """Seconds a file's size and mtime must stay unchanged before it counts as complete: longer while
        a process still holds it open (a stalled writer looks idle), yet finite, since some writers never
        close and a close event can be missed."""
        cfg = self.node.cfg.origins.inbox
        held = self._open.get(path, (0, 0.0))[0] > 0
        return max(cfg.stable_seconds, cfg.open_grace) if held else cfg.stable_seconds

    def _note_inbox(self, path: Path, *, closed: bool) -> None:
        if not path.is_relative_to(self.inbox) or path in self._publishing:
            return
        if is_temporary(path.relative_to(self.inbox)):
            return
        if closed:
            self._pending[path] = None
        else:
            cur = self._pending.get(path, _Pending(-1, -1, 0.0))
            if cur is not None:  # a modification restarts the stability clock
                self._pending[path] = _Pending(-1, -1, 0.0)

    def _cache_event(self, ev: FileSystemEvent) -> None:
        if isinstance(ev, FileOpenedEvent | FileClosedNoWriteEvent):
            return  # readers (the web seed, libtorrent) change nothing
        paths = [_p(ev.src_path)]
        if isinstance(ev, FileMovedEvent | DirMovedEvent):
            paths.append(_p(ev.dest_path))
        now = time.monotonic()
        for p in paths:
            if not self.cache.is_internal(p) and p not in self.cache.own_ops and p != self.cache.layout.root:
                self._dirty[p] = now

    async def _tick(self) -> None:
        stable = self.node.cfg.origins.inbox.stable_seconds
        interval = min(0.25, stable / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._emitters_alive()
                await self._recheck_refused()
                await self._check_inbox(stable)
                await self._check_cache()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("watch.tick_failed", error=str(e), exc_info=True)

    async def _check_inbox(self, stable: float) -> None:
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        paths = list(self._pending)
        stats = await loop.run_in_executor(None, _stat_many, paths, self.inbox)
        for path, st in zip(paths, stats, strict=True):
            entry = self._pending.get(path, _Pending(-1, -1, 0.0))
            if isinstance(st, UnsafeFile):
                self._pending.pop(path, None)
                self._refuse("inbox", path, st)
                continue
            if st is None:
                self._pending.pop(path, None)
                continue
            ready = entry is None
            if entry is not None:
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                elif now - entry.since >= self.stable_for(path):
                    ready = True
            if ready and self._failed.get(path) == (st.st_size, st.st_mtime_ns):
                self._pending.pop(path, None)
                continue
            if ready and path not in self._publishing:
                log.info("inbox.complete", path=str(path), closed=entry is None)
                self._pending.pop(path, None)
                self._failed.pop(path, None)
                self._publishing.add(path)
                task = asyncio.create_task(self._publish(path), name=f"inbox-publish:{path.name}")
                self._tasks.append(task)
                task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _check_cache(self) -> None:
        if not self._dirty:
            return
        now = time.monotonic()
        due = [p for p, t in self._dirty.items() if now - t >= DEBOUNCE]
        for p in due:
            del self._dirty[p]
        store = self.node.store
        root = self.cache.layout.root
        for p in due:
            rel = p.relative_to(root).as_posix()
            rows = await store.run(cachedb.cached_under, store, rel)
            if not rows:  # not an item: a symlink or special file someone put there is still reported
                bad = await asyncio.get_running_loop().run_in_executor(None, _inspect, p, root)
                if isinstance(bad, UnsafeFile) and bad.kind != "a directory":  # directories hold keys
                    self._refuse("cache", p, bad)
            for item_id, key, size, mtime_ns in rows:
                verdict = await asyncio.get_running_loop().run_in_executor(None, self._verdict, key, size, mtime_ns)
                if verdict is None:
                    continue
                self.external += 1
                if verdict == "deleted":
                    await self.cache.external_change(
                        item_id, "file deleted from the cache outside noded", changed=False
                    )
                elif verdict.startswith("unsafe:"):
                    await self.cache.unsafe_file(item_id, key, UnsafeFile(key, verdict.removeprefix("unsafe:")))
                elif verdict == "resized":
                    await self.cache.external_change(
                        item_id, "file changed in the cache outside noded (size differs)", changed=True
                    )
                else:
                    await self.cache.recheck(item_id, "file modified in the cache outside noded (mtime differs)")

    def _verdict(self, key: str, size: int | None, mtime_ns: int | None) -> str | None:
        try:
            st = lstat_regular(self.cache.layout.final_path(key), self.cache.layout.root)
        except FileNotFoundError:
            return "deleted"
        except UnsafeFile as e:
            return f"unsafe:{e.kind}"
        except (OSError, UnsafePath):
            return None
        if size is not None and st.st_size != size:
            return "resized"
        if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
            return "touched"
        return None

    # -- inbox publishing ---------------------------------------------------------------------
    async def _publish(self, path: Path) -> None:
        try:
            await self.publish_file(path)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.failed += 1
            log.error("inbox.publish_failed", path=str(path), error=str(e), exc_info=True)
            rel = path.relative_to(self.inbox).as_posix()
            self.node.problems["inbox"] = f"{rel}: publish failed: {_no_path(e)}; file left in the inbox"
            with contextlib.suppress(OSError):
                st = await asyncio.get_running_loop().run_in_executor(None, path.stat)
                self._failed[path] = (st.st_size, st.st_mtime_ns)
        finally:
            self._publishing.discard(path)

    async def publish_file(self, path: Path) -> State | None:
        """Publish one complete inbox file into the cache. Returns the item's new state (None: skipped)."""
        loop = asyncio.get_running_loop()
        layout = self.cache.layout
        rel = path.relative_to(self.inbox).as_posix()
        try:
            final = layout.final_path(rel)
        except UnsafePath as e:
            log.error("inbox.unsafe_name", path=str(path), error=str(e))
            self.node.problems["inbox"] = f"{rel}: {e}; file left in the inbox"
            return None
        try:
            st = await loop.run_in_executor(None, lstat_regular, path, self.inbox)
        except UnsafeFile as e:
            self._refuse("inbox", path, e)
            return None
        except FileNotFoundError:
            return None
        staging = layout.partial_dir / f"inbox-{uuid.uuid4().hex}"
        try:
            async with self.cache.reserve(st.st_size, path=staging):
                await loop.run_in_executor(None, _move_in, path, staging)
                try:
                    state = await self._record(path, rel, staging, final)
                except BaseException:
                    # Give the bytes back to the inbox: nothing is lost, a later event retries.
                    with contextlib.suppress(OSError):
                        await asyncio.shield(loop.run_in_executor(None, _move_back, staging, path))
                    raise
        except CacheFull as e:
            self.node.problems["inbox"] = f"{rel}: {e}"
            log.error("inbox.too_large", key=rel, error=str(e))
            return None
        self.node.problems.pop("inbox", None)
        return state

    async def _record(self, path: Path, rel: str, staging: Path, final: Path) -> State:
        loop = asyncio.get_running_loop()
        store = self.node.store
        h: HashResult = await loop.run_in_executor(None, hash_file, staging)
        entry = CatalogEntry(origin="inbox", key=rel, urls=(), size=h.size, md5=h.md5, sha256=h.sha256)
        item, _new_version = await store.run(store.upsert_entry, entry)
        if item.state is State.CACHED and item.sha256 == h.sha256:
            await loop.run_in_executor(None, _unlink, staging)  # identical bytes already cached
            self.cache.touch(item.id)
            log.info("inbox.duplicate", key=rel, version=item.version)
            return item.state
        self.cache.own_ops.add(final)
        try:
            fst = await loop.run_in_executor(None, publish, staging, final)
        finally:
            self.cache.own_ops.discard(final)
        _item, *retired = await store.run(cachedb.record_published, store, item.id, h, disk_bytes(fst), fst.st_mtime_ns)
        for old in retired:
            await self.cache.drop_torrent(old)
        self.published += 1
        log.info("inbox.published", key=rel, version=item.version, size=h.size, sha256=h.sha256)
        self.node.notify("cached")
        return State.CACHED


def _inspect(path: Path, beneath: Path) -> os.stat_result | UnsafeFile | None:
    """The file's lstat; UnsafeFile for a symlink, a special file or a symlinked directory on the way;
    None when it is gone. Blocking."""
    try:
        return lstat_regular(path, beneath)
    except UnsafeFile as e:
        return e
    except OSError:
        return None


def _stat_many(paths: list[Path], beneath: Path) -> list[os.stat_result | UnsafeFile | None]:
    return [_inspect(p, beneath) for p in paths]


def _no_path(e: BaseException) -> str:
    """An error's text for a status page: an OSError without the absolute path it names."""
    if isinstance(e, UnsafeFile):
        return e.kind
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _move_in(src: Path, dst: Path) -> None:
    """Rename on the same filesystem; otherwise copy, fsync, and only then remove the source."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.lstat(src).st_dev == dst.parent.stat().st_dev:
        os.rename(src, dst)  # moves a symlink swapped in since the check as a symlink: hashing refuses it
        return
    with os.fdopen(open_regular(src), "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        os.fsync(fout.fileno())
    fsync_dir(dst.parent)
    src.unlink()


def _move_back(src: Path, dst: Path) -> None:
    if os.path.lexists(src) and not os.path.lexists(dst):
        _move_in(src, dst)
