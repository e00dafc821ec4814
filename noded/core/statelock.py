"""One daemon per state and cache directory: an exclusive `flock` held for the life of the process.

Two daemons on the same directories (say, a second one started by hand with other ports) would pull
into the same partial files and write the same database. The second one must stop before it touches
anything: `acquire` runs before the store is opened or any component starts. The kernel drops the lock
when the process ends, however it ends (kill -9 included), so a stale lock file never blocks a restart.
The file holds the owner's pid, for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "noded.lock"
EX_TEMPFAIL = 75  # another daemon holds the directories; a later start may succeed


class DirectoryLocked(Exception):
    pass


class DirLock:
    """Exclusive locks on a set of directories, released together."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryLocked(
                f"{directory} is in use by another noded (pid {owner}); stop it first, or give this one "
                f"its own paths.cache_dir and paths.state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor drops the flock
        self._fds = []


def lock_directories(*dirs: Path) -> DirLock:
    """Lock every directory or none (DirectoryLocked names the first one held elsewhere)."""
    lock = DirLock()
    try:
        for d in dirs:
            lock.acquire(d)
    except BaseException:
        lock.release()
        raise
    return lock
