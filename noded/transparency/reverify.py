"""Re-verification asked for by community reports: drains `verify_queue` into the cache's verifier.

A `corrupt` report on an item this node holds queues the copy (noded.transparency.reports) and notifies "verify".
This component takes the queue in order and hands each key to the component named "cache", which must
offer `async reverify(key) -> dict` (the report of noded/verify.py: `ok`, `corrupt`, `missing` lists...).
Without such a component the rows stay queued (nothing is lost) and /v1/status shows why.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from noded.core.component import Node, cancel_task, supervise
from noded.core.logs import get_logger
from noded.transparency.reports import finish_verification, pending_verifications

log = get_logger("noded.reverify")

POLL = 60.0  # seconds; a lost wake-up costs at most this


def verdict(key: str, report: dict[str, Any]) -> str:
    """One word for what the verifier found (pure)."""
    for field in ("corrupt", "missing", "unverifiable", "not_cached", "unknown"):
        if key in (report.get(field) or []):
            return field
    return "ok" if report.get("ok") else "unknown"


class ReverifyQueue:
    name = "reverify"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.done = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=20)
        self.waiting = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = supervise(self._loop, "reverify", self.node, self.name)

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    def status(self) -> dict[str, Any]:
        return {"state": "running" if self._task else "stopped", "done": self.done, "waiting": self.waiting}

    async def _loop(self) -> None:
        while True:
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("reverify.failed", error=str(e), exc_info=True)
            await self.node.wait("verify", POLL)

    async def drain(self) -> int:
        """Re-verify every queued copy; returns how many were handled."""
        store = self.node.store
        rows = await store.run(pending_verifications, store)
        self.waiting = len(rows)
        cache = self.node.get("cache")
        reverify = getattr(cache, "reverify", None)
        if not rows:
            self.node.problems.pop("reverify", None)
            return 0
        if not callable(reverify):
            self.node.problems["reverify"] = f"{len(rows)} reported copies wait: no cache verifier in this build"
            return 0
        handled = 0
        for item_id, reason in rows:
            item = await store.run(store.get_item, item_id)
            if item is not None:
                result = await reverify(item.key)
                found = verdict(item.key, result)
                log.info("reverify.done", key=item.key, reason=reason, verdict=found)
                self.recent.append({"key": item.key, "reason": reason, "verdict": found})
            await store.run(finish_verification, store, item_id)
            handled += 1
            self.done += 1
        self.waiting = 0
        self.node.problems.pop("reverify", None)
        return handled
