"""Producing: batches handed to the producer at once, confirmed strictly in order once acked.

Glue between the engine and Faust's producer: the producer is a stand-in whose acks the test
releases; the engine and its store are the real ones (in memory)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from memberflow.app import Producing, Runtime
from memberflow.engine import Engine, RawMessage
from memberflow.settings import Settings, default_rules_file
from rules.customer import epoch
from rules.policy import parse_policy
from state.memory_store import MemoryStore
from streams.codec import encode_model
from streams.events import Purchase

POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))
WALL = epoch(datetime(2026, 6, 1, 12, tzinfo=UTC))


class Producer:
    """Records what is sent; each send's ack is a future the test resolves."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.acks: list[asyncio.Future[None]] = []

    async def send(self, topic: str, key: bytes, value: bytes, *args: Any) -> Any:
        self.sent.append(value)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


class App:
    def __init__(self) -> None:
        self.producer = Producer()


def bought(offset: int, event_id: str, customer: str, amount: str) -> RawMessage:
    event = Purchase(
        event_id=event_id,
        customer_id=customer,
        occurred_at=datetime.fromtimestamp(WALL, UTC),
        amount=Decimal(amount),
        currency="EUR",
    )
    return RawMessage("purchases", 0, offset, customer.encode(), encode_model(event))


def setup() -> tuple[Producing, App, MemoryStore, list[str]]:
    store = MemoryStore()
    runtime = Runtime(Settings(), POLICY)
    runtime._engine = Engine(store, POLICY, wall_clock=lambda: WALL)
    app = App()
    failures: list[str] = []
    return Producing(app, runtime, fatal=failures.append), app, store, failures  # type: ignore[arg-type]


def test_batches_are_confirmed_in_the_order_handed_over() -> None:
    async def scenario() -> None:
        producing, app, store, failures = setup()
        engine = producing.runtime.engine()
        confirmed: list[str] = []

        async def mark(name: str) -> None:
            confirmed.append(name)

        first = await engine.process([bought(1, "p1", "c1", "150")])  # silver: notifications
        first_done = await producing.hand_over(first, lambda: mark("first"))
        sent_first = len(app.producer.sent)
        assert sent_first >= 1  # handed to the producer at once, before any ack
        second = await engine.process([bought(2, "p2", "c1", "900")])  # gold, same customer
        second_done = await producing.hand_over(second, lambda: mark("second"))
        # The second batch hands out only its own decisions: the first's are already out.
        assert len(app.producer.sent) == sent_first + len(second.notifications)
        assert producing.pending() == 2

        # The broker acks the second batch first: nothing is confirmed before the first.
        for ack in app.producer.acks[sent_first:]:
            ack.set_result(None)
        await asyncio.sleep(0.05)
        assert confirmed == [] and not second_done.done()
        assert (await store.load(["c1"]))["c1"].outbox  # still held for a crash

        for ack in app.producer.acks[:sent_first]:
            ack.set_result(None)
        await asyncio.wait_for(second_done, 2)
        assert first_done.done()
        assert confirmed == ["first", "second"]
        assert (await store.load(["c1"]))["c1"].outbox == ()  # both confirmed: cleared
        recent = [n.notification_id for n in producing.runtime.recent_notifications]
        assert recent == [n.notification_id for n in first.notifications + second.notifications]
        await producing.wait_below(1)  # nothing pending: returns at once
        assert failures == []

    asyncio.run(scenario())


def test_a_failed_produce_stops_without_confirming() -> None:
    async def scenario() -> None:
        producing, app, store, failures = setup()
        engine = producing.runtime.engine()
        outcome = await engine.process([bought(1, "p1", "c1", "150")])
        await producing.hand_over(outcome)
        app.producer.acks[0].set_exception(RuntimeError("broker said no"))
        for ack in app.producer.acks[1:]:
            ack.set_result(None)
        await asyncio.sleep(0.05)
        assert failures and "stopping without ack" in failures[0]
        assert (await store.load(["c1"]))["c1"].outbox  # the next owner sends it again

    asyncio.run(scenario())


@pytest.mark.parametrize("depth", [1, 2])
def test_wait_below_bounds_the_batches_in_flight(depth: int) -> None:
    async def scenario() -> None:
        producing, app, _, failures = setup()
        engine = producing.runtime.engine()
        for i in range(depth):
            outcome = await engine.process([bought(i, f"p{i}", f"c{i}", "150")])
            await producing.hand_over(outcome)
        waiting = asyncio.ensure_future(producing.wait_below(depth))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        for ack in app.producer.acks:
            ack.set_result(None)
        await asyncio.wait_for(waiting, 2)
        assert failures == []

    asyncio.run(scenario())


class Stream:
    """Faust's stream as the agent uses it: records the events acked (their offsets) and
    whether their customers' outboxes were cleared (the batch confirmed) by then."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.acked: list[int] = []
        self.confirmed_first: list[bool] = []

    async def ack(self, event: Any) -> bool:
        self.acked.append(event.message.offset)
        customer = event.message.key.decode()
        self.confirmed_first.append((await self.store.load([customer]))[customer].outbox == ())
        return True


class Message:
    def __init__(self, raw: RawMessage) -> None:
        self.topic, self.partition, self.offset = raw.topic, raw.partition, raw.offset
        self.key, self.value = raw.key, raw.value
        self.tp = (raw.topic, raw.partition)
        self.timestamp = float(WALL)


class Event:
    def __init__(self, raw: RawMessage) -> None:
        self.message = Message(raw)


def test_the_agent_acks_its_input_only_after_the_broker_acked_and_the_batch_was_confirmed() -> None:
    """The agent's batch step (agents.purchases.process_batch): acking earlier would commit
    offsets whose notifications a crash could still lose (nothing in Redis would say so once
    the outbox is cleared, and nothing in Kafka would redeliver)."""
    from agents.purchases import process_batch

    async def scenario() -> None:
        producing, app, store, failures = setup()
        stream, positions = Stream(store), {}
        events = [Event(bought(5, "p1", "c1", "150")), Event(bought(6, "p2", "c2", "40"))]
        await process_batch(producing.runtime, producing, stream, events, positions)  # type: ignore[arg-type]
        assert app.producer.sent  # handed over at once
        await asyncio.sleep(0.05)
        assert stream.acked == [] and positions == {}  # the broker has not acked yet
        assert (await store.load(["c1"]))["c1"].outbox  # held for a crash meanwhile

        for ack in app.producer.acks:
            ack.set_result(None)
        await asyncio.wait_for(producing.wait_below(1), 2)
        assert stream.acked == [5, 6]
        assert stream.confirmed_first == [True, True]  # each ack after the confirm
        assert positions == {("purchases", 0): 6}
        assert failures == []

    asyncio.run(scenario())
