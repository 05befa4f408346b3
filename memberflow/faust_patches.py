"""Patches to faust-streaming 0.15.3's consumer internals, installed by memberflow.app.faust_app.

Kept apart from the app factory because they reach into Faust's private code: each one names
what it replaces and why, and tests/unit/test_consumer_path.py pins the Faust sources the
copied drain loop and take_queued follow, so a Faust upgrade cannot silently change what is
patched. Measured with ops/bench_consume_only.py (take): inline delivery and LeanMonitor
together save about half of Faust's per-event CPU; take_queued is for latency (ops/PERFORMANCE.md,
Done).
"""

from __future__ import annotations

import asyncio
import functools
import time
import types
from collections.abc import AsyncIterator
from typing import Any, cast

from faust.sensors import Monitor


def set_fetch_max_wait(milliseconds: int) -> None:
    """faust-streaming 0.15.3 creates its aiokafka consumer with fetch_max_wait_ms=1500 and no
    setting for it. aiokafka reads the value when the consumer starts, so it is set on the
    consumer right after Faust creates it. Measured (ops/benchmark.py, embedded broker at half
    load): p50 produce->applied 1.78 s with 1500 ms, 0.16 s with 10 ms, same throughput."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    original = getattr(thread._create_worker_consumer, "__wrapped__", None)
    if original is None:
        original = thread._create_worker_consumer

    @functools.wraps(original)
    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = milliseconds
        return consumer

    thread._create_worker_consumer = create  # type: ignore[method-assign]


class LeanMonitor(Monitor):
    """Faust's Monitor without its per-event bookkeeping.

    Faust calls four Monitor hooks for every event (message in, stream event in and out,
    message out): counters by topic, stream and task, time stamps, and a dict per event. Nothing
    in memberflow reads them (memberflow/metrics.py keeps its own), so they are skipped. What
    Faust itself reads is kept: ``stream_inbound_time`` (its stalled-stream warnings) and the
    per-partition read offsets. Commits, rebalances and web stats still go through Monitor."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        self.tp_read_offsets[tp] = offset

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        self.stream_inbound_time[tp] = time.monotonic()

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass


@types.coroutine
def resume(coro: Any, pending: Any) -> Any:
    """Go on running `coro` in a task after it suspended on `pending` in an eager first step.

    The same stepping a Task does (send None, or throw what the task was thrown, e.g. its
    cancellation), handing each future `coro` waits on to the task that runs this."""
    while True:
        try:
            yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(None)
            except StopIteration as stop:
                return stop.value


async def drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - Faust's loop
    """faust.transport.consumer.Consumer._drain_messages (faust-streaming 0.15.3), with one
    change: each message's conductor callback first runs inline, and only if it has to wait
    (flow control suspended, a full stream buffer, a full producer buffer) does it become a
    task raced against ``suspend_flow`` as before. Faust's loop made every message a task
    plus three waiter tasks (``wait_first``), which cancelled each other: about a quarter of
    a consume-only worker's CPU. What is delivered, in which order, and when offsets are
    acked and committed does not change. tests/unit/test_consumer_path.py pins the source."""
    from faust.transport.consumer import CONSUMER_FETCHING

    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            ait = getmany(timeout=1.0)

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    # Faust drops a message below the read offset ("DROPPED MESSAGE") as one
                    # seen already. After a rebalance that is not so: the rest of a batch
                    # fetched before it can arrive first (the read offset was reset), and the
                    # partition, read again from its committed offset, then had every message
                    # below that batch dropped, unprocessed, while later acks moved the commit
                    # past them (a lost stretch, with no offset committed before). Such a
                    # message is delivered: applying an event twice changes nothing here.
                    gap = offset - (r_offset or 0)
                    # We have a gap in income messages
                    if gap > 1 and r_offset:
                        acks_enabled = acks_enabled_for(message.topic)
                        if acks_enabled:
                            await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    delivery = callback(message)
                    try:
                        pending = delivery.send(None)
                    except StopIteration:
                        pass  # delivered without waiting: no task needed
                    else:
                        await self.wait_first(
                            asyncio.ensure_future(resume(delivery, pending)),
                            self.suspend_flow.wait(),
                        )
                    set_read_offset(tp, offset)
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)


def set_inline_delivery(enabled: bool) -> None:
    """Install (or take back out) the inline-delivery drain loop on Faust's aiokafka consumer."""
    from faust.transport.consumer import Consumer as BaseConsumer
    from faust.transport.drivers import aiokafka as driver

    if enabled:
        driver.Consumer._drain_messages = drain_messages  # type: ignore[method-assign]
    elif "_drain_messages" in vars(driver.Consumer):
        driver.Consumer._drain_messages = BaseConsumer._drain_messages  # type: ignore[method-assign]


async def take_queued(stream: Any, max_: int) -> AsyncIterator[list[Any]]:
    """``Stream.noack_take`` (faust-streaming 0.15.3) without its wait: a batch is every
    event already queued when the previous batch is done (at most `max_`), handed over as soon
    as the stream's queue is empty, instead of after waiting ``within`` seconds every time.

    Under load the queue fills while a batch is processed, so batches stay as large as
    before; at part load an event no longer waits out the timer on top of the batch ahead of
    it. Events are not acked here (the caller acks each after its batch is confirmed), as with
    ``noack_take``; buffering, the full-buffer wait and the stream's processors are Faust's
    (tests/unit/test_consumer_path.py pins the source this follows)."""
    buffer: list[Any] = []
    filled = asyncio.Event()  # set when the buffer holds an event
    room = asyncio.Event()  # set when a full buffer was handed over
    consuming: asyncio.Future[None] | None = None
    queue = getattr(stream.channel, "queue", None)

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        try:
            if consuming is not None:  # a batch is out: wait until it is handed back
                try:
                    await consuming
                finally:
                    consuming = None
            event = stream.current_event
            if event is None:
                raise RuntimeError("take_queued found current_event is None")
            buffer.append(event)
            filled.set()
            if len(buffer) >= max_:
                room.clear()
                await stream.wait(room)  # never more than max_ per batch
        except asyncio.CancelledError:  # pragma: no cover
            raise
        except Exception as exc:  # pragma: no cover - as Faust: the stream crashes
            stream.log.exception("Error adding to take buffer: %r", exc)
            await stream.crash(exc)
        return value

    acks_before = stream.enable_acks
    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(stream.channel)
    try:
        while not stream.should_stop:
            if not buffer:
                # Idle: wake up now and then to notice a stop.
                await stream.wait_for_stopped(filled, timeout=1.0)
                continue
            # What is already queued joins this batch: the stream's drainer moves queued events
            # a turn of the loop at a time, so turn it until the queue is empty (and once more
            # for the event in hand), or the batch is full.
            spins = 0
            while len(buffer) < max_ and spins < 2 * max_:
                spins += 1
                await asyncio.sleep(0)
                if queue is None:
                    break  # not a queue-backed channel: one turn only
                if queue.empty():
                    await asyncio.sleep(0)
                    if queue.empty():
                        break
            handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            consuming = handed
            try:
                yield list(buffer)
            finally:
                buffer.clear()
                filled.clear()
                handed.set_result(None)
                room.set()
    finally:
        stream.enable_acks = acks_before
        stream._processors.remove(add_to_buffer)


def take_batches(stream: Any, max_: int, within: float) -> AsyncIterator[Any]:
    """An agent's batches (MEMBERFLOW_BATCH_WITHIN_S): `take_queued` when `within` is 0, else
    Faust's ``noack_take``, which waits up to `within` seconds for each batch to fill. The
    worker and the benchmark's consume-only agent both take their batches here."""
    if within > 0:
        return cast(AsyncIterator[Any], stream.noack_take(max_, within=within))
    return take_queued(stream, max_)
