"""What every long-running part of the daemon looks like, and the context they share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from noded.core.counters import Traffic

if TYPE_CHECKING:
    from noded.core.config import Config
    from noded.core.store import Store


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
