"""POST /v1/add: fetch a dataset from the public swarm (magnet, infohash, .torrent or its URL)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.auth import require_token
from noded.api.errors import ApiError, read_json
from noded.p2p import torrent as T
from noded.p2p.swarm import AddError, torrent_input


async def add(request: web.Request) -> web.Response:
    """Body {"source": MAGNET|INFOHASH|URL} or {"torrent": base64}; 202 with the item once the torrent is
    known (a magnet's metadata comes from the swarm first), then the pull pipeline fetches it."""
    require_token(request)
    swarm: Any = request.app[NODE_KEY].get("swarm")
    if swarm is None:
        raise ApiError(503, "BitTorrent is off on this node (bittorrent.enabled = false)")
    try:
        text, torrent = torrent_input(await read_json(request))
        out = await swarm.add(text, torrent)
    except AddError as e:
        raise ApiError(422 if str(e).startswith("no metadata") else 400, str(e)) from None
    except T.TorrentError as e:
        raise ApiError(400, f"refused: {e}") from None
    return web.json_response(out, status=202)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/add", add)
