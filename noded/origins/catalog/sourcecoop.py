"""Source Cooperative: anonymous S3 ListObjectsV2 (path-style), continuation-token pagination.

A single-part ETag is the object's md5; a multipart ETag ("<hex>-<parts>") is not, so it is kept as
an ETag only and never compared with a file md5 (verification then relies on the size, plus any md5
published elsewhere, e.g. in the organisation's torrent).
"""

from __future__ import annotations

from urllib.parse import quote
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from noded.core.config import SourceCoopConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, is_hex

NAME = "sourcecoop"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _text(el: Element, tag: str) -> str | None:
    found = el.find(_NS + tag)
    if found is None:
        found = el.find(tag)  # some S3 clones omit the namespace
    return None if found is None or found.text is None else found.text


def split_prefix(bucket: str, prefix: str) -> tuple[str, str]:
    """(bucket, key prefix). Through the data.source.coop proxy the account is the first segment."""
    prefix = prefix.lstrip("/")
    if bucket:
        return bucket, prefix
    account, _, rest = prefix.partition("/")
    if not account:
        raise CatalogError(f"prefix {prefix!r} names no account (set origins.sourcecoop.bucket or use account/...)")
    return account, rest


def parse_page(body: bytes) -> tuple[list[tuple[str, str | None, str | None, str | None]], str | None]:
    """([(key, size, etag, last_modified)], next continuation token or None)."""
    try:
        root = SafeET.fromstring(body)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as e:
        raise CatalogError(f"malformed ListObjectsV2 XML: {e}") from None
    if root.tag not in (_NS + "ListBucketResult", "ListBucketResult"):
        raise CatalogError(f"unexpected XML root element {root.tag[:80]!r}")
    rows = []
    for c in list(root.findall(_NS + "Contents")) + list(root.findall("Contents")):
        key = _text(c, "Key")
        if key is None:
            raise CatalogError("a Contents element has no Key")
        etag = _text(c, "ETag")
        rows.append((key, _text(c, "Size"), etag.strip('"') if etag else None, _text(c, "LastModified")))
    truncated = (_text(root, "IsTruncated") or "false").strip().lower() == "true"
    token = _text(root, "NextContinuationToken")
    if truncated and not token:
        raise CatalogError("IsTruncated is true but NextContinuationToken is missing")
    return rows, token if truncated else None


class SourceCoopAdapter:
    name = NAME

    def __init__(self, cfg: SourceCoopConfig, http: HttpGetter, limits: Limits) -> None:
        self.cfg = cfg
        self.http = http
        self.limits = limits

    def owns(self, url: str) -> bool:
        return url.startswith(self.cfg.endpoint + "/")

    def object_url(self, bucket: str, key: str) -> str:
        return f"{self.cfg.endpoint}/{quote(bucket)}/{quote(key)}"

    async def list(self) -> Listing:
        out = EntryCollector(NAME, self.limits)
        for configured in self.cfg.prefixes or [""]:
            bucket, prefix = split_prefix(self.cfg.bucket, configured)
            token: str | None = None
            seen_tokens: set[str] = set()
            while True:
                params = {"list-type": "2", "max-keys": str(self.cfg.max_keys_per_page)}
                if prefix:
                    params["prefix"] = prefix
                if token:
                    params["continuation-token"] = token
                reply = await self.http.get_bytes(
                    f"{self.cfg.endpoint}/{quote(bucket)}",
                    channel=NAME,
                    params=params,
                    max_bytes=self.limits.max_page_bytes,
                )
                if reply.status != 200:
                    raise CatalogError(f"listing {bucket}/{prefix} answered HTTP {reply.status}")
                out.page(len(reply.body))
                rows, token = parse_page(reply.body)
                for key, size, etag, modified in rows:
                    if key.endswith("/") and (size in (None, "0")):
                        continue  # a "directory marker" object, not a file
                    md5 = etag if etag and is_hex(etag, 32) else None
                    out.add(
                        key,
                        urls=(self.object_url(bucket, key),),
                        size=size,
                        md5=md5,
                        etag=etag,
                        extra={"last_modified": modified, "multipart": bool(etag and "-" in etag)},
                    )
                if token is None:
                    break
                if token in seen_tokens:
                    raise CatalogError("continuation token repeats: the listing would never end")
                seen_tokens.add(token)
        return out.listing
