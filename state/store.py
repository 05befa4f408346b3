"""The store Protocol that the engine depends on, and the records it exchanges."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rules.customer import CustomerState
from streams.events import Notification


@dataclass(frozen=True, slots=True)
class Stored:
    """A customer as loaded: `version` 0 means no record yet."""

    customer_id: str
    version: int
    state: CustomerState | None
    outbox: tuple[Notification, ...] = ()
    gaps: tuple[GapSample, ...] = ()  # recorded with the state, not yet in the histograms


@dataclass(frozen=True, slots=True)
class GapSample:
    """One observed repurchase gap, kept in the customer's record (written atomically with the
    state that revealed it) until the customer's population contribution has counted it.

    `version` is the state version that first recorded it. A contribution counts the samples
    newer than the customer's previous contribution, and contributions are idempotent by
    version, so a crash anywhere neither loses a sample nor counts one twice."""

    category: str
    days: int
    version: int


@dataclass(frozen=True, slots=True)
class TimerEntry:
    """Where a customer's next timer is indexed: its shard (input partition) and due time.

    `version` is the customer version the due time was computed from. confirm() sets the exact
    entry only while the customer is still at that version: a worker that lost its partition
    and confirms late (a zombie) must not move a timer that the new owner has since set, for a
    newer state, to a later time. None: unconditional (a Write's entry, which only ever moves
    an entry earlier)."""

    shard: int
    due: int | None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Write:
    """Replace a customer's state and outbox if its version is still `expected_version`.

    `timer` is indexed *before* the state is written (only ever moving an entry earlier), so a
    crash between the two leaves at worst an early wake-up, never a timer nobody will fire."""

    customer_id: str
    expected_version: int
    state: CustomerState
    outbox: tuple[Notification, ...] = field(default=())
    timer: TimerEntry | None = None
    gaps: tuple[GapSample, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one customer contributes to the population statistics, as of state `version`.
    Applied idempotently: an older or equal version than the one recorded changes nothing."""

    customer_id: str
    version: int
    partition: int
    r: int  # last purchase time
    f: int  # window orders
    m: int  # window spend, minor units
    tier: str
    segment: str
    grade: str
    stage: str
    gaps: tuple[
        GapSample, ...
    ] = ()  # pending samples (those newer than the last contribution count)


class Store(Protocol):
    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]: ...

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        """Apply each write atomically; returns the new version, or None on a version conflict."""
        ...

    async def confirm(
        self,
        versions: dict[str, int],
        timers: dict[str, TimerEntry],
    ) -> None:
        """After the outputs were produced and the contributions made: drop the outbox and the
        pending gap samples of each customer still at the given version, set each customer's
        exact next due time in the index (while it is at its entry's version, TimerEntry)."""
        ...

    async def advance_clock(self, seconds: int, shard: int | None = None) -> int:
        """Raise the event clock (global, or one shard's) to at least `seconds`; returns it."""
        ...

    async def advance_clocks(self, shards: dict[int, int]) -> int:
        """advance_clock for each shard, and the global clock to the newest; returns it."""
        ...

    async def clock(self, shard: int | None = None) -> int | None: ...

    async def due(self, shard: int, until: int, limit: int) -> list[str]:
        """Customers of `shard` whose next timer is due at or before `until`, earliest first."""
        ...

    async def unindex(self, shard: int, versions: Mapping[str, int]) -> None:
        """Remove customers (id -> the version found with no timer left, 0 for no record) from
        a shard's index, each only while it is still at that version: a write since then (by
        the partition's new owner) has indexed that customer's new timers."""
        ...

    async def timer_heads(self, shards: Sequence[int]) -> dict[int, tuple[int | None, int | None]]:
        """Per shard (its event clock, its earliest indexed due time), in one round trip: how
        a worker decides, without taking its lock, whether a shard has timers to fire."""
        ...

    async def oldest_due(self, shards: Sequence[int]) -> dict[int, int | None]:
        """Per shard, its earliest indexed due time that is a real time: wake-ups (a new
        snapshot or policy puts customers at the front with due time 0) are not timers."""
        ...

    async def next_due_in(self, shard: int) -> int | None:
        """The earliest indexed due time in a shard (for status and tests)."""
        ...

    async def gap_histograms(self, categories: Sequence[str]) -> dict[str, dict[int, int]]: ...

    async def contribute(self, contributions: Sequence[Contribution]) -> None: ...

    async def population(self) -> tuple[int, dict[str, int]]:
        """(customers, {"r": sum, "f": sum, "m": sum}) over all stats shards."""
        ...

    async def count_at_most(self, dimension: str, values: Sequence[int]) -> list[int]:
        """For each value, how many customers have `dimension` <= value."""
        ...

    def customers_between(
        self, dimension: str, low: float, high: float
    ) -> AsyncIterator[list[tuple[str, int]]]:
        """(customer, partition) of customers with low < value <= high, in pages."""
        ...

    async def distribution(self) -> dict[str, int]:
        """Customers per label: "tier:gold", "segment:important_value", "grade:A", ..."""
        ...

    async def snapshot(self) -> str | None: ...

    async def publish_snapshot(self, version: int, document: str) -> bool:
        """Store `document` as the current snapshot if `version` is newer than the stored."""
        ...

    async def snapshot_version(self) -> int:
        """The current snapshot's version (0: none), cheap enough to read every batch."""
        ...

    async def snapshot_woken(self) -> int | None:
        """The snapshot version whose wake-ups were all sent (None: never recorded)."""
        ...

    async def set_snapshot_woken(self, version: int) -> None:
        """Record that the wake-ups of snapshot `version` were all sent."""
        ...

    def unclassified(self) -> AsyncIterator[list[tuple[str, int]]]:
        """(customer, partition) of customers not yet classified against any snapshot, in
        pages."""
        ...

    async def try_lock(self, ttl_s: int) -> bool: ...

    async def policy_version(self) -> str | None: ...

    async def set_policy_version(self, version: str) -> None:
        """Record `version` as the one the labels are computed with; the version it replaces
        is recorded as superseded (policy_superseded)."""
        ...

    async def policy_superseded(self, version: str) -> bool:
        """Whether `version` was once adopted and then replaced: a worker still running it is
        an old one (a rolling restart in progress, or a rollback under an old version)."""
        ...

    def all_customers(self) -> AsyncIterator[list[tuple[str, int]]]:
        """(customer, partition) of every customer in the population statistics, in pages.

        These three name up to every customer of the shop (a first snapshot, a new policy):
        pages, so that neither the caller nor the store holds them all at once."""
        ...

    async def unlock(self) -> None: ...

    async def wake(self, entries: Sequence[tuple[str, int]]) -> None:
        """Index (customer, partition) pairs as due now (reclassification after a snapshot)."""
        ...

    def scan(self) -> AsyncIterator[Stored]: ...

    async def close(self) -> None: ...
