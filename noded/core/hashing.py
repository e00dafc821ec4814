"""One pass over the bytes: md5 (what origins publish), sha256 (our record) and the sha1 of each
16 MiB piece (the torrent), optionally the whole-file sha1 (the Internet Archive publishes it).

md5 is the slow one (~635 MB/s against ~1.5 GB/s for sha1 and sha256 here), so it runs on its own
thread while sha256 and the piece hashes run on a second one; hashlib releases the GIL for large
buffers, so both threads really run in parallel. Each hash object is only ever touched by its own
single-thread executor, which keeps the updates in order without locks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from noded.core.model import PIECE_LENGTH, HashResult
from noded.core.priority import bulk_thread
from noded.core.safefs import open_regular

BLOCK = 4 * 1024 * 1024  # read size for files; large buffers keep the GIL released while hashing
DEPTH = 4  # blocks in flight per hasher: bounds memory while letting reads overlap hashing


class StreamHasher:
    """Feed the bytes of one file in order; `result()` after `finish()`/`finish_sync()`."""

    def __init__(self, *, want_sha1: bool = False, piece_length: int = PIECE_LENGTH) -> None:
        self.piece_length = piece_length
        self.size = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha1 = hashlib.sha1(usedforsecurity=False) if want_sha1 else None
        self._sha256 = hashlib.sha256()
        self._piece = hashlib.sha1(usedforsecurity=False)
        self._piece_fill = 0
        self._pieces = bytearray()
        self._a = ThreadPoolExecutor(1, thread_name_prefix="hash-md5", initializer=bulk_thread)
        self._b = ThreadPoolExecutor(1, thread_name_prefix="hash-sha", initializer=bulk_thread)
        self._pending: deque[tuple[Future[None], Future[None]]] = deque()

    # -- the two halves, each on its own thread ---------------------------------------------
    def _md5_part(self, data: bytes | memoryview) -> None:
        self._md5.update(data)
        if self._sha1 is not None:
            self._sha1.update(data)

    def _sha_part(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_length - self._piece_fill)
            self._piece.update(view[:take])
            self._piece_fill += take
            view = view[take:]
            if self._piece_fill == self.piece_length:
                self._pieces += self._piece.digest()
                self._piece = hashlib.sha1(usedforsecurity=False)
                self._piece_fill = 0

    # -- feeding ------------------------------------------------------------------------------
    def _submit(self, data: bytes | memoryview) -> tuple[Future[None], Future[None]]:
        self.size += len(data)
        pair = (self._a.submit(self._md5_part, data), self._b.submit(self._sha_part, data))
        self._pending.append(pair)
        return pair

    def update_sync(self, data: bytes | memoryview) -> None:
        """Blocking feed (from a worker thread): waits only when DEPTH blocks are already in flight."""
        self._submit(data)
        while len(self._pending) > DEPTH:
            a, b = self._pending.popleft()
            a.result()
            b.result()

    def update_piece_sync(self, data: bytes, digest: bytes) -> None:
        """Blocking feed of one whole piece whose sha1 the caller has already taken (and checked):
        the piece hash is not computed a second time."""
        if self._piece_fill:
            raise ValueError("a piece can only be fed whole, at a piece boundary")
        self.size += len(data)
        a = self._a.submit(self._md5_part, data)
        b = self._b.submit(self._known_piece, data, digest)
        self._pending.append((a, b))
        while len(self._pending) > DEPTH:
            x, y = self._pending.popleft()
            x.result()
            y.result()

    def _known_piece(self, data: bytes, digest: bytes) -> None:
        self._sha256.update(data)
        if len(data) == self.piece_length:
            self._pieces += digest
        else:  # the last, short piece: finished by _result
            self._piece.update(data)
            self._piece_fill = len(data)

    async def update(self, data: bytes | memoryview) -> None:
        """Feed from the event loop without blocking it. `data` must not be mutated afterwards."""
        self._submit(data)
        while len(self._pending) > DEPTH:
            a, b = self._pending.popleft()
            await asyncio.gather(asyncio.wrap_future(a), asyncio.wrap_future(b))

    def finish_sync(self) -> HashResult:
        while self._pending:
            a, b = self._pending.popleft()
            a.result()
            b.result()
        return self._result()

    async def finish(self) -> HashResult:
        while self._pending:
            a, b = self._pending.popleft()
            await asyncio.gather(asyncio.wrap_future(a), asyncio.wrap_future(b))
        return self._result()

    def close(self) -> None:
        self._a.shutdown(wait=False, cancel_futures=True)
        self._b.shutdown(wait=False, cancel_futures=True)

    def _result(self) -> HashResult:
        pieces = bytes(self._pieces)
        if self._piece_fill:  # the last, short piece
            pieces += self._piece.copy().digest()
        self.close()
        return HashResult(
            size=self.size,
            md5=self._md5.hexdigest(),
            sha256=self._sha256.hexdigest(),
            pieces=pieces,
            piece_length=self.piece_length,
            sha1=self._sha1.hexdigest() if self._sha1 is not None else None,
        )


def feed_range(hasher: StreamHasher, fd: int, start: int, end: int) -> None:
    """Blocking: feed bytes [start, end) of an open file to the hasher (runs in an executor)."""
    pos = start
    while pos < end:
        data = os.pread(fd, min(BLOCK, end - pos), pos)
        if not data:
            raise OSError(f"file ended at {pos}, expected {end} bytes")
        hasher.update_sync(data)
        pos += len(data)


def hash_file(path: Path, *, want_sha1: bool = False, piece_length: int = PIECE_LENGTH) -> HashResult:
    """Hash a file that did not come through a stream (inbox, verify). Blocking: run in an executor."""
    hasher = StreamHasher(want_sha1=want_sha1, piece_length=piece_length)
    try:
        fd = open_regular(path)  # never through a symlink: inbox and cache files are not only ours
        try:
            size = os.fstat(fd).st_size
            feed_range(hasher, fd, 0, size)
        finally:
            os.close(fd)
        return hasher.finish_sync()
    finally:
        hasher.close()
