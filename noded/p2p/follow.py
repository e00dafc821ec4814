"""md5, sha256 and piece sha1s of a file that libtorrent is still downloading, in one read.

Verification follows the download piece by piece (pieces come in order: the torrent is added with
sequential_download) and reads each piece right after libtorrent checked it, while it is still in the
page cache. It runs in two phases:

1. While the transfer runs, on a thread of its own at idle CPU priority: it only takes CPU that
   libtorrent leaves free, so following the download does not slow the download (measured with
   bench/p2p.py: nice 10 still cost the transfer about 10 % on 2 cores).
2. Once libtorrent reports the torrent complete, the rest on an ordinary executor thread at normal
   priority, so the tail is not starved by whatever else the machine does.

A thread cannot raise its own priority back without CAP_SYS_NICE, hence two threads; the idle one
belongs to a pool of its own that is shut down after the fetch, so a lowered priority never leaks into
a shared executor.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from noded.core.model import HashResult
from noded.core.priority import idle_thread
from noded.p2p import torrent as T
from noded.p2p.session import PieceFollower

__all__ = ["FollowHasher", "HashCancelled"]


class HashCancelled(Exception):
    pass


class FollowHasher:
    """Hashes `path` as the pieces of `follower` complete. Blocking methods: run them in executors.

    libtorrent announces a piece when its hash passed, which can be before its blocks left the store
    buffer for the file (or before the file exists); a piece that does not match `expected` yet is read
    again until it does, or until the torrent left the session (`follower.flushed`), after which what
    the file holds is final.
    """

    def __init__(
        self,
        path: Path,
        piece_length: int,
        size: int,
        follower: PieceFollower,
        cancel: threading.Event,
        expected: bytes | None = None,
    ) -> None:
        self.path = path
        self.piece_length = piece_length
        self.size = size
        self.follower = follower
        self.cancel = cancel
        self.expected = expected
        self.num_pieces = T.num_pieces(size, piece_length)
        self.done = 0  # pieces hashed so far, in order
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256()
        self._pieces = bytearray()

    def run(self, *, until_transferred: bool = False) -> bool:
        """Hash pieces as they complete. True once every piece is hashed; False when it stopped early
        because the transfer finished (`until_transferred`, the idle phase: its md5 thread runs at idle
        priority too): the rest is for `finish`."""
        f: BinaryIO | None = None
        init = idle_thread if until_transferred else None
        try:
            # md5 (~635 MB/s) is the slow one: it runs on a second thread while this one does sha256
            # and sha1 over the same buffer (hashlib releases the GIL on large buffers).
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="md5", initializer=init) as pool:
                pending: Future[None] | None = None
                while self.done < self.num_pieces:
                    if self.cancel.is_set():
                        raise HashCancelled
                    follower = self.follower
                    if until_transferred and follower.transferred:
                        break
                    if follower.frontier <= self.done:
                        self._wait(0.2)
                        continue
                    flushed = follower.flushed
                    if f is None:
                        try:
                            f = open(self.path, "rb")  # noqa: SIM115 - closed in finally; libtorrent creates it
                        except FileNotFoundError:
                            if flushed:
                                raise
                            self._wait(0.02)
                            continue
                    piece = self._read(f)
                    digest = hashlib.sha1(piece).digest()  # noqa: S324 - BitTorrent v1 piece hash
                    i = self.done
                    if self.expected is not None and digest != self.expected[i * 20 : i * 20 + 20] and not flushed:
                        self._wait(0.02)
                        continue
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(self._md5.update, piece)
                    self._sha256.update(piece)
                    self._pieces += digest
                    self.done += 1
                if pending is not None:
                    pending.result()
        finally:
            if f is not None:
                f.close()
        return self.done >= self.num_pieces

    def finish(self) -> HashResult:
        """Hash what is left at normal priority and return the result."""
        self.run()
        return self.result()

    def result(self) -> HashResult:
        return HashResult(
            size=self.size,
            md5=self._md5.hexdigest(),
            sha256=self._sha256.hexdigest(),
            pieces=bytes(self._pieces),
            piece_length=self.piece_length,
        )

    def _read(self, f: BinaryIO) -> bytes:
        offset = self.done * self.piece_length
        f.seek(offset)
        return f.read(min(self.piece_length, self.size - offset))

    def _wait(self, timeout: float) -> None:
        self.follower.changed.wait(timeout)
        self.follower.changed.clear()
