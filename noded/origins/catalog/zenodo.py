"""Zenodo: single records, the latest version of a concept, and all records of a community.

Record JSON: `files[]` with `key`, `size`, `checksum` ("md5:<hex>") and `links.self` (the content
link). Community search pages: `hits.hits[]` of records and `links.next`. The guest rate limit (60
requests/min) and `X-RateLimit-*` headers are honoured by the shared HTTP client per host; search
requests (community pages) are further spaced to `search_requests_per_minute` (Zenodo allows 30).

A withdrawn (410), restricted (403, or `access.files = "restricted"`) or missing record is rejected
alone, with the reason; the other records are used.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote, urlsplit

from noded.core.config import ZenodoConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, parse_json

NAME = "zenodo"
_STATUS_REASONS = {
    403: " (restricted)",
    404: " (does not exist)",
    410: " (withdrawn or deleted)",
}
PAGE_SIZE = 25  # Zenodo's guest maximum for search pages


class ZenodoAdapter:
    name = NAME

    def __init__(self, cfg: ZenodoConfig, http: HttpGetter, limits: Limits) -> None:
        self.cfg = cfg
        self.http = http
        self.limits = limits
        self._host = urlsplit(cfg.base_url).netloc
        self._next_search = 0.0  # monotonic time of the next allowed search request

    def owns(self, url: str) -> bool:
        # File links live under /api/ (records/<id>/files/<key>/content, or legacy /api/files/...).
        return url.startswith(self.cfg.base_url + "/api/")

    async def _search_slot(self) -> None:
        """Search endpoints have their own, lower limit than record GETs."""
        interval = 60.0 / self.cfg.search_requests_per_minute
        now = time.monotonic()
        slot = max(now, self._next_search)
        self._next_search = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _get(self, url: str, what: str, params: dict[str, str] | None = None) -> Any:
        if urlsplit(url).netloc != self._host:
            raise CatalogError(f"{what}: link {url[:200]!r} leaves {self._host}")
        reply = await self.http.get_bytes(
            url,
            channel=NAME,
            params=params,
            headers={"Accept": "application/json"},
            max_bytes=self.limits.max_page_bytes,
        )
        if reply.status != 200:
            why = _STATUS_REASONS.get(reply.status, "")
            raise CatalogError(f"{what} answered HTTP {reply.status}{why}")
        return reply.body

    async def list(self) -> Listing:
        out = EntryCollector(NAME, self.limits)
        for rid in self.cfg.records:
            url = f"{self.cfg.base_url}/api/records/{rid}"
            await out.unit(f"record {rid}", self._one(out, url, f"record {rid}"))
        for cid in self.cfg.concepts:
            # Resolves (by redirect) to the newest published version of the concept.
            url = f"{self.cfg.base_url}/api/records/{cid}/versions/latest"
            await out.unit(f"concept {cid}", self._one(out, url, f"concept {cid}"))
        for slug in self.cfg.communities:
            await out.unit(f"community {slug}", self._community(out, slug))
        return out.finish()

    async def _one(self, out: EntryCollector, url: str, what: str) -> None:
        body = await self._get(url, what)
        out.page(len(body))
        rec = parse_json(body, what)
        if not isinstance(rec, dict):
            raise CatalogError(f"{what}: a record is not a JSON object")
        access = rec.get("access")
        if isinstance(access, dict) and access.get("files") == "restricted":
            raise CatalogError(f"{what}: its files are restricted")
        self._record(out, rec, what)

    async def _community(self, out: EntryCollector, slug: str) -> None:
        what = f"community {slug}"
        next_url: str | None = f"{self.cfg.base_url}/api/communities/{quote(slug)}/records"
        params: dict[str, str] | None = {"page": "1", "size": str(PAGE_SIZE), "sort": "newest"}
        seen: set[str] = set()
        while next_url:
            await self._search_slot()
            body = await self._get(next_url, what, params)
            out.page(len(body))
            page = parse_json(body, what)
            hits = page.get("hits") if isinstance(page, dict) else None
            records = hits.get("hits") if isinstance(hits, dict) else None
            if not isinstance(records, list):
                raise CatalogError(f"{what}: page has no hits.hits list")
            for rec in records:
                access = rec.get("access") if isinstance(rec, dict) else None
                if isinstance(access, dict) and access.get("files") == "restricted":
                    out.reject(f"record {rec.get('id')}", "its files are restricted")
                    continue
                try:
                    self._record(out, rec, what)
                except CatalogError as e:  # one malformed record in a page: that record only
                    out.reject(f"{what}: record", str(e))
            links = page.get("links")
            nxt = links.get("next") if isinstance(links, dict) else None
            if nxt is not None and not isinstance(nxt, str):
                raise CatalogError(f"{what}: links.next is not a string")
            if nxt in seen:
                raise CatalogError(f"{what}: links.next repeats: the listing would never end")
            if nxt:
                seen.add(nxt)
            next_url, params = nxt, None  # the next link carries its own query

    def _record(self, out: EntryCollector, rec: Any, what: str) -> None:
        if not isinstance(rec, dict):
            raise CatalogError(f"{what}: a record is not a JSON object")
        files = rec.get("files", [])
        if isinstance(files, dict):  # InvenioRDM embeds {"entries": [...]} in some responses
            files = files.get("entries", [])
        if not isinstance(files, list):
            raise CatalogError(f"{what}: files is not a list")
        rid = rec.get("id")
        # Records of one concept are versions of one dataset: a newer record id is a newer release.
        concept = rec.get("conceptrecid")
        release = (
            {"release_group": f"zenodo-concept:{concept}", "release_order": rid}
            if isinstance(rid, int) and isinstance(concept, str | int) and str(concept).isdigit()
            else {}
        )
        for f in files:
            if not isinstance(f, dict):
                out.reject(f, "file entry is not an object")
                continue
            key = f.get("key", f.get("filename"))
            links = f.get("links")
            url = (links.get("self") or links.get("content")) if isinstance(links, dict) else None
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                out.reject(key, "file entry has no http(s) links.self")
                continue
            checksum = f.get("checksum")
            md5 = None
            if isinstance(checksum, str) and ":" in checksum:
                algo, _, digest = checksum.partition(":")
                if algo.lower() == "md5":
                    md5 = digest
            elif checksum is not None:
                out.reject(key, f"checksum {str(checksum)[:80]!r} is not 'algo:hex'")
                continue
            out.add(key, urls=(url,), size=f.get("size"), md5=md5, extra={"record": rid, **release})
