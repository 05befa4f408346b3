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
        self.event_clock = Gauge(
            "memberflow_event_clock_seconds",
            "The engine clock (event time in event mode).",
            registry=r,
        )
