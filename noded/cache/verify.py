"""Re-hash cached items against their recorded checksums (`noded verify`, and on demand in the daemon).

Incremental and resumable: a full pass walks cached items by id and stores a checkpoint (the last id
done) in the store's meta table every few items, so an interrupted pass resumes where it stopped.
Rate-limited: after each item the pass sleeps long enough to keep the average read rate under the
limit. A corrupt item is moved to the quarantine area (never served) and set back to WANTED, so the
pull pipeline fetches it again; an item being verified counts as in use and is never evicted meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from noded.cache.layout import UnsafePath
from noded.core.hashing import hash_file
from noded.core.logs import get_logger
from noded.core.model import HashResult, Item, State
from noded.core.safefs import UnsafeFile

if TYPE_CHECKING:  # the cache builds verifiers over itself
    from noded.cache.accounting import Cache

log = get_logger("noded.verify")

CHECKPOINT = "verify.checkpoint"  # meta: JSON of the pass in progress
LAST_RUN = "verify.last_run"  # meta: JSON summary of the last complete pass
CHECKPOINT_EVERY = 20  # items
CHECKPOINT_SECONDS = 5.0
PAGE = 200


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # no recorded checksum to compare with
    not_cached: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    bytes_read: int = 0
    resumed_after_id: int = 0
    complete: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mismatch(item: Item, h: HashResult, pieces: tuple[int, bytes] | None) -> str | None:
    """Why the bytes do not match the record (None: they match). Pure."""
    if item.size is not None and h.size != item.size:
        return f"size {h.size} != recorded {item.size}"
    if item.sha256 and h.sha256.lower() != item.sha256.lower():
        return f"sha256 {h.sha256} != recorded {item.sha256}"
    if item.md5 and h.md5.lower() != item.md5.lower():
        return f"md5 {h.md5} != recorded {item.md5}"
    if pieces is not None and pieces[0] == h.piece_length and pieces[1] != h.pieces:
        return "torrent piece hashes differ from the recorded ones"
    return None


class Verifier:
    def __init__(self, cache: Cache, rate: int | None = None) -> None:
        self.cache = cache
        self.node = cache.node
        self.store = cache.node.store
        configured = cache.node.cfg.cache.verify_rate
        self.rate = rate if rate is not None else (configured or None)

    async def verify_keys(self, keys: Sequence[str]) -> VerifyReport:
        """Verify the current version of each key now (no checkpoint)."""
        t0 = time.monotonic()
        rep = VerifyReport()
        for key in keys:
            item = await self.store.run(self.store.get_current, key)
            if item is None:
                rep.unknown.append(key)
            elif item.state is not State.CACHED:
                rep.not_cached.append(key)
            else:
                await self._one(item, rep)
        rep.complete = True
        rep.seconds = round(time.monotonic() - t0, 3)
        return rep

    async def verify_all(
        self,
        *,
        restart: bool = False,
        progress: Callable[[VerifyReport, Item], Awaitable[None] | None] | None = None,
    ) -> VerifyReport:
        """One pass over every cached item, resuming from the last checkpoint unless `restart`."""
        t0 = time.monotonic()
        rep = VerifyReport()
        raw = None if restart else await self.store.run(self.store.get_meta, CHECKPOINT)
        after_id = 0
        if raw:
            try:
                saved = json.loads(raw)
                after_id = int(saved["after_id"])
                for k in ("checked", "ok", "bytes_read"):
                    setattr(rep, k, int(saved.get(k, 0)))
                rep.corrupt = list(saved.get("corrupt", []))
            except (ValueError, KeyError, TypeError):
                log.warning("verify.bad_checkpoint", value=raw[:200])
                after_id = 0
        rep.resumed_after_id = after_id
        last_save = time.monotonic()
        since_save = 0
        while True:
            page = await self.store.run(self.store.items, states=[State.CACHED], after_id=after_id, limit=PAGE)
            if not page:
                break
            for item in page:
                await self._one(item, rep)
                after_id = item.id
                since_save += 1
                if progress is not None:
                    r = progress(rep, item)
                    if r is not None:
                        await r
                if since_save >= CHECKPOINT_EVERY or time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                    await self._save(after_id, rep)
                    since_save = 0
                    last_save = time.monotonic()
        rep.complete = True
        rep.seconds = round(time.monotonic() - t0, 3)
        summary = {"finished_at": time.time(), **rep.as_dict()}
        await self.store.run(self.store.set_meta, LAST_RUN, json.dumps(summary))
        await self.store.run(self.store.set_meta, CHECKPOINT, "")
        return rep

    async def _save(self, after_id: int, rep: VerifyReport) -> None:
        state = {
            "after_id": after_id,
            "checked": rep.checked,
            "ok": rep.ok,
            "bytes_read": rep.bytes_read,
            "corrupt": rep.corrupt[-100:],
            "saved_at": time.time(),
        }
        await self.store.run(self.store.set_meta, CHECKPOINT, json.dumps(state))

    async def _one(self, item: Item, rep: VerifyReport) -> None:
        if not (item.sha256 or item.md5):
            rep.unverifiable.append(item.key)
            return
        try:
            path = self.cache.layout.final_path(item.key)
        except UnsafePath:
            rep.unverifiable.append(item.key)
            return
        loop = asyncio.get_running_loop()
        t0, started = time.monotonic(), time.time()
        with self.cache.hold(item.id):
            try:
                h = await loop.run_in_executor(None, hash_file, path)
            except FileNotFoundError:
                rep.missing.append(item.key)
                await self.cache.external_change(item.id, "verify: file missing from the cache", changed=False)
                return
            except UnsafeFile as e:
                rep.corrupt.append(item.key)
                await self.cache.unsafe_file(item.id, item.key, e)
                return
            pieces = await self.store.run(self.store.get_pieces, item.id)
            rep.checked += 1
            rep.bytes_read += h.size
            why = mismatch(item, h, pieces)
            if why is None:
                rep.ok += 1
                await self.store.run(self.store.update_item, item.id, verified_at=started)
            else:
                rep.corrupt.append(item.key)
                log.error("verify.corrupt", key=item.key, version=item.version, reason=why)
                await self.cache.external_change(item.id, f"verify: {why}", changed=True)
        await self._pace(h.size, time.monotonic() - t0)

    async def _pace(self, nbytes: int, elapsed: float) -> None:
        """Sleep so that the average read rate stays under the limit."""
        if self.rate:
            delay = nbytes / self.rate - elapsed
            if delay > 0:
                await asyncio.sleep(delay)
