"""STAC: the organisation's catalogue (static JSON catalogs and stac-geoparquet) as an origin.

Every data asset of every STAC Item is one dataset file: its key is the file name at the end of the
asset's `href` (the name the torrents, Zenodo and IA use), and the `href` plus each `alternate` href
(alternate-assets extension) are its locations. `file:size` and `file:checksum` (a multihash: md5,
sha1 or sha2-256) are what the catalogue publishes about it; an alternate may state its own `file:*`
values, which must agree with the asset's.

Documents are fetched with the node's HTTP client (bounded, paced, retried) and parsed with pystac
(`Catalog`/`Collection`/`Item.from_dict`); stac-geoparquet files are read with pyarrow and
stac-geoparquet (`stac_table_to_items`) in an executor. Catalog links are followed on the root's host
only; asset hrefs may point anywhere over http(s). A bad asset, alternate or item is rejected alone
with a reason; a document that cannot be read fails that refresh of the origin.
"""

from __future__ import annotations

import asyncio
import io
import posixpath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pystac

from noded.core.config import StacConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, parse_json

NAME = "stac"
MAX_HREF = 2048
# Multihash function codes (https://github.com/multiformats/multicodec) -> (field, digest bytes).
MULTIHASH = {0xD5: ("md5", 16), 0x11: ("sha1", 20), 0x12: ("sha256", 32)}


class MultihashError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MultihashError("truncated varint")
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def parse_multihash(value: Any) -> tuple[str, str] | None:
    """("md5"|"sha1"|"sha256", hex digest) of a hex multihash; None for a well-formed one of another
    function; MultihashError when it is not a multihash at all."""
    if not isinstance(value, str) or not value or len(value) > 256 or len(value) % 2:
        raise MultihashError(f"file:checksum {str(value)[:80]!r} is not a hex multihash")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MultihashError(f"file:checksum {value[:80]!r} is not hex") from None
    code, pos = _varint(raw, 0)
    length, pos = _varint(raw, pos)
    digest = raw[pos:]
    if len(digest) != length:
        raise MultihashError(f"file:checksum says {length} digest bytes but has {len(digest)}")
    known = MULTIHASH.get(code)
    if known is None:
        return None
    name, size = known
    if length != size:
        raise MultihashError(f"file:checksum: a {name} digest is {size} bytes, not {length}")
    return name, digest.hex()


def check_href(href: Any, base: str) -> str:
    """An absolute http(s) URL for an asset href, or ValueError naming what is wrong with it."""
    if not isinstance(href, str) or not href:
        raise ValueError("href is missing or not a string")
    if len(href) > MAX_HREF:
        raise ValueError(f"href is longer than {MAX_HREF} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in href):
        raise ValueError("href contains whitespace or control characters")
    url = urljoin(base, href)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"href scheme {parts.scheme!r} is not http(s)")
    if not parts.hostname:
        raise ValueError("href names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("href carries credentials")
    return url


def file_name(url: str) -> str:
    """The dataset's name: the last segment of the URL path."""
    name = unquote(posixpath.basename(urlsplit(url).path))
    if not name:
        raise ValueError("href names a directory, not a file")
    return name


def _geoparquet_items(body: bytes) -> list[dict[str, Any]]:
    """Blocking (executor): the STAC Items of a stac-geoparquet file."""
    import pyarrow.parquet as pq  # heavy imports, only where a geoparquet catalog is configured
    from stac_geoparquet.arrow import stac_table_to_items

    table = pq.read_table(io.BytesIO(body))
    return list(stac_table_to_items(table))


class StacAdapter:
    name = NAME

    def __init__(self, cfg: StacConfig, http: HttpGetter, limits: Limits) -> None:
        self.cfg = cfg
        self.http = http
        self.limits = limits
        self._urls: set[str] = set()  # the asset hrefs of the last complete listing

    def owns(self, url: str) -> bool:
        return url in self._urls

    async def _get(self, url: str, out: EntryCollector, what: str) -> bytes:
        reply = await self.http.get_bytes(url, channel=NAME, max_bytes=self.limits.max_page_bytes)
        if reply.status != 200:
            raise CatalogError(f"{what} {url[:200]} answered HTTP {reply.status}")
        out.page(len(reply.body))
        return reply.body

    async def list(self) -> Listing:
        out = EntryCollector(NAME, self.limits)
        for root in self.cfg.catalogs:
            await self._walk(root, out)
        for url in self.cfg.geoparquet:
            body = await self._get(url, out, "stac-geoparquet")
            try:
                items = await asyncio.get_running_loop().run_in_executor(None, _geoparquet_items, body)
            except Exception as e:  # pyarrow and stac-geoparquet raise many kinds on a bad file
                raise CatalogError(f"stac-geoparquet {url[:200]}: unreadable: {type(e).__name__}: {e}") from None
            for d in items:
                self._item(out, d, url)
        self._urls = {u for e in out.listing.entries for u in e.urls}
        return out.listing

    async def _walk(self, root: str, out: EntryCollector) -> None:
        host = urlsplit(root).netloc
        queue, seen = [root], {root}
        while queue:
            url = queue.pop(0)
            if len(seen) > self.cfg.max_documents:
                raise CatalogError(f"more than {self.cfg.max_documents} catalog documents under {root[:200]}")
            doc = parse_json(await self._get(url, out, "STAC document"), f"STAC document {url[:200]}")
            if not isinstance(doc, dict):
                raise CatalogError(f"STAC document {url[:200]} is not a JSON object")
            kind = doc.get("type")
            if kind == "Feature":
                self._item(out, doc, url)
                continue
            if kind == "FeatureCollection":
                features = doc.get("features")
                if not isinstance(features, list):
                    raise CatalogError(f"ItemCollection {url[:200]} has no features list")
                for d in features:
                    self._item(out, d, url)
                continue
            if kind not in ("Catalog", "Collection"):
                raise CatalogError(f"STAC document {url[:200]} has type {str(kind)[:40]!r}")
            try:
                cat = (pystac.Collection if kind == "Collection" else pystac.Catalog).from_dict(
                    doc, href=url, migrate=False, preserve_dict=True
                )
            except Exception as e:  # pystac raises KeyError/TypeError/STACError on malformed documents
                raise CatalogError(f"STAC {kind} {url[:200]}: {type(e).__name__}: {e}") from None
            for link in cat.links:
                if link.rel not in ("child", "item"):
                    continue
                target = urljoin(url, link.href)
                if urlsplit(target).scheme not in ("http", "https") or urlsplit(target).netloc != host:
                    out.reject(target, f"{link.rel} link leaves the catalog's host {host}")
                    continue
                if target not in seen:
                    seen.add(target)
                    queue.append(target)

    def _item(self, out: EntryCollector, d: Any, base: str) -> None:
        if not isinstance(d, dict):
            out.reject(d, "a STAC item is not a JSON object")
            return
        try:
            item = pystac.Item.from_dict(d, href=None, migrate=False, preserve_dict=True)
        except Exception as e:
            out.reject(d.get("id"), f"not a STAC Item: {type(e).__name__}: {e}")
            return
        for name, asset in item.assets.items():
            extra = asset.extra_fields
            if set(asset.roles or ()) & set(self.cfg.skip_roles):
                continue
            self._asset(out, f"{item.id}/{name}", asset.href, extra, base)

    def _asset(self, out: EntryCollector, label: str, href: Any, fields: dict[str, Any], base: str) -> None:
        try:
            url = check_href(href, base)
            key = file_name(url)
            size, sums = _file_fields(fields)
        except ValueError as e:  # MultihashError too
            out.reject(label, str(e))
            return
        alternates: list[str] = []
        alt = fields.get("alternate")
        for alt_name, a in alt.items() if isinstance(alt, dict) else ():
            where = f"{label} alternate {alt_name}"
            if not isinstance(a, dict):
                out.reject(where, "alternate is not an object")
                continue
            try:
                alt_url = check_href(a.get("href"), base)
                alt_size, alt_sums = _file_fields(a)
            except ValueError as e:
                out.reject(where, str(e))
                continue
            clash = _clash(size, sums, alt_size, alt_sums)
            if clash:
                out.reject(where, f"conflicts with its asset: {clash}")
                continue
            alternates.append(alt_url)
        for u in dict.fromkeys([url, *alternates]):
            out.add(
                key,
                urls=(u,),
                size=size,
                md5=sums.get("md5"),
                sha1=sums.get("sha1"),
                sha256=sums.get("sha256"),
                extra={"stac": label},
            )


def _file_fields(fields: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    sums: dict[str, str] = {}
    raw = fields.get("file:checksum")
    if raw is not None:
        parsed = parse_multihash(raw)
        if parsed is not None:
            sums[parsed[0]] = parsed[1]
    return fields.get("file:size"), sums


def _clash(size: Any, sums: dict[str, str], alt_size: Any, alt_sums: dict[str, str]) -> str | None:
    if size is not None and alt_size is not None and size != alt_size:
        return f"file:size {alt_size} != {size}"
    for k in set(sums) & set(alt_sums):
        if sums[k] != alt_sums[k]:
            return f"{k} {alt_sums[k]} != {sums[k]}"
    return None
