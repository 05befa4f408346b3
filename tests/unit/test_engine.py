"""The engine over the in-memory store: batches, dead letters, redelivery, outbox, clocks, races."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from redis.exceptions import (
    AuthenticationError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from memberflow.engine import MAX_CONFLICT_ROUNDS, BatchOutcome, ClockMode, Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.settings import default_rules_file
from rules.customer import DAY, CustomerState, apply, epoch, iso
from rules.policy import parse_policy
from state.memory_store import MemoryStore
from state.store import Stored, TimerEntry, Write
from streams.codec import encode_model
from streams.events import (
    Cause,
    Item,
    Notification,
    NotificationType,
    Purchase,
    Refund,
    RejectReason,
    Tick,
)

POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))
WALL = epoch(datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC))
TOPIC = "purchases"


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def purchase(
    event_id: str, customer: str, when: int, amount: str = "10", currency: str = "EUR"
) -> Purchase:
    return Purchase(
        event_id=event_id,
        customer_id=customer,
        occurred_at=at(when),
        amount=Decimal(amount),
        currency=currency,
    )


def message(offset: int, value: bytes | None, partition: int = 0) -> RawMessage:
    return RawMessage(TOPIC, partition, offset, f"key-{offset}".encode(), value)


def bought(
    offset: int,
    event_id: str,
    customer: str,
    when: int,
    amount: str = "10",
    currency: str = "EUR",
    partition: int = 0,
) -> RawMessage:
    body = encode_model(purchase(event_id, customer, when, amount, currency))
    return message(offset, body, partition)


def make_engine(store: MemoryStore, clock_mode: ClockMode = "wall") -> Engine:
    # A fractional wall clock: the engine works in whole seconds.
    return Engine(
        store, POLICY, clock_mode=clock_mode, metrics=Metrics(), wall_clock=lambda: WALL + 0.75
    )


def sample(engine: Engine, name: str, **labels: str) -> float | None:
    return engine.metrics.registry.get_sample_value(name, labels)


async def snapshot(
    store: MemoryStore,
) -> dict[str, tuple[int, CustomerState, tuple[Notification, ...]]]:
    rows = {}
    async for stored in store.scan():
        assert stored.state is not None
        rows[stored.customer_id] = (stored.version, stored.state, stored.outbox)
    return rows


async def state_of(store: MemoryStore, customer: str) -> Stored:
    return (await store.load([customer]))[customer]


def dead_letter_rows(outcome: BatchOutcome) -> list[tuple[object, ...]]:
    rows = [
        (
            letter.source_offset,
            letter.source_partition,
            letter.source_topic,
            letter.reason,
            letter.raw_b64,
            letter.rejected_at,
            key,
        )
        for key, letter in outcome.dead_letters
    ]
    return sorted(rows, key=lambda row: (row[1], row[0]))  # type: ignore[arg-type]


def b64(value: bytes | None) -> str:
    return base64.b64encode(value or b"").decode()


# A batch with every kind of input: good, duplicate, and bad at each stage.
GOOD_1 = bought(10, "p1", "c1", WALL - 2 * DAY, "200")
GOOD_2 = bought(11, "p2", "c1", WALL - DAY, "150")  # c1 crosses silver
DUPLICATE = bought(5, "p1", "c1", WALL - 2 * DAY, "200", partition=1)  # upstream resend
BROKEN = message(12, b'{"type": "purchase", ')
UNKNOWN_CURRENCY = bought(7, "x1", "c2", WALL - DAY, "5", "JPY", partition=2)
GOOD_3 = bought(8, "p3", "c2", WALL - DAY, "10", partition=2)
ORPHAN_REFUND = message(
    9,
    encode_model(
        Refund(
            event_id="r1",
            customer_id="c3",
            refund_of="nope",
            occurred_at=at(WALL - DAY),
            amount=Decimal("5"),
            currency="EUR",
        )
    ),
    partition=2,
)
EMPTY = message(13, None)
CONFLICT = bought(6, "p1", "c1", WALL - 2 * DAY, "201", partition=1)
FUTURE = bought(10, "x2", "c2", WALL + DAY, partition=2)
TOO_OLD = bought(11, "x3", "c2", WALL - 800 * DAY, partition=2)
BATCH = [
    GOOD_1,
    GOOD_2,
    DUPLICATE,
    BROKEN,
    UNKNOWN_CURRENCY,
    GOOD_3,
    ORPHAN_REFUND,
    EMPTY,
    CONFLICT,
    FUTURE,
    TOO_OLD,
]
EXPECTED_DEAD = [
    (12, 0, TOPIC, RejectReason.MALFORMED_JSON, b64(BROKEN.value), at(WALL), b"key-12"),
    (13, 0, TOPIC, RejectReason.EMPTY, "", at(WALL), b"key-13"),
    (6, 1, TOPIC, RejectReason.CONFLICTING_DUPLICATE, b64(CONFLICT.value), at(WALL), b"key-6"),
    (7, 2, TOPIC, RejectReason.UNKNOWN_CURRENCY, b64(UNKNOWN_CURRENCY.value), at(WALL), b"key-7"),
    (9, 2, TOPIC, RejectReason.UNKNOWN_PURCHASE, b64(ORPHAN_REFUND.value), at(WALL), b"key-9"),
    (10, 2, TOPIC, RejectReason.FUTURE_TIMESTAMP, b64(FUTURE.value), at(WALL), b"key-10"),
    (11, 2, TOPIC, RejectReason.TOO_OLD, b64(TOO_OLD.value), at(WALL), b"key-11"),
]


def expected_upgrade_to_silver() -> Notification:
    note = apply(
        apply(None, purchase("p1", "c1", WALL - 2 * DAY, "200"), POLICY, WALL).state,
        purchase("p2", "c1", WALL - DAY, "150"),
        POLICY,
        WALL,
    ).notifications[0]
    assert note.cause == Cause(kind="event", id="p2")
    return note


def tiers_of(notes: Sequence[Notification]) -> list[Notification]:
    return [n for n in notes if n.type is NotificationType.TIER_UPGRADED]


def stages_of(notes: Sequence[Notification]) -> list[tuple[str, str, str, str]]:
    """(customer, previous stage, new stage, cause) of each lifecycle notification."""
    return [
        (
            n.customer_id,
            n.explanation["previous_stage"],
            n.explanation["new_stage"],
            n.cause.id,
        )
        for n in notes
        if n.type is NotificationType.LIFECYCLE_CHANGED
    ]


# What BATCH emits: c1 new (p1), silver (p2) and active (p2), then c2 new (p3).
BATCH_STAGES = [
    ("c1", "potential", "new", "p1"),
    ("c1", "new", "active", "p2"),
    ("c2", "potential", "new", "p3"),
]
BATCH_TYPES = [
    NotificationType.LIFECYCLE_CHANGED,
    NotificationType.TIER_UPGRADED,
    NotificationType.LIFECYCLE_CHANGED,
    NotificationType.LIFECYCLE_CHANGED,
]


def test_batch_outcome_counts_and_dead_letters_exactly() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        outcome = await engine.process(BATCH)
        assert outcome.applied == 3
        assert outcome.duplicates == 1
        assert dead_letter_rows(outcome) == EXPECTED_DEAD
        details = {letter.reason: letter.detail for _, letter in outcome.dead_letters}
        assert details[RejectReason.EMPTY] == "empty message"
        assert details[RejectReason.UNKNOWN_CURRENCY] == "JPY"
        assert details[RejectReason.UNKNOWN_PURCHASE] == "no purchase nope for customer c3"

        assert [n.type for n in outcome.notifications] == BATCH_TYPES
        assert tiers_of(outcome.notifications) == [expected_upgrade_to_silver()]
        assert stages_of(outcome.notifications) == BATCH_STAGES
        note = outcome.notifications[1]
        assert (note.type, note.customer_id) == (NotificationType.TIER_UPGRADED, "c1")
        assert note.explanation["new_tier"] == "silver"
        assert outcome.outbox_versions == {"c1": 1, "c2": 1}

        rows = await snapshot(store)
        assert sorted(rows) == ["c1", "c2"]  # c3 had nothing applied: no record
        c1 = rows["c1"][1]
        c2 = rows["c2"][1]
        assert rows["c1"][0] == rows["c2"][0] == 1
        assert (c1.lifetime_orders, c1.lifetime_spend, c1.tier) == (2, 35000, "silver")
        assert c1.window(WALL, POLICY.window_days) == (2, 35000)
        assert (c2.lifetime_orders, c2.lifetime_spend, c2.tier) == (1, 1000, "member")
        assert rows["c1"][2] == tuple(outcome.notifications[:3])
        assert rows["c2"][2] == tuple(outcome.notifications[3:])
        assert (c1.stage, c2.stage) == ("active", "new")
        assert await store.clock() is None  # wall mode does not keep an event clock

        assert sample(engine, "memberflow_events_total", outcome="applied") == 3
        assert sample(engine, "memberflow_events_total", outcome="duplicate") == 1
        assert sample(engine, "memberflow_events_total", outcome="dead_lettered") == 7
        assert sample(engine, "memberflow_dead_letters_total", reason="too_old") == 1
        assert sample(engine, "memberflow_event_clock_seconds") == WALL
        assert sample(engine, "memberflow_version_conflicts_total") == 0
        # Notifications counted when the broker has them, not before; a tier change when it
        # is written.
        assert sample(engine, "memberflow_notifications_total", type="tier_upgraded") is None
        assert sample(engine, "memberflow_tier_transitions_total", direction="up") == 1
        await engine.confirm(outcome)
        assert sample(engine, "memberflow_notifications_total", type="tier_upgraded") == 1
        assert sample(engine, "memberflow_notifications_total", type="lifecycle_changed") == 3
        assert sample(engine, "memberflow_tier_transitions_total", direction="up") == 1

    asyncio.run(scenario())


def test_redelivered_batch_after_confirm_applies_and_emits_nothing() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        first = await engine.process(BATCH)
        await engine.confirm(first)
        before = await snapshot(store)
        assert before["c1"][2] == ()  # confirmed: the outbox is empty

        again = await engine.process(BATCH)
        assert again.applied == 0
        assert again.duplicates == 4  # p1, p2, the resent p1, p3
        assert again.notifications == []
        assert again.outbox_versions == {}
        assert dead_letter_rows(again) == EXPECTED_DEAD  # bad input is bad every time
        assert await snapshot(store) == before  # same versions: nothing was written

    asyncio.run(scenario())


def test_outbox_is_resent_until_confirmed() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        first = await engine.process(BATCH)
        sent = first.notifications
        assert [n.type for n in sent] == BATCH_TYPES
        before = await snapshot(store)

        # Crash after producing, before confirm: the batch comes again, to a new process.
        engine = make_engine(store)
        again = await engine.process(BATCH)
        assert again.applied == 0
        assert again.notifications == sent
        assert [n.notification_id for n in again.notifications] == [n.notification_id for n in sent]
        assert again.outbox_versions == {"c1": 1, "c2": 1}
        assert await snapshot(store) == before

        await engine.confirm(again)
        assert (await state_of(store, "c1")).outbox == ()
        assert (await state_of(store, "c2")).outbox == ()
        # Produced again, but the upgrade happened once: the first process counted it (a
        # worker that lost the partition before its confirm still confirms and counts).
        assert sample(engine, "memberflow_notifications_total", type="tier_upgraded") == 1
        assert sample(engine, "memberflow_tier_transitions_total", direction="up") is None
        third = await engine.process(BATCH)
        assert third.notifications == []
        assert third.outbox_versions == {}

    asyncio.run(scenario())


def test_unconfirmed_outbox_travels_with_the_next_write() -> None:
    """The worker processes the next batch while the previous one's notifications are still
    being produced: a customer in both keeps the older notifications in its newer outbox (for
    a crash), but they are handed out only once."""

    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        first = await engine.process([GOOD_1, GOOD_2])
        assert [n.explanation["new_tier"] for n in tiers_of(first.notifications)] == ["silver"]
        assert stages_of(first.notifications) == BATCH_STAGES[:2]
        first_c1 = tuple(n for n in first.notifications if n.customer_id == "c1")
        # Not confirmed; the next batch takes c1 to gold.
        second = await engine.process(
            [bought(20, "p4", "c1", WALL, "300"), bought(21, "p5", "c1", WALL, "400")]
        )
        assert second.applied == 2
        # Only the new decision is handed out (no lifecycle step: already active) ...
        assert [n.explanation["new_tier"] for n in tiers_of(second.notifications)] == ["gold"]
        assert len(second.notifications) == 1
        assert second.outbox_versions == {"c1": 2}
        # ... while the record holds both, until confirmed.
        assert (await state_of(store, "c1")).outbox == first_c1 + tuple(second.notifications)

        # Had the process died here, the next one would send the whole outbox again.
        successor = make_engine(store)
        resent = await successor.process([bought(20, "p4", "c1", WALL, "300")])
        assert resent.duplicates == 1
        assert resent.notifications == [*first_c1, *second.notifications]

        # Confirms in order: the first must not drop the newer outbox.
        await engine.confirm(first)
        assert (await state_of(store, "c1")).outbox == first_c1 + tuple(second.notifications)
        # A third batch while the second is still out: nothing handed out twice.
        third = await engine.process([bought(22, "p4", "c1", WALL, "300")])
        assert (third.duplicates, third.notifications) == (1, [])
        await engine.confirm(second)
        stored = await state_of(store, "c1")
        assert (stored.version, stored.outbox) == (2, ())

    asyncio.run(scenario())


def test_duplicates_inside_one_batch() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        outcome = await engine.process([GOOD_1, GOOD_1, DUPLICATE, GOOD_3])
        assert (outcome.applied, outcome.duplicates, outcome.dead_letters) == (2, 2, [])
        assert (await state_of(store, "c1")).version == 1  # one write per customer per batch

    asyncio.run(scenario())


# -- the event clock -------------------------------------------------------------------------


def test_event_clock_judges_each_customer_by_its_own_latest_event() -> None:
    recent = WALL - DAY
    old = recent - 400 * DAY
    others = [bought(1, "b1", "other", recent, "5")]
    ours = [bought(2, "a1", "c1", old, "200"), bought(3, "a2", "c1", old + 3600, "150")]

    polled: list[BatchOutcome] = []

    async def scenario(clock_mode: ClockMode) -> tuple[Stored, BatchOutcome, int | None]:
        store = MemoryStore()
        engine = make_engine(store, clock_mode)
        await engine.confirm(await engine.process(others))
        outcome = await engine.process(ours)
        await engine.confirm(outcome)
        stored = await state_of(store, "c1")
        if clock_mode == "wall":
            polled.append(await engine.process_due(0))
        return stored, outcome, await store.clock()

    stored, outcome, clock = asyncio.run(scenario("event"))
    assert outcome.applied == 2
    assert outcome.dead_letters == []
    assert stored.state is not None
    assert stored.state.latest_event_at == old + 3600
    assert stored.state.buckets == {old // DAY: [2, 35000]}
    assert stored.state.window(old + 3600, POLICY.window_days) == (2, 35000)
    assert stored.state.tier == "silver"
    assert stored.state.tier_since == old + 3600
    (note,) = tiers_of(outcome.notifications)
    assert note.occurred_at == at(old + 3600)
    assert note.explanation["inputs"]["evaluated_at"] == iso(old + 3600)
    assert stages_of(outcome.notifications) == [
        ("c1", "potential", "new", "a1"),
        ("c1", "new", "active", "a2"),
    ]
    assert [n.occurred_at for n in outcome.notifications] == [
        at(old),
        at(old + 3600),
        at(old + 3600),
    ]
    assert (stored.state.stage, stored.state.stage_since) == ("active", old + 3600)
    assert clock == recent  # an older batch never moves the clock back

    # The same input judged by the wall clock: 400 days old is outside the window. Before a2
    # is applied c1's timers run up to a2's own time only (nothing is due an hour after a1):
    # they used to run up to the wall clock, so the customer lapsed, churned and was
    # "reactivated" by a purchase made 400 days ago. The timers a2 leaves overdue fire at the
    # next poll: the customer's last purchase is 400 days old, so it has churned.
    stored, outcome, clock = asyncio.run(scenario("wall"))
    assert outcome.applied == 2
    assert tiers_of(outcome.notifications) == []
    assert stages_of(outcome.notifications) == [
        ("c1", "potential", "new", "a1"),
        ("c1", "new", "active", "a2"),
    ]
    assert stored.state is not None
    assert stored.state.buckets == {}
    assert stored.state.tier == "member"
    assert stored.state.stage == "active"
    assert clock is None
    (poll,) = polled
    last = old + 3600
    assert stages_of(poll.notifications) == [
        ("c1", "active", "at_risk", f"at_risk@{last}"),
        ("c1", "at_risk", "churned", f"churned@{last}"),
    ]
    assert [n.type for n in poll.notifications].count(NotificationType.WIN_BACK_OFFER) == 1


def test_event_clock_advances_to_the_newest_applied_event() -> None:
    t1, t2 = WALL - 3 * DAY, WALL - 2 * DAY

    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store, "event")
        first = await engine.process(
            [
                bought(1, "e1", "c1", t1),
                bought(2, "e2", "c2", t2),
                bought(3, "x1", "c2", t2 + 3600, currency="JPY"),  # rejected, newer
                bought(4, "x2", "c1", WALL + DAY),  # rejected as future, newer still
            ]
        )
        assert first.applied == 2
        assert [(row[0], row[3]) for row in dead_letter_rows(first)] == [
            (3, RejectReason.UNKNOWN_CURRENCY),
            (4, RejectReason.FUTURE_TIMESTAMP),
        ]
        assert await store.clock() == t2
        assert sample(engine, "memberflow_event_clock_seconds") == t2

        # Only duplicates and bad input: the clock stays.
        await engine.process([bought(5, "e2", "c2", t2), message(6, b"nope")])
        assert await store.clock() == t2
        # Older events never move it back; newer ones move it forward.
        await engine.process([bought(7, "e3", "c3", t1 - DAY)])
        assert await store.clock() == t2
        await engine.process([bought(8, "e4", "c3", WALL)])
        assert await store.clock() == WALL

    asyncio.run(scenario())


def test_rejected_far_future_event_does_not_stall_the_event_clock() -> None:
    year_2100 = epoch(datetime(2100, 1, 1, tzinfo=UTC))

    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store, "event")
        first = await engine.process(
            [bought(1, "e1", "c1", WALL - DAY), bought(2, "x1", "c2", year_2100)]
        )
        assert first.applied == 1
        assert [letter.reason for _, letter in first.dead_letters] == [
            RejectReason.FUTURE_TIMESTAMP
        ]
        # Later ordinary events are still judged against real event time.
        later = await engine.process([bought(3, "e2", "c3", WALL - DAY)])
        assert later.dead_letters == []
        assert later.applied == 1
        assert await store.clock() == WALL - DAY

    asyncio.run(scenario())


# -- races and transient failures ------------------------------------------------------------


class RacingStore(MemoryStore):
    """Before the engine's save lands, another worker writes the same customers (once each,
    or every time with `always`)."""

    def __init__(self, rivals: dict[str, Purchase], always: bool = False) -> None:
        super().__init__()
        self.rivals = rivals
        self.always = always
        self.raced: list[str] = []

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        for write in writes:
            rival = self.rivals.get(write.customer_id)
            if rival is None or (write.customer_id in self.raced and not self.always):
                continue
            self.raced.append(write.customer_id)
            current = (await self.load([write.customer_id]))[write.customer_id]
            event = rival.model_copy(update={"event_id": f"{rival.event_id}-{len(self.raced)}"})
            decision = apply(current.state, event, POLICY, WALL)
            assert decision.state is not None
            theirs = Write(write.customer_id, current.version, decision.state, current.outbox)
            assert (await super().save([theirs]))[write.customer_id] == current.version + 1
        return await super().save(writes)


def test_version_conflict_is_retried_and_counted_once() -> None:
    rival = purchase("rival", "c1", WALL - 3 * DAY, "200")

    async def scenario() -> None:
        store = RacingStore({"c1": rival})
        engine = make_engine(store)
        outcome = await engine.process(
            [bought(1, "p2", "c1", WALL - DAY, "150"), bought(2, "p3", "c2", WALL - DAY, "10")]
        )
        assert store.raced == ["c1"]
        assert sample(engine, "memberflow_version_conflicts_total") == 1
        assert outcome.applied == 2  # not 3: the conflicted fold is redone, not added
        assert outcome.duplicates == 0
        assert outcome.dead_letters == []
        c1 = await state_of(store, "c1")
        assert c1.version == 2
        assert c1.state is not None
        assert (c1.state.lifetime_orders, c1.state.lifetime_spend) == (2, 35000)
        assert c1.state.tier == "silver"
        # The upgrade is caused by our event, judged on the rival's write plus ours; the
        # rival's first purchase made c1 new, ours makes it active.
        (note,) = tiers_of(outcome.notifications)
        # c2's write stood in the first round, c1's in the second.
        assert stages_of(outcome.notifications) == [
            ("c2", "potential", "new", "p3"),
            ("c1", "new", "active", "p2"),
        ]
        assert note.cause == Cause(kind="event", id="p2")
        assert note.explanation["inputs"]["window_orders"] == 2
        assert outcome.outbox_versions == {"c2": 1, "c1": 2}
        assert (await state_of(store, "c2")).version == 1
        assert sample(engine, "memberflow_events_total", outcome="applied") == 2

    asyncio.run(scenario())


def test_endless_version_conflicts_give_up_without_acking() -> None:
    rival = purchase("rival", "c1", WALL - 3 * DAY, "1")

    async def scenario() -> None:
        store = RacingStore({"c1": rival}, always=True)
        engine = make_engine(store)
        with pytest.raises(RuntimeError, match=r"version conflicts did not settle for \['c1'\]"):
            await engine.process([bought(1, "p2", "c1", WALL - DAY, "150")])
        assert sample(engine, "memberflow_version_conflicts_total") == MAX_CONFLICT_ROUNDS
        c1 = await state_of(store, "c1")
        assert c1.state is not None
        assert c1.state.lifetime_orders == MAX_CONFLICT_ROUNDS  # only the rival's writes
        assert sample(engine, "memberflow_events_total", outcome="applied") is None

    asyncio.run(scenario())


class FlakyStore(MemoryStore):
    """The first `failures` loads fail like a Redis connection drop."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("connection reset")
        return await super().load(customer_ids)


def test_transient_store_errors_are_retried() -> None:
    async def scenario() -> None:
        store = FlakyStore(failures=2)
        engine = make_engine(store)
        engine.max_backoff_s = 0.01
        outcome = await engine.process([GOOD_1])
        assert outcome.applied == 1
        assert sample(engine, "memberflow_redis_retries_total", operation="load") == 2
        assert sample(engine, "memberflow_redis_errors_total", operation="load") is None
        assert (await state_of(store, "c1")).version == 1

    asyncio.run(scenario())


class RefusingStore(MemoryStore):
    """A Redis that answers the first `refusals` saves with `error`."""

    def __init__(self, error: RedisError, refusals: int = 1_000_000) -> None:
        super().__init__()
        self.error, self.refusals = error, refusals

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        if self.refusals:
            self.refusals -= 1
            raise self.error
        return await super().save(writes)


@pytest.mark.parametrize(
    "error",
    [
        OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently"),
        ResponseError("BUSY Redis is busy running a script."),
        MasterDownError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data..."),
        AuthenticationError("invalid username-password pair or user is disabled."),
        NoPermissionError("this user has no permissions to run the 'evalsha' command"),
    ],
    ids=["oom", "readonly", "misconf", "busy", "masterdown", "auth", "acl"],
)
def test_a_redis_that_refuses_is_waited_for_and_counted_as_errors(error: RedisError) -> None:
    """Memory full, a replica, writes stopped, a password or ACL that no longer lets the
    worker in: the worker waits (nothing acked) until Redis is mended, counted for the
    critical MemberflowRedisErrors alert. It used to die at once, and under a supervisor
    restart and die again before any scrape saw the errors; the authentication and
    master-down errors, being connection and cluster errors too, counted as mere retries."""

    async def scenario() -> None:
        store = RefusingStore(error, refusals=3)
        engine = make_engine(store)
        engine.max_backoff_s = 0.01
        outcome = await engine.process([GOOD_1])
        assert outcome.applied == 1
        assert sample(engine, "memberflow_redis_errors_total", operation="save") == 3
        assert sample(engine, "memberflow_redis_retries_total", operation="save") is None
        assert (await state_of(store, "c1")).version == 1

    asyncio.run(scenario())


def test_other_store_errors_are_counted_and_fail_the_batch() -> None:
    """Not retried (waiting mends no script error or wrong password: the batch fails unacked
    and the worker restarts it), but counted for the MemberflowRedisErrors alert."""

    async def scenario() -> None:
        engine = make_engine(RefusingStore(ResponseError("ERR Error running script")))
        with pytest.raises(ResponseError):
            await engine.process([GOOD_1])
        assert sample(engine, "memberflow_redis_errors_total", operation="save") == 1
        assert sample(engine, "memberflow_redis_retries_total", operation="save") is None

    asyncio.run(scenario())


class GatedStore(MemoryStore):
    """Answers a batch's first reads (event clock, snapshot version, customers) only once all
    three are asked for: a batch that asks one after the other never gets an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.all_asked = asyncio.Event()

    async def _gate(self, name: str) -> None:
        self.asked.append(name)
        if len(self.asked) == 3:
            self.all_asked.set()
        await asyncio.wait_for(self.all_asked.wait(), timeout=2)

    async def clock(self, shard: int | None = None) -> int | None:
        if not self.all_asked.is_set():
            await self._gate("clock")
        return await super().clock(shard)

    async def snapshot_version(self) -> int:
        if not self.all_asked.is_set():
            await self._gate("snapshot")
        return await super().snapshot_version()

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        if not self.all_asked.is_set():
            await self._gate("load")
        return await super().load(customer_ids)


def test_a_batch_asks_its_first_reads_together() -> None:
    # One wait on Redis instead of three per batch: at half load these were three of a
    # batch's five round trips on the path to its state being applied.
    async def scenario() -> None:
        store = GatedStore()
        engine = make_engine(store, clock_mode="event")
        outcome = await engine.process([GOOD_1])
        assert sorted(store.asked) == ["clock", "load", "snapshot"]
        assert outcome.applied == 1
        assert (await state_of(store, "c1")).version == 1

    asyncio.run(scenario())


class FailingLoadStore(MemoryStore):
    """The customers' load fails (not a transient error) while the event-clock and snapshot
    reads are still waiting for their answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_waiting = 0
        self.reads_cancelled = 0

    async def _slow_read(self) -> None:
        self.reads_waiting += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.reads_cancelled += 1
            raise
        finally:
            self.reads_waiting -= 1

    async def clock(self, shard: int | None = None) -> int | None:
        await self._slow_read()
        return await super().clock(shard)

    async def snapshot_version(self) -> int:
        await self._slow_read()
        return await super().snapshot_version()

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        await asyncio.sleep(0)  # the two reads are waiting by now
        raise ValueError("stored state unreadable")


def test_a_failed_read_leaves_no_other_read_running() -> None:
    """When one of a batch's concurrent first reads fails, the others are cancelled and have
    finished by the time the error reaches the caller, who may then close the Redis client
    (asyncio.gather alone would leave them running on it)."""

    async def scenario() -> None:
        store = FailingLoadStore()
        engine = make_engine(store, clock_mode="event")
        with pytest.raises(ValueError, match="unreadable"):
            await engine.process([GOOD_1])
        assert store.reads_cancelled == 2
        assert store.reads_waiting == 0

    asyncio.run(scenario())


# -- timers ----------------------------------------------------------------------------------

FORMULA_DUE = 14 * DAY  # infant_formula: 21-day cycle, reminded 7 days ahead
LATENESS = 3600  # the engine's default timer_lateness_s


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def timer_engine(store: MemoryStore, clock: Clock, clock_mode: ClockMode = "wall") -> Engine:
    return Engine(store, POLICY, clock_mode=clock_mode, metrics=Metrics(), wall_clock=clock)


def shopped(
    offset: int,
    event_id: str,
    customer: str,
    when: int,
    category: str = "infant_formula",
    partition: int = 0,
) -> RawMessage:
    event = purchase(event_id, customer, when).model_copy(
        update={"items": (Item(sku="sku-1", category=category),)}
    )
    return message(offset, encode_model(event), partition)


def tick(offset: int, when: int, partition: int) -> RawMessage:
    return message(offset, Tick(occurred_at=at(when)).model_dump_json().encode(), partition)


def reminders(outcome: BatchOutcome) -> list[tuple[str, datetime, str]]:
    return [
        (n.customer_id, n.occurred_at, n.cause.id)
        for n in outcome.notifications
        if n.type is NotificationType.REPURCHASE_REMINDER
    ]


def test_process_indexes_the_next_due_time_on_the_customers_partition() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        outcome = await engine.process(
            [
                shopped(1, "f1", "c1", WALL, partition=2),
                shopped(2, "t1", "c2", WALL - DAY, category="toys", partition=0),
            ]
        )
        assert outcome.applied == 2
        expected = {
            "c1": TimerEntry(2, WALL + FORMULA_DUE, 1),  # the reminder (computed at version 1)
            "c2": TimerEntry(0, WALL - DAY + 60 * DAY, 1),  # toys: only the lifecycle
        }
        assert outcome.timers == expected
        # Indexed with the write already (a crash before confirm loses no timer) ...
        assert store.timers == {2: {"c1": WALL + FORMULA_DUE}, 0: {"c2": WALL + 59 * DAY}}
        await engine.confirm(outcome)
        # ... and exactly after confirm.
        assert store.timers == {2: {"c1": WALL + FORMULA_DUE}, 0: {"c2": WALL + 59 * DAY}}
        assert await store.next_due_in(2) == WALL + FORMULA_DUE
        assert await store.due(2, WALL + FORMULA_DUE - 1, 10) == []
        assert await store.due(2, WALL + FORMULA_DUE, 10) == ["c1"]
        assert await store.due(0, WALL + 100 * DAY, 10) == ["c2"]  # not c1: another shard
        assert (
            sample(
                engine,
                "memberflow_triggers_total",
                trigger="repurchase_reminder",
                outcome="scheduled",
            )
            == 1
        )

        # A purchase in the category moves the indexed time later (exactly, after confirm).
        clock.now = WALL + 10 * DAY
        again = await engine.process([shopped(3, "f2", "c1", WALL + 10 * DAY, partition=2)])
        assert again.timers == {"c1": TimerEntry(2, WALL + 10 * DAY + FORMULA_DUE, 2)}
        assert store.timers[2] == {"c1": WALL + FORMULA_DUE}  # save only moves it earlier
        await engine.confirm(again)
        assert store.timers[2] == {"c1": WALL + 10 * DAY + FORMULA_DUE}
        assert (
            sample(
                engine,
                "memberflow_triggers_total",
                trigger="repurchase_reminder",
                outcome="rescheduled",
            )
            == 1
        )

    asyncio.run(scenario())


def test_process_due_in_wall_mode_fires_a_due_reminder_once() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        await engine.confirm(await engine.process([shopped(1, "f1", "c1", WALL, partition=1)]))

        clock.now = WALL + FORMULA_DUE - 1
        early = await engine.process_due(1)
        assert (early.notifications, early.timers_fired, early.timers) == ([], 0, {})

        clock.now = WALL + FORMULA_DUE + 5.5
        fired = await engine.process_due(1)
        assert fired.timers_fired == 1
        # In `wall` mode a message is sent when it really goes out: the (later) clock.
        assert reminders(fired) == [
            ("c1", at(WALL + FORMULA_DUE + 5), f"reminder:infant_formula@{WALL}")
        ]
        assert len(fired.notifications) == 1
        assert fired.outbox_versions == {"c1": 2}
        assert fired.timers == {"c1": TimerEntry(1, WALL + 60 * DAY, 2)}  # next: at risk
        assert fired.more_due is False
        stored = await state_of(store, "c1")
        assert stored.outbox == tuple(fired.notifications)
        assert stored.state is not None
        assert stored.state.reminded == {"infant_formula": WALL}
        assert sample(engine, "memberflow_timer_lateness_seconds_sum") == 5
        assert (
            sample(
                engine, "memberflow_triggers_total", trigger="repurchase_reminder", outcome="fired"
            )
            == 1
        )

        # Not confirmed yet: the index still points at the fired time. While this process is
        # producing the outbox, the next poll hands out nothing again ...
        assert store.timers[1] == {"c1": WALL + FORMULA_DUE}
        polled = await engine.process_due(1)
        assert (polled.timers_fired, polled.notifications) == (0, [])
        # ... and had it crashed, the next process's poll resends it, firing nothing new.
        resent = await timer_engine(store, clock).process_due(1)
        assert resent.timers_fired == 0
        assert resent.notifications == fired.notifications  # same ids: consumers drop them
        assert (await state_of(store, "c1")).version == 2

        # Confirm re-indexes the next due time; nothing is due any more.
        await engine.confirm(fired)
        assert store.timers[1] == {"c1": WALL + 60 * DAY}
        assert (await state_of(store, "c1")).outbox == ()
        quiet = await engine.process_due(1)
        assert (quiet.notifications, quiet.timers_fired) == ([], 0)
        assert (await state_of(store, "c1")).version == 2
        assert await engine.process_due(0) == BatchOutcome()  # another shard: nothing

    asyncio.run(scenario())


def test_a_reminder_due_in_quiet_hours_is_woken_once_when_they_end() -> None:
    """Woken at its due time (22:30 Berlin) it would only be deferred to 08:00: the index
    points at 08:00, where one wake-up defers it and sends it, and its lateness is the
    send's (measured from 08:00), not the ten hours since it was due."""

    async def scenario() -> None:
        evening = epoch(datetime(2026, 6, 1, 20, 30, tzinfo=UTC))  # 22:30 in Berlin
        due = evening + FORMULA_DUE
        quiet_end = epoch(datetime(2026, 6, 16, 6, 0, tzinfo=UTC))  # 08:00 in Berlin
        store = MemoryStore()
        clock = Clock(evening)
        engine = timer_engine(store, clock)
        bought = await engine.process([shopped(1, "f1", "c1", evening, partition=1)])
        assert bought.timers == {"c1": TimerEntry(1, quiet_end, 1)}
        await engine.confirm(bought)
        assert store.timers[1] == {"c1": quiet_end}

        clock.now = due + 60
        assert await engine.process_due(1) == BatchOutcome()  # nobody woken to be deferred
        assert (await state_of(store, "c1")).version == 1

        clock.now = quiet_end + 5
        woken = await engine.process_due(1)
        assert woken.timers_fired == 2  # deferred at its due time, then sent
        assert reminders(woken) == [("c1", at(quiet_end + 5), f"reminder:infant_formula@{evening}")]
        (note,) = woken.notifications
        assert note.explanation["deferred"] is True
        assert note.explanation["scheduled_for"] == iso(due)
        assert (await state_of(store, "c1")).version == 2  # one write for both steps
        assert sample(engine, "memberflow_timer_lateness_seconds_sum") == 5
        assert sample(engine, "memberflow_timer_lateness_seconds_count") == 1
        for outcome in ("deferred_quiet_hours", "fired"):
            assert (
                sample(
                    engine,
                    "memberflow_triggers_total",
                    trigger="repurchase_reminder",
                    outcome=outcome,
                )
                == 1
            )

    asyncio.run(scenario())


def test_process_due_stops_at_its_limit_earliest_first() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        first = await engine.process(
            [shopped(1, "f1", "late", WALL), shopped(2, "f2", "early", WALL - DAY)]
        )
        await engine.confirm(first)
        clock.now = WALL + 20 * DAY
        one = await engine.process_due(0, limit=1)
        assert one.more_due is True
        assert [r[0] for r in reminders(one)] == ["early"]
        await engine.confirm(one)
        rest = await engine.process_due(0, limit=1)
        assert rest.more_due is True  # a full page: the caller polls again
        assert [r[0] for r in reminders(rest)] == ["late"]
        await engine.confirm(rest)
        assert (await engine.process_due(0, limit=1)).notifications == []

    asyncio.run(scenario())


def test_process_due_in_event_mode_follows_the_partitions_clock() -> None:
    bought_at = WALL - 20 * DAY
    due = bought_at + FORMULA_DUE

    async def scenario() -> None:
        store = MemoryStore()
        engine = timer_engine(store, Clock(WALL), "event")
        await engine.confirm(await engine.process([shopped(1, "f1", "c1", bought_at, partition=3)]))
        assert await store.clock(3) == bought_at
        assert (await engine.process_due(3)).notifications == []

        # A tick on another partition moves that partition's clock only.
        await engine.process([tick(2, due + LATENESS, partition=0)])
        assert (await store.clock(0), await store.clock(3)) == (due + LATENESS, bought_at)
        assert await store.clock() == due + LATENESS  # the global clock follows
        assert (await engine.process_due(3)).notifications == []

        # On the partition: timers fire up to its clock less the allowed lateness.
        await engine.process([tick(3, due + LATENESS - 1, partition=3)])
        assert await store.clock(3) == due + LATENESS - 1
        assert await engine.timer_clock(3) == due - 1
        held = await engine.process_due(3)
        assert (held.notifications, held.timers_fired) == ([], 0)

        await engine.process([tick(4, due + LATENESS, partition=3)])
        fired = await engine.process_due(3)
        assert reminders(fired) == [("c1", at(due), f"reminder:infant_formula@{bought_at}")]
        # Not observed in event mode: event time says how fast a replay runs, not how late.
        assert sample(engine, "memberflow_timer_lateness_seconds_count") == 0
        await engine.confirm(fired)
        assert store.timers[3] == {"c1": bought_at + 60 * DAY}
        # An older tick never moves the clock back.
        await engine.process([tick(5, bought_at, partition=3)])
        assert await store.clock(3) == due + LATENESS
        assert (await engine.process_due(3)).notifications == []

    asyncio.run(scenario())


def test_tick_beyond_the_allowed_skew_is_dead_lettered_and_moves_no_clock() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = timer_engine(store, Clock(WALL), "event")
        skew = POLICY.input.max_future_skew_minutes * 60
        outcome = await engine.process(
            [tick(1, WALL + skew, partition=1), tick(2, WALL + skew + 1, partition=2)]
        )
        assert [(row[0], row[1], row[3]) for row in dead_letter_rows(outcome)] == [
            (2, 2, RejectReason.FUTURE_TIMESTAMP)
        ]
        assert (await store.clock(1), await store.clock(2)) == (WALL + skew, None)
        assert outcome.applied == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("clock_mode", ["wall", "event"])
def test_redelivered_batch_after_process_due_does_not_fire_again(clock_mode: ClockMode) -> None:
    bought_at = WALL - 20 * DAY
    batch = [shopped(1, "f1", "c1", bought_at), shopped(2, "t1", "c2", bought_at, "toys")]

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(bought_at)
        engine = timer_engine(store, clock, clock_mode)
        await engine.confirm(await engine.process(batch))
        clock.now = WALL
        if clock_mode == "event":
            await engine.process([tick(3, WALL, partition=0)])
        fired = await engine.process_due(0)
        # Six days late: `wall` mode sends it now, `event` mode at its due time.
        sent = WALL if clock_mode == "wall" else bought_at + FORMULA_DUE
        assert reminders(fired) == [("c1", at(sent), f"reminder:infant_formula@{bought_at}")]
        await engine.confirm(fired)
        before = await snapshot(store)

        again = await engine.process(batch)
        assert (again.applied, again.duplicates) == (0, 2)
        assert again.notifications == []
        assert again.outbox_versions == {}
        assert await snapshot(store) == before  # nothing written
        await engine.confirm(again)
        assert (await engine.process_due(0)).notifications == []
        assert await snapshot(store) == before

    asyncio.run(scenario())


def test_customer_with_no_timers_left_is_unindexed() -> None:
    window_end = (WALL // DAY + 365) * DAY  # the purchase leaves the 365-day window

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        await engine.confirm(
            await engine.process([shopped(1, "t1", "c1", WALL, "toys", partition=4)])
        )
        clock.now = WALL + 200 * DAY
        lapsed = await engine.process_due(4)
        # State changes at their due times; the message when it really goes out (wall mode).
        assert [(n.type.value, n.occurred_at) for n in lapsed.notifications] == [
            ("lifecycle_changed", at(WALL + 60 * DAY)),
            ("win_back_offer", at(WALL + 200 * DAY)),
            ("lifecycle_changed", at(WALL + 180 * DAY)),
        ]
        assert lapsed.timers == {"c1": TimerEntry(4, window_end, 2)}  # churned: the window left
        await engine.confirm(lapsed)
        assert store.timers[4] == {"c1": window_end}

        store.timers[4]["ghost"] = WALL  # indexed, but no record
        clock.now = window_end
        expired = await engine.process_due(4)
        # Its event id stays in the duplicate check for 730 days (+ 30 of slack), then goes.
        forget = (WALL // DAY + 761) * DAY
        assert (expired.notifications, expired.timers_fired, expired.timers) == (
            [],
            1,
            {"c1": TimerEntry(4, forget, 3)},
        )
        await engine.confirm(expired)
        clock.now = forget
        forgotten = await engine.process_due(4)
        assert (forgotten.notifications, forgotten.timers_fired, forgotten.timers) == ([], 1, {})
        assert len((await state_of(store, "c1")).state.seen) == 0  # type: ignore[union-attr]
        # Nothing left to fire and nothing to produce: out of the index at once.
        assert store.timers[4] == {}
        assert await store.next_due_in(4) is None
        stored = await state_of(store, "c1")
        assert stored.state is not None
        assert (stored.state.stage, stored.state.buckets, stored.outbox) == ("churned", {}, ())
        await engine.confirm(expired)
        assert store.timers[4] == {}
        clock.now = WALL + 4000 * DAY
        assert await engine.process_due(4) == BatchOutcome()

    asyncio.run(scenario())


def test_a_late_confirm_by_the_partitions_old_owner_does_not_delay_the_new_owners_timer() -> None:
    """A worker that lost its partition (its broker acks stalled, it was thrown out of the
    group) confirms a batch after the new owner has applied a newer event of the same
    customer: its exact index entry, for the older state (at risk in 60 days), must not
    replace the new owner's (the reminder in 14). Fails if confirm's index write is not tied
    to the version it was computed from."""

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL + DAY)
        old, new = timer_engine(store, clock), timer_engine(store, clock)
        toys = shopped(0, "e1", "x", WALL, category="toys")
        stalled = await old.process([toys])  # saved, not confirmed
        await new.confirm(await new.process([toys]))  # redelivered to the new owner
        formula = await new.process([shopped(1, "e2", "x", WALL + DAY)])
        await new.confirm(formula)
        reminder_due = formula.timers["x"].due
        assert reminder_due is not None and reminder_due < WALL + 60 * DAY
        await old.confirm(stalled)
        assert store.timers[0] == {"x": reminder_due}
        clock.now = reminder_due
        fired = await new.process_due(0)
        assert [n.type.value for n in fired.notifications] == ["repurchase_reminder"]

    asyncio.run(scenario())


def test_a_customer_written_while_found_with_no_timers_stays_indexed() -> None:
    """The old owner of a partition finds a woken customer with nothing left to fire and
    unindexes it, but the new owner has meanwhile applied a purchase and indexed its timers:
    the removal must not take them with it (they would never fire)."""

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        old, new = timer_engine(store, clock), timer_engine(store, clock)
        await store.wake([("x", 0)])  # no record yet: nothing to fire
        loaded = store.load

        async def load_then_the_new_owner_writes(ids: Sequence[str]) -> dict[str, Stored]:
            found = await loaded(ids)
            store.load = loaded  # type: ignore[method-assign]
            await new.confirm(await new.process([shopped(0, "e1", "x", WALL)]))
            return found

        store.load = load_then_the_new_owner_writes  # type: ignore[method-assign]
        found = await old.process_due(0)
        assert (found.timers_fired, found.timers) == (0, {})
        assert store.timers[0] == {"x": WALL + FORMULA_DUE}

    asyncio.run(scenario())


def test_outbox_of_the_last_timers_survives_a_crash_before_it_was_produced() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        await engine.confirm(await engine.process([shopped(1, "t1", "c1", WALL, "toys")]))
        clock.now = WALL + 400 * DAY
        lost = await engine.process_due(0)  # its outputs never reach the broker
        assert [n.type.value for n in lost.notifications] == [
            "lifecycle_changed",
            "win_back_offer",
            "lifecycle_changed",
        ]
        forget = (WALL // DAY + 761) * DAY  # the event id leaves the duplicate check
        assert (lost.timers_fired, lost.timers) == (4, {"c1": TimerEntry(0, forget, 2)})
        assert store.timers[0] == {"c1": WALL + 60 * DAY}  # kept while the outbox waits

        restarted = timer_engine(store, clock)
        resent = await restarted.process_due(0)
        assert resent.notifications == lost.notifications
        assert resent.timers_fired == 0
        await restarted.confirm(resent)
        assert (await state_of(store, "c1")).outbox == ()
        # Produced and confirmed: indexed for what is left, the duplicate check's expiry.
        assert store.timers[0] == {"c1": forget}
        final = await restarted.process_due(0)
        assert (final.notifications, final.timers_fired) == ([], 0)

    asyncio.run(scenario())


def test_shards_due_names_the_shards_with_a_timer_due_now_and_how_long_it_waited() -> None:
    """The poller's hint, taken without the lock: wall time in `wall` mode, the shard's event
    clock less the lateness in `event` mode."""

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        engine = timer_engine(store, clock)
        await engine.confirm(await engine.process([shopped(1, "f1", "c1", WALL, partition=2)]))
        assert await engine.shards_due([0, 1, 2]) == []
        assert await engine.timers_overdue([0, 2]) == {0: 0, 2: 0}
        clock.now = WALL + FORMULA_DUE
        assert await engine.shards_due([0, 1, 2]) == [2]
        assert await engine.shards_due([0, 1]) == []
        # Nothing fired them: the oldest due timer's wait grows with the clock.
        clock.now = WALL + FORMULA_DUE + 600
        assert await engine.timers_overdue([0, 2]) == {0: 0, 2: 600}
        # Wake-ups (due 0, a new snapshot) are not late timers: they read as 56 years.
        await store.wake([("c8", 2), ("c9", 0)])
        assert await engine.timers_overdue([0, 2]) == {0: 0, 2: 600}

        events = MemoryStore()
        by_events = timer_engine(events, Clock(WALL), clock_mode="event")
        await by_events.confirm(
            await by_events.process([shopped(1, "f1", "c1", WALL, partition=2)])
        )
        await events.advance_clock(WALL + FORMULA_DUE, shard=2)
        assert await by_events.shards_due([2]) == []  # within the lateness
        await events.advance_clock(WALL + FORMULA_DUE + LATENESS, shard=2)
        assert await by_events.shards_due([0, 2]) == [2]
        # Not reported in event mode: a replay's clock runs days ahead of the firing.
        await events.advance_clock(WALL + FORMULA_DUE + LATENESS + 90, shard=2)
        assert await by_events.timers_overdue([0, 2]) == {}

    asyncio.run(scenario())


def test_a_superseded_worker_indexes_what_it_writes_as_due_now() -> None:
    """During a rolling restart an old worker still applies events by its old policy, and the
    write takes the customer's wake-up from the adoption (its index entry becomes exact).
    Superseded, it indexes the customer as due now instead, so a worker on the adopted
    version re-evaluates it; such a customer used to keep the old policy's labels until its
    next own timer or event, weeks away."""

    async def scenario() -> None:
        store = MemoryStore()
        clock = Clock(WALL)
        old = timer_engine(store, clock)
        old.superseded = True
        outcome = await old.process([shopped(1, "f1", "c1", WALL, partition=2)])
        assert outcome.timers["c1"].due == 0
        await old.confirm(outcome)
        assert store.timers[2] == {"c1": 0}

        new = timer_engine(store, clock)  # a worker on the adopted version owns it now
        woken = await new.process_due(2)
        await new.confirm(woken)
        assert store.timers[2] == {"c1": WALL + FORMULA_DUE}

    asyncio.run(scenario())


async def _formula_bought_at_noon() -> tuple[MemoryStore, Clock, Engine, int]:
    """A wall clock engine whose customer c1 bought infant formula at 12:00 in Berlin."""
    noon = epoch(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))
    store = MemoryStore()
    clock = Clock(noon + 5)
    engine = timer_engine(store, clock)
    await engine.confirm(await engine.process([shopped(1, "f1", "c1", noon)]))
    return store, clock, engine, noon


def test_wall_clock_a_purchase_processed_late_is_not_preceded_by_timers_due_after_it() -> None:
    """A backlog: a formula rebuy made a minute before its reminder was due is processed 30 s
    after that due time. Timers ran up to the processing time first, so the 20 %-off reminder
    went out and the purchase that made it pointless came next; likewise a purchase made before
    the at-risk time, processed after it, gave 'active -> at_risk -> active'."""

    async def scenario() -> None:
        store, clock, engine, noon = await _formula_bought_at_noon()
        due = noon + FORMULA_DUE
        clock.now = due + 30
        late = await engine.process([shopped(2, "f2", "c1", due - 60)])
        await engine.confirm(late)
        assert reminders(late) == []
        assert late.applied == 1
        polled = await engine.process_due(0)
        assert reminders(polled) == []  # the rebuy moved it two weeks on
        assert (await state_of(store, "c1")).state.categories["infant_formula"][0] == due - 60  # type: ignore[union-attr]

        # The at-risk time (60 days after the last purchase) passes between a purchase and
        # its processing: no lapse, the purchase is the customer's latest.
        at_risk = due - 60 + 60 * DAY
        clock.now = at_risk + 30
        bought_in_time = await engine.process([shopped(3, "t1", "c1", at_risk - 600, "toys")])
        await engine.confirm(bought_in_time)
        assert stages_of(bought_in_time.notifications) == []
        assert stages_of((await engine.process_due(0)).notifications) == []
        assert (await state_of(store, "c1")).state.stage == "active"  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_wall_clock_timers_left_overdue_by_a_late_purchase_fire_at_the_next_poll() -> None:
    """What falls due between a purchase and its processing, and still stands after it, is
    not lost: the customer is indexed as due, and the next poll fires it."""

    async def scenario() -> None:
        store, clock, engine, noon = await _formula_bought_at_noon()
        due = noon + FORMULA_DUE
        clock.now = due + 30
        # A toys purchase made before the formula reminder's due time: it does not cancel it.
        late = await engine.process([shopped(2, "t1", "c1", due - 60, "toys")])
        await engine.confirm(late)
        assert reminders(late) == []
        assert store.timers[0]["c1"] <= clock.now  # indexed as overdue
        polled = await engine.process_due(0)
        assert reminders(polled) == [("c1", at(due + 30), f"reminder:infant_formula@{noon}")]

    asyncio.run(scenario())


def test_a_reminder_goes_out_as_indexed_when_the_learned_interval_changes() -> None:
    """Diapers learn their interval. A purchase is indexed with the interval learned then;
    the learned value shrinks afterwards. The reminder followed the new value while the index
    kept the old wake-up, so it went out late, or (as here) was cancelled as no longer useful
    and never sent."""

    async def scenario() -> None:
        noon = epoch(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))
        store = MemoryStore()
        store.gaps["diapers"] = {20: 40}  # 40 samples, median 20 days
        clock = Clock(noon + 5)
        engine = Engine(store, POLICY, metrics=Metrics(), wall_clock=clock, learn_refresh_s=1e-9)
        bought = await engine.process([shopped(1, "d1", "c1", noon, "diapers")])
        await engine.confirm(bought)
        due = noon + 15 * DAY  # 20 learned - 5 lead
        assert store.timers[0] == {"c1": due}

        store.gaps["diapers"] = {8: 400}  # the population now rebuys every 8 days
        for day in range(1, 15):
            clock.now = noon + day * DAY
            assert reminders(await engine.process_due(0)) == []
        clock.now = due
        sent = await engine.process_due(0)
        assert reminders(sent) == [("c1", at(due), f"reminder:diapers@{noon}")]
        (note,) = [n for n in sent.notifications if n.type is NotificationType.REPURCHASE_REMINDER]
        assert (note.explanation["interval_days"], note.explanation["interval_source"]) == (
            20,
            "learned",
        )

    asyncio.run(scenario())


@pytest.mark.parametrize("polled", [False, True], ids=["not-polled", "polled"])
def test_event_clock_a_late_refund_does_not_depend_on_when_the_memory_was_pruned(
    polled: bool,
) -> None:
    """A dormant customer's purchase, the partition clock 800 days on, then a refund of it
    stamped 100 days after the purchase (within max_event_age_days of the clock, so accepted):
    its purchase is past the dedup horizon seen from the clock. It was applied when no timer
    poll had run, and unknown when one had (the memory_expiry timer prunes by the clock)."""
    t0 = WALL - 900 * DAY

    async def scenario() -> tuple[list[str], int]:
        store = MemoryStore()
        engine = make_engine(store, "event")
        await engine.confirm(await engine.process([bought(1, "p1", "c1", t0, "50")]))
        await engine.confirm(await engine.process([tick(2, t0 + 800 * DAY, 0)]))
        if polled:
            while (due := await engine.process_due(0)).timers_fired:
                await engine.confirm(due)
        late = Refund(
            event_id="r1",
            customer_id="c1",
            refund_of="p1",
            occurred_at=at(t0 + 100 * DAY),
            amount=Decimal("50"),
            currency="EUR",
        )
        outcome = await engine.process([message(3, encode_model(late), 0)])
        await engine.confirm(outcome)
        state = (await state_of(store, "c1")).state
        assert state is not None
        return [d.reason.value for _, d in outcome.dead_letters], state.lifetime_orders

    assert asyncio.run(scenario()) == (["unknown_purchase"], 1)


def test_a_state_written_before_reminders_kept_their_interval_gets_it_when_evaluated() -> None:
    """Format 2 entries ([time, count]) follow the interval in force. Woken (a new policy
    version wakes everyone), such a customer is given the interval in force then, and its index
    entry with it: a learned interval that moves afterwards no longer strands the reminder."""

    async def scenario() -> None:
        noon = epoch(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))
        store = MemoryStore()
        clock = Clock(noon + 5)
        engine = Engine(store, POLICY, metrics=Metrics(), wall_clock=clock, learn_refresh_s=1e-9)
        await engine.confirm(await engine.process([shopped(1, "d1", "c1", noon, "diapers")]))
        stored = await state_of(store, "c1")
        assert stored.state is not None
        old = stored.state.copy()
        old.categories["diapers"] = old.categories["diapers"][:2]  # as format 2 wrote it
        await store.save([Write("c1", stored.version, old, (), TimerEntry(0, noon + 25 * DAY))])
        store.timers[0]["c1"] = noon + 25 * DAY

        store.gaps["diapers"] = {20: 40}
        clock.now = noon + DAY
        await store.wake([("c1", 0)])
        woken = await engine.process_due(0)
        await engine.confirm(woken)
        state = (await state_of(store, "c1")).state
        assert state is not None and state.categories["diapers"][2:] == [20, 1]
        assert store.timers[0]["c1"] == noon + 15 * DAY

        store.gaps["diapers"] = {8: 400}
        clock.now = noon + 15 * DAY
        assert reminders(await engine.process_due(0)) == [
            ("c1", at(noon + 15 * DAY), f"reminder:diapers@{noon}")
        ]

    asyncio.run(scenario())


def test_wall_clock_a_window_expiry_before_a_late_purchase_starts_the_grace_at_its_time() -> None:
    """A silver customer's orders leave the window; a small order made an hour before that is
    processed two days later. The expiry is not the purchase's to cancel: it fires at its own
    time, so the grace period starts then, not two days late at the processing time."""

    async def scenario() -> None:
        first = (WALL // DAY - 300) * DAY + 10 * 3600
        clock = Clock(first)
        store = MemoryStore()
        engine = timer_engine(store, clock)
        await engine.confirm(
            await engine.process(
                [bought(1, "a", "c1", first, "200"), bought(2, "b", "c1", first + 1, "200")]
            )
        )
        clock.now = first + 100 * DAY
        await engine.confirm(await engine.process([bought(3, "c", "c1", first + 100 * DAY, "5")]))
        expiry = (first // DAY + 365) * DAY
        clock.now = expiry + 2 * DAY
        late = await engine.process([bought(4, "d", "c1", expiry - 3600, "5")])
        await engine.confirm(late)
        state = (await state_of(store, "c1")).state
        assert state is not None
        assert (state.tier, state.below_since) == ("silver", expiry)

    asyncio.run(scenario())


@pytest.mark.parametrize(("first", "second"), [("30", "5"), ("5", "25")])
def test_a_snapshot_published_while_a_batch_is_in_flight_still_relabels_its_customers(
    first: str, second: str
) -> None:
    """Another worker publishes a snapshot between this batch's state write and its confirm.
    Its wake-up of the customer was overwritten by the confirm's exact due time, or it never
    woke the customer (the statistics still held its old value): the customer kept a label of
    the old snapshot, for good. The confirm now wakes the batch's customers again."""
    from memberflow.population import publish
    from rules.segments import classify, customer_values

    class PublishingMidBatch(MemoryStore):
        publish_on_save = False

        async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
            result = await super().save(writes)
            if self.publish_on_save:
                self.publish_on_save = False
                await publish(self, POLICY, WALL)
            return result

    async def scenario() -> None:
        store = PublishingMidBatch()
        engine = make_engine(store)

        async def run(batch: list[RawMessage]) -> None:
            await engine.confirm(await engine.process(batch))

        async def drain() -> None:
            while await store.due(0, WALL, 1):
                await engine.confirm(await engine.process_due(0))

        t = WALL - 5 * DAY
        others = [
            bought(100 + i, f"p{i}", f"P{i}", t - i * DAY, str(5 + i % 7 * 5)) for i in range(60)
        ]
        await run([bought(1, "a1", "A", t, "10"), bought(3, "x1", "X", t, first), *others])
        await publish(store, POLICY, WALL)
        await drain()
        await run([bought(4 + i, f"y{i}", f"Y{i}", t, "100") for i in range(30)])
        store.publish_on_save = True
        await run([bought(50, "x2", "X", t, second)])
        await drain()
        latest = await publish(store, POLICY, WALL)
        await drain()
        state = (await state_of(store, "X")).state
        assert state is not None and state.segment is not None
        should = classify(customer_values(state, POLICY, WALL), latest, POLICY)
        assert (state.segment[0], state.segment[2]) == (should.rfm_type, should.grade)

    asyncio.run(scenario())


def test_a_woken_customer_is_counted_with_its_own_latest_purchase() -> None:
    """Event mode: timers fire up to the shard's clock less the lateness. A customer woken by a
    first snapshot had its purchase of 00:10 (the next day after that time) left out of its
    window: relabelled and counted in the statistics without it (f 1, m 50 EUR instead of 2
    and 450), which moved every customer's M flag."""
    from memberflow.population import publish

    midnight = epoch(datetime(2026, 6, 2, 0, 0, tzinfo=UTC))

    async def scenario() -> None:
        store = MemoryStore()
        engine = Engine(
            store,
            POLICY,
            clock_mode="event",
            metrics=Metrics(),
            wall_clock=lambda: midnight + 30 * DAY,
            timer_lateness_s=3600,
        )
        batch = [bought(i, f"e{i}", f"C{i}", midnight - (i + 1) * DAY, "50") for i in range(4)]
        batch += [
            bought(10, "x1", "X", midnight - 10 * DAY, "50"),
            bought(11, "x2", "X", midnight + 600, "400"),
        ]
        await engine.confirm(await engine.process(batch))
        await publish(store, POLICY, midnight + 600)  # a first snapshot: everyone woken
        await engine.confirm(await engine.process_due(0))
        counted = store.contributions["X"]
        assert (counted.f, counted.m) == (2, 45000)

    asyncio.run(scenario())


def test_wall_clock_a_purchase_stamped_just_past_midnight_counts_at_once() -> None:
    """Five minutes before midnight, a purchase stamped three minutes after it (accepted: less
    than max_future_skew_minutes ahead). Judged at the wall clock, its bucket (tomorrow's) was
    outside the window: no tier change, statistics without it, and nothing woke it later."""
    midnight = epoch(datetime(2026, 6, 2, 0, 0, tzinfo=UTC))

    async def scenario() -> None:
        store = MemoryStore()
        engine = Engine(store, POLICY, metrics=Metrics(), wall_clock=lambda: midnight - 300)
        outcome = await engine.process(
            [bought(1, "x1", "X", midnight + 180, "400"), bought(2, "x0", "X", midnight - 900)]
        )
        await engine.confirm(outcome)
        counted = store.contributions["X"]
        assert (counted.f, counted.m) == (2, 41000)
        state = (await state_of(store, "X")).state
        assert state is not None and state.tier == "silver"  # 410 EUR in 2 orders

    asyncio.run(scenario())


def test_wake_ups_a_failed_publish_did_not_send_are_sent_by_the_next() -> None:
    """The snapshot is stored before its wake-ups go out; a Redis error among them (the agent
    retries the whole publish) left the rest unsent for good: the retry woke only what changed
    from the stored, half-woken snapshot. Now the next publish sees the wake-ups unfinished and
    wakes everyone."""
    from functools import partial

    from redis.exceptions import ConnectionError as RedisConnectionError

    from memberflow.population import publish
    from rules.segments import classify, customer_values

    class FailingOnce(MemoryStore):
        fail = False

        async def wake(self, entries: Sequence[tuple[str, int]]) -> None:
            if self.fail:
                self.fail = False
                raise RedisConnectionError("connection reset during the wake-ups")
            await super().wake(entries)

    async def scenario() -> None:
        store = FailingOnce()
        engine = make_engine(store)
        engine.max_backoff_s = 0.01

        async def drain() -> None:
            while await store.due(0, WALL, 1):
                await engine.confirm(await engine.process_due(0))

        t = WALL - 5 * DAY
        batch = [
            bought(i, f"p{i}", f"P{i}", t - i * DAY, str(10 + 10 * (i % 5))) for i in range(20)
        ]
        await engine.confirm(await engine.process(batch))
        await publish(store, POLICY, WALL)
        await drain()
        more = [bought(100 + i, f"y{i}", f"Y{i}", t, "200") for i in range(10)]
        await engine.confirm(await engine.process(more))
        store.fail = True
        await engine.retry("publish", partial(publish, store, POLICY, WALL))  # as the agent does
        await drain()
        latest = await publish(store, POLICY, WALL)
        assert latest is not None
        await drain()
        wrong = []
        async for stored in store.scan():
            assert stored.state is not None and stored.state.segment is not None
            should = classify(customer_values(stored.state, POLICY, WALL), latest, POLICY)
            if (stored.state.segment[0], stored.state.segment[2]) != (
                should.rfm_type,
                should.grade,
            ):
                wrong.append(stored.customer_id)
        assert wrong == []

    asyncio.run(scenario())


def test_a_snapshot_computed_while_customers_arrive_keeps_its_mean_scores_in_range() -> None:
    """Forty contributions land while a snapshot is computed: the score counts and the total
    came from different moments, and the mean R score came out at -13."""
    from memberflow.population import compute_snapshot
    from state.store import Contribution

    def contribution(cid: str, r: int, f: int, m: int) -> Contribution:
        return Contribution(cid, 1, 0, r, f, m, "member", "", "", "new")

    class Busy(MemoryStore):
        arrived = False

        async def count_at_most(self, dimension: str, values: Sequence[int]) -> list[int]:
            if not self.arrived and dimension == "f":
                self.arrived = True
                late = [contribution(f"N{i}", 1_600_000_000 + i, 9, 9_000) for i in range(40)]
                await self.contribute(late)
            return await super().count_at_most(dimension, values)

    async def scenario() -> None:
        store = Busy()
        await store.contribute(
            [contribution(f"C{i}", 1_700_000_000 + i, 1 + i % 3, 1_000 * i) for i in range(10)]
        )
        snapshot = await compute_snapshot(store, 1, 0)
        assert snapshot is not None
        assert all(1 <= score <= 5 for score in snapshot.mean_scores.values()), snapshot

    asyncio.run(scenario())
