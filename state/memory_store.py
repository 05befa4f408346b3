"""In-memory store with the Redis store's semantics, for fast tests of the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from rules.customer import CustomerState
from state.store import Stored, Write
from streams.events import Notification


class MemoryStore:
    def __init__(self) -> None:
        # Serialised like Redis, so a test cannot pass by sharing mutable objects.
        self._rows: dict[str, tuple[int, str, tuple[Notification, ...]]] = {}
        self._clock: int | None = None

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        out = {}
        for cid in customer_ids:
            row = self._rows.get(cid)
            if row is None:
                out[cid] = Stored(cid, 0, None)
            else:
                out[cid] = Stored(cid, row[0], CustomerState.from_json(row[1]), row[2])
        return out

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        results: dict[str, int | None] = {}
        for w in writes:
            current = self._rows.get(w.customer_id, (0, "", ()))[0]
            if current != w.expected_version:
                results[w.customer_id] = None
                continue
            self._rows[w.customer_id] = (current + 1, w.state.to_json(), tuple(w.outbox))
            results[w.customer_id] = current + 1
        return results

    async def clear_outbox(self, versions: dict[str, int]) -> None:
        for cid, version in versions.items():
            row = self._rows.get(cid)
            if row is not None and row[0] == version:
                self._rows[cid] = (row[0], row[1], ())

    async def advance_clock(self, seconds: int) -> int:
        self._clock = max(self._clock or 0, seconds)
        return self._clock

    async def clock(self) -> int | None:
        return self._clock

    async def scan(self) -> AsyncIterator[Stored]:
        for stored in (await self.load(list(self._rows))).values():
            yield stored

    async def close(self) -> None:
        return None
