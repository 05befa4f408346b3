"""The engine: validate -> load -> rules -> save -> (caller produces) -> confirm.

One call per batch of input events (`process`) or of due timers (`process_due`). The engine
owns the order of operations that makes redelivery harmless: new state and the notifications it
caused are written together (the customer's outbox) in one atomic Redis step; the caller
produces the outbox and only then acks the input offsets and calls `confirm`, which clears the
outbox. A crash anywhere re-sends at most an outbox whose notification ids are deterministic,
and never counts an event twice (event ids are remembered in the state).
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

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memberflow.metrics import Metrics
from memberflow.population import current_snapshot
from rules.customer import (
    CustomerState,
    apply,
    epoch,
    evaluate_tier,
    evaluation_time,
    freeze_intervals,
    screen,
)
from rules.policy import Policy
from rules.segments import Snapshot, grade_direction, reclassify
from rules.timeline import Timer, advance, learned_interval, wake_at
from state.aio import together
from state.store import (
    Contribution,
    GapSample,
    Store,
    Stored,
    TimerEntry,
    Write,
)
from streams.codec import MAX_MESSAGE_BYTES, decode_event
from streams.events import (
    Cause,
    DeadLetter,
    InputEvent,
    Notification,
    NotificationType,
    Rejection,
    RejectReason,
    Tick,
)

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
# Redis up but refusing the work until an operator (or a failover) mends it: memory full,
# a replica or a master without its replicas, writes stopped after a failed save, a script
# busy past its time limit, a password or ACL that no longer lets this worker in. Retried
# with backoff like the transient ones (dying instead made a restart loop whose errors no
# scrape ever saw), but counted as errors: critical. Checked before TRANSIENT, which the
# authentication and master-down errors also are (subclasses of connection and cluster
# errors): they were retried as a warning forever.
REFUSALS = (
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    AuthenticationError,
    NoPermissionError,
)
REFUSAL_PREFIXES = ("MISCONF", "NOREPLICAS", "BUSY ")


def refused(exc: RedisError) -> bool:
    return isinstance(exc, REFUSALS) or (
        isinstance(exc, ResponseError) and str(exc).startswith(REFUSAL_PREFIXES)
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
    timers: dict[str, TimerEntry] = field(default_factory=dict)  # exact next due, per customer
    contributions: list[Contribution] = field(default_factory=list)  # population statistics
    # customer -> state version whose record holds gap samples (cleared after contributing)
    gap_versions: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    timers_fired: int = 0
    more_due: bool = False  # process_due stopped at its limit
    snapshot_version: int = 0  # the population snapshot the batch labelled with (0: none)


@dataclass(slots=True)
class _Fold:
    """One customer's work in a batch, kept apart until its write is known to stand."""

    stored: Stored
    shard: int
    state: CustomerState | None = None
    write: Write | None = None
    applied: int = 0
    duplicates: int = 0
    rejected: list[tuple[RawMessage, Rejection]] = field(default_factory=list)
    applied_times: list[int] = field(default_factory=list)  # event times of applied events
    # Event times of applied and duplicate events: what moves the clock. A duplicate was applied
    # before, maybe by a worker killed between its state write and the clock update.
    clock_times: list[int] = field(default_factory=list)
    effects: list[tuple[str, str]] = field(default_factory=list)
    gaps: list[tuple[str, int]] = field(default_factory=list)
    fired: list[Timer] = field(default_factory=list)
    fired_at: int = 0  # the clock the timers fired at (for lateness)
    now: int = 0  # evaluation time of the last change (population values are taken at it)


async def _zero() -> int:
    return 0


class Engine:
    def __init__(
        self,
        store: Store,
        policy: Policy,
        clock_mode: ClockMode = "wall",
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_backoff_s: float = 5.0,
        timer_lateness_s: int = 3600,
        learn_refresh_s: float = 60.0,
    ) -> None:
        self.store = store
        self.policy = policy
        self.clock_mode = clock_mode
        self.metrics = metrics or Metrics()
        self.wall_clock = wall_clock
        self.max_backoff_s = max_backoff_s
        self.timer_lateness_s = timer_lateness_s
        # Set when another policy version was adopted after this worker's (a rolling restart):
        # every customer it writes is indexed as due now, so the workers on the adopted version
        # re-evaluate it once they own its partition (its event here also took its wake-up).
        self.superseded = False
        self.learn_refresh_s = learn_refresh_s
        self._learned: dict[str, int] = {}
        self._learned_at = float("-inf")
        self._snapshot: Snapshot | None = None
        # customer -> version whose whole outbox this engine has handed out to be produced and
        # not yet seen confirmed. The caller may process the next batch while the previous
        # one's notifications are still being produced (confirms stay in order): a customer in
        # both then carries the older notifications in its newer outbox (kept there until
        # confirmed, in case this process dies) but they are not handed out a second time.
        self._handed: dict[str, int] = {}

    async def current_snapshot(self) -> Snapshot | None:
        """The published population snapshot. Its version is checked on every call (one small
        GET), so a worker never labels with an old snapshot after a newer one was published
        and its relabelling wake-ups went out; the document is re-read only when it changed."""
        version = await self.retry("snapshot", self.store.snapshot_version)
        if version and (self._snapshot is None or self._snapshot.version != version):
            self._snapshot = await self.retry("snapshot", partial(current_snapshot, self.store))
            if self._snapshot is not None:
                self.metrics.snapshot_version.set(self._snapshot.version)
                self.metrics.snapshot_published.set(self._snapshot.published_at)
        return self._snapshot

    async def retry(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry a Redis operation until it succeeds. Not acking is the safe failure: while
        Redis is down the stream stalls (backpressure) and nothing is lost."""
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                result = await call()
                self.metrics.redis_seconds.labels(operation).observe(time.perf_counter() - started)
                return result
            except (RedisError, OSError) as exc:
                if isinstance(exc, RedisError) and refused(exc):
                    # Critical (MemberflowRedisErrors): waits for Redis to be mended.
                    self.metrics.redis_errors.labels(operation).inc()
                    log.error("redis %s refused (%s); retrying in %.2fs", operation, exc, delay)
                elif isinstance(exc, TRANSIENT):
                    # The connection: a warning (MemberflowRedisRetries).
                    self.metrics.redis_retries.labels(operation).inc()
                    log.warning("redis %s failed (%s); retrying in %.2fs", operation, exc, delay)
                else:
                    # Not mended by waiting (a script error): the batch fails unacked and the
                    # worker stops; its supervisor restarts it (MemberflowWorkerRestarting:
                    # this count dies with the process before a scrape can see it).
                    self.metrics.redis_errors.labels(operation).inc()
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def learned_intervals(self) -> dict[str, int]:
        """Median repurchase gaps per learning category, re-read every `learn_refresh_s`."""
        categories = [c for c, r in self.policy.repurchase.categories.items() if r.learn]
        if categories and time.monotonic() - self._learned_at >= self.learn_refresh_s:
            histograms = await self.retry("gaps", partial(self.store.gap_histograms, categories))
            learned = {}
            for category, histogram in histograms.items():
                days = learned_interval(histogram, self.policy.repurchase.min_samples)
                if days is not None:
                    learned[category] = days
            self._learned, self._learned_at = learned, time.monotonic()
        return self._learned

    async def _global_clock(self) -> int:
        return (await self.store.clock()) or 0

    # -- input events ------------------------------------------------------------------------

    async def process(self, messages: Sequence[RawMessage]) -> BatchOutcome:
        outcome = BatchOutcome()
        wall_now = int(self.wall_clock())
        by_customer: dict[str, list[tuple[RawMessage, InputEvent]]] = {}
        shard_of: dict[str, int] = {}
        ticks: dict[int, int] = {}
        for message in messages:
            decoded = decode_event(message.value)
            if isinstance(decoded, Rejection):
                self._dead_letter(outcome, message, decoded, wall_now)
            elif isinstance(decoded, Tick):
                self._tick(outcome, message, decoded, wall_now, ticks)
            else:
                by_customer.setdefault(decoded.customer_id, []).append((message, decoded))
                shard_of[decoded.customer_id] = message.partition

        customers = list(by_customer)
        global_clock, snapshot, loaded = 0, None, None
        if customers:
            # Independent reads, so concurrent: a batch waits for one round trip, not three
            # (at half load these were three of a batch's five waits on Redis).
            global_clock, snapshot, loaded = await together(
                self.retry("clock", self._global_clock) if self.clock_mode == "event" else _zero(),
                self.current_snapshot(),
                self.retry("load", partial(self.store.load, customers)),
            )
            outcome.snapshot_version = snapshot.version if snapshot else 0
        learned = await self.learned_intervals()

        def fold(stored: Stored) -> _Fold:
            cid = stored.customer_id
            return self._fold(
                stored, shard_of[cid], by_customer[cid], global_clock, wall_now, learned, snapshot
            )

        shard_clocks = await self._run(outcome, customers, fold, loaded)
        for shard, tick in ticks.items():
            shard_clocks[shard] = max(shard_clocks.get(shard, 0), tick)
        if self.clock_mode == "event" and shard_clocks:
            # Applied (or already applied) events and ticks only: a dead-lettered far-future
            # event must not move the clock (every later event would then be judged too old).
            clock = await self.retry("clock", partial(self.store.advance_clocks, shard_clocks))
            self.metrics.event_clock.set(clock)
        elif self.clock_mode == "wall":
            self.metrics.event_clock.set(wall_now)

        self.metrics.batch_size.observe(len(messages))
        self.metrics.last_event.set(wall_now)
        self.metrics.events.labels("applied").inc(outcome.applied)
        self.metrics.events.labels("duplicate").inc(outcome.duplicates)
        self.metrics.events.labels("dead_lettered").inc(len(outcome.dead_letters))
        return outcome

    def _tick(
        self,
        outcome: BatchOutcome,
        message: RawMessage,
        tick: Tick,
        wall_now: int,
        ticks: dict[int, int],
    ) -> None:
        at = epoch(tick.occurred_at)
        skew = self.policy.input.max_future_skew_minutes * 60
        if at > wall_now + skew:
            rejection = Rejection(
                reason=RejectReason.FUTURE_TIMESTAMP, detail=f"tick at {tick.occurred_at}"
            )
            self._dead_letter(outcome, message, rejection, wall_now)
            return
        ticks[message.partition] = max(ticks.get(message.partition, 0), at)

    def _fold(
        self,
        stored: Stored,
        shard: int,
        items: list[tuple[RawMessage, InputEvent]],
        global_clock: int,
        wall_now: int,
        learned: dict[str, int],
        snapshot: Snapshot | None,
    ) -> _Fold:
        """Apply one customer's events in order, through the pure rules. Before each event the
        customer's timers are brought up to its time, so a purchase arriving after a due
        reminder (or lifecycle step) sees the world as it was at that moment."""
        fold = _Fold(stored, shard, state=stored.state)
        notifications: list[Notification] = []
        cause: Cause | None = None
        for message, event in items:
            now = evaluation_time(self.clock_mode, fold.state, event, wall_now)
            screened_at = max(now, global_clock)
            rejection = screen(event, self.policy, screened_at, wall_now)
            if rejection is None:
                # Timers due before this event fire first, but only count if the event is
                # applied: a refused or duplicate event must not move the customer's time.
                # Before the event's own time only: in wall clock mode `now` is when it is
                # processed, and a reminder due between a rebuy and its processing (a backlog)
                # was sent, then made pointless by the rebuy. What falls due between the two
                # stays indexed as overdue: the next timer poll fires what still stands. The
                # window and memory expiries in between fire now (a purchase cancels neither,
                # and the grace period a window expiry starts must start at its own time).
                wall = self.clock_mode == "wall"
                moved = (
                    advance(
                        fold.state,
                        self.policy,
                        min(now, event.at) if wall else now,
                        learned,
                        self._sends_from(now),
                        expiries_until=now if wall else None,
                    )
                    if fold.state
                    else None
                )
                decision = apply(
                    moved.state if moved else fold.state,
                    event,
                    self.policy,
                    now,
                    learned,
                    screened_at,
                )
                rejection = decision.rejection
                if decision.duplicate:
                    fold.duplicates += 1
                    fold.clock_times.append(event.at)
                elif rejection is None:
                    if moved is not None and moved.changed:
                        notifications.extend(moved.notifications)
                        fold.effects.extend(moved.effects)
                    fold.state = decision.state
                    notifications.extend(decision.notifications)
                    fold.effects.extend(decision.effects)
                    fold.gaps.extend(decision.gaps)
                    fold.applied += 1
                    fold.applied_times.append(event.at)
                    fold.clock_times.append(event.at)
                    fold.now = max(fold.now, now)
                    cause = event.cause
            if rejection is not None:
                fold.rejected.append((message, rejection))
        changed = fold.applied > 0 or bool(fold.effects)
        if changed and fold.state is not None:
            freeze_intervals(fold.state, self.policy, learned)  # fold.state is its own copy
        if changed and fold.state is not None and cause is not None:
            # fold.state is this fold's own: apply() returned a new state for every applied
            # event, so relabelling it in place touches nothing loaded or shared.
            notes, _ = reclassify(fold.state, self.policy, snapshot, fold.now, cause)
            notifications.extend(notes)
        self._prepare_write(fold, notifications, changed=changed)
        return fold

    def _wake_at(self, state: CustomerState) -> int | None:
        return 0 if self.superseded else wake_at(state, self.policy, self._learned)

    def _prepare_write(self, fold: _Fold, notifications: list[Notification], changed: bool) -> None:
        if changed and fold.state is not None:
            # Gap samples go into the record with the state that revealed them (the version
            # this write creates), so a crash before confirm() cannot lose them.
            version = fold.stored.version + 1
            fold.write = Write(
                customer_id=fold.stored.customer_id,
                expected_version=fold.stored.version,
                state=fold.state,
                outbox=tuple(fold.stored.outbox) + tuple(notifications),
                timer=TimerEntry(fold.shard, self._wake_at(fold.state)),
                gaps=fold.stored.gaps + tuple(GapSample(c, d, version) for c, d in fold.gaps),
            )

    async def _run(
        self,
        outcome: BatchOutcome,
        customer_ids: list[str],
        fold: Callable[[Stored], _Fold],
        loaded: dict[str, Stored] | None = None,
    ) -> dict[int, int]:
        """Load (unless the caller has: `loaded`), fold, save with compare-and-set; redo
        customers whose write lost a race. Returns the newest applied (or already applied)
        event time per shard."""
        newest: dict[int, int] = {}
        pending = customer_ids
        for _ in range(MAX_CONFLICT_ROUNDS):
            if not pending:
                return newest
            if loaded is None:
                loaded = await self.retry("load", partial(self.store.load, pending))
            folds = {cid: fold(loaded[cid]) for cid in pending}
            writes = [f.write for f in folds.values() if f.write is not None]
            versions = await self.retry("save", partial(self.store.save, writes))
            conflicted = []
            for customer_id, f in folds.items():
                handed = self._handed.get(customer_id, -1) >= f.stored.version
                if f.write is None:
                    if f.stored.outbox and not handed:  # left unsent by a crash: send it now
                        outcome.notifications.extend(f.stored.outbox)
                        outcome.outbox_versions[customer_id] = f.stored.version
                        self._handed[customer_id] = f.stored.version
                    if f.stored.gaps:  # left uncounted by a crash: counted now
                        outcome.gap_versions[customer_id] = f.stored.version
                    version = f.stored.version
                elif (written := versions[customer_id]) is None:
                    self.metrics.version_conflicts.inc()
                    conflicted.append(customer_id)
                    continue
                else:
                    version = written
                    added = f.write.outbox[len(f.stored.outbox) :]
                    # Decided by this write, so counted here, once: the notifications of a
                    # re-sent outbox (a crash, a partition that moved before its confirm) are
                    # produced again, but the change they tell of happened once.
                    self._count_transitions(added)
                    new = added if handed else f.write.outbox
                    outcome.notifications.extend(new)
                    if f.write.outbox:
                        outcome.outbox_versions[customer_id] = version
                        self._handed[customer_id] = version
                    if f.write.gaps:
                        outcome.gap_versions[customer_id] = version
                self._settle(outcome, customer_id, f, newest, version)
            pending, loaded = conflicted, None
        if pending:
            # Another writer keeps winning: give up on the batch without acking it.
            raise RuntimeError(f"version conflicts did not settle for {sorted(pending)[:5]}")
        return newest

    def _settle(
        self,
        outcome: BatchOutcome,
        customer_id: str,
        f: _Fold,
        newest: dict[int, int],
        version: int,
    ) -> None:
        """Count a fold that stands (a conflicted one is redone, so counted only once)."""
        outcome.applied += f.applied
        outcome.duplicates += f.duplicates
        outcome.timers_fired += len(f.fired)
        # f.fired and f.effects are one entry per firing (advance()). A message deferred for
        # quiet hours was woken at their end on purpose (wake_at): its lateness is its send's,
        # which fires in the same pass and is measured from the end of the quiet hours.
        # Wall clock mode only: in event mode the clock is event time, which a replay moves by
        # days between two polls, so "late" would measure the replay's speed (the
        # MemberflowTimersLate alert fired on every replay); the lag alerts cover a stuck worker.
        for timer, (_, result) in zip(f.fired, f.effects, strict=False):
            if result != "deferred_quiet_hours" and self.clock_mode == "wall":
                self.metrics.timer_lateness.observe(max(0, f.fired_at - timer.due))
        if f.state is not None:
            # Also for folds that wrote nothing (all duplicates): repairs the index and the
            # population statistics after a crash between the state write and confirm().
            due = (
                f.write.timer.due
                if f.write is not None and f.write.timer is not None
                else self._wake_at(f.state)
            )
            outcome.timers[customer_id] = TimerEntry(f.shard, due, version)
            gaps = f.write.gaps if f.write is not None else f.stored.gaps
            contribution = self._contribution(f.state, version, f.shard, f.now, gaps)
            if contribution is not None:
                outcome.contributions.append(contribution)
        for trigger, result in f.effects:
            self.metrics.triggers.labels(trigger, result).inc()
        wall_now = int(self.wall_clock())
        for occurred in f.clock_times:
            newest[f.shard] = max(newest.get(f.shard, 0), occurred)
        for occurred in f.applied_times:
            self.metrics.event_time_lag.observe(max(0, wall_now - occurred))
        for message, rejection in f.rejected:
            self._dead_letter(outcome, message, rejection, wall_now)

    def _contribution(
        self,
        state: CustomerState,
        version: int,
        shard: int,
        now: int,
        gaps: tuple[GapSample, ...] = (),
    ) -> Contribution | None:
        if state.last_purchase_at is None or version == 0:
            return None
        if not now:  # nothing changed in this batch: the customer's own current time
            now = (
                int(self.wall_clock())
                if self.clock_mode == "wall"
                else (state.latest_event_at or state.last_purchase_at)
            )
        orders, spend = state.window(now, self.policy.window_days)
        segment = state.segment or ["", "", "", 0]
        return Contribution(
            customer_id=state.customer_id,
            version=version,
            partition=shard,
            r=state.last_purchase_at,
            f=orders,
            m=spend,
            tier=state.tier,
            segment=str(segment[0]),
            grade=str(segment[2]),
            stage=state.stage,
            gaps=gaps,
        )

    # -- timers ------------------------------------------------------------------------------

    def _sends_from(self, now: int) -> int | None:
        """When a marketing message fired now really goes out (rules.timeline.advance): in
        `wall` mode now; in `event` mode at its due time, as a batch computation would."""
        return now if self.clock_mode == "wall" else None

    async def timer_clock(self, shard: int) -> int:
        """The time up to which a shard's timers fire: wall time, or in `event` mode the
        shard's event clock less the allowed lateness."""
        if self.clock_mode == "wall":
            return int(self.wall_clock())
        clock = await self.retry("clock", partial(self.store.clock, shard))
        return (clock or 0) - self.timer_lateness_s

    async def shards_due(self, shards: Sequence[int]) -> list[int]:
        """The shards among `shards` with a timer due now (one round trip). A hint for the
        poller, which takes its lock only for these; process_due() checks again."""
        if not shards:
            return []
        heads = await self.retry("due", partial(self.store.timer_heads, shards))
        due = []
        for shard, (clock, first) in heads.items():
            until = (
                int(self.wall_clock())
                if self.clock_mode == "wall"
                else (clock or 0) - self.timer_lateness_s
            )
            if first is not None and until > 0 and first <= until:
                due.append(shard)
        return due

    async def timers_overdue(self, shards: Sequence[int]) -> dict[int, int]:
        """Per shard, how long its oldest due timer has waited past its due time (0: none is
        due). Unlike the lateness of fired timers, it grows while timers do not fire at all.
        Wall clock mode only, like the lateness: in event mode a replay moves the clock by days
        a second while timers get their share of the time, so the wait measures the replay.
        Wake-ups (due time 0: relabelling after a new snapshot or policy) are not counted: they
        have no due time to be late for, and a large storm of them is worked off at
        `timer_share` (the age read "56 years" after every publish).
        Not retried: a report, which has no figure while Redis is away."""
        if not shards or self.clock_mode != "wall":
            return {}
        oldest = await self.store.oldest_due(shards)
        now = int(self.wall_clock())
        return {shard: 0 if due is None else max(0, now - due) for shard, due in oldest.items()}

    async def process_due(self, shard: int, limit: int = 500) -> BatchOutcome:
        """Fire the due timers of one shard (an input partition this worker owns)."""
        outcome = BatchOutcome()
        until = await self.timer_clock(shard)
        if until <= 0:
            return outcome
        due = await self.retry("due", partial(self.store.due, shard, until, limit))
        if not due:
            return outcome
        outcome.more_due = len(due) == limit
        learned = await self.learned_intervals()
        snapshot = await self.current_snapshot()
        outcome.snapshot_version = snapshot.version if snapshot else 0
        # customer -> the version found with no timer left: unindexed only while still at it
        vanished: dict[str, int] = {}

        def fold(stored: Stored) -> _Fold:
            f = _Fold(stored, shard, state=stored.state, now=until)
            if stored.state is None:
                vanished[stored.customer_id] = stored.version
                return f
            moved = advance(stored.state, self.policy, until, learned, self._sends_from(until))
            # Relabelled in place below: either advance()'s own copy or the state just loaded
            # for this fold (a conflict reloads it), so nothing shared changes.
            f.state, f.effects, f.fired = moved.state, list(moved.effects), list(moved.fired)
            f.fired_at = until
            if moved.fired:
                cause = Cause(kind="timer", id=f"{moved.fired[-1].key}@{moved.fired[-1].anchor}")
            else:  # woken by a new snapshot or a new policy version: both name the cause
                version = snapshot.version if snapshot else 0
                cause = Cause(kind="snapshot", id=f"{version}/{self.policy.version}")
            # A woken customer is re-evaluated whole: a new policy may move its tier too
            # (upgrades at once; a raised bar starts the grace period).
            before = (f.state.tier, f.state.below_since, f.state.policy_version)
            f.state.policy_version = self.policy.version  # evaluated under it from now on
            frozen = freeze_intervals(f.state, self.policy, learned)
            # Judged at its own latest event when that is past `until` (event mode: the
            # shard's clock less the lateness): at `until`, a purchase made after it on the
            # next day was outside the window, and the customer was relabelled and counted
            # in the statistics without it.
            judged = max(until, f.state.latest_event_at or 0)
            f.now = judged
            tier_notes = evaluate_tier(f.state, self.policy, judged, cause)
            notes, relabelled = reclassify(f.state, self.policy, snapshot, judged, cause)
            retiered = (f.state.tier, f.state.below_since, f.state.policy_version) != before
            self._prepare_write(
                f,
                [*moved.notifications, *tier_notes, *notes],
                changed=moved.changed or relabelled or retiered or frozen,
            )
            return f

        await self._run(outcome, due, fold)
        for customer_id, entry in list(outcome.timers.items()):
            if entry.due is None:
                del outcome.timers[customer_id]
                # While its outbox waits to be produced, the entry stays (at the fired time):
                # after a crash before confirm, the next poll resends it, then unindexes.
                if customer_id not in outcome.outbox_versions:
                    vanished[customer_id] = entry.version or 0
        if vanished:
            await self.retry("unindex", partial(self.store.unindex, shard, vanished))
        return outcome

    # -- outputs -----------------------------------------------------------------------------

    def _dead_letter(
        self, outcome: BatchOutcome, message: RawMessage, rejection: Rejection, wall_now: int
    ) -> None:
        self.metrics.dead_letters.labels(rejection.reason.value).inc()
        raw = message.value or b""
        outcome.dead_letters.append(
            (
                message.key,
                DeadLetter(
                    reason=rejection.reason,
                    detail=rejection.detail,
                    raw_b64=base64.b64encode(raw[:MAX_MESSAGE_BYTES]).decode(),
                    raw_bytes=len(raw),
                    raw_truncated=len(raw) > MAX_MESSAGE_BYTES,
                    source_topic=message.topic,
                    source_partition=message.partition,
                    source_offset=message.offset,
                    rejected_at=datetime.fromtimestamp(wall_now, UTC),
                ),
            )
        )

    def _count_transitions(self, notifications: Sequence[Notification]) -> None:
        for notification in notifications:
            direction = _TIER_DIRECTION.get(notification.type)
            if direction is not None:
                self.metrics.tier_transitions.labels(direction).inc()
            elif notification.type is NotificationType.SEGMENT_CHANGED:
                direction = grade_direction(
                    str(notification.explanation.get("previous_grade") or "") or None,
                    str(notification.explanation.get("grade") or "") or None,
                )
                self.metrics.segment_transitions.labels(direction).inc()

    async def confirm(self, outcome: BatchOutcome) -> None:
        """Call after every notification of `outcome` was acknowledged by the broker, and only
        after the outcomes handed out before it were confirmed (in order: confirming clears a
        customer's outbox, which may still hold an earlier outcome's notifications)."""
        for notification in outcome.notifications:
            self.metrics.notifications.labels(notification.type.value).inc()
        # Contributions first: they count the pending gap samples that confirm then clears.
        if outcome.contributions:
            await self.retry("contribute", partial(self.store.contribute, outcome.contributions))
        versions = {**outcome.gap_versions, **outcome.outbox_versions}
        await self.retry("confirm", partial(self.store.confirm, versions, outcome.timers))
        if outcome.timers:
            published = await self.retry("snapshot", self.store.snapshot_version)
            if published != outcome.snapshot_version:
                # A snapshot published while this batch was in flight: its wake-ups missed
                # these customers (the statistics still held their old values) or were just
                # overwritten by their exact due times above, so they kept labels of the old
                # snapshot until something else woke them. Woken again, they are relabelled.
                entries = [(cid, entry.shard) for cid, entry in outcome.timers.items()]
                await self.retry("wake", partial(self.store.wake, entries))
        for customer_id, version in outcome.outbox_versions.items():
            if self._handed.get(customer_id) == version:  # else a newer outbox is out
                del self._handed[customer_id]
