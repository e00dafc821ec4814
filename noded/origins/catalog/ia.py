"""Internet Archive: `/metadata/{identifier}` JSON, downloads via `/download/{identifier}/{name}`.

`files[]` entries carry `name`, `source` (original / derivative / metadata), `size` and `mtime` as
strings (some entries have no size), `md5` and `sha1`. Originals only unless derivatives are asked for.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from noded.core.config import InternetArchiveConfig
from noded.origins.catalog.base import CatalogError, EntryCollector, HttpGetter, Limits, Listing, parse_json

NAME = "ia"
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
        sources = {"original", "derivative"} if self.cfg.include_derivatives else {"original"}
        for ident in self.cfg.identifiers:
            if not _IDENT.match(ident):
                raise CatalogError(f"identifier {ident[:120]!r} is not a valid archive.org identifier")
            reply = await self.http.get_bytes(
                f"{self.cfg.base_url}/metadata/{ident}",
                channel=NAME,
                headers={"Accept": "application/json"},
                max_bytes=self.limits.max_page_bytes,
            )
            if reply.status != 200:
                raise CatalogError(f"metadata of {ident} answered HTTP {reply.status}")
            out.page(len(reply.body))
            meta: Any = parse_json(reply.body, f"metadata of {ident}")
            if not isinstance(meta, dict):
                raise CatalogError(f"metadata of {ident} is not a JSON object")
            if not meta:  # the API answers {} for an unknown identifier
                raise CatalogError(f"identifier {ident} does not exist (empty metadata)")
            files = meta.get("files")
            if not isinstance(files, list):
                raise CatalogError(f"metadata of {ident} has no files list")
            if len(files) > self.limits.max_entries:
                raise CatalogError(f"metadata of {ident} lists {len(files)} files (max {self.limits.max_entries})")
            for f in files:
                if not isinstance(f, dict):
                    out.reject(f, "file entry is not an object")
                    continue
                name = f.get("name")
                if f.get("source") not in sources:
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
        return out.listing
