"""Serving a file or an in-memory body with validators, conditional requests and byte ranges.

The rules are `noded.core.httpcond`'s; this module does the I/O: stat and open off the loop, sendfile
for a whole file or one range, chunked reads for the parts of a multipart/byteranges answer. Every
answer reports the body bytes actually handed to the socket, also when the client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from aiohttp import web

from noded.core import safefs
from noded.core.httpcond import Validators, if_range_allows, multipart_plan, parse_ranges, precondition

CHUNK = 1024 * 1024
FALLBACK_TYPE = "application/octet-stream"

OnSent = Callable[[int, int, bool], None]  # (status, body bytes sent, aborted)


def file_validators(st: os.stat_result) -> Validators:
    return Validators(f'"{st.st_mtime_ns:x}-{st.st_size:x}"', int(st.st_mtime))


class _Body:
    """What is being sent: an open file or bytes; read(first, n) returns up to n bytes at first."""

    def __init__(self, size: int, fobj: IO[bytes] | None = None, data: bytes | None = None) -> None:
        self.size, self.fobj, self.data = size, fobj, data

    def read(self, first: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[first : first + n]
        assert self.fobj is not None
        self.fobj.seek(first)
        return self.fobj.read(n)


async def serve_file(
    request: web.Request,
    path: Path,
    *,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    on_sent: OnSent | None = None,
) -> web.StreamResponse:
    """A regular file, or 404 when it is not one (anymore)."""
    loop = asyncio.get_running_loop()

    def open_file() -> tuple[IO[bytes], os.stat_result]:
        # Never through a symlink, never anything but a regular file (also one swapped in after a check).
        f = os.fdopen(safefs.open_regular(path), "rb")
        try:
            st = os.fstat(f.fileno())  # the stat of what we opened, not of what the path names later
        except BaseException:
            f.close()
            raise
        return f, st

    try:
        fobj, st = await loop.run_in_executor(None, open_file)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, safefs.UnsafeFile):
        raise web.HTTPNotFound(text="not found\n") from None
    try:
        ctype = content_type or mimetypes.guess_type(path.name)[0] or FALLBACK_TYPE
        body = _Body(st.st_size, fobj=fobj)
        return await _answer(request, body, file_validators(st), ctype, headers, on_sent)
    finally:
        await loop.run_in_executor(None, fobj.close)


async def serve_bytes(
    request: web.Request,
    data: bytes,
    validators: Validators,
    *,
    content_type: str,
    headers: Mapping[str, str] | None = None,
    on_sent: OnSent | None = None,
) -> web.StreamResponse:
    return await _answer(request, _Body(len(data), data=data), validators, content_type, headers, on_sent)


async def _answer(
    request: web.Request,
    body: _Body,
    v: Validators,
    ctype: str,
    headers: Mapping[str, str] | None,
    on_sent: OnSent | None,
) -> web.StreamResponse:
    resp = web.StreamResponse()
    if headers:
        resp.headers.update(headers)
    resp.headers["ETag"] = v.etag
    resp.headers["Last-Modified"] = v.last_modified_http
    resp.headers["Accept-Ranges"] = "bytes"
    sent = _Sent()
    aborted = True
    try:
        cond = precondition(request.headers, v, request.method)
        ranges = None
        # Range is defined for GET only (RFC 9110 section 14.2): HEAD describes the whole representation.
        ranged = request.method == "GET" and "Range" in request.headers
        if cond is None and ranged and if_range_allows(request.headers.get("If-Range"), v):
            ranges = parse_ranges(request.headers.get("Range"), body.size)
        if cond is not None or ranges == []:
            if cond is None:
                cond = 416
                resp.headers["Content-Range"] = f"bytes */{body.size}"
            resp.set_status(cond)
            if cond != 304:
                resp.content_length = 0
            await resp.prepare(request)
            await resp.write_eof()
            aborted = False
            return resp
        send_body = request.method != "HEAD"
        if ranges is not None and len(ranges) > 1:
            plan = multipart_plan(ranges, body.size, ctype, secrets.token_hex(16))
            resp.set_status(206)
            resp.headers["Content-Type"] = plan.content_type
            resp.content_length = plan.length
            await resp.prepare(request)
            if send_body:
                for part_head, first, last in plan.parts:
                    await resp.write(part_head)
                    await _write_range(request, resp, body, first, last, sent, sendfile=False)
                await resp.write(plan.trailer)
        else:
            resp.content_type = ctype
            if ranges is None:
                first, last = 0, body.size - 1
            else:
                ((first, last),) = ranges
                resp.set_status(206)
                resp.headers["Content-Range"] = f"bytes {first}-{last}/{body.size}"
            resp.content_length = last - first + 1
            await resp.prepare(request)
            if send_body and last >= first:
                await _write_range(request, resp, body, first, last, sent, sendfile=True)
        await resp.write_eof()
        aborted = False
        return resp
    finally:
        if on_sent is not None:
            on_sent(resp.status, sent.n, aborted)


class _Sent:
    n = 0


async def _write_range(
    request: web.Request, resp: web.StreamResponse, body: _Body, first: int, last: int, sent: _Sent, *, sendfile: bool
) -> None:
    """Bytes first..last (inclusive) of the body, counted into `sent` as they reach the socket."""
    count = last - first + 1
    loop = asyncio.get_running_loop()
    fobj = body.fobj
    if sendfile and fobj is not None and request.transport is not None:
        try:
            await loop.sendfile(request.transport, fobj, first, count)
            sent.n += count
            return
        except NotImplementedError:
            pass
        except BaseException:
            # sendfile leaves the file offset just past what the kernel took, also when it fails midway.
            with contextlib.suppress(OSError, ValueError):
                sent.n += max(0, min(count, fobj.tell() - first))
            raise
    done = 0
    while done < count:
        chunk = await loop.run_in_executor(None, body.read, first + done, min(CHUNK, count - done))
        if not chunk:
            raise ConnectionResetError("the file shrank while it was being sent")
        await resp.write(chunk)
        done += len(chunk)
        sent.n += len(chunk)
