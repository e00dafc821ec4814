"""What every long-running part of the daemon looks like, and the context they share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from noded.core.counters import Traffic
from noded.core.logs import get_logger

if TYPE_CHECKING:
    from noded.core.config import Config
    from noded.core.store import Store


log = get_logger("noded.supervise")

BACKOFF_MIN = 1.0  # seconds before the first restart; doubled per crash in a row
BACKOFF_MAX = 60.0
HEALTHY_AFTER = 300.0  # a loop that has run this long since its restart is healthy again


@dataclass
class LoopHealth:
    """One supervised loop, as /v1/status shows it."""

    name: str
    component: str
    state: str = "running"  # "running", or "restarting" while it waits out its backoff
    crashes: int = 0
    last_error: str | None = None
    last_crash: float | None = None  # unix time


def supervise(
    fn: Callable[[], Awaitable[None]],
    name: str,
    node: Node | None = None,
    component: str | None = None,
) -> asyncio.Task[None]:
    """Run the loop `fn()` in a task that restarts it, with backoff, whenever it raises or returns.

    A crash is logged with its traceback, counted in `node.loops`, and shown in `node.problems` until the
    loop has run `HEALTHY_AFTER` seconds again; while it waits to restart, its component's state is
    "restarting", never "running". Cancelling the returned task stops the loop.
    """
    health = LoopHealth(name, component or name)
    if node is not None:
        node.loops[name] = health
    return asyncio.create_task(_supervisor(fn, health, node), name=name)


async def _supervisor(fn: Callable[[], Awaitable[None]], health: LoopHealth, node: Node | None) -> None:
    problem = f"loop {health.name}"
    backoff = BACKOFF_MIN
    try:
        while True:
            health.state = "running"
            inner: asyncio.Task[None] = asyncio.ensure_future(fn())
            try:
                done, _ = await asyncio.wait({inner}, timeout=HEALTHY_AFTER)
                if not done:
                    backoff = BACKOFF_MIN
                    if node is not None:
                        node.problems.pop(problem, None)
                    await asyncio.wait({inner})
            finally:
                if not inner.done():
                    await cancel_task(inner)
            if inner.cancelled():  # cancelled from elsewhere: the loop was meant to end
                return
            exc = inner.exception()
            health.crashes += 1
            health.last_crash = time.time()
            health.last_error = f"{type(exc).__name__}: {exc}"[:300] if exc else "returned"
            if exc is not None:
                log.error("loop.crashed", loop=health.name, crashes=health.crashes, restart_in=backoff, exc_info=exc)
            else:
                log.error("loop.ended", loop=health.name, crashes=health.crashes, restart_in=backoff)
            if node is not None:
                node.problems[problem] = (
                    f"{health.name} crashed {health.crashes} time(s), last: {health.last_error}; restarted with backoff"
                )
            health.state = "restarting"
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
    finally:
        if node is not None and node.loops.get(health.name) is health:
            del node.loops[health.name]


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a component's background task and wait until it has really ended (None: nothing to do)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@runtime_checkable
class Component(Protocol):
    """Started in order by the daemon, stopped in reverse. `status()` must be cheap (no I/O)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@runtime_checkable
class Reloadable(Protocol):
    async def reload(self, cfg: Config) -> None: ...


@dataclass
class Node:
    """Shared runtime context: configuration, store, counters and the running components."""

    cfg: Config
    store: Store
    traffic: Traffic = field(default_factory=Traffic)
    started_at: float = field(default_factory=time.time)
    components: dict[str, Component] = field(default_factory=dict)
    ready: bool = False
    stopping: bool = False
    # Why fetches are waiting, why R2 is failing, ...: one short reason per subsystem for /v1/status.
    problems: dict[str, str] = field(default_factory=dict)
    loop_lag: float = 0.0  # seconds, most recent measurement
    instance: str = ""  # this process's random id; /healthz answers it (noded.core.instance)
    # The last SIGHUP: keys applied, keys that need a restart, when; a rejected file's problems.
    reload: dict[str, Any] | None = None
    loops: dict[str, LoopHealth] = field(default_factory=dict)  # supervised loops by name
    _signals: dict[str, asyncio.Event] = field(default_factory=dict)

    def notify(self, topic: str) -> None:
        """Wake components waiting on a topic ("cached", "wanted", "pushed", "evicted", ...).

        Components keep their work in the store and only use these as hints, so a lost wake-up costs
        at most one polling interval, and a crash loses nothing.
        """
        self._signals.setdefault(topic, asyncio.Event()).set()

    async def wait(self, topic: str, timeout: float) -> bool:
        ev = self._signals.setdefault(topic, asyncio.Event())
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            ev.clear()
        return True

    def get(self, name: str) -> Any:
        return self.components.get(name)

    def component_state(self, name: str, reported: str) -> str:
        """A component's state as status shows it: "restarting" while one of its loops waits to restart,
        whatever the component itself says."""
        if reported == "running" and any(h.component == name and h.state != "running" for h in self.loops.values()):
            return "restarting"
        return reported
