"""In-memory store with the Redis store's semantics, for fast tests of the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

from rules.customer import CustomerState
from state.store import Contribution, GapSample, Stored, TimerEntry, Write
from streams.events import Notification


class MemoryStore:
    def __init__(self) -> None:
        # Serialised like Redis, so a test cannot pass by sharing mutable objects.
        self._rows: dict[str, tuple[int, str, tuple[Notification, ...], tuple[GapSample, ...]]] = {}
        self._clocks: dict[int | None, int] = {}
        self.timers: dict[int, dict[str, int]] = {}
        self.gaps: dict[str, dict[int, int]] = {}
        self.contributions: dict[str, Contribution] = {}
        self._snapshot: tuple[int, str] | None = None
        self._snapshot_woken: int | None = None
        self._policy_version: str | None = None
        self._superseded: set[str] = set()

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        out = {}
        for cid in customer_ids:
            row = self._rows.get(cid)
            if row is None:
                out[cid] = Stored(cid, 0, None)
            else:
                out[cid] = Stored(cid, row[0], CustomerState.from_json(row[1]), row[2], row[3])
        return out

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        results: dict[str, int | None] = {}
        for w in writes:
            if w.timer is not None and w.timer.due is not None:
                index = self.timers.setdefault(w.timer.shard, {})
                index[w.customer_id] = min(index.get(w.customer_id, w.timer.due), w.timer.due)
            current = self._rows[w.customer_id][0] if w.customer_id in self._rows else 0
            if current != w.expected_version:
                results[w.customer_id] = None
                continue
            self._rows[w.customer_id] = (
                current + 1,
                w.state.to_json(),
                tuple(w.outbox),
                tuple(w.gaps),
            )
            results[w.customer_id] = current + 1
        return results

    async def confirm(
        self,
        versions: dict[str, int],
        timers: dict[str, TimerEntry],
    ) -> None:
        for cid, version in versions.items():
            row = self._rows.get(cid)
            if row is not None and row[0] == version:
                self._rows[cid] = (row[0], row[1], (), ())
        for cid, entry in timers.items():
            if entry.due is not None and entry.version in (None, self._version(cid)):
                self.timers.setdefault(entry.shard, {})[cid] = entry.due

    async def advance_clock(self, seconds: int, shard: int | None = None) -> int:
        self._clocks[shard] = max(self._clocks.get(shard, 0), seconds)
        return self._clocks[shard]

    async def advance_clocks(self, shards: dict[int, int]) -> int:
        for shard, seconds in shards.items():
            await self.advance_clock(seconds, shard)
        return await self.advance_clock(max(shards.values()))

    async def clock(self, shard: int | None = None) -> int | None:
        return self._clocks.get(shard)

    async def due(self, shard: int, until: int, limit: int) -> list[str]:
        index = self.timers.get(shard, {})
        ready = sorted((due, cid) for cid, due in index.items() if due <= until)
        return [cid for _, cid in ready[:limit]]

    async def unindex(self, shard: int, versions: Mapping[str, int]) -> None:
        for cid, version in versions.items():
            if self._version(cid) == version:
                self.timers.get(shard, {}).pop(cid, None)

    def _version(self, cid: str) -> int:
        row = self._rows.get(cid)
        return row[0] if row is not None else 0

    async def timer_heads(self, shards: Sequence[int]) -> dict[int, tuple[int | None, int | None]]:
        return {shard: (self._clocks.get(shard), await self.next_due_in(shard)) for shard in shards}

    async def oldest_due(self, shards: Sequence[int]) -> dict[int, int | None]:
        heads = {}
        for shard in shards:
            due = [at for at in self.timers.get(shard, {}).values() if at >= 1]
            heads[shard] = min(due) if due else None
        return heads

    async def next_due_in(self, shard: int) -> int | None:
        index = self.timers.get(shard, {})
        return min(index.values()) if index else None

    async def gap_histograms(self, categories: Sequence[str]) -> dict[str, dict[int, int]]:
        return {category: dict(self.gaps.get(category, {})) for category in categories}

    async def contribute(self, contributions: Sequence[Contribution]) -> None:
        for c in contributions:
            old = self.contributions.get(c.customer_id)
            if old is None or old.version < c.version:
                self.contributions[c.customer_id] = c
                # As CONTRIBUTE_LUA: samples newer than the previous contribution count.
                for sample in c.gaps:
                    if old is None or sample.version > old.version:
                        histogram = self.gaps.setdefault(sample.category, {})
                        histogram[sample.days] = histogram.get(sample.days, 0) + 1

    async def population(self) -> tuple[int, dict[str, int]]:
        rows = self.contributions.values()
        return len(rows), {d: sum(getattr(c, d) for c in rows) for d in ("r", "f", "m")}

    async def count_at_most(self, dimension: str, values: Sequence[int]) -> list[int]:
        column = [getattr(c, dimension) for c in self.contributions.values()]
        return [sum(1 for x in column if x <= value) for value in values]

    async def customers_between(
        self, dimension: str, low: float, high: float
    ) -> AsyncIterator[list[tuple[str, int]]]:
        found = sorted(
            (c.customer_id, c.partition)
            for c in self.contributions.values()
            if low < getattr(c, dimension) <= high
        )
        for page in _pages(found):
            yield page

    async def distribution(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for c in self.contributions.values():
            labels = [f"tier:{c.tier}", f"stage:{c.stage}"]
            labels += [f"segment:{c.segment}"] if c.segment else []
            labels += [f"grade:{c.grade}"] if c.grade else []
            for label in labels:
                totals[label] = totals.get(label, 0) + 1
        return dict(sorted(totals.items()))

    async def snapshot(self) -> str | None:
        return self._snapshot[1] if self._snapshot else None

    async def publish_snapshot(self, version: int, document: str) -> bool:
        if self._snapshot is not None and self._snapshot[0] >= version:
            return False
        self._snapshot = (version, document)
        return True

    async def snapshot_version(self) -> int:
        return self._snapshot[0] if self._snapshot else 0

    async def snapshot_woken(self) -> int | None:
        return self._snapshot_woken

    async def set_snapshot_woken(self, version: int) -> None:
        self._snapshot_woken = version

    async def unclassified(self) -> AsyncIterator[list[tuple[str, int]]]:
        found = sorted(
            (c.customer_id, c.partition) for c in self.contributions.values() if not c.segment
        )
        for page in _pages(found):
            yield page

    async def try_lock(self, ttl_s: int) -> bool:
        return True  # one process: nothing to exclude

    async def unlock(self) -> None:
        return None

    async def policy_version(self) -> str | None:
        return self._policy_version

    async def set_policy_version(self, version: str) -> None:
        if self._policy_version is not None and self._policy_version != version:
            self._superseded.add(self._policy_version)
        self._superseded.discard(version)
        self._policy_version = version

    async def policy_superseded(self, version: str) -> bool:
        return version in self._superseded

    async def all_customers(self) -> AsyncIterator[list[tuple[str, int]]]:
        found = sorted((c.customer_id, c.partition) for c in self.contributions.values())
        for page in _pages(found):
            yield page

    async def wake(self, entries: Sequence[tuple[str, int]]) -> None:
        for customer_id, partition in entries:
            self.timers.setdefault(partition, {})[customer_id] = 0

    async def scan(self) -> AsyncIterator[Stored]:
        for stored in (await self.load(list(self._rows))).values():
            yield stored

    async def close(self) -> None:
        return None


def _pages(found: list[tuple[str, int]], size: int = 100) -> list[list[tuple[str, int]]]:
    return [found[start : start + size] for start in range(0, len(found), size)]
