"""R2 as an origin: list the bucket under the prefix, and pull an item while verifying it.

Listings are untrusted input: keys are normalised and confined (no '..', no empty segments, no
control characters), sizes bounded, and anything odd is skipped with a reason instead of failing the
whole listing. A pull is one plain HTTP GET (a presigned S3 URL when we hold credentials, else the
bucket's public URL) hashed while it streams; the sha256 our pushers store in the object metadata is
what the bytes must match.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp

from noded.core.config import R2Config
from noded.core.counters import Traffic
from noded.core.hashing import StreamHasher
from noded.core.logs import get_logger
from noded.core.model import PIECE_LENGTH, CatalogEntry, HashResult, Item
from noded.core.priority import bulk_thread
from noded.origins.bodies import BodyTransport, TransportError, open_in
from noded.origins.catalog.base import is_hex
from noded.origins.sources import FetchError
from noded.r2.client import CHANNEL, MissingCredentials, R2Client, load_credentials

log = get_logger("noded.r2source")

MAX_KEY_LENGTH = 1024
WRITE_BATCH = 8 * 1024 * 1024  # bytes handed to the hashing/writing thread at once


# -- listing (pure) ------------------------------------------------------------------------------
def normalise_key(object_key: str, prefix: str) -> str | None:
    """The item key of an object under `prefix`, or None when it is not a safe file key."""
    if not object_key.startswith(prefix):
        return None
    key = object_key[len(prefix) :]
    if not key or key.endswith("/") or len(key) > MAX_KEY_LENGTH or "\\" in key:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return None
    if any(part in ("", ".", "..") for part in key.split("/")):
        return None
    return key


def plain_md5(etag: str | None) -> str | None:
    """A single-part object's ETag is the md5 of its bytes; a multipart ETag ('...-N') is not."""
    e = (etag or "").strip('"').lower()
    return e if is_hex(e, 32) else None


def entries_from_listing(
    objects: Iterable[dict[str, Any]], *, prefix: str, public_url: str | None, max_items: int, max_size: int
) -> tuple[list[CatalogEntry], list[str]]:
    """ListObjectsV2 `Contents` -> catalog entries, and the reasons for skipped objects."""
    entries: list[CatalogEntry] = []
    skipped: list[str] = []
    for obj in objects:
        raw = str(obj.get("Key", ""))
        key = normalise_key(raw, prefix)
        if key is None:
            skipped.append(f"{raw[:200]!r}: not a safe key under {prefix!r}")
            continue
        size = obj.get("Size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_size:
            skipped.append(f"{raw[:200]!r}: size {size!r} outside 0..{max_size}")
            continue
        if len(entries) >= max_items:
            skipped.append(f"listing truncated at {max_items} items")
            break
        modified = obj.get("LastModified")
        etag = str(obj.get("ETag") or "").strip('"') or None
        urls = (f"{public_url}/{quote(raw)}",) if public_url else ()
        entries.append(
            CatalogEntry(
                origin="r2",
                key=key,
                urls=urls,
                size=size,
                md5=plain_md5(etag),
                etag=etag,
                mtime=modified.timestamp() if isinstance(modified, datetime) else None,
            )
        )
    return entries, skipped


def checksums_from_metadata(meta: dict[str, str]) -> tuple[str | None, str | None]:
    """(sha256, md5) from object metadata, when well-formed."""
    m = {k.lower(): v.strip().lower() for k, v in meta.items()}
    sha256 = m.get("sha256")
    md5 = m.get("md5")
    return (sha256 if sha256 and is_hex(sha256, 64) else None, md5 if md5 and is_hex(md5, 32) else None)


async def list_catalog(
    client: R2Client, *, max_items: int, max_size: int, public_url: str | None = None, head_concurrency: int = 8
) -> list[CatalogEntry]:
    """List the bucket under the prefix; HEAD each object for the sha256/md5 our pushers stored."""

    def list_all() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pages = client.s3.get_paginator("list_objects_v2").paginate(Bucket=client.bucket, Prefix=client.prefix)
        for page in pages:
            out += page.get("Contents", [])
            if len(out) > max_items:
                break
        return out

    objects = await client.call(list_all)
    entries, skipped = entries_from_listing(
        objects, prefix=client.prefix, public_url=public_url, max_items=max_items, max_size=max_size
    )
    for reason in skipped[:20]:
        log.warning("r2.listing_skipped", reason=reason)
    sem = asyncio.Semaphore(head_concurrency)

    async def with_checksums(e: CatalogEntry) -> CatalogEntry:
        async with sem:
            try:
                head = await client.call(client.s3.head_object, Bucket=client.bucket, Key=client.object_key(e.key))
            except Exception as exc:
                log.warning("r2.head_failed", key=e.key, reason=client.failure(exc).reason)
                return e
        sha256, md5 = checksums_from_metadata(head.get("Metadata") or {})
        if head.get("ContentLength") != e.size:
            return e  # replaced between list and HEAD: the next refresh sees it consistently
        return CatalogEntry(
            origin=e.origin,
            key=e.key,
            urls=e.urls,
            size=e.size,
            md5=md5 or e.md5,
            sha256=sha256,
            etag=e.etag,
            mtime=e.mtime,
        )

    return list(await asyncio.gather(*(with_checksums(e) for e in entries)))


# -- hashing while streaming -----------------------------------------------------------------------
class _HashingWriter:
    """Writes a stream to a file while the one-pass hasher (noded/hashing.py) takes md5, sha256 and
    the sha1 of each torrent piece."""

    def __init__(self, path: Path, piece_length: int = PIECE_LENGTH) -> None:
        self.path = path
        self.hasher = StreamHasher(piece_length=piece_length)
        self.f: BinaryIO | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/close()

    def write(self, data: bytes | memoryview) -> None:
        assert self.f is not None
        self.f.write(data)
        self.hasher.update_sync(data)

    def finish(self) -> HashResult:
        self._close_file()
        return self.hasher.finish_sync()

    def close(self) -> None:
        """Also on failure: the file is closed and the hasher's threads are let go."""
        self._close_file()
        self.hasher.close()

    def _close_file(self) -> None:
        if self.f is not None:
            self.f.flush()
            self.f.close()
            self.f = None


# -- the Source ------------------------------------------------------------------------------------
class R2Source:
    """Pulls items from R2 for the pipeline, after peers and origins have failed."""

    name = "r2"

    def __init__(
        self,
        cfg: R2Config,
        traffic: Traffic,
        client: R2Client | None = None,
        *,
        timeout: aiohttp.ClientTimeout | None = None,
        owns_client: bool = False,
    ) -> None:
        if client is None and not cfg.public_url:
            raise ValueError("R2 as an origin needs credentials or r2.public_url")
        self.cfg = cfg
        self.traffic = traffic
        self.client = client
        self._owns_client = owns_client
        self.prefix = cfg.prefix
        self._timeout = timeout or aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout, sock_read=cfg.read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="r2-pull")
        # The bodies: received, written and hashed in a thread (aiohttp would copy each byte on the loop).
        self._bodies = BodyTransport(
            user_agent="noded", connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout, max_idle=2
        )
        self._body_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="r2-body", initializer=bulk_thread)

    @classmethod
    async def open(cls, cfg: R2Config, traffic: Traffic) -> R2Source | None:
        """`from_config` off the event loop (building a boto3 client reads its model from disk)."""
        return await asyncio.get_running_loop().run_in_executor(None, cls.from_config, cfg, traffic)

    @classmethod
    def from_config(cls, cfg: R2Config, traffic: Traffic) -> R2Source | None:
        """With credentials when configured (presigned GETs), else the public URL; None when neither.
        Blocking (see `open`)."""
        try:
            client: R2Client | None = R2Client(cfg, load_credentials(cfg), traffic, threads=4)
        except MissingCredentials:
            client = None
        if client is None and not cfg.public_url:
            return None
        return cls(cfg, traffic, client, owns_client=True)

    def _url(self, key: str, method: str) -> str:
        okey = f"{self.prefix}{key}"
        if self.client is not None:
            return self.client.presign("head_object" if method == "HEAD" else "get_object", okey)
        assert self.cfg.public_url is not None
        return f"{self.cfg.public_url}/{quote(okey)}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._body_threads.shutdown(wait=False, cancel_futures=True)
        self._bodies.close()
        if self._owns_client and self.client is not None:
            self.client.close()

    async def offers(self, item: Item) -> bool:
        try:
            async with self._http().head(self._url(item.key, "HEAD")) as resp:
                self.traffic.add(CHANNEL, "in", 0, requests=1, errors=int(resp.status >= 500))
                if resp.status != 200:
                    return False
                sha256, _ = checksums_from_metadata(_amz_meta(resp.headers))
                length = resp.content_length
        except (aiohttp.ClientError, TimeoutError):
            self.traffic.add(CHANNEL, "in", 0, requests=1, errors=1)
            return False
        if item.size is not None and length is not None and length != item.size:
            return False
        return not (item.sha256 and sha256 and item.sha256.lower() != sha256)

    async def fetch(self, item: Item, partial: Path) -> HashResult:
        loop = asyncio.get_running_loop()
        writer = _HashingWriter(partial)
        traffic = self.traffic

        def take(chunk: memoryview) -> None:  # in the body thread
            writer.write(chunk)
            traffic.add(CHANNEL, "in", len(chunk))

        try:
            resp = await open_in(self._body_threads, self._bodies, self._url(item.key, "GET"), {})
        except TransportError as e:
            self.traffic.add(CHANNEL, "in", 0, errors=1)
            raise FetchError(f"R2 transfer of {item.key} failed: {e}") from None
        try:
            self.traffic.add(CHANNEL, "in", 0, requests=1, errors=int(resp.status >= 400))
            _check_status(resp.status, item.key)
            meta_sha256, meta_md5 = checksums_from_metadata(_amz_meta(resp.headers))
            if item.sha256 and meta_sha256 and item.sha256.lower() != meta_sha256:
                raise FetchError(
                    f"R2 holds another version of {item.key} (sha256 {meta_sha256}, wanted {item.sha256})",
                    retryable=False,
                )
            length = resp.content_length
            if item.size is not None and length is not None and length != item.size:
                raise FetchError(f"R2 holds {length} bytes for {item.key}, the item has {item.size}", retryable=False)
            await loop.run_in_executor(self._executor, writer.open)
            body = self._body_threads.submit(resp.hand_over, take, WRITE_BATCH)
            try:
                await asyncio.wrap_future(body)
            except asyncio.CancelledError:
                resp.abort()  # the thread returns at once; it is waited for before the file is closed
                await asyncio.wait([asyncio.wrap_future(body)])
                raise
            result = await loop.run_in_executor(self._executor, writer.finish)
            etag_md5 = plain_md5(resp.headers.get("ETag"))
        except TransportError as e:
            self.traffic.add(CHANNEL, "in", 0, errors=1)
            raise FetchError(f"R2 transfer of {item.key} failed: {e}") from None
        finally:
            resp.release()
            await loop.run_in_executor(self._executor, writer.close)
        if length is not None and result.size != length:
            raise FetchError(f"R2 sent {result.size} of {length} bytes for {item.key}")
        _verify(item, result, sha256=meta_sha256 or item.sha256, md5=item.md5 or meta_md5 or etag_md5)
        log.info("r2.pulled", key=item.key, bytes=result.size)
        return result


def _amz_meta(headers: Any) -> dict[str, str]:
    return {k[len("x-amz-meta-") :]: v for k, v in headers.items() if k.lower().startswith("x-amz-meta-")}


def _check_status(status: int, key: str) -> None:
    if status == 200:
        return
    if status == 404:
        raise FetchError(f"{key} is not in R2", retryable=False)
    if status in (401, 403):
        raise FetchError(f"R2 refused to serve {key} ({status})", retryable=False)
    if status >= 500 or status == 429:
        raise FetchError(f"R2 answered {status} for {key}")
    raise FetchError(f"R2 answered {status} for {key}", retryable=False)


def _verify(item: Item, result: HashResult, *, sha256: str | None, md5: str | None) -> None:
    if not sha256 and not md5:
        raise FetchError(
            f"nothing to verify {item.key} against: no sha256 in R2 metadata and no published checksum",
            retryable=False,
        )
    if sha256 and result.sha256 != sha256.lower():
        raise FetchError(
            f"{item.key} from R2 has sha256 {result.sha256}, expected {sha256}", retryable=False, suspect=True
        )
    if md5 and result.md5 != md5.lower():
        raise FetchError(f"{item.key} from R2 has md5 {result.md5}, expected {md5}", retryable=False, suspect=True)
    if item.size is not None and result.size != item.size:
        raise FetchError(f"{item.key} from R2 is {result.size} bytes, expected {item.size}", suspect=True)
