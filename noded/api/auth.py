"""Bearer-token guard for write endpoints."""

from __future__ import annotations

import hmac

from aiohttp import web

from noded.api.errors import ApiError

TOKEN_KEY = web.AppKey("api_token", str)


def require_token(request: web.Request) -> None:
    token = request.app.get(TOKEN_KEY)
    if not token:
        raise ApiError(
            403,
            "write endpoints are disabled: no API token configured (systemd credential api-token or NODED_API_TOKEN)",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing bearer token", hint="send Authorization: Bearer <token>")
    # aiohttp keeps undecodable header bytes as surrogates; encoded back the same way they compare as
    # the bytes the client sent (and never match a token), instead of failing to encode.
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise ApiError(403, "invalid token")
