"""state.aio.together: concurrent steps that settle together."""

from __future__ import annotations

import asyncio

import pytest

from state.aio import together


def test_results_come_in_the_order_of_the_steps() -> None:
    async def value(result: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return result

    assert asyncio.run(together(value(1, 0.02), value(2, 0.0), value(3, 0.01))) == [1, 2, 3]


async def slow(name: str, finished: list[str]) -> None:
    """Waits until cancelled, then says it finished."""
    try:
        await asyncio.sleep(30)
    finally:
        finished.append(name)


def test_a_failure_cancels_the_other_steps_before_it_is_raised() -> None:
    finished: list[str] = []

    async def failing() -> None:
        await asyncio.sleep(0)
        raise KeyError("lost")

    async def scenario() -> None:
        with pytest.raises(KeyError, match="lost"):
            await together(slow("a", finished), failing(), slow("b", finished))
        assert sorted(finished) == ["a", "b"]  # cancelled, and done before together() raised

    asyncio.run(scenario())


def test_cancelling_the_caller_cancels_every_step() -> None:
    finished: list[str] = []

    async def scenario() -> None:
        caller = asyncio.create_task(together(slow("a", finished), slow("b", finished)))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert sorted(finished) == ["a", "b"]

    asyncio.run(scenario())
