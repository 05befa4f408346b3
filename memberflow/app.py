"""The Faust app factory and the runtime the agents share (settings, policy, engine)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import faust

from memberflow.engine import BatchOutcome, Engine
from memberflow.faust_patches import LeanMonitor, set_fetch_max_wait, set_inline_delivery
from memberflow.kafka import broker_ssl_context
from memberflow.metrics import Metrics
from memberflow.settings import Settings
from memberflow.web import notification_ring, register_views
from rules.policy import Policy
from state.redis_store import RedisStore, connect
from streams.events import Notification

# Full (generation 2) collections at most once per this many generation-1 collections
# (CPython's default is 10). A batch keeps its events, states and notifications alive for its
# whole run, so most of what it allocates outlives two young collections and is promoted, then
# dies: with the default, a worker draining a backlog ran a full collection about twice a
# second, each walking 100,000-250,000 such objects (about 90 ms here), 18 % of its time
# (ops/benchmark.py --phases c, 2026-11-26: 155 full collections, 14 s of 77 s). At 100: 16,
# 1.5 s, and 2,585 / 2,457 -> 3,261 / 2,840 events/s in alternating runs, RSS +9-16 MiB.
FULL_COLLECTION_EVERY = 100


def settle_heap() -> None:
    """Once started: freeze what starting built (Faust, aiokafka, pydantic schemas, metrics
    live as long as the process, so no collection need walk them; full collections took
    ~50 ms each before, a tail-latency spike) and make full collections rarer (above)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


@dataclass
class Runtime:
    """What the agents need, built once per worker process."""

    settings: Settings
    policy: Policy
    metrics: Metrics = field(default_factory=Metrics)
    recent_notifications: deque[Notification] = field(default_factory=notification_ring)
    _engine: Engine | None = None
    _lock: asyncio.Lock | None = None
    last_event_batch: float = -1e9  # monotonic time the last event batch ended (never)
    # Why this worker's policy no longer counts (another version was adopted since), or None.
    # Such a worker still applies events (by its old policy, until it is restarted) but fires
    # no timers and publishes no snapshot: those wait for workers on the adopted version.
    superseded: str | None = None

    def events_flowing(self) -> bool:
        """True while event batches keep coming (one ended within the last half second)."""
        return time.monotonic() - self.last_event_batch < 0.5

    def lock(self) -> asyncio.Lock:
        """Serialises event batches and timer batches within this worker."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def engine(self) -> Engine:
        # Built lazily inside the running loop: redis.asyncio binds to the loop that uses it.
        if self._engine is None:
            password = self.settings.redis_password
            client = connect(
                self.settings.redis_url,
                cluster=self.settings.redis_cluster,
                password=password.get_secret_value() if password else None,
            )
            self._engine = Engine(
                RedisStore(client, stats_shards=self.settings.stats_shards),
                self.policy,
                clock_mode=self.settings.clock,
                metrics=self.metrics,
                max_backoff_s=self.settings.redis_retry_max_backoff_s,
                timer_lateness_s=self.settings.timer_lateness_s,
                learn_refresh_s=self.settings.learn_refresh_s,
            )
        return self._engine


def faust_app(
    settings: Settings, app_id: str | None = None, *, fast_path: bool = True
) -> faust.App:
    """The Faust app with memberflow's broker, consumer and web settings (also what
    ops/benchmark.py measures its baselines with, so every run has the same consumer).

    ``fast_path`` (inline delivery of fetched messages, LeanMonitor) halves the CPU Faust's
    consumer path takes per event, with the same delivery and acks; False builds Faust's own
    path (ops/bench_consume_only.py BENCH_FAUST_PATH=stock, to measure what it saves)."""
    set_fetch_max_wait(settings.broker_fetch_max_wait_ms)
    # Measured with ops/bench_consume_only.py (take): about half of Faust's per-event CPU.
    set_inline_delivery(fast_path)
    extra: dict[str, Any] = {"Monitor": LeanMonitor} if fast_path else {}
    broker_credentials: faust.SASLCredentials | faust.SSLCredentials | None = None
    context = broker_ssl_context(settings) if settings.broker_tls else None
    if settings.broker_username and settings.broker_password:
        # With an SSL context Faust speaks SASL_SSL, without SASL_PLAINTEXT (the password in
        # clear on the wire: only for a broker on a trusted network).
        broker_credentials = faust.SASLCredentials(
            username=settings.broker_username,
            password=settings.broker_password.get_secret_value(),
            ssl_context=context,
        )
    elif context is not None:
        broker_credentials = faust.SSLCredentials(context)
    return faust.App(
        app_id or settings.app_id,
        broker=settings.broker_url,
        broker_credentials=broker_credentials,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
        # State lives in Redis with the idempotency memory; Faust tables are not used.
        store="memory://",
        autodiscover=False,
        # Faust would otherwise let unprefixed environment variables (WEB_BIND, PRODUCER_ACKS,
        # STREAM_BUFFER_MAXSIZE, ...) override what is passed here: a stray WEB_BIND=0.0.0.0
        # exposed the API while the token check saw loopback. MEMBERFLOW_* is the only input.
        env={},
        **extra,
    )


def create_app(runtime: Runtime) -> faust.App:
    app = faust_app(runtime.settings)
    app.memberflow = runtime  # type: ignore[attr-defined]

    from agents.purchases import register  # agents depend on the app, not the other way

    register(app, runtime)

    register_views(app, runtime)  # HTTP API, status page, /metrics, /health (memberflow/web.py)

    return app


async def send(app: faust.App, settings: Settings, outcome: BatchOutcome) -> list[Any]:
    """Hand a batch's notifications and dead letters to the producer; returns the futures of
    the broker's acks (the producer batches and sends them meanwhile)."""
    producer = app.producer
    pending = []
    for notification in outcome.notifications:
        pending.append(
            await producer.send(
                settings.notifications_topic,
                _key(notification),
                notification.model_dump_json().encode(),
                None,
                None,
                None,
            )
        )
    for key, letter in outcome.dead_letters:
        pending.append(
            await producer.send(
                settings.dead_letter_topic, key, letter.model_dump_json().encode(), None, None, None
            )
        )
    return pending


@dataclass
class _Handed:
    outcome: BatchOutcome
    acks: list[Any]
    confirmed: Callable[[], Awaitable[None]] | None
    done: asyncio.Future[None]


class Producing:
    """Notifications are produced while the worker goes on with the next batch.

    A batch's notifications and dead letters are handed to the producer as soon as its state
    is saved (the outbox in Redis is what makes that safe); a background task then waits for
    the broker's acks and only then confirms the batch (clears the outbox, indexes the timers,
    counts the statistics) and acks its input offsets. Batches are confirmed strictly in the
    order they were handed over, whether event or timer batches: a confirm clears a customer's
    outbox, which may still hold an earlier batch's notifications (Engine._handed). Measured
    (ops/benchmark.py): the worker no longer sits idle while the broker acknowledges.

    `hand_over` is called under the runtime lock, right after processing (so the order of
    handing over is the order of processing); confirms take the lock too (every Redis write of
    a worker stays serialised). Errors stop the process (`fatal`): the state is the claim, so
    whatever was not confirmed is found again by the next owner."""

    def __init__(
        self,
        app: faust.App,
        runtime: Runtime,
        fatal: Callable[[str], None],
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.fatal = fatal
        self._queue: deque[_Handed] = deque()
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def hand_over(
        self, outcome: BatchOutcome, confirmed: Callable[[], Awaitable[None]] | None = None
    ) -> asyncio.Future[None]:
        """Send `outcome` now; confirm it (then call `confirmed`) once the broker acked it.
        Returns a future done when that happened."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._confirm_in_order())
        acks = await send(self.app, self.runtime.settings, outcome)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Handed(outcome, acks, confirmed, done))
        self._wakeup.set()
        return done

    def pending(self) -> int:
        """Batches handed over and not yet confirmed."""
        return len(self._queue)

    async def wait_below(self, depth: int) -> None:
        """Wait (outside the lock) until fewer than `depth` batches are unconfirmed: bounds
        what a worker holds in memory and how far its confirms lag."""
        while len(self._queue) >= depth:
            self._progress.clear()
            await self._progress.wait()

    async def _confirm_in_order(self) -> None:
        engine = self.runtime.engine()
        try:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                handed = self._queue[0]
                if handed.acks:
                    await asyncio.gather(*handed.acks)
                async with self.runtime.lock():
                    await engine.confirm(handed.outcome)
                self.runtime.recent_notifications.extend(handed.outcome.notifications)
                if handed.confirmed is not None:
                    await handed.confirmed()
                self._queue.popleft()
                handed.done.set_result(None)
                self._progress.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.fatal("unexpected error producing or confirming a batch; stopping without ack")


def _key(notification: Notification) -> bytes:
    return notification.customer_id.encode()
