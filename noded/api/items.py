"""GET /v1/items/{key}: one item, with how many copies of it (and of each of its pieces) the network holds."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from noded.api.app import NODE_KEY
from noded.api.errors import ApiError
from noded.core.component import Node
from noded.core.model import Item, State
from noded.core.store import Store
from noded.p2p.replicas import count, durable_locations

MAX_KEY = 1024


def _basic(store: Store, item: Item) -> tuple[list[str], int]:
    durable = durable_locations(
        md5=item.md5, sha256=item.sha256, size=item.size, pushed=item.pushed, replicas=store.replicas(item.key)
    )
    pieces = store.get_pieces(item.id)
    return durable, (len(pieces[1]) // 20 if pieces else 1)


async def replicas_of(node: Node, item: Item) -> dict[str, Any]:
    """The volunteer's last count when it runs; else durable locations and the peers' inventories."""
    vol: Any = node.components.get("volunteer")
    if vol is not None:
        body = vol.replicas_of(item.key)
        if body is not None:
            return dict(body)
    durable, n = await node.store.run(_basic, node.store, item)
    nodes: dict[str, frozenset[int] | None] = {}
    sync: Any = node.components.get("sync")
    for view in getattr(sync, "peers", {}).values():
        if not view.up:
            continue
        if item.key in view.items:
            nodes[view.name] = None
        elif item.key in view.partial:
            nodes[view.name] = view.partial[item.key][1]
    body = count(item.key, n, durable=durable, nodes=nodes).public()
    body["held_here"] = list(range(n)) if item.state is State.CACHED else []
    return body


async def get_item(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    key = request.match_info["key"].lstrip("/")
    if not key or len(key) > MAX_KEY or ".." in key.split("/"):
        raise ApiError(400, "expected an item key such as census/2021/da.parquet")
    item = await node.store.run(node.store.get_current, key)
    if item is None:
        raise ApiError(404, f"no item with key {key!r} is known to this node")
    body = item.public()
    body["replicas"] = await replicas_of(node, item)
    return web.json_response(body)


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/items/{key:.+}", get_item)
