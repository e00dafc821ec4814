"""Reading HTTP bodies from outside with a byte cap, and JSON bodies through the bounded reader.

Works on aiohttp's StreamReader, so the same code reads a client response (peers, mirrors) and a server
request (the API). A body is read whole up to the cap, never cut at what happens to be buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from noded.core import jsonread

CHUNK = 64 * 1024
# Above this, parsing moves off the event loop (a few MiB of JSON take tens of milliseconds).
PARSE_OFF_LOOP = 256 * 1024


class BodyTooLarge(ValueError):
    def __init__(self, what: str, cap: int) -> None:
        super().__init__(f"{what} too large (limit {cap} bytes)")
        self.cap = cap


async def read_capped(
    content: aiohttp.StreamReader, cap: int, content_length: int | None = None, what: str = "body"
) -> bytes:
    """The whole body, or BodyTooLarge as soon as it is known to exceed `cap` (before reading it, when the
    length is announced)."""
    if content_length is not None and content_length > cap:
        raise BodyTooLarge(what, cap)
    buf = bytearray()
    async for chunk in content.iter_chunked(CHUNK):
        buf += chunk
        if len(buf) > cap:
            raise BodyTooLarge(what, cap)
    return bytes(buf)


async def parse_json(raw: bytes, limits: jsonread.JsonLimits, what: str) -> Any:
    """`jsonread.loads`, off the loop for large bodies."""
    if len(raw) <= PARSE_OFF_LOOP:
        return jsonread.loads(raw, limits, what)
    return await asyncio.get_running_loop().run_in_executor(None, jsonread.loads, raw, limits, what)


async def read_json(
    content: aiohttp.StreamReader, limits: jsonread.JsonLimits, content_length: int | None = None, what: str = "body"
) -> Any:
    """A JSON body read with `limits`; every refusal is a `jsonread.JsonInputError`."""
    try:
        raw = await read_capped(content, limits.max_bytes, content_length, what)
    except BodyTooLarge as e:
        raise jsonread.JsonInputError("too_large", str(e)) from None
    return await parse_json(raw, limits, what)


async def response_json(resp: aiohttp.ClientResponse, limits: jsonread.JsonLimits, what: str = "answer") -> Any:
    return await read_json(resp.content, limits, resp.content_length, what)
