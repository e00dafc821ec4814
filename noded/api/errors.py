"""JSON errors for every failure, never an HTML page or a bare 500."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from noded.core import jsonread
from noded.core.httpread import BodyTooLarge, parse_json, read_capped
from noded.core.logs import get_logger

log = get_logger("noded.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message, **extra}}, status=status)


class ApiError(web.HTTPException):
    """Raise from a handler to answer a JSON error with a clear message."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": {"status": status, "message": message, **extra}}),
            content_type="application/json",
        )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size
        return json_error(413, f"request body too large (limit {limit} bytes)")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.content_type == "application/json":
            raise
        return json_error(e.status, e.reason)
    except json.JSONDecodeError as e:
        return json_error(400, f"malformed JSON: {e.msg} at position {e.pos}")
    except jsonread.JsonInputError as e:
        return json_error(413 if e.too_large else 400, str(e))
    except Exception:
        log.exception("api.unhandled", path=request.path, method=request.method)
        return json_error(500, "internal error; see the node's log")


# Request bodies are small documents (reports, overrides): shallow, with ordinary numbers.
API_DEPTH = 32


async def read_json(request: web.Request) -> Any:
    """The request body as JSON through the bounded reader: 413 over the body cap, 400 for anything the
    reader refuses (malformed, too deep, huge numbers, not UTF-8, lone surrogates), 415 for another type."""
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type}")
    limits = jsonread.JsonLimits(max_bytes=request.app._client_max_size, max_depth=API_DEPTH)
    try:
        raw = await read_capped(request.content, limits.max_bytes, request.content_length, "request body")
        # An empty body is no document: handlers answer what they expected instead.
        return await parse_json(raw, limits, "request body") if raw else None
    except BodyTooLarge as e:
        raise ApiError(413, str(e)) from None
    except jsonread.JsonInputError as e:
        raise ApiError(413 if e.too_large else 400, str(e)) from None
