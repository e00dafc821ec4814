"""Opening files noded did not create: never through a symlink, never anything but a regular file.

The inbox and the cache directory are writable by operators and other programs. A symlink there could
point at any file the daemon can read (its credentials, other users' data); following it would publish,
serve, hash into a torrent or push that file. Every read of such a file goes through this module:
`O_NOFOLLOW` on the last component, no symlinked directory between `beneath` and the file, and an
`fstat` on the opened descriptor (the same inode that is read) that must show a regular file.
`O_NONBLOCK` keeps a FIFO from hanging the open.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

Realpath = Callable[[str], str]


class UnsafeFile(OSError):
    """A symlink, a file under a symlinked directory, or not a regular file (FIFO, device, socket, dir).
    `kind` says which without naming the path (status pages show it; paths stay in the log)."""

    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(f"{path} is {kind}")
        self.kind = kind


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class DirRealpaths:
    """`os.path.realpath` of directories, each walked once: for one pass over many files (a restart's
    reconciliation or restore), where an lstat of every component per file would dominate. Scope one to
    a single pass: a directory swapped for a symlink later is seen by the next pass (as it would be by a
    walk per file that ran a moment earlier)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        real = self._seen.get(path)
        if real is None:
            real = self._seen[path] = os.path.realpath(path)
        return real


def check_beneath(path: Path, beneath: Path | None, realpath: Realpath = os.path.realpath) -> None:
    """No directory between `beneath` (itself resolved) and `path` is a symlink."""
    if beneath is None:
        return
    parent, base = os.path.dirname(path), os.fspath(beneath)
    if not (os.path.isabs(parent) and os.path.isabs(base)):
        parent, base = str(path.parent), str(beneath)  # relative: pathlib's normalisation decides
        inside = Path(parent).is_relative_to(base)
    else:  # string operations: a restart checks thousands of files
        inside = parent == base or parent.startswith(os.path.join(base, ""))
    if not inside:
        raise UnsafeFile(path, f"outside {beneath}")
    if realpath(parent) != parent:
        raise UnsafeFile(path, "under a symlinked directory")


def lstat_regular(path: Path, beneath: Path | None = None, realpath: Realpath = os.path.realpath) -> os.stat_result:
    """`lstat` that raises UnsafeFile unless `path` is a regular file reached without symlinks.
    `realpath`: a `DirRealpaths` shared by a pass over many files."""
    check_beneath(path, beneath, realpath)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(path, _kind(st.st_mode))
    return st


def open_regular(path: Path, beneath: Path | None = None, flags: int = os.O_RDONLY) -> int:
    """A descriptor of `path`, refused (UnsafeFile) for a symlink or anything but a regular file."""
    check_beneath(path, beneath)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise UnsafeFile(path, "a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, _kind(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def describe(path: Path) -> str | None:
    """Why `path` may not be read as one of noded's files (None: it may, or it is gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return None
    return _kind(st.st_mode)  # never the link's target: it may name a secret's location
