"""Verification that follows a download: pieces are hashed only once they are complete, in order."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from noded.core.hashing import hash_file
from noded.core.priority import idle_thread
from noded.p2p.follow import FollowHasher, HashCancelled
from noded.p2p.session import PieceFollower
from tests.p2p_helpers import content

PL = 16 * 1024  # small pieces keep the test fast; the logic does not depend on the size


def test_follower_frontier_is_contiguous() -> None:
    f = PieceFollower(5)
    for i, want in [(2, 0), (0, 1), (1, 3), (4, 3), (3, 5)]:
        f.add(i)
        assert f.frontier == want


def test_follower_waits_for_pieces_and_matches_a_full_read(tmp_path: Path) -> None:
    data = content(5 * PL + 100, 5)
    path = tmp_path / "part"
    path.write_bytes(b"\0" * len(data))  # preallocated, as libtorrent leaves it
    follower = PieceFollower(6)
    cancel = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(FollowHasher(path, PL, len(data), follower, cancel).finish)
        # Pieces land out of order; each is written before libtorrent would announce it.
        with open(path, "r+b") as f:
            for i in [1, 0, 3, 2, 5, 4]:
                f.seek(i * PL)
                f.write(data[i * PL : (i + 1) * PL])
                f.flush()
                follower.add(i)
                time.sleep(0.01)
        result = fut.result(timeout=10)
    full = hash_file(path, piece_length=PL)
    assert result == full
    assert result.md5 == hashlib.md5(data).hexdigest() and result.sha256 == hashlib.sha256(data).hexdigest()


def test_follower_cancel(tmp_path: Path) -> None:
    path = tmp_path / "part"
    path.write_bytes(b"\0" * PL)
    cancel = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(FollowHasher(path, PL, 3 * PL, PieceFollower(3), cancel).finish)
        cancel.set()
        with pytest.raises(HashCancelled):
            fut.result(timeout=5)


def test_follower_rereads_a_piece_announced_before_it_reached_the_file(tmp_path: Path) -> None:
    data = content(2 * PL, 6)
    expected = hashlib.sha1(data[:PL]).digest() + hashlib.sha1(data[PL:]).digest()
    path = tmp_path / "part"
    path.write_bytes(b"\0" * len(data))
    follower = PieceFollower(2)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(FollowHasher(path, PL, len(data), follower, threading.Event(), expected).finish)
        follower.add(0)  # announced while the file still holds zeros
        follower.add(1)
        time.sleep(0.2)
        assert not fut.done()  # still waiting for the real bytes
        path.write_bytes(data)
        follower.changed.set()
        result = fut.result(timeout=10)
    assert result.pieces == expected and result.md5 == hashlib.md5(data).hexdigest()


def test_follower_gives_up_waiting_once_flushed(tmp_path: Path) -> None:
    """Bytes that never match (a bad peer) end as a result whose pieces differ: the caller rejects it."""
    path = tmp_path / "part"
    path.write_bytes(b"\0" * PL)
    follower = PieceFollower(1)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(FollowHasher(path, PL, PL, follower, threading.Event(), b"\1" * 20).finish)
        follower.add(0)
        time.sleep(0.1)
        follower.set_flushed()
        result = fut.result(timeout=10)
    assert result.pieces != b"\1" * 20


def test_idle_phase_stops_when_the_transfer_completes_and_the_tail_finishes_the_same_hash(tmp_path: Path) -> None:
    data = content(6 * PL + 7, 7)
    path = tmp_path / "part"
    path.write_bytes(b"\0" * len(data))
    follower = PieceFollower(7)
    hasher = FollowHasher(path, PL, len(data), follower, threading.Event())
    with ThreadPoolExecutor(1, initializer=idle_thread) as idle:
        early = idle.submit(hasher.run, until_transferred=True)
        with open(path, "r+b") as f:  # the first two pieces land while the transfer runs
            f.write(data[: 2 * PL])
        follower.add(0)
        follower.add(1)
        deadline = time.monotonic() + 10
        while hasher.done < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hasher.done == 2 and not early.done()  # following, waiting for piece 2
        path.write_bytes(data)
        follower.complete()  # libtorrent: torrent finished
        assert early.result(timeout=10) is False  # handed over, not finished
    assert hasher.done < 7
    follower.set_flushed()
    result = hasher.finish()  # the tail, on this (normal priority) thread
    assert result == hash_file(path, piece_length=PL)
    assert result.md5 == hashlib.md5(data).hexdigest()


def test_the_first_piece_may_be_announced_before_the_file_exists(tmp_path: Path) -> None:
    data = content(2 * PL, 8)
    path = tmp_path / "part"
    follower = PieceFollower(2)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(FollowHasher(path, PL, len(data), follower, threading.Event()).finish)
        follower.add(0)  # announced; libtorrent has not created the file yet
        time.sleep(0.1)
        assert not fut.done()
        path.write_bytes(data)
        follower.add(1)
        result = fut.result(timeout=10)
    assert result.md5 == hashlib.md5(data).hexdigest()


def test_idle_priority_is_per_thread(tmp_path: Path) -> None:
    def policy() -> tuple[int, int]:
        tid = threading.get_native_id()
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)

    def lowered() -> tuple[int, int]:
        idle_thread()
        return policy()

    with ThreadPoolExecutor(1) as pool:
        low = pool.submit(lowered).result()
    assert low[0] == os.SCHED_IDLE or low[1] == 19
    assert policy()[0] == os.SCHED_OTHER  # the calling thread kept its priority
