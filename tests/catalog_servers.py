"""Real aiohttp servers speaking the shapes of the Zenodo and Internet Archive APIs (and raw S3 XML).

The JSON follows the public APIs: Zenodo records carry `files[]` with `key`, `size`, `checksum`
("md5:<hex>") and `links.self`; community searches answer `hits.hits[]` with `links.next`; concept
ids redirect (`/versions/latest`) to the newest record; archive.org answers `/metadata/{id}` with
`files[]` whose `size` and `mtime` are strings. Every request is logged with its arrival time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web


@dataclass
class ApiLog:
    requests: list[tuple[float, str]] = field(default_factory=list)

    def add(self, request: web.Request) -> None:
        self.requests.append((time.monotonic(), request.path_qs))


def zenodo_file(base: str, rid: int, key: str, data: bytes | None = None, size: int | None = None) -> dict[str, Any]:
    data = data if data is not None else key.encode()
    return {
        "id": hashlib.md5(key.encode()).hexdigest(),
        "key": key,
        "size": len(data) if size is None else size,
        "checksum": "md5:" + hashlib.md5(data).hexdigest(),
        "links": {"self": f"{base}/api/records/{rid}/files/{key}/content"},
    }


def zenodo_record(base: str, rid: int, files: list[dict[str, Any]], concept: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "recid": str(rid),
        "conceptrecid": str(concept or rid - 1),
        "doi": f"10.5281/zenodo.{rid}",
        "metadata": {"title": f"Record {rid}", "resource_type": {"type": "dataset"}},
        "files": files,
        "links": {"self": f"{base}/api/records/{rid}", "latest": f"{base}/api/records/{rid}/versions/latest"},
    }


class ZenodoServer:
    """`records` by id; `concepts` concept id -> latest record id; `communities` slug -> record ids."""

    def __init__(self, page_size: int = 2) -> None:
        self.records: dict[int, Any] = {}
        self.concepts: dict[int, int] = {}
        self.communities: dict[str, list[int]] = {}
        self.raw: dict[str, bytes] = {}  # path_qs -> body to answer instead (malformed pages)
        self.page_size = page_size
        self.log = ApiLog()
        self.rate_headers: dict[str, str] = {}
        self.status: dict[int, int] = {}  # record id -> error status (410 withdrawn, 403 restricted)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/records/{rid}", self.record)
        app.router.add_get("/api/records/{rid}/versions/latest", self.latest)
        app.router.add_get("/api/communities/{slug}/records", self.community)
        return app

    def _json(self, request: web.Request, body: Any) -> web.Response:
        raw = self.raw.get(request.path_qs)
        headers = {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "59", **self.rate_headers}
        if raw is not None:
            return web.Response(body=raw, content_type="application/json", headers=headers)
        return web.json_response(body, headers=headers)

    async def record(self, request: web.Request) -> web.Response:
        self.log.add(request)
        rid = int(request.match_info["rid"])
        if rid in self.status:
            code = self.status[rid]
            message = {410: "The record has been deleted.", 403: "Permission denied."}.get(code, "Error")
            return web.json_response({"status": code, "message": message}, status=code)
        if rid not in self.records:
            return web.json_response({"status": 404, "message": "PID does not exist."}, status=404)
        return self._json(request, self.records[rid])

    async def latest(self, request: web.Request) -> web.Response:
        self.log.add(request)
        rid = self.concepts.get(int(request.match_info["rid"]))
        if rid is None:
            return web.json_response({"status": 404}, status=404)
        raise web.HTTPFound(f"/api/records/{rid}")

    async def community(self, request: web.Request) -> web.Response:
        self.log.add(request)
        slug = request.match_info["slug"]
        ids = self.communities.get(slug, [])
        page = int(request.query.get("page", "1"))
        size = min(int(request.query.get("size", "10")), self.page_size)
        chunk = ids[(page - 1) * size : page * size]
        base = f"{request.scheme}://{request.host}"
        links = {"self": f"{base}/api/communities/{slug}/records?page={page}&size={size}"}
        if page * size < len(ids):
            links["next"] = f"{base}/api/communities/{slug}/records?page={page + 1}&size={size}"
        body = {
            "hits": {"hits": [self.records[i] for i in chunk], "total": len(ids)},
            "links": links,
            "sortBy": "newest",
        }
        return self._json(request, body)


class ArchiveServer:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}
        self.raw: dict[str, bytes] = {}
        self.log = ApiLog()
        self.hang: asyncio.Event | None = None  # set: metadata requests hang until it is set
        self.collections: dict[str, list[str]] = {}  # collection -> identifiers (the scrape API)
        self.scrape_page = 2  # identifiers per scrape page, small so the cursor is exercised

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metadata/{ident}", self.metadata)
        app.router.add_get("/services/search/v1/scrape", self.scrape)
        return app

    async def scrape(self, request: web.Request) -> web.Response:
        """The scrape API: `q=collection:(X)`, `fields`, `count` (>= 100), an opaque `cursor`."""
        self.log.add(request)
        q = request.query.get("q", "")
        if not q.startswith("collection:(") or int(request.query.get("count", "0")) < 100:
            return web.json_response({"error": "bad query"}, status=400)
        ids = self.collections.get(q[len("collection:(") : -1], [])
        start = int(request.query.get("cursor", "c0")[1:])
        chunk = ids[start : start + self.scrape_page]
        body: dict[str, Any] = {"items": [{"identifier": i} for i in chunk], "count": len(chunk), "total": len(ids)}
        if start + self.scrape_page < len(ids):
            body["cursor"] = f"c{start + self.scrape_page}"
        return web.json_response(body)

    async def metadata(self, request: web.Request) -> web.Response:
        self.log.add(request)
        ident = request.match_info["ident"]
        if self.hang is not None:
            await self.hang.wait()
        if ident in self.raw:
            return web.Response(body=self.raw[ident], content_type="application/json")
        return web.json_response(self.items.get(ident, {}))  # archive.org answers {} for unknown ids


def ia_file(name: str, data: bytes | None, source: str = "original", with_size: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "source": source, "mtime": "1735689600", "format": "Unknown"}
    if data is not None:
        d["md5"] = hashlib.md5(data).hexdigest()
        d["sha1"] = hashlib.sha1(data).hexdigest()
        d["crc32"] = "00000000"
        if with_size:
            d["size"] = str(len(data))
    if source == "derivative":
        d["original"] = "x"
    return d


def ia_metadata(ident: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "created": 1735689600,
        "d1": "ia800000.us.archive.org",
        "dir": f"/0/items/{ident}",
        "files": files,
        "files_count": len(files),
        "item_size": 0,
        "metadata": {"identifier": ident, "mediatype": "data", "collection": ["opensource"]},
        "server": "ia800000.us.archive.org",
    }


def s3_page(
    keys: list[tuple[str, int, str]], token: str | None, next_token: str | None, name: str = "b", url: bool = False
) -> bytes:
    """A ListObjectsV2 result, written by hand so hostile keys can be put in it. `url`: as S3 answers
    `encoding-type=url` (keys percent-encoded, so even a NUL survives the XML); else raw, as S3 does
    without it (a NUL then makes the page unreadable)."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
        f"<Name>{name}</Name><Prefix></Prefix><KeyCount>{len(keys)}</KeyCount><MaxKeys>1000</MaxKeys>",
        f"<IsTruncated>{'true' if next_token else 'false'}</IsTruncated>",
    ]
    if url:
        parts.append("<EncodingType>url</EncodingType>")
        keys = [(quote(k, safe="/"), size, etag) for k, size, etag in keys]
    if token:
        parts.append(f"<ContinuationToken>{token}</ContinuationToken>")
    if next_token:
        parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
    for key, size, etag in keys:
        parts.append(
            f"<Contents><Key>{escape(key)}</Key><LastModified>2025-01-01T00:00:00.000Z</LastModified>"
            f"<ETag>&quot;{etag}&quot;</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
        )
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


class RawS3Server:
    """Answers listing pages from `pages` (continuation token or "" -> body), or renders `listings`
    (token -> (keys, next token)) per request, percent-encoding keys when `encoding-type=url` is asked."""

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        self.listings: dict[str, tuple[list[tuple[str, int, str]], str | None]] = {}
        self.log = ApiLog()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{bucket}", self.list)
        return app

    async def list(self, request: web.Request) -> web.Response:
        self.log.add(request)
        token = request.query.get("continuation-token", "")
        body = self.pages.get(token)
        if token in self.listings:
            keys, nxt = self.listings[token]
            url = request.query.get("encoding-type") == "url"
            body = s3_page(keys, token or None, nxt, request.match_info["bucket"], url=url)
        if body is None:
            return web.Response(status=400, text="bad token")
        return web.Response(body=body, content_type="application/xml")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()
