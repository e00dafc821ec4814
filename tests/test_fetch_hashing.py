"""One-pass hashing agrees with hashlib and with the organisation's torrent tool (py3createtorrent)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import libtorrent as lt

from noded.core.hashing import StreamHasher, hash_file

MiB = 1024 * 1024


def test_pieces_and_md5_match_py3createtorrent(tmp_path: Path) -> None:
    data = os.urandom(33 * MiB + 5)  # two full 16 MiB pieces and a short one
    f = tmp_path / "d.parquet"
    f.write_bytes(data)
    out = tmp_path / "d.torrent"
    subprocess.run(
        [sys.executable, "-m", "py3createtorrent", str(f), "-p", "16384", "--md5", "-s", "Data for Canada",
         "-o", str(out), "-q", "-f"],
        check=True,
    )  # fmt: skip
    info = lt.bdecode(out.read_bytes())[b"info"]
    got = hash_file(f, want_sha1=True)
    assert got.pieces == info[b"pieces"] and len(got.pieces) == 3 * 20
    assert got.md5 == info[b"md5sum"].decode()
    assert got.size == info[b"length"]
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.sha1 == hashlib.sha1(data).hexdigest()


async def test_stream_feed_in_odd_chunks_equals_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 7)
    h = StreamHasher(piece_length=MiB)
    pos, step = 0, 1
    while pos < len(data):  # chunks that straddle piece boundaries in every possible way
        await h.update(data[pos : pos + step])
        pos += step
        step = step * 3 + 1
    r = await h.finish()
    assert r.md5 == hashlib.md5(data).hexdigest()
    L = MiB
    assert r.pieces == b"".join(hashlib.sha1(data[i : i + L]).digest() for i in range(0, len(data), L))


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "e"
    f.write_bytes(b"")
    r = hash_file(f)
    assert r.size == 0 and r.md5 == hashlib.md5(b"").hexdigest() and r.pieces == b""


async def test_hashing_does_not_block_the_loop() -> None:
    data = os.urandom(64 * MiB)
    h = StreamHasher()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    t = asyncio.create_task(ticker())
    for i in range(0, len(data), 4 * MiB):
        await h.update(data[i : i + 4 * MiB])
    await h.finish()
    t.cancel()
    assert ticks > 16  # the loop kept running while the threads hashed
