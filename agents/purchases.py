"""The purchases agent: raw bytes in, batches to the engine, outcome out, then ack.

Acks are manual (noack_take): an offset is committed only after the batch's state is in Redis
and its notifications and dead letters were acknowledged by the broker. The broker's acks are
awaited in the background (memberflow.app.Producing) while the next batch is processed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import faust

from memberflow.engine import RawMessage
from memberflow.faust_patches import take_batches

if TYPE_CHECKING:
    from memberflow.app import Producing, Runtime

log = logging.getLogger(__name__)

# Exit code when the agent meets an error it cannot classify: the process stops without
# acking, so the batch is redelivered to whichever worker takes over.
EXIT_UNEXPECTED = 70


def _die(message: str) -> None:
    log.critical(message, exc_info=True)
    logging.shutdown()
    os._exit(EXIT_UNEXPECTED)


def register(app: faust.App, runtime: Runtime) -> None:
    settings = runtime.settings
    # Raw bytes: Faust acks and drops a message its own decoder fails on, so we validate.
    purchases = app.topic(
        settings.purchases_topic,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
    )

    from memberflow.app import Producing, settle_heap  # the app imports the agents, not back

    positions: dict[faust.types.TP, int] = {}  # last processed offset per partition
    reported: set[int] = set()  # partitions whose lag this worker exports
    producing = Producing(app, runtime, fatal=_die)

    starts: dict[faust.types.TP, int] = {}  # earliest offsets of partitions never committed

    @app.on_partitions_revoked.connect
    async def forget_revoked(_app: Any, /, *args: Any, signal: Any = None, **_: Any) -> None:
        revoked: set[faust.types.TP] = set(args[0]) if args else set()
        # Given back later, a partition resumes from its committed offset, which another
        # worker may have moved meanwhile: a position kept from before overstated the lag, for
        # good if the partition then stayed idle (and MemberflowWorkerStalled fired).
        for tp in revoked:
            positions.pop(tp, None)
            starts.pop(tp, None)

    @app.timer(interval=5.0)
    async def report_progress() -> None:
        # A report must never stop the worker: an exception in a Faust timer crashes it.
        try:
            await report_lag()
            await report_overdue()
        except Exception:
            log.warning("could not report consumer lag or timers", exc_info=True)

    def owned_partitions() -> set[faust.types.TP]:
        return {tp for tp in app.consumer.assignment() if tp.topic == settings.purchases_topic}

    async def report_lag() -> None:
        owned = owned_partitions()
        ends: dict[faust.types.TP, int | None] = {}
        if owned:
            try:
                # The broker's end offsets (one small request every 5 s). The consumer's own
                # high-water marks only move when a fetch returns, and a stalled worker stops
                # fetching once its buffers are full: its lag froze there while the backlog
                # grew, so the lag alert never fired for exactly the stuck worker it is for.
                ends = dict(await asyncio.wait_for(app.consumer.highwaters(*owned), 4.0))
            except Exception as exc:  # the broker unreachable: the consumer's last figures
                log.debug("end offsets unavailable (%s); using the fetched high water", exc)
        owned &= owned_partitions()  # a rebalance may have run meanwhile
        committed = getattr(app.consumer, "_committed_offset", {})
        # Nothing processed here yet (a worker stuck on its first batch must show its lag too):
        # from the committed offset Faust read when the partition came, or, in a group that
        # never committed, from where it starts reading (earliest), asked once per assignment.
        unknown = [tp for tp in owned if tp not in positions and committed.get(tp) is None]
        if unknown and not all(tp in starts for tp in unknown):
            try:
                starts.update(await asyncio.wait_for(app.consumer.earliest_offsets(*unknown), 4.0))
            except Exception as exc:  # reported next time
                log.debug("earliest offsets unavailable (%s)", exc)
        for tp in owned:
            highwater = ends.get(tp)
            if highwater is None:
                try:
                    highwater = app.consumer.highwater(tp)
                except Exception:  # revoked since (aiokafka asserts the assignment)
                    continue
            if highwater is None:
                continue
            if tp in positions:
                lag = highwater - positions[tp] - 1
            else:
                start = committed.get(tp)
                if start is None:
                    start = starts.get(tp)
                if start is None:
                    continue
                lag = highwater - start
            runtime.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, lag))
            reported.add(tp.partition)
        # A partition this worker lost is the new owner's to report: its last figure here
        # would stay exported forever (the lag alert takes the max over workers).
        for tp in [tp for tp in positions if tp not in owned]:
            del positions[tp]
        for partition in reported - {tp.partition for tp in owned}:
            runtime.metrics.consumer_lag.remove(str(partition))
            reported.discard(partition)

    overdue_reported: set[int] = set()

    async def report_overdue() -> None:
        # Here, not in fire_timers: a poller that stopped firing (stuck, or a superseded
        # worker's) must still show its timers waiting.
        partitions = sorted(tp.partition for tp in owned_partitions())
        try:
            overdue = await asyncio.wait_for(runtime.engine().timers_overdue(partitions), 4.0)
        except Exception as exc:  # Redis away: no figure (the Redis alerts cover it)
            log.debug("timer heads unavailable (%s)", exc)
            return
        for partition, seconds in overdue.items():
            runtime.metrics.timers_overdue.labels(str(partition)).set(seconds)
        for partition in overdue_reported - set(overdue):
            runtime.metrics.timers_overdue.remove(str(partition))
        overdue_reported.clear()
        overdue_reported.update(overdue)

    @app.timer(interval=settings.timer_poll_s)
    async def fire_timers() -> None:
        """Fire due timers of the partitions this worker owns (their customers are ours)."""
        if runtime.superseded is not None:
            return  # an old worker in a rolling restart: the new owners fire them
        engine = runtime.engine()
        shards = sorted(tp.partition for tp in owned_partitions())
        try:
            # Checked without the lock (one round trip for every shard): an idle poll must not
            # take event time, which matters when Redis is slow.
            for shard in await engine.shards_due(shards):
                while True:
                    async with runtime.lock():
                        started = time.perf_counter()
                        # Small batches, smaller still while events flow: the lock is released
                        # between them, and an event arriving meanwhile waits for one batch.
                        limit = 25 if runtime.events_flowing() else 100
                        outcome = await engine.process_due(shard, limit=limit)
                        confirmed = await producing.hand_over(outcome)
                    # Confirmed before the next poll of this shard: until then the index still
                    # names the customers just fired. The share counts the wait for the broker
                    # too: a storm's notifications must not crowd the topic either.
                    await confirmed
                    took = time.perf_counter() - started
                    if not outcome.more_due:
                        break
                    if runtime.events_flowing():
                        # A wake-up storm (a new snapshot relabels everyone) must not starve
                        # events: while they flow, timers get `timer_share` of the time.
                        await asyncio.sleep(
                            took * (1 - settings.timer_share) / settings.timer_share
                        )
        except Exception:
            # The state is the claim: an unconfirmed firing is found again on restart.
            _die("unexpected error firing timers; stopping")

    @app.timer(interval=settings.snapshot_check_s)
    async def publish_snapshot() -> None:
        """Publish population thresholds on the policy interval (one worker wins the lock)."""
        from memberflow.population import PolicySuperseded, adopt_policy, publish

        engine = runtime.engine()
        now = int(time.time())
        interval = runtime.policy.segments.snapshot_interval_minutes * 60
        try:
            try:
                await engine.retry("policy", partial(adopt_policy, engine.store, runtime.policy))
            except PolicySuperseded as exc:
                if runtime.superseded is None:
                    log.error("%s; this worker fires no timers until restarted with it", exc)
                runtime.superseded = str(exc)
                engine.superseded = True
                return
            # Through the engine: it also sets the snapshot gauges, which a worker that has not
            # processed a batch yet exported as 0 (version 0, published in 1970).
            latest = await engine.current_snapshot()
            if latest is None or now - latest.published_at >= interval:
                await engine.retry("publish", partial(publish, engine.store, runtime.policy, now))
        except Exception:
            _die("unexpected error publishing a snapshot; stopping")

    @app.task
    async def settle_heap_once_started() -> None:
        settle_heap()

    @app.agent(purchases, concurrency=1, name="memberflow.purchases")
    async def process_purchases(stream: faust.StreamT) -> None:
        batches = take_batches(stream, settings.batch_max, settings.batch_within_s)
        async for events in batches:
            try:
                await process_batch(runtime, producing, stream, events, positions)
            except Exception:
                # Transient Redis errors are retried inside the engine; anything reaching
                # here is unexpected. Letting it escape would make Faust ack the batch.
                _die("unexpected error in the purchases agent; stopping without ack")
            runtime.last_event_batch = time.monotonic()
            # At most one batch waits for the broker while the next one is processed.
            await producing.wait_below(2)


async def process_batch(
    runtime: Runtime,
    producing: Producing,
    stream: faust.StreamT,
    events: Sequence[faust.EventT],
    positions: dict[faust.types.TP, int],
) -> None:
    """One batch of the agent: processed and handed to the producer under the lock; its input
    offsets are acked only once the broker acked its output and the engine confirmed it (the
    outbox in Redis covers the time between). Outside the agent, so a test drives it."""
    started = time.perf_counter()
    batch = [
        RawMessage(
            topic=event.message.topic,
            partition=event.message.partition,
            offset=event.message.offset,
            key=event.message.key,
            value=event.message.value,
        )
        for event in events
    ]
    # One batch at a time per worker, events or timers, handed to the producer in the order
    # processed (confirms follow that order).
    async with runtime.lock():
        outcome = await runtime.engine().process(batch)
        await producing.hand_over(
            outcome, partial(_acked, runtime, stream, events, positions, started)
        )


async def _acked(
    runtime: Runtime,
    stream: faust.StreamT,
    events: Sequence[faust.EventT],
    positions: dict[faust.types.TP, int],
    started: float,
) -> None:
    """After a batch is confirmed: ack its input offsets (Faust commits them)."""
    done = time.time()
    for event in events:
        await stream.ack(event)
        tp = event.message.tp
        positions[tp] = max(positions.get(tp, -1), event.message.offset)
        runtime.metrics.processing_latency.observe(max(0.0, done - event.message.timestamp))
    runtime.metrics.batch_seconds.observe(time.perf_counter() - started)
