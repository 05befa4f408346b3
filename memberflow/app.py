"""The Faust app factory and the runtime the agents share (settings, policy, engine)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import faust

from memberflow.engine import BatchOutcome, Engine
from memberflow.metrics import Metrics
from memberflow.settings import Settings
from memberflow.web import notification_ring, register_views
from rules.policy import Policy
from state.redis_store import RedisStore, connect
from streams.events import Notification


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


def _set_fetch_max_wait(milliseconds: int) -> None:
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


def faust_app(settings: Settings, app_id: str | None = None) -> faust.App:
    """The Faust app with memberflow's broker, consumer and web settings (also what
    ops/benchmark.py measures its baselines with, so every run has the same consumer)."""
    _set_fetch_max_wait(settings.broker_fetch_max_wait_ms)
    broker_credentials = None
    if settings.broker_username and settings.broker_password:
        broker_credentials = faust.SASLCredentials(
            username=settings.broker_username,
            password=settings.broker_password.get_secret_value(),
        )
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
    )


def create_app(runtime: Runtime) -> faust.App:
    app = faust_app(runtime.settings)
    app.memberflow = runtime  # type: ignore[attr-defined]

    from agents.purchases import register  # agents depend on the app, not the other way

    register(app, runtime)

    register_views(app, runtime)  # HTTP API, status page, /metrics, /health (memberflow/web.py)

    return app


async def publish(app: faust.App, settings: Settings, outcome: BatchOutcome) -> None:
    """Produce a batch's notifications and dead letters and wait for the broker's acks."""
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
    if pending:
        await asyncio.gather(*pending)
    app.memberflow.recent_notifications.extend(outcome.notifications)  # type: ignore[attr-defined]


def _key(notification: Notification) -> bytes:
    return notification.customer_id.encode()
