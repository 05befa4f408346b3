"""memberflow's cheaper Faust consumer path (memberflow/faust_patches.py): inline delivery and
LeanMonitor, installed by memberflow.app.faust_app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import types
from collections import defaultdict
from typing import Any

import faust
import pytest
from faust.sensors import Monitor
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.drivers import aiokafka as driver

from memberflow import faust_patches
from memberflow.app import faust_app
from memberflow.faust_patches import LeanMonitor, resume, take_batches, take_queued
from memberflow.settings import Settings

# sha256 of faust-streaming 0.15.3's Consumer._drain_messages, which
# memberflow/faust_patches.py copies with one change. A different Faust must be read again
# before this pin is moved.
FAUST_DRAIN_MESSAGES = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def test_the_copied_drain_loop_is_still_fausts() -> None:
    source = inspect.getsource(BaseConsumer._drain_messages)
    assert hashlib.sha256(source.encode()).hexdigest() == FAUST_DRAIN_MESSAGES
    # the copy differs in how the callback is awaited, and delivers what Faust drops
    copied = inspect.getsource(faust_patches.drain_messages)
    assert "callback(message), self.suspend_flow.wait()" in source
    assert "delivery.send(None)" in copied and "self.suspend_flow.wait()" in copied


def test_faust_app_installs_the_fast_path_and_can_take_it_out() -> None:
    settings = Settings()
    try:
        stock = faust_app(settings, "t-stock", fast_path=False)
        assert driver.Consumer._drain_messages is BaseConsumer._drain_messages
        assert type(stock.monitor) is Monitor
        fast = faust_app(settings, "t-fast")
        assert driver.Consumer._drain_messages is faust_patches.drain_messages
        assert isinstance(fast.monitor, LeanMonitor)
    finally:
        faust_app(settings, "t-again")  # the default, as every worker builds it


def test_lean_monitor_keeps_what_faust_reads() -> None:
    monitor = LeanMonitor()
    tp: Any = ("purchases", 3)
    assert monitor.on_stream_event_in(tp, 7, None, None) is None
    assert tp in monitor.stream_inbound_time  # Faust's stalled-stream warnings read this
    monitor.on_message_in(tp, 7, None)
    assert monitor.tp_read_offsets[tp] == 7
    monitor.on_stream_event_out(tp, 7, None, None, None)
    monitor.on_message_out(tp, 7, None)
    assert monitor.messages_received_total == 0  # the per-event statistics are skipped


async def _deliver(coro: Any) -> Any:
    """What the drain loop does with one callback: an eager first step, a task if it waits."""
    try:
        pending = coro.send(None)
    except StopIteration as done:
        return ("inline", done.value)
    return ("task", await asyncio.ensure_future(resume(coro, pending)))


def test_a_callback_that_does_not_wait_runs_inline() -> None:
    async def callback() -> int:
        await asyncio.gather()  # awaits, but an already finished future: no suspension
        return 5

    assert asyncio.run(_deliver(callback())) == ("inline", 5)


def test_a_callback_that_waits_goes_on_in_a_task() -> None:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[int] = loop.create_future()
        seen = []

        async def callback() -> int:
            seen.append("first step")
            await asyncio.sleep(0)  # a bare yield
            value = await gate  # a future
            seen.append("resumed")
            return value + 1

        loop.call_later(0.01, gate.set_result, 41)
        result = await _deliver(callback())
        return result, seen

    assert asyncio.run(main()) == (("task", 42), ["first step", "resumed"])


def test_errors_and_cancellation_reach_the_callback() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        events: list[str] = []

        async def blocked() -> None:
            try:
                await loop.create_future()  # never done, like a full stream buffer
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            finally:
                events.append("cleaned up")

        coro = blocked()
        task = asyncio.ensure_future(resume(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()  # what wait_first does when suspend_flow is set
        with pytest.raises(asyncio.CancelledError):
            await task

        async def failing() -> None:
            await asyncio.sleep(0)
            raise ValueError("bad")

        coro2 = failing()
        with pytest.raises(ValueError, match="bad"):
            await asyncio.ensure_future(resume(coro2, coro2.send(None)))
        events.append("raised")
        return events

    assert asyncio.run(main()) == ["cancelled", "cleaned up", "raised"]


# sha256 of faust-streaming 0.15.3's Stream.noack_take, which memberflow.faust_patches.take_queued
# follows without its timed wait.
FAUST_NOACK_TAKE = "f2cc2dbfc162d2006c94361c0ed68535c95484020849eb0d4210c1f52c4c430a"


def test_take_queued_still_follows_fausts_noack_take() -> None:
    source = inspect.getsource(faust.Stream.noack_take)
    assert hashlib.sha256(source.encode()).hexdigest() == FAUST_NOACK_TAKE


class QueueStream:
    """The parts of faust.Stream that take_queued uses. Like Faust's stream iterator, the
    passive drainer moves one queued value per turn of the event loop and runs the
    processors on it with `current_event` set."""

    def __init__(self) -> None:
        self.channel = types.SimpleNamespace(queue=asyncio.Queue())
        self.current_event: Any = None
        self.enable_acks = True
        self.should_stop = False
        self.log = logging.getLogger("test.QueueStream")
        self._processors: list[Any] = []
        self._drainer: asyncio.Task[None] | None = None
        self.timeouts = 0  # idle waits that ran out: a batch waited with nothing arriving

    def add_processor(self, processor: Any) -> None:
        self._processors.append(processor)

    def _enable_passive(self, channel: Any) -> None:
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while True:
            await asyncio.sleep(0)
            value = await self.channel.queue.get()
            self.current_event = types.SimpleNamespace(value=value)
            for processor in list(self._processors):
                value = await processor(value)

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float) -> None:  # noqa: ASYNC109 - Faust's signature
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            self.timeouts += 1

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def crash(self, exc: BaseException) -> None:
        raise exc

    def put(self, *values: int) -> None:
        for value in values:
            self.channel.queue.put_nowait(value)

    async def close(self) -> None:
        assert self._drainer is not None
        self._drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drainer


def values(batch: Any) -> list[int]:
    return [event.value for event in batch]


def test_what_is_queued_is_one_batch_at_once_up_to_the_maximum() -> None:
    async def main() -> None:
        stream = QueueStream()
        stream.put(*range(7))
        batches = take_queued(stream, 3)
        assert values(await anext(batches)) == [0, 1, 2]
        assert values(await anext(batches)) == [3, 4, 5]
        assert values(await anext(batches)) == [6]
        assert stream.timeouts == 0  # no batch waited for more while events were queued
        assert stream.enable_acks is False  # the caller acks
        await batches.aclose()
        assert stream.enable_acks is True and stream._processors == []
        await stream.close()

    asyncio.run(main())


def test_events_arriving_while_a_batch_is_out_make_the_next_batch() -> None:
    async def main() -> None:
        stream = QueueStream()
        batches = take_queued(stream, 100)
        waiting = asyncio.ensure_future(anext(batches))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # idle: no empty batches
        stream.put(1)
        assert values(await waiting) == [1]
        stream.put(2, 3, 4)  # while batch [1] is processed
        for _ in range(20):
            await asyncio.sleep(0)
        assert values(await anext(batches)) == [2, 3, 4]
        await batches.aclose()
        await stream.close()

    asyncio.run(main())


def test_a_positive_batch_wait_takes_fausts_own_batches() -> None:
    stream = QueueStream()
    asked: list[tuple[int, float]] = []

    def noack_take(max_: int, within: float) -> str:
        asked.append((max_, within))
        return "faust's noack_take"

    stream.noack_take = noack_take  # type: ignore[attr-defined]
    assert take_batches(stream, 5, 0.25) == "faust's noack_take"
    assert asked == [(5, 0.25)]

    async def main() -> None:
        batches = take_batches(stream, 5, 0.0)  # 0: take_queued
        stream.put(1, 2)
        assert values(await anext(batches)) == [1, 2]
        assert asked == [(5, 0.25)]  # Faust's take was not asked again
        await batches.aclose()
        await stream.close()

    asyncio.run(main())


class _Stopped:
    def __init__(self) -> None:
        self.stopped = False

    def is_set(self) -> bool:
        return self.stopped


class _DrainingConsumer:
    """What drain_messages reads of a Faust consumer: one fetch of `offsets` on one
    partition, then stop."""

    consumer_stopped_errors = ()

    def __init__(self, offsets: list[int], read_offset: int | None) -> None:
        self.offsets = offsets
        self.delivered: list[int] = []
        self.gaps: list[tuple[int, int]] = []
        self._stopped = _Stopped()
        self._read_offset: dict[Any, int | None] = defaultdict(lambda: None)
        self._read_offset[TP] = read_offset
        self._commit_every = None
        self._n_acked = 0
        self.should_stop = False
        self.diag = types.SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        self.app = types.SimpleNamespace(
            topics=types.SimpleNamespace(acks_enabled_for=lambda topic: True)
        )
        self.log = types.SimpleNamespace(dev=lambda *args: None)
        self.suspend_flow = asyncio.Event()

    async def getmany(self, timeout: float) -> Any:  # noqa: ASYNC109 (Faust's signature)
        self._stopped.stopped = True  # one fetch
        for offset in self.offsets:
            yield TP, types.SimpleNamespace(offset=offset, topic=TP[0], key=b"k", value=b"v")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def callback(self, message: Any) -> None:
        self.delivered.append(message.offset)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        self.gaps.append((offset_from, offset_to))


TP: Any = ("purchases", 0)


def test_a_message_below_the_read_offset_is_delivered_not_dropped() -> None:
    """After a rebalance the rest of a batch fetched before it can arrive first, then the
    partition is read again from its committed offset: Faust dropped every message below the
    stale batch ("DROPPED MESSAGE"), unprocessed, while acks moved the commit past them."""

    async def main() -> _DrainingConsumer:
        consumer = _DrainingConsumer([150, 151, 100, 101, 102], read_offset=None)
        fetcher = types.SimpleNamespace(_stopped=_Stopped())
        await faust_patches.drain_messages(consumer, fetcher)
        return consumer

    consumer = asyncio.run(main())
    assert consumer.delivered == [150, 151, 100, 101, 102]
    assert consumer._read_offset[TP] == 102
    assert consumer.gaps == []


def test_a_jump_in_offsets_is_still_a_gap() -> None:
    """Transaction markers take offsets no message has: Faust's gap bookkeeping stays, so the
    commit can pass them."""

    async def main() -> _DrainingConsumer:
        consumer = _DrainingConsumer([11, 12, 15, 16], read_offset=10)
        await faust_patches.drain_messages(consumer, types.SimpleNamespace(_stopped=_Stopped()))
        return consumer

    consumer = asyncio.run(main())
    assert consumer.delivered == [11, 12, 15, 16]
    assert consumer.gaps == [(13, 15)]
