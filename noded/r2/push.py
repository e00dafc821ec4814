"""The pusher: copies every cached item to R2; an item is "pushed" only once a HEAD confirms it.

Work lives in the store (cached rows with pushed=0), so a crash or restart resumes by rescanning; the
"cached" signal only shortens the wait. Multipart uploads this node starts are recorded in the store
before their first part, so after a SIGKILL the next push of that item resumes its upload (only the
missing parts are sent) and the next start aborts exactly those of ours that cannot be resumed (and
uploads under the prefix older than `stale_upload_age`, which nobody will complete), never a peer
node's upload that is still running.

Failures come in two kinds. An outage (connection refused, 5xx, credentials refused) stops the pass,
sets node.problems["r2"] and backs off exponentially; the items stay cached and unpushed. A problem
with one item (its file vanished, R2 holds a different object in create-only mode, bytes did not
verify) is written to that item's `error` and the item is retried after `rescan_interval`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noded.cache.layout import CacheLayout, UnsafePath
from noded.core.component import Node, cancel_task, supervise
from noded.core.logs import get_logger
from noded.core.model import Item, State
from noded.core.safefs import UnsafeFile, lstat_regular, open_regular
from noded.core.store import Store
from noded.origins.schedule import TokenBucket
from noded.r2.budget import ByteBudget
from noded.r2.client import MissingCredentials, R2Client, R2Failure, load_credentials
from noded.r2.partsize import PartPlan, plan_parts

log = get_logger("noded.push")

__all__ = ["R2Pusher", "backoff_delay", "plan_parts"]

SCAN_BATCH = 500


def backoff_delay(attempt: int, initial: float, maximum: float, rnd: float | None = None) -> float:
    """Doubling delay from `initial`, capped at `maximum`, with +-10% jitter so nodes do not sync up."""
    r = random.random() if rnd is None else rnd
    base = min(maximum, initial * 2 ** min(attempt, 60))
    return float(min(maximum, base * (0.9 + 0.2 * r)))


class R2Unavailable(Exception):
    """R2 cannot be used right now (outage, overload, credentials): back off, keep the items."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ItemFailed(Exception):
    """This one item cannot be pushed now; the reason goes into its row."""

    def __init__(self, reason: str, failure: R2Failure | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


# -- the r2_uploads table (migration 4): our own multipart uploads -------------------------------
def record_upload(store: Store, upload_id: str, item_id: int, object_key: str) -> None:
    with store.tx() as c:
        c.execute(
            "INSERT OR REPLACE INTO r2_uploads(upload_id, item_id, object_key, created_at) VALUES(?,?,?,?)",
            (upload_id, item_id, object_key, time.time()),
        )


def forget_upload(store: Store, upload_id: str) -> None:
    with store.tx() as c:
        c.execute("DELETE FROM r2_uploads WHERE upload_id=?", (upload_id,))


def recorded_uploads(store: Store) -> dict[str, tuple[str, int]]:
    """upload id -> (object key, item id), oldest first."""
    rows = store.conn.execute("SELECT upload_id, object_key, item_id FROM r2_uploads ORDER BY created_at, rowid")
    return {str(u): (str(k), int(i)) for u, k, i in rows}


# -- blocking helpers (run on the R2 threads) ----------------------------------------------------
def _read_part(path: Path, offset: int, length: int) -> bytes:
    fd = open_regular(path)
    try:
        chunks = []
        got = 0
        while got < length:
            b = os.pread(fd, length - got, offset + got)
            if not b:
                raise ItemFailed(f"cached file {path} is shorter than its recorded size")
            chunks.append(b)
            got += len(b)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _sha256_file(path: Path, cancel: threading.Event, block: int = 8 * 1024 * 1024) -> str:
    """The file's sha256, read sequentially (SHA-NI: ~1.5 GB/s); stops early when cancelled."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        while not cancel.is_set():
            b = f.read(block)
            if not b:
                return h.hexdigest()
            h.update(b)
    return ""


def _read_part_crc32(path: Path, offset: int, length: int) -> tuple[bytes, str]:
    """A part's bytes and their CRC32 as the x-amz-checksum-crc32 header wants it (base64, big-endian)."""
    data = _read_part(path, offset, length)
    return data, _b64(zlib.crc32(data).to_bytes(4, "big"))


def needs_rehash(item: Item, mtime_ns: int, now: float, rehash_after: float) -> bool:
    """Whether the pusher must hash the file again before R2 may complete it (pure).

    Not when the bytes were hashed and matched less than `rehash_after` seconds ago and the file's
    mtime is the one recorded at that moment: the usual push right after a pull or an inbox publish,
    where a second read of the whole file would find what the first one just found.
    """
    if rehash_after <= 0 or item.verified_at is None or item.mtime_ns is None:
        return True
    if mtime_ns != item.mtime_ns:
        return True
    return not 0 <= now - item.verified_at <= rehash_after


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _etag_hex(resp: dict[str, Any]) -> str:
    return str(resp.get("ETag", "")).strip('"').lower()


@dataclass
class PushStats:
    pushed: int = 0
    skipped_identical: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    bytes_rehashed: int = 0  # read again to re-check a copy before R2 completes it
    aborted_uploads: int = 0


class R2Pusher:
    """Component "r2". `in_use` holds ids of items whose files are being read for an upload: the
    cache's eviction must not delete those."""

    name = "r2"

    def __init__(self, node: Node, layout: CacheLayout | None = None, up: TokenBucket | None = None) -> None:
        self.node = node
        self.up = up  # the bandwidth timetable's upload bucket (None: unlimited)
        self.cfg = node.cfg.r2
        self.layout = layout or CacheLayout(node.cfg.paths.cache_dir, node.cfg.paths.state_dir)
        self.in_use: set[int] = set()  # also read by the cache through items_in_use()
        self.stats = PushStats()
        self.client: R2Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "stopped"
        self._attempt = 0
        self._next_retry_at: float | None = None
        self._item_retry: dict[int, float] = {}  # item id -> monotonic time before which it is skipped
        self._cleaned = False
        self._slots: asyncio.Semaphore | None = None
        self._buffers: ByteBudget | None = None
        self._last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.cfg.enabled:
            self._state = "disabled"
            return
        try:
            creds = load_credentials(self.cfg)
        except MissingCredentials as e:
            # Not fatal: the node still caches and seeds; status says why nothing reaches R2.
            self.node.problems["r2"] = str(e)
            self._state = "no-credentials"
            log.error("r2.no_credentials", reason=str(e))
            return
        # Building a boto3 client loads its service model from disk: off the loop.
        loop = asyncio.get_running_loop()
        self.client = await loop.run_in_executor(None, R2Client, self.cfg, creds, self.node.traffic)
        self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        # Parts grow with the file (about 500 MiB at 4.9 TiB): cap the bytes held in memory too.
        self._buffers = ByteBudget(self.cfg.max_buffer_bytes)
        self._state = "starting"
        self._task = supervise(self._run, "r2-pusher", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        if self.client is not None:
            self.client.close()
            self.client = None
        self._state = "stopped"

    def items_in_use(self) -> set[int]:
        """Ids whose files are being read for an upload (the cache never evicts these)."""
        return set(self.in_use)

    def status(self) -> dict[str, Any]:
        retry_in = None
        if self._next_retry_at is not None:
            retry_in = round(max(0.0, self._next_retry_at - time.monotonic()), 1)
        return {
            "state": self._state,
            "endpoint": self.cfg.endpoint,
            "bucket": self.cfg.bucket,
            "prefix": self.cfg.prefix,
            "create_only": self.cfg.create_only,
            "in_use": sorted(self.in_use),
            "pushed": self.stats.pushed,
            "skipped_identical": self.stats.skipped_identical,
            "failed": self.stats.failed,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "bytes_rehashed": self.stats.bytes_rehashed,
            "aborted_uploads": self.stats.aborted_uploads,
            "attempt": self._attempt,
            "retry_in": retry_in,
            "last_error": self._last_error,
        }

    # -- main loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.run_pass()
            except R2Unavailable as e:
                delay = backoff_delay(self._attempt, self.cfg.retry_initial, self.cfg.retry_max)
                self._attempt += 1
                self._last_error = e.reason
                self.node.problems["r2"] = e.reason
                self._state = "backoff"
                self._next_retry_at = time.monotonic() + delay
                log.warning("r2.unavailable", reason=e.reason, attempt=self._attempt, retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # a bug must not kill the pusher; it is logged and retried
                delay = backoff_delay(self._attempt, self.cfg.retry_initial, self.cfg.retry_max)
                self._attempt += 1
                self._last_error = f"{type(e).__name__}: {e}"
                self._state = "backoff"
                self._next_retry_at = time.monotonic() + delay
                log.error("r2.pass_failed", error=self._last_error, retry_in=round(delay, 3), exc_info=True)
                await asyncio.sleep(delay)
                continue
            if self._attempt or "r2" in self.node.problems:
                log.info("r2.recovered", after_attempts=self._attempt)
            self.node.problems.pop("r2", None)
            self._attempt = 0
            self._next_retry_at = None
            self._state = "idle"
            await self.node.wait("cached", self._idle_timeout())

    def _idle_timeout(self) -> float:
        timeout = self.cfg.rescan_interval
        if self._item_retry:
            timeout = min(timeout, max(0.1, min(self._item_retry.values()) - time.monotonic()))
        return timeout

    async def run_pass(self) -> None:
        """Abort leftovers, then push every cached, unpushed item (bounded concurrency)."""
        store = self.node.store
        await self._cleanup_uploads()
        self._state = "pushing"
        items_sem = asyncio.Semaphore(self.cfg.max_concurrent_items)
        after = 0
        while True:
            batch = await store.run(store.items, states=[State.CACHED], after_id=after, limit=SCAN_BATCH)
            if not batch:
                return
            after = batch[-1].id
            now = time.monotonic()
            strict = self.node.cfg.origins.require_checksum
            todo = [
                i for i in batch if not i.pushed and not i.withheld(strict) and self._item_retry.get(i.id, 0.0) <= now
            ]
            if not todo:
                continue
            try:
                async with asyncio.TaskGroup() as tg:
                    for item in todo:
                        tg.create_task(self._push_guarded(item, items_sem))
            except ExceptionGroup as eg:
                raise _first(eg, R2Unavailable) or eg from None

    async def _push_guarded(self, item: Item, sem: asyncio.Semaphore) -> None:
        store = self.node.store
        async with sem:
            self.in_use.add(item.id)  # before re-reading the row: eviction checks this set
            try:
                fresh = await store.run(store.get_item, item.id)
                if fresh is None or fresh.state != State.CACHED or fresh.pushed:
                    return
                if fresh.withheld(self.node.cfg.origins.require_checksum):
                    return
                try:
                    await self.push_item(fresh)
                    self._item_retry.pop(item.id, None)
                except ItemFailed as e:
                    self.stats.failed += 1
                    self._last_error = f"{fresh.key}: {e.reason}"
                    self._item_retry[item.id] = time.monotonic() + self.cfg.rescan_interval
                    log.warning("r2.push_failed", key=fresh.key, item_id=fresh.id, reason=e.reason)
                    await store.run(store.update_item, fresh.id, error=f"r2: {e.reason}")
            finally:
                self.in_use.discard(item.id)

    # -- one item ---------------------------------------------------------------------------
    async def push_item(self, item: Item) -> bool:
        """Upload (or confirm) one cached item; returns False when R2 already held it."""
        client = self._require_client()
        try:
            path = self.layout.final_path(item.key)
        except UnsafePath as e:
            raise ItemFailed(str(e)) from None
        loop = asyncio.get_running_loop()
        try:
            st = await loop.run_in_executor(client.executor, lstat_regular, path, self.layout.root)
        except UnsafeFile as e:
            raise ItemFailed(f"refused to push: {e}") from None
        except OSError as e:
            raise ItemFailed(f"cached file {path} cannot be read: {e.strerror}") from None
        if item.size is not None and st.st_size != item.size:
            raise ItemFailed(f"cached file is {st.st_size} bytes, the store recorded {item.size}")
        if not item.sha256:
            raise ItemFailed("no sha256 recorded for the item; the object could not be labelled")
        size = st.st_size
        rehash = needs_rehash(item, st.st_mtime_ns, time.time(), self.cfg.rehash_after)
        okey = client.object_key(item.key)
        head = await self._head(okey)
        if head is not None:
            if _matches(head, size, item.sha256):
                await self._mark_pushed(item, size, uploaded=False)
                return False
            if self.cfg.create_only:
                raise ItemFailed(
                    f"R2 already holds {okey} with different content "
                    f"(size {head.get('ContentLength')}, sha256 {_meta(head).get('sha256')}); create_only forbids "
                    "overwriting it"
                )
        plan = plan_parts(size, threshold=self.cfg.multipart_threshold, part_size=self.cfg.part_size)
        if plan.multipart:
            await self._multipart(item, path, okey, plan, rehash=rehash)
        else:
            await self._single(item, path, okey, size, rehash=rehash)
        head = await self._head(okey)
        if head is None or not _matches(head, size, item.sha256):
            raise ItemFailed(f"HEAD after the upload does not show size {size} and our sha256 for {okey}")
        await self._mark_pushed(item, size, uploaded=True)
        return True

    def _metadata(self, item: Item) -> dict[str, str]:
        md = {"sha256": str(item.sha256).lower()}
        if item.md5:
            md["md5"] = item.md5.lower()
        return md

    def _checksum_algorithm(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": "CRC32"} if self.cfg.part_checksum == "crc32" else {}

    def _conditional(self) -> dict[str, str]:
        return {"IfNoneMatch": "*"} if self.cfg.create_only else {}

    async def _single(self, item: Item, path: Path, okey: str, size: int, *, rehash: bool) -> None:
        client = self._require_client()
        loop = asyncio.get_running_loop()
        if rehash:
            try:
                digest = await loop.run_in_executor(client.executor, _sha256_file, path, threading.Event())
            except OSError as e:
                raise ItemFailed(f"cannot read {path} to verify it: {e.strerror or e}") from None
            self.stats.bytes_rehashed += size
            if digest != str(item.sha256).lower():
                raise ItemFailed(f"the cached file no longer matches its sha256 (now {digest}); not uploaded")
        extra: dict[str, Any] = dict(self._conditional())
        if item.md5:
            # The md5 recorded when the bytes were verified: R2 refuses the PUT if the file changed since.
            extra["ContentMD5"] = _b64(bytes.fromhex(item.md5))

        if self.up is not None:
            await self.up.take(size)

        def put() -> dict[str, Any]:
            try:
                f = os.fdopen(open_regular(path, self.layout.root), "rb")
            except OSError as e:  # a local problem, not an R2 outage
                raise ItemFailed(f"cannot open {path}: {e.strerror or e}") from None
            with f:
                resp: dict[str, Any] = client.s3.put_object(
                    Bucket=client.bucket,
                    Key=okey,
                    Body=f,
                    ContentLength=size,
                    Metadata=self._metadata(item),
                    **extra,
                )
                return resp

        resp = await self._s3(put)
        etag = _etag_hex(resp)
        if item.md5 and etag and len(etag) == 32 and etag != item.md5.lower():
            # Servers that do not check Content-MD5 stored what we sent: the local copy is damaged.
            with contextlib.suppress(R2Unavailable, ItemFailed):
                await self._s3(client.s3.delete_object, Bucket=client.bucket, Key=okey)
            raise ItemFailed(f"the cached file no longer matches its md5 (R2 ETag {etag}); deleted the upload")
        self.stats.bytes_uploaded += size

    async def _multipart(self, item: Item, path: Path, okey: str, plan: PartPlan, *, rehash: bool) -> None:
        client = self._require_client()
        store = self.node.store
        resumed_id, done = await self._resume(item, okey, plan)
        if resumed_id is None:
            created = await self._s3(
                client.s3.create_multipart_upload,
                Bucket=client.bucket,
                Key=okey,
                Metadata=self._metadata(item),
                **self._checksum_algorithm(),
            )
            upload_id = str(created["UploadId"])
            await store.run(record_upload, store, upload_id, item.id, okey)
            log.info("r2.multipart_started", key=item.key, parts=plan.count, part_size=plan.part_size)
        else:
            upload_id = resumed_id
        # The parts are read out of order; unless the copy was verified moments ago, a sequential pass
        # alongside them checks that the file still has the sha256 it was verified with, so bit rot
        # never completes into R2.
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        verify: asyncio.Future[str]
        if rehash:
            verify = loop.run_in_executor(client.executor, _sha256_file, path, cancel)
        else:
            verify = loop.create_future()
            verify.set_result(str(item.sha256).lower())
        verify.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        try:
            etags: dict[int, dict[str, str]] = dict(done)
            try:
                async with asyncio.TaskGroup() as tg:
                    for number, offset, length in plan.parts():
                        if number in done:
                            continue
                        tg.create_task(self._part(path, okey, upload_id, number, offset, length, etags))
            except ExceptionGroup as eg:
                raise _first(eg, R2Unavailable) or _first(eg, ItemFailed) or eg from None
            try:
                digest = await verify
            except OSError as e:
                raise ItemFailed(f"cannot read {path} to verify it: {e.strerror or e}") from None
            if rehash:
                self.stats.bytes_rehashed += plan.size
            if digest != str(item.sha256).lower():
                raise ItemFailed(f"the cached file no longer matches its sha256 (now {digest}); upload aborted")
            parts = [{"PartNumber": n, **etags[n]} for n in sorted(etags)]
            await self._s3(
                client.s3.complete_multipart_upload,
                Bucket=client.bucket,
                Key=okey,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **self._conditional(),
            )
        except ItemFailed:
            cancel.set()
            # Our own upload: abort it now (an outage leaves it recorded for the next pass to abort).
            with contextlib.suppress(R2Unavailable, ItemFailed):
                await self._abort(okey, upload_id)
                await store.run(forget_upload, store, upload_id)
            raise
        finally:
            cancel.set()  # stops the verifying read when the parts failed or were cancelled
        await store.run(forget_upload, store, upload_id)

    async def _part(
        self,
        path: Path,
        okey: str,
        upload_id: str,
        number: int,
        offset: int,
        length: int,
        etags: dict[int, dict[str, str]],
    ) -> None:
        client = self._require_client()
        assert self._slots is not None and self._buffers is not None
        loop = asyncio.get_running_loop()
        if self.up is not None:
            await self.up.take(length)  # before taking a slot and a buffer: waiting holds neither
        async with self._slots, self._buffers.hold(length):
            checksum: dict[str, str] = {}
            try:
                if self.cfg.part_checksum == "crc32":
                    data, crc = await loop.run_in_executor(client.executor, _read_part_crc32, path, offset, length)
                    checksum["ChecksumCRC32"] = crc
                else:
                    data = await loop.run_in_executor(client.executor, _read_part, path, offset, length)
            except OSError as e:
                raise ItemFailed(f"cannot read part {number} of {path}: {e.strerror}") from None
            # The CRC32 goes in a header the store checks on arrival (not botocore's aws-chunked trailer,
            # which R2 refuses). It also spares S3-like stores a whole-object checksum of their own at
            # completion (moto computes CRC64NVME over the whole object then). No md5 per part: at
            # ~635 MB/s it would be the slowest step of the push.
            resp = await self._s3(
                client.s3.upload_part,
                Bucket=client.bucket,
                Key=okey,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ContentLength=length,
                **checksum,
            )
            etags[number] = {"ETag": str(resp["ETag"]), **checksum}
            self.stats.bytes_uploaded += length

    async def _mark_pushed(self, item: Item, size: int, *, uploaded: bool) -> None:
        store = self.node.store
        await store.run(store.update_item, item.id, pushed=True, error=None)
        if uploaded:
            self.stats.pushed += 1
        else:
            self.stats.skipped_identical += 1
        log.info("r2.pushed", key=item.key, item_id=item.id, bytes=size, uploaded=uploaded)
        # Now durable: fetches waiting for room may find it evictable.
        self.node.notify("pushed")
        cache = self.node.get("cache")
        if cache is not None and hasattr(cache, "wake"):
            cache.wake()

    # -- leftovers --------------------------------------------------------------------------
    async def _cleanup_uploads(self) -> None:
        """Abort our recorded multipart uploads that cannot be resumed, and stale ones under the prefix.

        A recorded upload of an item that is still cached and unpushed is kept: the next push of that
        item resumes it from ListParts instead of sending every part again.
        """
        store = self.node.store
        ours = await store.run(recorded_uploads, store)
        if self._cleaned and not ours:
            return
        client = self._require_client()
        resumable: dict[int, str] = {}  # item id -> its newest recorded upload
        for uid, (okey, item_id) in ours.items():
            item = await store.run(store.get_item, item_id)
            unpushed = item is not None and item.state == State.CACHED and not item.pushed
            if unpushed and item is not None and client.object_key(item.key) == okey:
                resumable[item_id] = uid
        keep = set(resumable.values())

        def list_uploads() -> list[dict[str, Any]]:
            pages = client.s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=client.bucket, Prefix=client.prefix
            )
            return [u for page in pages for u in page.get("Uploads", [])]

        uploads = await self._s3(list_uploads)
        listed = {str(u["UploadId"]) for u in uploads}
        now = time.time()
        for u in uploads:
            uid, okey = str(u["UploadId"]), str(u["Key"])
            if uid in keep:
                continue
            initiated = u.get("Initiated")
            age = now - initiated.timestamp() if initiated is not None else 0.0
            stale = self.cfg.stale_upload_age > 0 and age > self.cfg.stale_upload_age
            if uid not in ours and not stale:
                continue  # perhaps another node's upload, still running
            await self._abort(okey, uid)
            log.info("r2.upload_aborted", object_key=okey, ours=uid in ours, age_seconds=round(age))
        for uid in ours:
            if uid not in keep or uid not in listed:
                await store.run(forget_upload, store, uid)
        self._cleaned = True

    async def _abort(self, okey: str, upload_id: str) -> None:
        client = self._require_client()
        try:
            await self._s3(client.s3.abort_multipart_upload, Bucket=client.bucket, Key=okey, UploadId=upload_id)
        except ItemFailed as e:
            if e.failure is None or e.failure.kind != "missing":
                raise
        self.stats.aborted_uploads += 1

    async def _resume(self, item: Item, okey: str, plan: PartPlan) -> tuple[str | None, dict[int, dict[str, str]]]:
        """Our recorded upload of this item and the parts R2 already holds, when they fit the plan."""
        client = self._require_client()
        store = self.node.store
        recorded = [u for u, (k, i) in (await store.run(recorded_uploads, store)).items() if i == item.id and k == okey]
        if not recorded:
            return None, {}
        upload_id = recorded[-1]

        def list_parts() -> tuple[list[dict[str, Any]], str]:
            pages = list(
                client.s3.get_paginator("list_parts").paginate(Bucket=client.bucket, Key=okey, UploadId=upload_id)
            )
            algorithm = str(pages[0].get("ChecksumAlgorithm") or "") if pages else ""
            return [p for page in pages for p in page.get("Parts", [])], algorithm

        try:
            parts, algorithm = await self._s3(list_parts)
        except ItemFailed as e:
            if e.failure is not None and e.failure.kind == "missing":
                await store.run(forget_upload, store, upload_id)
                return None, {}
            raise
        expected = {n: (offset, length) for n, offset, length in plan.parts()}
        want_crc = self.cfg.part_checksum == "crc32"
        done: dict[int, dict[str, str]] = {}
        # An upload cut with other settings (part size, part checksums on or off) cannot be
        # completed: start over. Stores that do not report the algorithm (moto) are taken at their word.
        fits = not algorithm or (algorithm.upper() == "CRC32") == want_crc
        missing_crc: list[int] = []
        for p in parts if fits else []:
            n, size = int(p["PartNumber"]), int(p["Size"])
            if n not in expected or expected[n][1] != size:
                fits = False
                break
            done[n] = {"ETag": str(p["ETag"])}
            if want_crc:
                if p.get("ChecksumCRC32"):
                    done[n]["ChecksumCRC32"] = str(p["ChecksumCRC32"])
                else:
                    missing_crc.append(n)
        if not fits:
            with contextlib.suppress(ItemFailed):
                await self._abort(okey, upload_id)
            await store.run(forget_upload, store, upload_id)
            log.info("r2.upload_aborted", object_key=okey, ours=True, reason="parts do not fit the plan")
            return None, {}
        if missing_crc:
            # CompleteMultipartUpload names each part's checksum; recompute the ones ListParts left
            # out from our copy (the whole-file sha256 check before completing still guards the bytes).
            loop = asyncio.get_running_loop()
            path = self.layout.final_path(item.key)
            for n in missing_crc:
                _, crc = await loop.run_in_executor(client.executor, _read_part_crc32, path, *expected[n])
                done[n]["ChecksumCRC32"] = crc
        log.info("r2.multipart_resumed", key=item.key, parts_done=len(done), parts=plan.count)
        return upload_id, done

    # -- requests ---------------------------------------------------------------------------
    def _require_client(self) -> R2Client:
        if self.client is None:
            raise R2Unavailable("R2 client is not running")
        return self.client

    async def _s3(self, fn: Any, /, **kwargs: Any) -> Any:
        client = self._require_client()
        try:
            return await client.call(fn, **kwargs)
        except (ItemFailed, R2Unavailable):
            raise
        except Exception as e:
            f = client.failure(e)
            if f.kind == "outage":
                raise R2Unavailable(f.reason) from None
            raise ItemFailed(f.reason, f) from None

    async def _head(self, okey: str) -> dict[str, Any] | None:
        client = self._require_client()
        try:
            resp: dict[str, Any] = await self._s3(client.s3.head_object, Bucket=client.bucket, Key=okey)
        except ItemFailed as e:
            if e.failure is not None and e.failure.kind == "missing":
                return None
            raise
        return resp


def _meta(head: dict[str, Any]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}


def _matches(head: dict[str, Any], size: int, sha256: str) -> bool:
    return bool(head.get("ContentLength") == size and _meta(head).get("sha256", "").lower() == sha256.lower())


def _first(eg: BaseExceptionGroup[Any], kind: type[BaseException]) -> BaseException | None:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            found = _first(e, kind)
            if found is not None:
                return found
        elif isinstance(e, kind):
            return e
    return None
