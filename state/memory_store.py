"""In-memory store with the Redis store's semantics, for fast tests of the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from rules.customer import CustomerState
from state.store import Stored, TimerEntry, Write
from streams.events import Notification


class MemoryStore:
    def __init__(self) -> None:
        # Serialised like Redis, so a test cannot pass by sharing mutable objects.
        self._rows: dict[str, tuple[int, str, tuple[Notification, ...]]] = {}
        self._clocks: dict[int | None, int] = {}
        self.timers: dict[int, dict[str, int]] = {}
        self.gaps: dict[str, dict[int, int]] = {}

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
            if w.timer is not None and w.timer.due is not None:
                index = self.timers.setdefault(w.timer.shard, {})
                index[w.customer_id] = min(index.get(w.customer_id, w.timer.due), w.timer.due)
            current = self._rows.get(w.customer_id, (0, "", ()))[0]
            if current != w.expected_version:
                results[w.customer_id] = None
                continue
            self._rows[w.customer_id] = (current + 1, w.state.to_json(), tuple(w.outbox))
            results[w.customer_id] = current + 1
        return results

    async def confirm(
        self,
        versions: dict[str, int],
        timers: dict[str, TimerEntry],
        gaps: Sequence[tuple[str, int]] = (),
    ) -> None:
        for cid, version in versions.items():
            row = self._rows.get(cid)
            if row is not None and row[0] == version:
                self._rows[cid] = (row[0], row[1], ())
        for cid, entry in timers.items():
            if entry.due is not None:
                self.timers.setdefault(entry.shard, {})[cid] = entry.due
        for category, days in gaps:
            histogram = self.gaps.setdefault(category, {})
            histogram[days] = histogram.get(days, 0) + 1

    async def advance_clock(self, seconds: int, shard: int | None = None) -> int:
        self._clocks[shard] = max(self._clocks.get(shard, 0), seconds)
        return self._clocks[shard]

    async def clock(self, shard: int | None = None) -> int | None:
        return self._clocks.get(shard)

    async def due(self, shard: int, until: int, limit: int) -> list[str]:
        index = self.timers.get(shard, {})
        ready = sorted((due, cid) for cid, due in index.items() if due <= until)
        return [cid for _, cid in ready[:limit]]

    async def unindex(self, shard: int, customer_ids: Sequence[str]) -> None:
        for cid in customer_ids:
            self.timers.get(shard, {}).pop(cid, None)

    async def next_due_in(self, shard: int) -> int | None:
        index = self.timers.get(shard, {})
        return min(index.values()) if index else None

    async def gap_histograms(self, categories: Sequence[str]) -> dict[str, dict[int, int]]:
        return {category: dict(self.gaps.get(category, {})) for category in categories}

    async def scan(self) -> AsyncIterator[Stored]:
        for stored in (await self.load(list(self._rows))).values():
            yield stored

    async def close(self) -> None:
        return None
