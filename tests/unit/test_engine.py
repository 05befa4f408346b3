"""The engine over the in-memory store: batches, dead letters, redelivery, outbox, clocks, races."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from memberflow.engine import MAX_CONFLICT_ROUNDS, BatchOutcome, ClockMode, Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.settings import default_rules_file
from rules.customer import DAY, CustomerState, apply, epoch, iso
from rules.policy import parse_policy
from state.memory_store import MemoryStore
from state.store import Stored, Write
from streams.codec import encode_model
from streams.events import Cause, Notification, NotificationType, Purchase, Refund, RejectReason

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


async def snapshot(store: MemoryStore) -> dict[str, tuple[int, str, tuple[Notification, ...]]]:
    rows = {}
    async for stored in store.scan():
        assert stored.state is not None
        rows[stored.customer_id] = (stored.version, stored.state.to_json(), stored.outbox)
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

        assert outcome.notifications == [expected_upgrade_to_silver()]
        note = outcome.notifications[0]
        assert (note.type, note.customer_id) == (NotificationType.TIER_UPGRADED, "c1")
        assert note.explanation["new_tier"] == "silver"
        assert outcome.outbox_versions == {"c1": 1}

        rows = await snapshot(store)
        assert sorted(rows) == ["c1", "c2"]  # c3 had nothing applied: no record
        c1 = CustomerState.from_json(rows["c1"][1])
        c2 = CustomerState.from_json(rows["c2"][1])
        assert rows["c1"][0] == rows["c2"][0] == 1
        assert (c1.lifetime_orders, c1.lifetime_spend, c1.tier) == (2, 35000, "silver")
        assert c1.window(WALL, POLICY.window_days) == (2, 35000)
        assert (c2.lifetime_orders, c2.lifetime_spend, c2.tier) == (1, 1000, "member")
        assert rows["c1"][2] == (note,)
        assert rows["c2"][2] == ()
        assert await store.clock() is None  # wall mode does not keep an event clock

        assert sample(engine, "memberflow_events_total", outcome="applied") == 3
        assert sample(engine, "memberflow_events_total", outcome="duplicate") == 1
        assert sample(engine, "memberflow_events_total", outcome="dead_lettered") == 7
        assert sample(engine, "memberflow_dead_letters_total", reason="too_old") == 1
        assert sample(engine, "memberflow_event_clock_seconds") == WALL
        assert sample(engine, "memberflow_version_conflicts_total") == 0
        # Counted when the broker has them, not before.
        assert sample(engine, "memberflow_notifications_total", type="tier_upgraded") is None
        await engine.confirm(outcome)
        assert sample(engine, "memberflow_notifications_total", type="tier_upgraded") == 1

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
        assert len(sent) == 1
        before = await snapshot(store)

        # Crash after producing, before confirm: the batch comes again.
        again = await engine.process(BATCH)
        assert again.applied == 0
        assert again.notifications == sent
        assert [n.notification_id for n in again.notifications] == [sent[0].notification_id]
        assert again.outbox_versions == {"c1": 1}
        assert await snapshot(store) == before

        await engine.confirm(again)
        assert (await state_of(store, "c1")).outbox == ()
        third = await engine.process(BATCH)
        assert third.notifications == []
        assert third.outbox_versions == {}

    asyncio.run(scenario())


def test_unconfirmed_outbox_travels_with_the_next_write() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = make_engine(store)
        first = await engine.process([GOOD_1, GOOD_2])
        (silver,) = first.notifications
        # Not confirmed; the next batch takes c1 to gold.
        second = await engine.process(
            [bought(20, "p4", "c1", WALL, "300"), bought(21, "p5", "c1", WALL, "400")]
        )
        assert second.applied == 2
        assert [n.explanation["new_tier"] for n in second.notifications] == ["silver", "gold"]
        assert second.notifications[0] == silver
        assert second.outbox_versions == {"c1": 2}
        # A late confirm of the first batch must not drop the newer outbox.
        await engine.confirm(first)
        assert (await state_of(store, "c1")).outbox == tuple(second.notifications)
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

    async def scenario(clock_mode: ClockMode) -> tuple[Stored, BatchOutcome, int | None]:
        store = MemoryStore()
        engine = make_engine(store, clock_mode)
        await engine.process(others)
        outcome = await engine.process(ours)
        return await state_of(store, "c1"), outcome, await store.clock()

    stored, outcome, clock = asyncio.run(scenario("event"))
    assert outcome.applied == 2
    assert outcome.dead_letters == []
    assert stored.state is not None
    assert stored.state.latest_event_at == old + 3600
    assert stored.state.buckets == {old // DAY: [2, 35000]}
    assert stored.state.window(old + 3600, POLICY.window_days) == (2, 35000)
    assert stored.state.tier == "silver"
    assert stored.state.tier_since == old + 3600
    (note,) = outcome.notifications
    assert note.occurred_at == at(old + 3600)
    assert note.explanation["inputs"]["evaluated_at"] == iso(old + 3600)
    assert clock == recent  # an older batch never moves the clock back

    # The same input judged by the wall clock: 400 days old is outside the window.
    stored, outcome, clock = asyncio.run(scenario("wall"))
    assert outcome.applied == 2
    assert outcome.notifications == []
    assert stored.state is not None
    assert stored.state.buckets == {}
    assert stored.state.tier == "member"
    assert clock is None


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
        # The upgrade is caused by our event, judged on the rival's write plus ours.
        (note,) = outcome.notifications
        assert note.cause == Cause(kind="event", id="p2")
        assert note.explanation["inputs"]["window_orders"] == 2
        assert outcome.outbox_versions == {"c1": 2}
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
        assert (await state_of(store, "c1")).version == 1

    asyncio.run(scenario())
