"""Source Cooperative: anonymous S3 ListObjectsV2 (path-style) through botocore.

botocore signs nothing (UNSIGNED), asks for `encoding-type=url` and decodes the keys (so a key with
a character XML cannot carry, such as NUL, arrives intact and is rejected alone by the key rules
instead of making the page unreadable), follows continuation tokens (refusing one that repeats),
retries throttling and 5xx, and turns S3 errors into exceptions. R2's own listing uses the same
paginator. Before botocore parses a page, defusedxml checks it (no DTD or entity tricks) and that a
200 answer really is a ListBucketResult.

A single-part ETag is the object's md5; a multipart ETag ("<hex>-<parts>") is not, so it is kept as
an ETag only and never compared with a file md5 (verification then relies on the md5 or piece hashes
other locations of the same dataset publish: Zenodo, IA, the organisation's torrent).

Keys: the object key without its product segment (`origins.sourcecoop.strip_product`), so the object
`dataforcanada/<product>/<name>` is the dataset `<name>` as Zenodo, IA and the torrents name it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import botocore.handlers
import botocore.session
import defusedxml.ElementTree as SafeET
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from defusedxml import DefusedXmlException

from noded.core.config import FetchConfig, SourceCoopConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, is_hex
from noded.origins.catalog.keys import dataset_name

NAME = "sourcecoop"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def split_prefix(bucket: str, prefix: str) -> tuple[str, str]:
    """(bucket, key prefix). Through the data.source.coop proxy the account is the first segment."""
    prefix = prefix.lstrip("/")
    if bucket:
        return bucket, prefix
    account, _, rest = prefix.partition("/")
    if not account:
        raise CatalogError(f"prefix {prefix!r} names no account (set origins.sourcecoop.bucket or use account/...)")
    return account, rest


def _check_page(response_dict: dict[str, Any], max_bytes: int, **_: Any) -> None:
    """botocore's before-parse hook: refuse oversized pages, XML entity tricks and a 200 that is no listing."""
    body = response_dict.get("body") or b""
    if len(body) > max_bytes:
        raise CatalogError(f"a page of {len(body)} bytes exceeds {max_bytes}")
    if response_dict.get("status_code") != 200:
        return  # botocore turns S3's error documents into ClientError
    try:
        root = SafeET.fromstring(body)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as e:
        raise CatalogError(f"malformed ListObjectsV2 XML: {e}") from None
    if root.tag not in (_NS + "ListBucketResult", "ListBucketResult"):
        raise CatalogError(f"unexpected XML root element {root.tag[:80]!r}")


class SourceCoopAdapter:
    name = NAME

    def __init__(
        self, cfg: SourceCoopConfig, http: HttpGetter, limits: Limits, fetch: FetchConfig | None = None
    ) -> None:
        self.cfg = cfg
        self.limits = limits
        self.fetch = fetch or FetchConfig()
        self._client: Any = None
        # Several origins may share one base URL: only the configured buckets/prefixes are this origin's.
        self._owned: list[str] = []
        for p in cfg.prefixes or [""]:
            try:
                bucket, prefix = split_prefix(cfg.bucket, p)
            except CatalogError:
                continue
            self._owned.append(self.object_url(bucket, prefix))

    def owns(self, url: str) -> bool:
        return any(url.startswith(base) for base in self._owned)

    def object_url(self, bucket: str, key: str) -> str:
        return f"{self.cfg.endpoint}/{quote(bucket)}/{quote(key)}"

    def _make_client(self) -> Any:
        session = botocore.session.get_session()
        client = session.create_client(
            "s3",
            endpoint_url=self.cfg.endpoint,
            region_name="us-west-2",  # unsigned requests: the region only shapes the URL, not the answer
            config=BotoConfig(
                signature_version=UNSIGNED,
                s3={"addressing_style": "path"},
                retries={"max_attempts": self.fetch.max_attempts, "mode": "standard"},
                connect_timeout=self.fetch.connect_timeout,
                read_timeout=self.fetch.read_timeout,
                user_agent=self.fetch.user_agent,
            ),
        )
        max_bytes = self.limits.max_page_bytes
        # botocore's own 200-error hook would turn an unreadable page into a bare, retried "HTTP 500";
        # this check names what is wrong with it instead.
        builtin = getattr(botocore.handlers, "_handle_200_error", None)  # private: may go in a later botocore
        if builtin is not None:
            client.meta.events.unregister("before-parse.s3.*", builtin)
        client.meta.events.register(
            "before-parse.s3.ListObjectsV2", lambda **kw: _check_page(max_bytes=max_bytes, **kw)
        )
        return client

    def _pages(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        if self._client is None:
            self._client = self._make_client()
        paginator = self._client.get_paginator("list_objects_v2")
        params: dict[str, Any] = {"Bucket": bucket, "PaginationConfig": {"PageSize": self.cfg.max_keys_per_page}}
        if prefix:
            params["Prefix"] = prefix
        return iter(paginator.paginate(**params))

    async def list(self) -> Listing:
        out = EntryCollector(NAME, self.limits)
        for configured in self.cfg.prefixes or [""]:
            await out.unit(f"prefix {configured}", self._list_prefix(out, configured))
        return out.finish()

    async def _list_prefix(self, out: EntryCollector, configured: str) -> None:
        loop = asyncio.get_running_loop()
        bucket, prefix = split_prefix(self.cfg.bucket, configured)
        what = f"listing {bucket}/{prefix}"
        try:
            pages = await loop.run_in_executor(None, self._pages, bucket, prefix)
            while True:
                page = await loop.run_in_executor(None, next, pages, None)  # blocking I/O: off the loop
                if page is None:
                    return
                out.page(0)  # botocore enforced the byte bound already; this counts pages
                self._add_page(out, bucket, page)
        except ClientError as e:
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise CatalogError(f"{what} answered HTTP {status} {err.get('Code', '')}".rstrip()) from None
        except BotoCoreError as e:  # connection failures after retries, unparsable pages, repeating tokens
            raise CatalogError(f"{what}: {e}") from None

    def _add_page(self, out: EntryCollector, bucket: str, page: dict[str, Any]) -> None:
        contents = page.get("Contents") or []
        if len(contents) > self.cfg.max_keys_per_page * 2:
            raise CatalogError(f"a page lists {len(contents)} keys (asked for {self.cfg.max_keys_per_page})")
        for c in contents:
            key = c.get("Key")
            size = c.get("Size")
            if not isinstance(key, str):
                out.reject(key, "entry has no key")
                continue
            if key.endswith("/") and size in (None, 0):
                continue  # a "directory marker" object, not a file
            etag = (c.get("ETag") or "").strip('"') or None
            md5 = etag if etag and is_hex(etag, 32) else None
            modified = c.get("LastModified")
            out.add(
                dataset_name(key) if self.cfg.strip_product else key,
                urls=(self.object_url(bucket, key),),
                size=size,
                md5=md5,
                etag=etag,
                extra={
                    "last_modified": modified.isoformat() if modified is not None else None,
                    "multipart": bool(etag and "-" in etag),
                    "path": f"{bucket}/{key}",
                },
            )
