"""Prometheus metrics, built on an injected registry. Labels come from small fixed sets only
(outcome, reject reason, notification type, tier/segment/grade/stage): never a customer id."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The dimensions of memberflow_customers: the label prefixes of the population counters.
CUSTOMER_DIMENSIONS = ("tier", "segment", "grade", "stage")


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
        self.redis_errors = Counter(
            "memberflow_redis_errors_total",
            "Redis operations refused or failed (not connection trouble: see retries): "
            "OOM, READONLY, MISCONF, BUSY, MASTERDOWN, authentication and ACL refusals are "
            "retried until Redis is mended; others fail the batch, unacked, and the worker "
            "restarts it.",
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
            "Events in a partition not yet processed by this worker (the broker's end offset - "
            "position), every 5 s.",
            ["partition"],
            registry=r,
        )
        self.processing_latency = Histogram(
            "memberflow_processing_latency_seconds",
            "From the event's arrival on the broker to its state applied and outputs acked.",
            # Up to an hour: draining a backlog, the p99 panel must show how far behind it is,
            # not sit at the top bucket.
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
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
            "Tier changes by direction (up, down), counted once when the change is written "
            "(a re-sent notification is not counted again).",
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
            "How long after its due time a timer fired (wall clock mode only).",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 86400),
            registry=r,
        )
        self.timers_overdue = Gauge(
            "memberflow_timers_overdue_seconds",
            "How long the oldest due timer of a partition this worker owns has waited past its "
            "due time (0: none due; wall clock mode only). Grows while timers do not fire at "
            "all, which the lateness histogram cannot show.",
            ["partition"],
            registry=r,
        )
        self.event_clock = Gauge(
            "memberflow_event_clock_seconds",
            "The engine clock (event time in event mode).",
            registry=r,
        )
        self.customers = Gauge(
            "memberflow_customers",
            "Customers per label of a dimension (tier, segment, grade, stage), read from the "
            "population counters in Redis (no scan); every worker reports the same totals.",
            ["dimension", "label"],
            registry=r,
        )
        self._customer_labels: set[tuple[str, str]] = set()
        self.redis_seconds = Histogram(
            "memberflow_redis_call_duration_seconds",
            "Duration of one engine Redis step (a pipelined round trip or a few), by operation.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.segment_transitions = Counter(
            "memberflow_segment_transitions_total",
            "RFM type changes by grade direction (up: a better grade, down, same: same grade, "
            "changed: first classification).",
            ["direction"],
            registry=r,
        )
        self.snapshot_version = Gauge(
            "memberflow_snapshot_version",
            "Version of the population snapshot this worker labels customers against.",
            registry=r,
        )
        self.started = Gauge(
            "memberflow_process_start_time_seconds",
            "Wall time this worker process started: a restart loop shows as its changes (an "
            "error counted just before a worker stops dies with the process, unscraped).",
            registry=r,
        )
        self.started.set(time.time())
        self.snapshot_published = Gauge(
            "memberflow_snapshot_published_timestamp_seconds",
            "When that snapshot was published (its age is time() minus this).",
            registry=r,
        )

    def set_customers(self, distribution: dict[str, int]) -> None:
        """Set the customers gauge from Store.distribution() ({"tier:gold": 3, ...}). A label
        seen before and now absent (its count fell to 0) is reported as 0, not dropped."""
        current: dict[tuple[str, str], int] = {}
        for key, count in distribution.items():
            dimension, _, label = key.partition(":")
            if dimension in CUSTOMER_DIMENSIONS and label:
                current[(dimension, label)] = count
        for labels in self._customer_labels - current.keys():
            self.customers.labels(*labels).set(0)
        for labels, count in current.items():
            self.customers.labels(*labels).set(count)
        self._customer_labels |= current.keys()

    # -- read back, for the worker's status page ----------------------------------------------

    def events_total(self) -> dict[str, float]:
        """Input events finished by this process, per outcome."""
        return _by_label(self.events, "outcome")

    def notifications_total(self) -> dict[str, float]:
        """Notifications produced by this process, per type."""
        return _by_label(self.notifications, "type")

    def consumer_lag_by_partition(self) -> dict[int, float]:
        return {int(k): v for k, v in _by_label(self.consumer_lag, "partition").items()}


def _by_label(metric: Counter | Gauge, label: str) -> dict[str, float]:
    """A one-label counter or gauge's current values (counters: the _total samples)."""
    values: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[sample.labels[label]] = sample.value
    return values
