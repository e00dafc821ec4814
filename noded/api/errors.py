"""JSON errors for every failure, never an HTML page or a bare 500."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

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
    except Exception:
        log.exception("api.unhandled", path=request.path, method=request.method)
        return json_error(500, "internal error; see the node's log")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, with a 400/415 that says what is wrong."""
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type}")
    raw = await request.read()
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
