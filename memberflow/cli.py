"""The `memberflow` command line: worker, demo, replay, customer, export, rules check."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from memberflow.policy_file import load_policy
from memberflow.settings import Settings
from memberflow.views import TimeOutOfRange, parse_time
from rules.customer import summarize
from rules.policy import Policy, PolicyError
from rules.timeline import learned_interval

EXIT_USAGE = 2  # bad input from the user: bad policy, unreachable service, bad file


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # Named as the operator set them (the environment variable), without pydantic's links.
        # An error about several variables (no location) names them in its message.
        lines = []
        for err in exc.errors(include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            name = f"MEMBERFLOW_{str(err['loc'][0]).upper()}: " if err["loc"] else ""
            lines.append(f"  - {name}{message}")
        raise CliError("invalid MEMBERFLOW_* settings:\n" + "\n".join(lines)) from exc


def _policy(settings: Settings) -> Policy:
    try:
        return load_policy(settings.rules_file)
    except PolicyError as exc:
        raise CliError(str(exc)) from exc


def _parse_time(text: str) -> int:
    try:
        return parse_time(text)
    except TimeOutOfRange as exc:
        raise CliError(f"time {exc}") from exc
    except ValueError as exc:
        raise CliError(f"not an ISO 8601 time: {text!r}") from exc


# -- worker ---------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    import faust

    from memberflow.app import Runtime, create_app
    from memberflow.kafka import BrokerUnreachable, ensure_topics

    settings = _settings()
    policy = _policy(settings)
    _check_web_address(settings)
    asyncio.run(_check_redis(settings))
    try:
        ensure_topics(settings)
    except BrokerUnreachable as exc:
        raise CliError(str(exc)) from exc
    from memberflow.web import WebConfigError

    try:
        app = create_app(Runtime(settings, policy))
    except WebConfigError as exc:
        raise CliError(str(exc)) from exc
    worker = faust.Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def _check_web_address(settings: Settings) -> None:
    """Bind the HTTP views' address once before Faust does: a port in use (several workers
    on one host) ended in Faust's traceback after the worker had joined the group."""
    import socket

    try:
        with socket.create_server((settings.web_host, settings.web_port)):
            pass
    except OSError as exc:
        raise CliError(
            f"cannot serve HTTP on {settings.web_host}:{settings.web_port} "
            f"({exc.strerror or exc}); set MEMBERFLOW_WEB_HOST / MEMBERFLOW_WEB_PORT"
        ) from exc


async def _check_redis(settings: Settings) -> None:
    from state.redis_store import connect

    password = settings.redis_password
    client = connect(
        settings.redis_url,
        cluster=settings.redis_cluster,
        password=password.get_secret_value() if password else None,
    )
    try:
        await client.ping()
    except Exception as exc:
        raise CliError(
            f"cannot reach Redis at {settings.redis_url} ({exc}); check MEMBERFLOW_REDIS_URL "
            "and that redis-server is running"
        ) from exc
    finally:
        await client.aclose()


# -- reading state ---------------------------------------------------------------------------


async def _with_store(settings: Settings, work: Any) -> Any:
    from state.redis_store import RedisStore, connect

    await _check_redis(settings)
    password = settings.redis_password
    store = RedisStore(
        connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            password=password.get_secret_value() if password else None,
        ),
        stats_shards=settings.stats_shards,
    )
    try:
        return await work(store)
    finally:
        await store.close()


async def _as_of(store: Any, settings: Settings, as_of: str | None) -> int:
    if as_of:
        return _parse_time(as_of)
    if settings.clock == "event":
        clock = await store.clock()
        if clock is not None:
            return int(clock)
    return int(time.time())


def cmd_customer(args: argparse.Namespace) -> int:
    # The same document as the worker's GET /customers/{id}: one function builds both.
    from memberflow.views import AsOfTooEarly, InvalidCustomerId, check_customer_id, customer_view

    settings = _settings()
    policy = _policy(settings)
    try:
        customer_id = check_customer_id(args.customer_id)
    except InvalidCustomerId as exc:
        raise CliError(str(exc)) from exc
    if args.as_of:
        _parse_time(args.as_of)  # a bad time is refused before Redis is read

    async def work(store: Any) -> dict[str, Any] | None:
        as_of = await _as_of(store, settings, args.as_of)
        return await customer_view(store, policy, customer_id, as_of, asked_as_of=bool(args.as_of))

    try:
        view = asyncio.run(_with_store(settings, work))
    except AsOfTooEarly as exc:
        raise CliError(str(exc)) from exc
    if view is None:
        # Exit 1, not 2: the command was right, the customer is not there (scripts tell apart).
        print(f"memberflow: no such customer: {args.customer_id}", file=sys.stderr)
        return 1
    print(json.dumps(view, indent=2, ensure_ascii=False))
    return 0


@contextmanager
def _replacing(path: str) -> Iterator[TextIO]:
    """A text file that takes the place of `path` only once the block completes: on any
    failure the previous file stays as it was and the partial output is removed. An unusable
    path is a CliError before the block runs."""
    try:
        info: os.stat_result | None = os.stat(path)  # through symlinks, as open() would
    except FileNotFoundError:
        info = None  # a new file (a missing directory fails at mkstemp below)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from exc
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise CliError(f"cannot write {path}: Is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):
        # /dev/null, /dev/stdout, a FIFO: nothing to keep, and no file to put in their place
        try:
            direct = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror}") from exc
        with direct:
            yield direct
        return
    if info is not None:
        if not os.access(path, os.W_OK):  # refused as open() would, not silently replaced
            raise CliError(f"cannot write {path}: Permission denied")
        mode = stat.S_IMODE(info.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # what open() gives a new file
    # Through a symlink the link stays and its target is replaced, as open() would write there;
    # the temporary file sits next to that target so that os.replace is an atomic rename.
    target = os.path.realpath(path)
    try:
        fd, temp = tempfile.mkstemp(
            dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(fd, mode)  # mkstemp makes it 0600
            yield out
        try:
            os.replace(temp, target)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        with suppress(OSError):
            os.unlink(temp)
        raise


def cmd_export(args: argparse.Namespace) -> int:
    from memberflow.views import looked_at

    settings = _settings()
    policy = _policy(settings)
    if args.as_of:
        _parse_time(args.as_of)  # a bad time is refused before Redis is read

    moved = 0

    async def export(store: Any, out: TextIO) -> int:
        nonlocal moved
        as_of = await _as_of(store, settings, args.as_of)
        count = 0
        async for stored in store.scan():
            if stored.state is not None:
                # A state cannot be looked back at: a customer who bought after --as-of is
                # evaluated at that last purchase (its line's as_of says so). Refusing made any
                # past --as-of fail on a live shop, after part of the output was written.
                at = looked_at(stored.state, as_of)
                moved += at != as_of
                out.write(json.dumps(summarize(stored.state, policy, at), ensure_ascii=False))
                out.write("\n")
                count += 1
        return count

    if args.output:
        try:
            with _replacing(args.output) as out:
                count = asyncio.run(_with_store(settings, lambda store: export(store, out)))
        except BrokenPipeError:
            raise  # -o /dev/stdout into `head`: main() stops quietly
        except OSError as exc:  # a full disk while writing (the previous file stays)
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    else:
        count = asyncio.run(_with_store(settings, lambda store: export(store, sys.stdout)))
    print(f"exported {count} customers", file=sys.stderr)
    if moved:
        print(
            f"{moved} of them bought after --as-of: evaluated at their last purchase instead",
            file=sys.stderr,
        )
    return 0


def cmd_intervals(args: argparse.Namespace) -> int:
    settings = _settings()
    policy = _policy(settings)
    categories = sorted(policy.repurchase.categories)

    async def work(store: Any) -> list[dict[str, Any]]:
        histograms = await store.gap_histograms(categories)
        rows = []
        for category in categories:
            rule = policy.repurchase.categories[category]
            histogram = histograms.get(category, {})
            learned = learned_interval(histogram, policy.repurchase.min_samples)
            in_use = learned if rule.learn and learned is not None else rule.interval_days
            rows.append(
                {
                    "category": category,
                    "configured_days": rule.interval_days,
                    "learn": rule.learn,
                    "samples": sum(histogram.values()),
                    "learned_median_days": learned,
                    "min_samples": policy.repurchase.min_samples,
                    "in_use_days": in_use,
                    "remind_after_days": max(1, in_use - rule.lead_days),
                }
            )
        return rows

    rows = asyncio.run(_with_store(settings, work))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'category':<20} {'configured':>10} {'learn':>6} {'samples':>8} {'learned':>8} "
        f"{'in use':>7} {'remind on day':>14}"
    )
    for row in rows:
        learned = row["learned_median_days"]
        print(
            f"{row['category']:<20} {row['configured_days']:>10} {row['learn']!s:>6} "
            f"{row['samples']:>8} {'-' if learned is None else learned:>8} "
            f"{row['in_use_days']:>7} {row['remind_after_days']:>14}"
        )
    return 0


def cmd_segments(args: argparse.Namespace) -> int:
    from memberflow.population import current_snapshot, publish
    from rules.names import TYPE_NAMES

    settings = _settings()
    policy = _policy(settings)

    async def work(store: Any) -> dict[str, Any]:
        published = None
        if args.publish:
            published = await publish(store, policy, int(time.time()), lock_wait_s=60)
        snapshot = await current_snapshot(store)
        return {
            "published_now": published is not None,
            "snapshot": snapshot.model_dump() if snapshot else None,
            "distribution": await store.distribution(),
        }

    result = asyncio.run(_with_store(settings, work))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    snapshot = result["snapshot"]
    if args.publish and not result["published_now"]:
        # publish() makes nothing without classified customers, or when another worker held
        # the snapshot lock for the whole wait (it is publishing one itself).
        print(
            "nothing published: no customers to compute a snapshot from yet, or another worker "
            "held the snapshot lock for 60 s or published first"
            + ("" if snapshot is None else "; the current snapshot:")
        )
    if snapshot is None:
        if not args.publish:
            print("no population snapshot yet (memberflow segments --publish makes one)")
    else:
        age = int(time.time()) - snapshot["published_at"]
        print(
            f"snapshot v{snapshot['version']}: {snapshot['customers']} customers, published "
            f"{age}s ago{' (just now)' if result['published_now'] else ''}"
        )
        means = snapshot["means"]
        print(
            f"  means: last purchase {datetime.fromtimestamp(means['r'], UTC):%Y-%m-%d}, "
            f"F {means['f']:.2f} orders, M {means['m'] / 100:.2f} {policy.base_currency}"
        )
    distribution: dict[str, int] = result["distribution"]
    for dimension in ("tier", "segment", "grade", "stage"):
        rows = {
            k.split(":", 1)[1]: v for k, v in distribution.items() if k.startswith(dimension + ":")
        }
        if not rows:
            continue
        total = sum(rows.values())
        print(f"{dimension}:")
        for label, count in sorted(rows.items(), key=lambda kv: -kv[1]):
            names = TYPE_NAMES.get(label)
            shown = f"{label} ({names[1]}, {names[0]})" if names else label
            print(f"  {shown:<50} {count:>8}  {100 * count / total:5.1f} %")
    return 0


def cmd_tick(args: argparse.Namespace) -> int:
    """Publish a watermark to every partition: in `event` mode, timers up to TIME fire."""
    from kafka import KafkaProducer

    from memberflow.kafka import (
        BrokerUnreachable,
        bootstrap_servers,
        client_security,
        ensure_topics,
        probe,
    )
    from streams.events import Tick

    settings = _settings()
    at = _parse_time(args.time) if args.time else int(time.time())
    moment = datetime.fromtimestamp(at, UTC)
    # Refused here, before anything is sent: workers dead-letter a tick this far ahead of
    # their clocks (future_timestamp), so event time would not move although we said it did.
    skew = _policy(settings).input.max_future_skew_minutes
    if at > time.time() + skew * 60:
        raise CliError(
            f"{moment.isoformat()} is more than {skew} minutes (input.max_future_skew_minutes) "
            "ahead of this machine's clock: workers would dead-letter the tick as "
            "future_timestamp"
        )
    servers = bootstrap_servers(settings.broker_url)
    try:
        ensure_topics(settings)
        probe(servers, settings.broker_url, 10.0)
    except BrokerUnreachable as exc:
        raise CliError(str(exc)) from exc
    producer = KafkaProducer(bootstrap_servers=servers, acks="all", **client_security(settings))
    try:
        partitions = sorted(producer.partitions_for(settings.purchases_topic) or ())
        value = Tick(occurred_at=moment).model_dump_json().encode()
        for partition in partitions:
            producer.send(settings.purchases_topic, value=value, partition=partition)
        producer.flush()
    finally:
        producer.close(timeout=5)
    print(
        f"tick at {moment.isoformat()} sent to {len(partitions)} partitions of "
        f"{settings.purchases_topic}: each moves its event time there as a worker reads it",
        file=sys.stderr,
    )
    return 0


# -- replay ----------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from memberflow.kafka import (
        BrokerUnreachable,
        bootstrap_servers,
        client_security,
        ensure_topics,
    )
    from memberflow.replay import count_lines, iter_history, publish

    settings = _settings()
    policy = _policy(settings)
    path = Path(args.path)
    if not path.is_file():
        raise CliError(f"not a file: {path}" if path.exists() else f"no such file: {path}")
    try:
        ensure_topics(settings)
        records = iter_history(path, policy.base_currency)
        stats = publish(
            records,
            ",".join(bootstrap_servers(settings.broker_url)),
            settings.purchases_topic,
            total=count_lines(path),
            progress=not args.quiet,
            security=client_security(settings),
        )
    except (BrokerUnreachable, ValueError) as exc:
        raise CliError(str(exc)) from exc
    rate = stats.published / stats.seconds if stats.seconds else 0.0
    print(
        f"published {stats.published} events to {settings.purchases_topic} "
        f"in {stats.seconds:.1f}s ({rate:,.0f}/s); {stats.skipped_blank} blank lines skipped",
        file=sys.stderr,
    )
    return 0


# -- rules -----------------------------------------------------------------------------------


def cmd_rules_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(Path(args.file))
    except PolicyError as exc:
        raise CliError(str(exc)) from exc
    tiers = ", ".join(
        f"{t.name} (>= {t.min_window_spend} {policy.base_currency}, >= {t.min_window_orders} "
        f"orders{', formerly ' + '/'.join(t.formerly) if t.formerly else ''})"
        for t in policy.tiers
    )
    print(f"{args.file}: policy {policy.version} is valid; tiers: {tiers}")
    return 0


# -- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from memberflow.demo import DemoOptions, run_demo
    from memberflow.services import ServiceError

    if args.workdir:
        try:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot use --workdir {args.workdir}: {exc.strerror}") from exc
    options = DemoOptions(
        customers=args.customers,
        days=args.days,
        duration_s=args.duration,
        rate=args.rate,
        seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None,
        hold_s=args.hold,
    )
    try:
        return run_demo(options)
    except ServiceError as exc:  # redis-server missing, a port taken: what to fix, no traceback
        raise CliError(f"the demo could not start its services: {exc}") from exc


def _count(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _rate(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memberflow",
        description=(
            "Event-driven membership engine: consumes purchases from Kafka, keeps rolling "
            "R/F/M state per customer in Redis, assigns tiers and emits notifications. "
            "Configuration comes from MEMBERFLOW_* environment variables (see README)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "worker",
        help="run a stream worker (Faust) from the MEMBERFLOW_* settings",
        description="Run a worker: consumes the purchases topic, writes state to Redis, "
        "produces notifications and dead letters. Start several for more throughput; "
        "they share the topic's partitions (on one host, give each its own "
        "MEMBERFLOW_WEB_PORT: the HTTP views listen on 6066 by default). Settings come "
        "from MEMBERFLOW_* environment variables (README, Configuration).",
    )
    p.set_defaults(func=cmd_worker)

    p = commands.add_parser(
        "demo",
        help="run everything locally: broker, Redis, a worker and a synthetic shop",
        description="The embedded default: starts a local Kafka-protocol broker (Tansu) and a "
        "redis-server in a temp dir, a worker, and a synthetic shop producing purchases; "
        "shows progress and a live summary, then stops by itself.",
    )
    p.add_argument("--customers", type=_count, default=300, help="synthetic customers (300)")
    p.add_argument(
        "--days", type=_count, default=400, help="days of shop history to generate (400)"
    )
    p.add_argument("--duration", type=_seconds, default=90.0, help="stop after N seconds (90)")
    p.add_argument("--rate", type=_rate, default=400.0, help="purchases per second offered (400)")
    p.add_argument("--seed", type=int, default=7, help="random seed of the synthetic shop (7)")
    p.add_argument("--workdir", help="keep logs and data here instead of a temp dir")
    p.add_argument(
        "--hold",
        type=_seconds,
        default=0.0,
        help="keep the broker, Redis and the worker up this many seconds after the summary, "
        "to browse the status page and the HTTP API (0)",
    )
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser(
        "replay",
        help="publish purchases from a CSV or JSONL file to the purchases topic",
        description="Publish history to the purchases topic, keyed by customer_id, with a "
        "progress bar. CSV header: event_id,customer_id,occurred_at,amount and optional "
        "currency,category,sku,quantity,channel (and type,refund_of for refunds). "
        "occurred_at is ISO 8601; a bare date means midnight UTC. JSONL lines are published "
        "as they are. Bad "
        "lines are published too: the worker dead-letters them with the reason.",
    )
    p.add_argument("path", help="a .csv, .jsonl or .ndjson file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = commands.add_parser(
        "customer",
        help="one customer's state and explanation as JSON",
        description="Print one customer's R/F/M, tier and explanation as JSON.",
    )
    p.add_argument("customer_id")
    p.add_argument(
        "--as-of",
        help="evaluation time (ISO 8601) of R/F/M, the window and what the customer qualifies "
        "for then (explanation.tier.qualifies_for, explanation.segment.at_as_of); tier, "
        "lifecycle and segment stay the stored labels, which only the engine moves; not "
        "before the customer's last purchase (the state keeps no history). Default: the "
        "engine's clock",
    )
    p.set_defaults(func=cmd_customer)

    p = commands.add_parser(
        "export",
        help="every customer's state, one JSON object per line",
        description="Export every customer: customer_id, first/last purchase, recency_days, "
        "frequency, monetary and average order value (rolling window), lifetime totals, "
        "tier, lifecycle stage, categories, and the segment of the latest snapshot "
        "(rfm_type, rfm_scores, grade).",
    )
    p.add_argument(
        "--as-of",
        help="evaluation time for recency and the window (ISO 8601; tier, lifecycle and "
        "segment stay the stored labels; a customer who bought after it is evaluated at that "
        "last purchase, its line's as_of says so); default: the engine's clock (event clock in "
        "event mode, else now)",
    )
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser(
        "intervals",
        help="repurchase intervals per category: configured, learned from the data, in use",
        description="Show what memberflow learned about repurchase cycles: per category the "
        "configured interval, the number of observed gaps, their median (used once there are "
        "min_samples gaps and the category has learn: true), and the reminder day.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_intervals)

    p = commands.add_parser(
        "segments",
        help="customers per RFM type, grade, tier and lifecycle stage; the current snapshot",
        description="Print the distribution of customers over the 8 RFM types (with their "
        "Chinese and English names), A/B/C grades, tiers and lifecycle stages, from counters "
        "kept with the population statistics (no scan), and the population snapshot the "
        "labels are judged against. --publish publishes a new snapshot now (the workers also "
        "do it every segments.snapshot_interval_minutes) and wakes the customers it relabels.",
    )
    p.add_argument("--publish", action="store_true", help="publish a new snapshot first")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_segments)

    p = commands.add_parser(
        "tick",
        help="advance event time on every partition (event clock mode)",
        description="Publish a watermark to every partition of the purchases topic. In "
        "`event` clock mode time only moves with events; after a replay, `memberflow tick T` "
        "lets the timers (reminders, lifecycle, window expiry) due before T fire.",
    )
    p.add_argument("time", nargs="?", help="ISO 8601 time (default: now)")
    p.set_defaults(func=cmd_tick)

    rules = commands.add_parser("rules", help="policy tools").add_subparsers(
        dest="rules_command", required=True, metavar="SUBCOMMAND"
    )
    p = rules.add_parser(
        "check",
        help="validate a policy file with clear errors",
        description="Validate a policy (rules) file: every problem is listed with where it "
        "is; exit 0 when the file is valid. Workers refuse to start with an invalid file.",
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_rules_check)
    from memberflow.simulate import add_parser as add_simulate_parser

    add_simulate_parser(rules)  # `rules simulate FILE`: what-if of a new policy
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"memberflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`memberflow export | head`): stop quietly, as a Unix tool
        # killed by SIGPIPE would (exit 141); stdout goes to /dev/null so that flushing it at
        # exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
