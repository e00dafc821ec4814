"""What every long-running part of the daemon looks like, and the context they share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from noded.traffic import Traffic

if TYPE_CHECKING:
    from noded.config import Config
    from noded.store import Store


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

    def get(self, name: str) -> Any:
        return self.components.get(name)
