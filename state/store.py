"""The store Protocol that the engine depends on, and the records it exchanges."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
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


@dataclass(frozen=True, slots=True)
class Write:
    """Replace a customer's state and outbox if its version is still `expected_version`."""

    customer_id: str
    expected_version: int
    state: CustomerState
    outbox: tuple[Notification, ...] = field(default=())


class Store(Protocol):
    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]: ...

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        """Apply each write atomically; returns the new version, or None on a version conflict."""
        ...

    async def clear_outbox(self, versions: dict[str, int]) -> None:
        """Drop the outbox of each customer still at the given version (its notifications
        have been produced)."""
        ...

    async def advance_clock(self, seconds: int) -> int:
        """Raise the event clock to at least `seconds`; returns the clock."""
        ...

    async def clock(self) -> int | None: ...

    def scan(self) -> AsyncIterator[Stored]: ...

    async def close(self) -> None: ...
