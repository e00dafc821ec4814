"""The byte budget that bounds part buffers in memory."""

from __future__ import annotations

import asyncio

import pytest

from noded.r2.budget import ByteBudget


async def test_holds_never_exceed_the_limit_and_all_complete() -> None:
    budget = ByteBudget(10)
    peak = 0

    async def job(n: int) -> None:
        nonlocal peak
        async with budget.hold(n):
            peak = max(peak, budget.used)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(*(job(n) for n in [4, 4, 4, 3, 7, 1, 10, 2])), 5)
    assert peak <= 10 and budget.used == 0


async def test_an_oversized_request_runs_alone_instead_of_waiting_forever() -> None:
    budget = ByteBudget(10)
    seen: list[int] = []

    async def job(n: int) -> None:
        async with budget.hold(n):
            seen.append(budget.used)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(job(3), job(25), job(3)), 5)
    assert 25 in seen and all(u <= 10 or u == 25 for u in seen)


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ByteBudget(0)
