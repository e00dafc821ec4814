"""`hash_file(path) -> HashResult` for the cache (inbox, verify).

The real implementation lives in noded/hashing.py (owned by the origins work). Until that module is
merged, a private fallback with the same signature keeps the cache usable; once noded.hashing exists,
it is used and the fallback is dead code to delete. Blocking: call it in an executor.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

from noded.model import PIECE_LENGTH, HashResult

_CHUNK = 1024 * 1024


def _fallback_hash_file(path: Path) -> HashResult:
    md5 = hashlib.md5(usedforsecurity=False)
    sha256 = hashlib.sha256()
    pieces: list[bytes] = []
    piece = hashlib.sha1(usedforsecurity=False)
    in_piece = 0
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            chunk = view[:n]
            md5.update(chunk)
            sha256.update(chunk)
            size += n
            off = 0
            while off < n:
                take = min(n - off, PIECE_LENGTH - in_piece)
                piece.update(chunk[off : off + take])
                in_piece += take
                off += take
                if in_piece == PIECE_LENGTH:
                    pieces.append(piece.digest())
                    piece = hashlib.sha1(usedforsecurity=False)
                    in_piece = 0
    if in_piece:
        pieces.append(piece.digest())
    return HashResult(size=size, md5=md5.hexdigest(), sha256=sha256.hexdigest(), pieces=b"".join(pieces))


def _resolve() -> Callable[[Path], HashResult]:
    try:
        mod = importlib.import_module("noded.hashing")
    except ModuleNotFoundError as e:
        if e.name != "noded.hashing":
            raise
        return _fallback_hash_file
    fn = getattr(mod, "hash_file", None)
    return cast(Callable[[Path], HashResult], fn) if callable(fn) else _fallback_hash_file


hash_file = _resolve()
