"""Prometheus metrics, built on an injected registry. Labels come from small fixed sets only
(outcome, reject reason, notification type): never a customer id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "memberflow_events_total",
            "Input events by outcome (applied, duplicate, dead_lettered).",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "memberflow_dead_letters_total",
            "Dead-lettered inputs by reason.",
            ["reason"],
            registry=r,
        )
        self.notifications = Counter(
            "memberflow_notifications_total",
            "Notifications produced by type.",
            ["type"],
            registry=r,
        )
        self.batch_size = Histogram(
            "memberflow_batch_size_events",
            "Events per processed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "memberflow_batch_duration_seconds",
            "Time to process one batch end to end.",
            registry=r,
        )
        self.redis_retries = Counter(
            "memberflow_redis_retries_total",
            "Redis operations retried after a transient error.",
            ["operation"],
            registry=r,
        )
        self.version_conflicts = Counter(
            "memberflow_version_conflicts_total",
            "Customer writes refused because another worker wrote first (reloaded and redone).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "memberflow_consumer_lag_events",
            "Events in a partition not yet processed by this worker (high water - position).",
            ["partition"],
            registry=r,
        )
        self.processing_latency = Histogram(
            "memberflow_processing_latency_seconds",
            "From the event's arrival on the broker to its state applied and outputs acked.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.event_time_lag = Histogram(
            "memberflow_event_time_lag_seconds",
            "From the event's occurred_at to its state applied (large during replays).",
            buckets=(0.1, 1, 10, 60, 600, 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400),
            registry=r,
        )
        self.tier_transitions = Counter(
            "memberflow_tier_transitions_total",
            "Tier changes by direction (up, down).",
            ["direction"],
            registry=r,
        )
        self.last_event = Gauge(
            "memberflow_last_event_timestamp_seconds",
            "Wall time at which the last batch of events was applied.",
            registry=r,
        )
        self.triggers = Counter(
            "memberflow_triggers_total",
            "Time-driven triggers by outcome (scheduled, rescheduled, fired, deferred_cap, "
            "deferred_quiet_hours, cancelled).",
            ["trigger", "outcome"],
            registry=r,
        )
        self.timer_lateness = Histogram(
            "memberflow_timer_lateness_seconds",
            "How long after its due time a timer fired (clock of its partition in event mode).",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 86400),
            registry=r,
        )
        self.event_clock = Gauge(
            "memberflow_event_clock_seconds",
            "The engine clock (event time in event mode).",
            registry=r,
        )
