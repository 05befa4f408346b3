"""asyncio helpers shared by the store and the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Await `steps` concurrently; if one fails, cancel and await the rest before raising.

    asyncio.gather leaves the others running: a worker's concurrent Redis reads kept using a
    client the caller then closed (in CI a connection one of them opened was never closed),
    and a Cluster save retried after one node failed would race the other nodes' pipelines,
    still writing."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
