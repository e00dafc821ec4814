"""Internet Archive: `/metadata/{identifier}` JSON, downloads via `/download/{identifier}/{name}`.

`files[]` entries carry `name`, `source` (original / derivative / metadata), `size` and `mtime` as
strings (some entries have no size), `md5` and `sha1`. Originals only unless derivatives are asked for.
Files the Archive generates about an item (`<id>_files.xml`, `_meta.xml`, ...: `skip_suffixes`, and
every `source = metadata` file) are skipped; `private` files (401/403 for everyone) are rejected with
that reason. Collections are listed through the scrape API (`/services/search/v1/scrape`, cursor
paging). A dark, unknown or broken identifier is rejected alone; the others are used.
"""

from __future__ import annotations

import builtins
import re
from typing import Any
from urllib.parse import quote

from noded.core.config import InternetArchiveConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, parse_json

NAME = "ia"
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SCRAPE_PAGE = 1000  # identifiers per scrape request (the API's minimum is 100, maximum 10,000)


class InternetArchiveAdapter:
    name = NAME

    def __init__(self, cfg: InternetArchiveConfig, http: HttpGetter, limits: Limits) -> None:
        self.cfg = cfg
        self.http = http
        self.limits = limits

    def owns(self, url: str) -> bool:
        return url.startswith(self.cfg.base_url + "/download/")

    async def list(self) -> Listing:
        out = EntryCollector(NAME, self.limits)
        idents: builtins.list[str] = [*self.cfg.identifiers]
        for coll in self.cfg.collections:
            found: builtins.list[str] = []
            await out.unit(f"collection {coll}", self._scrape(out, coll, found))
            idents += [i for i in found if i not in idents]
        for ident in idents:
            await out.unit(f"identifier {ident}", self._item(out, ident))
        return out.finish()

    async def _get_json(self, out: EntryCollector, url: str, what: str, params: dict[str, str] | None = None) -> Any:
        reply = await self.http.get_bytes(
            url,
            channel=NAME,
            params=params,
            headers={"Accept": "application/json"},
            max_bytes=self.limits.max_page_bytes,
        )
        if reply.status != 200:
            raise CatalogError(f"{what} answered HTTP {reply.status}")
        out.page(len(reply.body))
        return parse_json(reply.body, what)

    async def _scrape(self, out: EntryCollector, coll: str, found: builtins.list[str]) -> None:
        if not _IDENT.match(coll):
            raise CatalogError(f"collection {coll[:120]!r} is not a valid archive.org identifier")
        what = f"collection {coll}"
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params = {"q": f"collection:({coll})", "fields": "identifier", "count": str(SCRAPE_PAGE)}
            if cursor:
                params["cursor"] = cursor
            page = await self._get_json(out, f"{self.cfg.base_url}/services/search/v1/scrape", what, params)
            items = page.get("items") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise CatalogError(f"{what}: scrape page has no items list")
            for it in items:
                ident = it.get("identifier") if isinstance(it, dict) else None
                if not isinstance(ident, str) or not _IDENT.match(ident):
                    out.reject(f"{what}: {str(ident)[:100]}", "not a valid archive.org identifier")
                    continue
                found.append(ident)
            if len(found) > self.limits.max_entries:
                raise CatalogError(f"{what} lists more than {self.limits.max_entries} identifiers")
            nxt = page.get("cursor")
            if not nxt:
                return
            if not isinstance(nxt, str) or nxt in seen:
                raise CatalogError(f"{what}: cursor repeats or is not a string: the listing would never end")
            seen.add(nxt)
            cursor = nxt

    async def _item(self, out: EntryCollector, ident: str) -> None:
        if not _IDENT.match(ident):
            raise CatalogError(f"identifier {ident[:120]!r} is not a valid archive.org identifier")
        what = f"metadata of {ident}"
        meta = await self._get_json(out, f"{self.cfg.base_url}/metadata/{ident}", what)
        if not isinstance(meta, dict):
            raise CatalogError(f"{what} is not a JSON object")
        if not meta:  # the API answers {} for an unknown identifier
            raise CatalogError(f"identifier {ident} does not exist (empty metadata)")
        if meta.get("is_dark"):
            raise CatalogError(f"identifier {ident} is dark (taken down by the Internet Archive)")
        files = meta.get("files")
        if not isinstance(files, list):
            raise CatalogError(f"{what} has no files list")
        if len(files) > self.limits.max_entries:
            raise CatalogError(f"{what} lists {len(files)} files (max {self.limits.max_entries})")
        sources = {"original", "derivative"} if self.cfg.include_derivatives else {"original"}
        skip = tuple(self.cfg.skip_suffixes)
        for f in files:
            if not isinstance(f, dict):
                out.reject(f, "file entry is not an object")
                continue
            name = f.get("name")
            if f.get("source") not in sources:
                continue
            if isinstance(name, str) and skip and name.endswith(skip):
                continue  # generated by the Archive about the item, not a dataset
            if str(f.get("private", "")).lower() == "true":
                out.reject(name, "private file: the Internet Archive serves it to nobody")
                continue
            mtime: float | None = None
            raw_mtime = f.get("mtime")
            if isinstance(raw_mtime, str) and raw_mtime.replace(".", "", 1).isdigit():
                mtime = float(raw_mtime)
            url = f"{self.cfg.base_url}/download/{ident}/{quote(name)}" if isinstance(name, str) else ""
            out.add(
                name,
                urls=(url,),
                size=f.get("size"),
                md5=f.get("md5"),
                sha1=f.get("sha1"),
                mtime=mtime,
                extra={"identifier": ident, "source": f.get("source")},
            )
