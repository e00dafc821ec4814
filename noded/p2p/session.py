"""One libtorrent session, driven from asyncio without blocking the loop.

A dedicated thread waits for alerts (`wait_for_alert` releases the GIL) and hands each batch to the
loop with `call_soon_threadsafe`. libtorrent's alert objects are only valid until the next
`pop_alerts`, so the thread waits until the loop has dispatched a batch before popping the next one.
On the loop only asynchronous libtorrent calls are made (async_add_torrent, remove_torrent,
save_resume_data, post_torrent_updates, post_peer_info, connect_peer): they post to libtorrent's
network thread and return at once. Torrent status comes from state_update alerts, not polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import libtorrent as lt

from noded.core.logs import get_logger

log = get_logger("noded.p2p.session")

AlertHandler = Callable[[Any], None]


@dataclass
class TorrentState:
    """What the last state_update said about one torrent (plain values, safe to keep)."""

    infohash: str
    state: str = "unknown"
    progress: float = 0.0
    uploaded: int = 0  # payload bytes this session
    downloaded: int = 0
    upload_rate: int = 0
    download_rate: int = 0
    num_peers: int = 0
    is_seeding: bool = False
    error: str = ""


class SessionError(RuntimeError):
    pass


class PieceFollower:
    """Pieces of one torrent that passed libtorrent's hash check, as a contiguous frontier a reader
    thread can follow (pieces below `frontier` are complete on disk)."""

    def __init__(self, num_pieces: int) -> None:
        self.num_pieces = num_pieces
        self.frontier = 0  # read from another thread: an int assignment is atomic under the GIL
        # Set once the torrent left the session: its storage is closed, every byte is in the file.
        self.flushed = False
        # Set once libtorrent reported the torrent complete (verification may still trail it).
        self.transferred = False
        self.changed = threading.Event()
        self._done: set[int] = set()

    def add(self, index: int) -> None:
        self._done.add(index)
        while self.frontier in self._done:
            self._done.discard(self.frontier)
            self.frontier += 1
        self.changed.set()

    def set_flushed(self) -> None:
        self.flushed = True
        self.complete()

    def complete(self) -> None:
        """libtorrent says the torrent is complete: every piece is on disk, alerts seen or not."""
        self.transferred = True
        self.frontier = self.num_pieces
        self.changed.set()


class TorrentSession:
    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self.ses: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._handled = threading.Event()
        self.handles: dict[str, Any] = {}  # infohash -> torrent_handle
        self._by_handle: dict[Any, str] = {}
        self.states: dict[str, TorrentState] = {}
        self._adding: dict[str, asyncio.Future[Any]] = {}
        self._removing: dict[str, asyncio.Future[None]] = {}
        self._resume_waiters: dict[str, asyncio.Future[bytes | None]] = {}
        self.listen_port: int | None = None
        self._listen_ready: asyncio.Event | None = None
        # Subscribers by alert type name (e.g. "state_changed_alert"); called on the loop.
        self.subscribers: dict[str, list[AlertHandler]] = {}
        self.checking_seen: set[str] = set()  # infohashes that ever entered a checking state
        self._updated: set[str] = set()  # infohashes in state updates since take_updated()
        self.followers: dict[str, PieceFollower] = {}
        self._stats_waiters: list[asyncio.Future[tuple[int, int]]] = []
        # Called with the infohash before a torrent leaves the session (its final byte counts are read).
        self.before_remove: Callable[[str], Awaitable[None]] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listen_ready = asyncio.Event()
        # Creating a session binds sockets and spins up threads: off the loop.
        settings: Any = self._settings
        self.ses = await self._loop.run_in_executor(None, lambda: lt.session(settings))
        self._running.set()
        self._thread = threading.Thread(target=self._alert_thread, name="lt-alerts", daemon=True)
        self._thread.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listen_ready.wait(), 10)

    async def stop(self) -> None:
        self._running.clear()
        self._handled.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
            self._thread = None
        ses, self.ses = self.ses, None
        if ses is not None:
            # Destroying the session waits for its threads (tracker stops, disk flush): off the loop,
            # and the last reference must die on the executor thread, not here.
            box = [ses]
            del ses
            await asyncio.get_running_loop().run_in_executor(None, _destroy, box)
        for w in self._stats_waiters:
            w.cancel()
        for fut in [*self._adding.values(), *self._removing.values(), *self._resume_waiters.values()]:
            if not fut.done():
                fut.set_exception(SessionError("session stopped"))

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Change some settings; the others keep their values (also for a later start())."""
        self._settings = {**self._settings, **settings}
        if self.ses is not None:
            self.ses.apply_settings(settings)  # asynchronous in libtorrent

    # -- torrents --------------------------------------------------------------------------
    async def add(self, atp: Any, infohash: str, timeout: float = 60) -> Any:
        """Add a torrent; returns its handle once libtorrent confirms (or raises SessionError)."""
        if infohash in self.handles:
            return self.handles[infohash]
        fut = self.add_nowait(atp, infohash)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut.done():
                self._adding.pop(infohash, None)

    def add_nowait(self, atp: Any, infohash: str) -> asyncio.Future[Any]:
        """Ask libtorrent to add a torrent; the future resolves to its handle once libtorrent confirms.

        For many torrents at once (a restart): one future each, no task or timer per torrent."""
        if self.ses is None or self._loop is None:
            raise SessionError("session not running")
        fut = self._adding.get(infohash)
        if fut is None:
            fut = self._loop.create_future()
            if infohash in self.handles:
                fut.set_result(self.handles[infohash])
                return fut
            self._adding[infohash] = fut
            self.ses.async_add_torrent(atp)
        return fut

    def forget_added(self, infohash: str) -> None:
        """Drop the bookkeeping of an add_nowait whose result was taken (or abandoned)."""
        fut = self._adding.get(infohash)
        if fut is not None and fut.done():
            del self._adding[infohash]

    async def remove(self, infohash: str, *, delete_files: bool = False, timeout: float = 30) -> bool:
        """Remove a torrent (files kept unless asked). False when it was not in the session."""
        h = self.handles.get(infohash)
        if h is None or self.ses is None or self._loop is None:
            return False
        fut = self._removing.get(infohash)
        if fut is None and self.before_remove is not None:
            try:
                await self.before_remove(infohash)
            except Exception as e:  # the removal goes ahead; the session reconciliation keeps the bytes
                log.warning("p2p.final_reading_failed", infohash=infohash, error=str(e))
            fut = self._removing.get(infohash)
        if fut is None:
            if infohash not in self.handles:
                return False
            fut = self._loop.create_future()
            self._removing[infohash] = fut
            flags = lt.session.delete_files if delete_files else 0
            self.ses.remove_torrent(h, flags)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        return True

    async def resume_data(self, infohash: str, timeout: float = 30) -> bytes | None:
        """Ask for one torrent's resume data; bytes, or None if libtorrent had none to give."""
        h = self.handles.get(infohash)
        if h is None or self._loop is None:
            return None
        fut = self._resume_waiters.get(infohash)
        if fut is None:
            fut = self._loop.create_future()
            self._resume_waiters[infohash] = fut
            h.save_resume_data(lt.save_resume_flags_t.save_info_dict)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return None
        finally:
            if fut.done():
                self._resume_waiters.pop(infohash, None)

    async def resume_data_many(
        self, infohashes: list[str], timeout: float = 30, *, only_if_modified: bool = False
    ) -> dict[str, bytes]:
        """Resume data of many torrents, asked for at once and awaited together (no task or timer per
        torrent): what arrived within `timeout`, by infohash. `only_if_modified`: libtorrent answers only
        for torrents whose resume state changed since it was last saved (or since a resume-data add)."""
        if self._loop is None:
            return {}
        flags = lt.save_resume_flags_t.save_info_dict
        if only_if_modified:
            flags |= lt.save_resume_flags_t.only_if_modified
        futs: dict[str, asyncio.Future[bytes | None]] = {}
        for ih in infohashes:
            h = self.handles.get(ih)
            if h is None:
                continue
            fut = self._resume_waiters.get(ih)
            if fut is None:
                fut = self._loop.create_future()
                self._resume_waiters[ih] = fut
                h.save_resume_data(flags)
            futs[ih] = fut
        if futs:
            await asyncio.wait(futs.values(), timeout=timeout)
        out: dict[str, bytes] = {}
        for ih, fut in futs.items():
            if fut.done():
                self._resume_waiters.pop(ih, None)
                if not fut.cancelled() and fut.exception() is None and (data := fut.result()):
                    out[ih] = data
        return out

    def connect_peer(self, infohash: str, host: str, port: int) -> bool:
        h = self.handles.get(infohash)
        if h is None:
            return False
        try:
            h.connect_peer((host, port))
        except (RuntimeError, ValueError) as e:
            log.debug("p2p.connect_peer_failed", infohash=infohash, peer=f"{host}:{port}", error=str(e))
            return False
        return True

    def post_updates(self) -> None:
        if self.ses is not None:
            self.ses.post_torrent_updates()

    async def payload_counters(self, timeout: float = 5) -> tuple[int, int] | None:
        """The session's (sent, received) payload bytes since it started, from a session_stats alert."""
        if self.ses is None or self._loop is None:
            return None
        fut: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._stats_waiters.append(fut)
        self.ses.post_session_stats()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(ValueError):
                self._stats_waiters.remove(fut)

    def take_updated(self) -> set[str]:
        """Infohashes whose status changed since the last call."""
        out, self._updated = self._updated, set()
        return out

    def post_peer_info(self, infohash: str) -> None:
        h = self.handles.get(infohash)
        if h is not None:
            h.post_peer_info()

    def subscribe(self, alert_type: str, fn: AlertHandler) -> None:
        self.subscribers.setdefault(alert_type, []).append(fn)

    def unsubscribe(self, alert_type: str, fn: AlertHandler) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.subscribers[alert_type].remove(fn)

    # -- alerts ----------------------------------------------------------------------------
    def _alert_thread(self) -> None:
        assert self._loop is not None
        while self._running.is_set():
            ses = self.ses
            if ses is None:
                return
            if ses.wait_for_alert(250) is None:
                continue
            alerts = ses.pop_alerts()
            if not alerts:
                continue
            self._handled.clear()
            try:
                plain = _read_plain(alerts)
            except Exception as e:  # the loop then reads them itself
                log.warning("p2p.alert_read_failed", error=str(e))
                plain = {}
            try:
                self._loop.call_soon_threadsafe(self._dispatch, alerts, plain)
            except RuntimeError:  # loop closed
                return
            # The alert objects die at the next pop_alerts: wait until the loop is done with them.
            while self._running.is_set() and not self._handled.wait(0.5):
                pass

    def _dispatch(self, alerts: list[Any], plain: dict[int, Any] | None = None) -> None:
        plain = plain or {}
        try:
            for i, a in enumerate(alerts):
                try:
                    self._handle(a, plain.get(i))
                except Exception as e:  # one odd alert must not stop the flow of the others
                    log.warning("p2p.alert_failed", alert=type(a).__name__, error=str(e))
        finally:
            self._handled.set()

    def _handle(self, a: Any, plain: Any = None) -> None:
        """One alert, on the loop. `plain`: what `_read_plain` already took from it on the alert thread."""
        kind = type(a).__name__
        if isinstance(a, lt.add_torrent_alert):
            ih = plain if isinstance(plain, str) else _add_infohash(a)
            fut = self._adding.get(ih)
            if a.error.value():
                if fut is not None and not fut.done():
                    fut.set_exception(SessionError(f"libtorrent refused torrent {ih}: {a.error.message()}"))
            else:
                self.handles[ih] = a.handle
                self._by_handle[a.handle] = ih
                self.states.setdefault(ih, TorrentState(ih))
                if fut is not None and not fut.done():
                    fut.set_result(a.handle)
        elif isinstance(a, lt.state_update_alert):
            for row in plain if isinstance(plain, list) else _status_rows(a):
                ih = row[0]
                self._updated.add(ih)
                ts = self.states.get(ih)
                if ts is None:
                    ts = self.states[ih] = TorrentState(ih)
                (
                    _,
                    ts.state,
                    ts.progress,
                    ts.uploaded,
                    ts.downloaded,
                    ts.upload_rate,
                    ts.download_rate,
                    ts.num_peers,
                    ts.is_seeding,
                    ts.error,
                ) = row
        elif isinstance(a, lt.piece_finished_alert):
            # Only downloads are followed; a restart's thousands of seeds report every piece too.
            f = self.followers.get(self._by_handle.get(a.handle, "")) if self.followers else None
            if f is not None:
                f.add(int(a.piece_index))
        elif isinstance(a, lt.state_changed_alert):
            ih = self._by_handle.get(a.handle, "")
            state = str(a.state).rsplit(".", 1)[-1]
            if state.startswith("checking"):
                self.checking_seen.add(ih)
                log.info("p2p.checking", infohash=ih, state=state)
            if ih in self.states:
                self.states[ih].state = state
        elif isinstance(a, lt.torrent_removed_alert):
            ih = _v1(a.info_hashes)
            h = self.handles.pop(ih, None)
            if h is not None:
                self._by_handle.pop(h, None)
            self.states.pop(ih, None)
            fut = self._removing.pop(ih, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(a, lt.save_resume_data_alert):
            ih, data = plain if isinstance(plain, tuple) else _resume_blob(a)
            fut = self._resume_waiters.get(ih)
            if fut is not None and not fut.done():
                fut.set_result(data)
        elif isinstance(a, lt.save_resume_data_failed_alert):
            ih = self._by_handle.get(a.handle, "")
            fut = self._resume_waiters.get(ih)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(a, lt.session_stats_alert):
            values = a.values
            counters = (int(values["net.sent_payload_bytes"]), int(values["net.recv_payload_bytes"]))
            waiters, self._stats_waiters = self._stats_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(counters)
        elif isinstance(a, lt.listen_succeeded_alert):
            if a.socket_type == lt.socket_type_t.tcp:
                self.listen_port = int(a.port)
                if self._listen_ready is not None:
                    self._listen_ready.set()
        elif isinstance(a, lt.listen_failed_alert):
            log.error("p2p.listen_failed", message=a.message())
        elif isinstance(a, lt.torrent_error_alert | lt.file_error_alert):
            log.warning("p2p.torrent_error", message=a.message())
        for fn in self.subscribers.get(kind, ()):
            fn(a)

    def infohash_of(self, handle: Any) -> str | None:
        return self._by_handle.get(handle)


def _v1(hashes: Any) -> str:
    return str(hashes.v1)


def _add_infohash(a: Any) -> str:
    return _v1(a.params.ti.info_hashes() if a.params.ti is not None else a.params.info_hashes)


def _resume_blob(a: Any) -> tuple[str, bytes]:
    params = a.params
    return _v1(params.info_hashes), bytes(lt.write_resume_data_buf(params))


StatusRow = tuple[str, str, float, int, int, int, int, int, bool, str]


def _status_rows(a: Any) -> list[StatusRow]:
    """Plain values of a state_update_alert (each field read is a call into libtorrent's bindings)."""
    return [
        (
            _v1(st.info_hashes),
            str(st.state).rsplit(".", 1)[-1],
            float(st.progress),
            int(st.total_payload_upload),
            int(st.total_payload_download),
            int(st.upload_payload_rate),
            int(st.download_payload_rate),
            int(st.num_peers),
            bool(st.is_seeding),
            st.errc.message() if st.errc.value() else "",
        )
        for st in a.status
    ]


def _read_plain(alerts: list[Any]) -> dict[int, Any]:
    """On the alert thread: the plain values of the alerts that are costly to read, by position, so the
    loop's share of a batch (thousands of torrents' states when thousands are seeded, thousands of adds
    at a restart, thousands of resume data blobs at a save) is dictionary updates, not binding calls."""
    out: dict[int, Any] = {}
    for i, a in enumerate(alerts):
        if isinstance(a, lt.state_update_alert):
            out[i] = _status_rows(a)
        elif isinstance(a, lt.add_torrent_alert):
            out[i] = _add_infohash(a)
        elif isinstance(a, lt.save_resume_data_alert):
            out[i] = _resume_blob(a)
    return out


def _destroy(box: list[Any]) -> None:
    ses = box.pop()
    ses.pause()
    del ses
