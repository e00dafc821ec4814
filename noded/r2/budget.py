"""An asyncio byte budget: bounds the memory held by buffers in flight (e.g. multipart parts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ByteBudget:
    """`async with budget.hold(n):` waits until n more bytes fit under the limit.

    A request larger than the whole limit is let through alone (when nothing else is held), so a
    single oversized part can never wait forever.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: self._fits(n))
            self.used += n
        try:
            yield
        finally:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()
