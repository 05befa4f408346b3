"""The engine: validate -> load -> rules -> save -> (caller produces) -> confirm.

One call per batch. The engine owns the order of operations that makes redelivery harmless:
new state and the notifications it caused are written together (the customer's outbox) in one
atomic Redis step; the caller produces the outbox and only then acks the input offsets and
calls `confirm`, which clears the outbox. A crash anywhere re-sends at most an outbox whose
notification ids are deterministic, and never counts an event twice (event ids are remembered
in the state).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Literal, TypeVar

from redis.exceptions import BusyLoadingError, ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memberflow.metrics import Metrics
from rules.customer import CustomerState, apply, epoch, evaluation_time, screen
from rules.policy import Policy
from state.store import Store, Stored, Write
from streams.codec import decode_event
from streams.events import DeadLetter, InputEvent, Notification, NotificationType, Rejection

log = logging.getLogger(__name__)

T = TypeVar("T")
ClockMode = Literal["wall", "event"]
TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ClusterDownError,
    TryAgainError,
    OSError,
)
MAX_CONFLICT_ROUNDS = 8
_TIER_DIRECTION = {
    NotificationType.TIER_UPGRADED: "up",
    NotificationType.TIER_DOWNGRADED: "down",
}


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class BatchOutcome:
    notifications: list[Notification] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)
    outbox_versions: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0


@dataclass(slots=True)
class _Fold:
    stored: Stored
    write: Write | None = None
    applied: int = 0
    duplicates: int = 0
    rejected: list[tuple[RawMessage, Rejection]] = field(default_factory=list)
    applied_times: list[int] = field(default_factory=list)  # event times of applied events


class Engine:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        clock_mode: ClockMode = "wall",
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock_mode = clock_mode
        self.metrics = metrics or Metrics()
        self.wall_clock = wall_clock
        self.max_backoff_s = max_backoff_s

    async def retry(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a Redis operation until it succeeds. Not acking is the safe failure: while
        Redis is down the stream stalls (backpressure) and nothing is lost."""
        delay = 0.05
        while True:
            try:
                return await call()
            except TRANSIENT as exc:
                self.metrics.redis_retries.labels(operation).inc()
                log.warning("redis %s failed (%s); retrying in %.2fs", operation, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)

    async def _clock_or_zero(self) -> int:
        return (await self.store.clock()) or 0

    async def process(self, messages: Sequence[RawMessage]) -> BatchOutcome:
        outcome = BatchOutcome()
        wall_now = int(self.wall_clock())
        by_customer: dict[str, list[tuple[RawMessage, InputEvent]]] = {}
        for message in messages:
            decoded = decode_event(message.value)
            if isinstance(decoded, Rejection):
                self._dead_letter(outcome, message, decoded, wall_now)
            else:
                by_customer.setdefault(decoded.customer_id, []).append((message, decoded))

        global_clock = 0
        if self.clock_mode == "event" and by_customer:
            global_clock = await self.retry("clock", self._clock_or_zero)

        pending = dict(by_customer)
        newest_applied = 0
        for _ in range(MAX_CONFLICT_ROUNDS):
            if not pending:
                break
            loaded = await self.retry("load", partial(self.store.load, list(pending)))
            folds = {
                cid: self._fold(loaded[cid], items, global_clock, wall_now)
                for cid, items in pending.items()
            }
            writes = [fold.write for fold in folds.values() if fold.write is not None]
            versions = await self.retry("save", partial(self.store.save, writes))
            conflicted = {}
            for customer_id, fold in folds.items():
                if fold.write is None:
                    if fold.stored.outbox:  # left unsent by a crash: send it now
                        outcome.notifications.extend(fold.stored.outbox)
                        outcome.outbox_versions[customer_id] = fold.stored.version
                elif (version := versions[customer_id]) is None:
                    self.metrics.version_conflicts.inc()
                    conflicted[customer_id] = pending[customer_id]
                    continue
                else:
                    outcome.notifications.extend(fold.write.outbox)
                    if fold.write.outbox:
                        outcome.outbox_versions[customer_id] = version
                # Counted only for a fold that stands: a conflicted one is redone.
                outcome.applied += fold.applied
                outcome.duplicates += fold.duplicates
                for occurred in fold.applied_times:
                    newest_applied = max(newest_applied, occurred)
                    self.metrics.event_time_lag.observe(max(0, wall_now - occurred))
                for message, rejection in fold.rejected:
                    self._dead_letter(outcome, message, rejection, wall_now)
            pending = conflicted
        if pending:
            # Another writer keeps winning: give up on the batch without acking it.
            raise RuntimeError(f"version conflicts did not settle for {sorted(pending)[:5]}")

        if self.clock_mode == "event" and outcome.applied:
            # Applied events only: a dead-lettered far-future event must not move the clock
            # (every later event would then be judged too old).
            clock = await self.retry("clock", partial(self.store.advance_clock, newest_applied))
            self.metrics.event_clock.set(clock)
        elif self.clock_mode == "wall":
            self.metrics.event_clock.set(wall_now)

        self.metrics.batch_size.observe(len(messages))
        self.metrics.last_event.set(wall_now)
        self.metrics.events.labels("applied").inc(outcome.applied)
        self.metrics.events.labels("duplicate").inc(outcome.duplicates)
        self.metrics.events.labels("dead_lettered").inc(len(outcome.dead_letters))
        return outcome

    def _fold(
        self,
        stored: Stored,
        items: list[tuple[RawMessage, InputEvent]],
        global_clock: int,
        wall_now: int,
    ) -> _Fold:
        """Apply one customer's events in order, through the pure rules."""
        fold = _Fold(stored)
        state: CustomerState | None = stored.state
        new_notifications: list[Notification] = []
        for message, event in items:
            now = evaluation_time(self.clock_mode, state, event, wall_now)
            rejection = screen(event, self.policy, max(now, global_clock), wall_now)
            if rejection is None:
                decision = apply(state, event, self.policy, now)
                rejection = decision.rejection
                if decision.duplicate:
                    fold.duplicates += 1
                elif rejection is None:
                    state = decision.state
                    new_notifications.extend(decision.notifications)
                    fold.applied += 1
                    fold.applied_times.append(epoch(event.occurred_at))
            if rejection is not None:
                fold.rejected.append((message, rejection))
        if fold.applied and state is not None:
            fold.write = Write(
                customer_id=stored.customer_id,
                expected_version=stored.version,
                state=state,
                outbox=tuple(stored.outbox) + tuple(new_notifications),
            )
        return fold

    def _dead_letter(
        self, outcome: BatchOutcome, message: RawMessage, rejection: Rejection, wall_now: int
    ) -> None:
        self.metrics.dead_letters.labels(rejection.reason.value).inc()
        outcome.dead_letters.append(
            (
                message.key,
                DeadLetter(
                    reason=rejection.reason,
                    detail=rejection.detail,
                    raw_b64=base64.b64encode(message.value or b"").decode(),
                    source_topic=message.topic,
                    source_partition=message.partition,
                    source_offset=message.offset,
                    rejected_at=datetime.fromtimestamp(wall_now, UTC),
                ),
            )
        )

    async def confirm(self, outcome: BatchOutcome) -> None:
        """Call after every notification of `outcome` was acknowledged by the broker."""
        for notification in outcome.notifications:
            self.metrics.notifications.labels(notification.type.value).inc()
            direction = _TIER_DIRECTION.get(notification.type)
            if direction is not None:
                self.metrics.tier_transitions.labels(direction).inc()
        await self.retry("clear_outbox", partial(self.store.clear_outbox, outcome.outbox_versions))
