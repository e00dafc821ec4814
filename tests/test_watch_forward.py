"""The cache watcher's observer thread drops events from the cache's own area before they reach the loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from watchdog.events import FileMovedEvent, FileSystemEvent
from watchdog.observers import Observer

from noded.cache.layout import INTERNAL
from noded.cache.watch import _EVENTS, _Forward


async def _collect(root: Path) -> list[FileSystemEvent]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, FileSystemEvent]] = asyncio.Queue()
    internal = root / INTERNAL
    (internal / "partial").mkdir(parents=True)
    (root / "ds").mkdir()
    observer = Observer()
    forward = _Forward(loop, queue, "cache", internal=internal, readers=False)
    observer.schedule(forward, str(root), recursive=True, event_filter=_EVENTS)
    await loop.run_in_executor(None, observer.start)
    try:
        partial = internal / "partial" / "1-1"

        def work() -> None:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for i in range(200):  # a pull writing its partial: an event per write
                    os.pwrite(fd, b"x" * 4096, i * 4096)
            finally:
                os.close(fd)
            with open(root / "ds" / "other.csv", "wb") as f:  # a cached file changed behind noded's back
                f.write(b"changed")
            with open(root / "ds" / "other.csv", "rb") as f:  # a reader: nothing to look at
                f.read()
            os.rename(partial, root / "ds" / "published.bin")  # publish: a move out of the area

        await loop.run_in_executor(None, work)
        await asyncio.sleep(1.0)
    finally:
        await loop.run_in_executor(None, lambda: (observer.stop(), observer.join(5)))
    out = []
    while not queue.empty():
        out.append((await queue.get())[1])
    return out


def test_internal_area_events_stay_on_the_observer_thread(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    events = asyncio.run(_collect(root))
    internal = os.fsencode(root / INTERNAL)
    inside = [e for e in events if os.fsencode(e.src_path).startswith(internal) and not isinstance(e, FileMovedEvent)]
    assert inside == [], inside[:5]
    moved = [e for e in events if isinstance(e, FileMovedEvent)]
    assert [os.fsdecode(e.dest_path) for e in moved] == [str(root / "ds" / "published.bin")], events
    changed = {os.fsdecode(e.src_path) for e in events}
    assert str(root / "ds" / "other.csv") in changed
    kinds = {type(e).__name__ for e in events if os.fsdecode(e.src_path) == str(root / "ds" / "other.csv")}
    assert not kinds & {"FileOpenedEvent", "FileClosedNoWriteEvent"}, kinds
