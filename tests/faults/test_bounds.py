"""Bounds: memory stays flat over a long run.

One worker (real broker, redis-server with AOF) processes a long event-time stream: a fixed
population of customers buying steadily over a span many times longer than the retention
bounds. The bounds are shortened by a policy variant so that the span is covered in a minute:
a 14-day rolling window and `input.max_event_age_days` = 28 (the dedup memory's horizon),
over 360 days of purchases (about 13 times the longest bound).

After each sixth of the stream, once the worker has committed everything and fired every due
timer, the test samples Redis (`INFO memory`, DBSIZE, keys and elements per key pattern, the
encoded customer states and what they hold) and the worker's RSS, and prints a table (-s).

What must hold:
- every customer's dedup memory holds at most the events of the `max_event_age_days` before
  its last purchase, plus the prune's slack (rules.customer.dedup_slack_days: 3 days here; the
  engine prunes on purchases and window-expiry timers);
- every key pattern stays within customers x a constant (keys and elements), but for the
  repurchase-gap histograms, whose fields are bounded by categories x distinct gap days;
- after the warm-up (the first sample, 60 days: more than twice the longest bound) no sample
  exceeds the first later one by more than TOLERANCE: Redis used_memory, the encoded states,
  the dedup entries, the elements of per-customer structures and the worker's RSS;
- the export equals the batch oracle computed with the same bounds, every duplicate was
  recognised and nothing was dead-lettered (no event judged too old by the shortened bound).

Why TOLERANCE = 20 % catches an unpruned dedup memory: a customer buys every 3 days on
average, so with pruning it keeps about 28 / 3 ~ 10 entries at any time, without it one per
purchase so far: ~40 after 120 days (the baseline sample) and ~120 after 360 days, +200 %. The
encoded state (~25 bytes per entry on top of ~1 kB) then grows by well over 50 % from the
baseline to the last sample, and Redis used_memory by more than 20 % as well. Checked by
hand, without editing code: `BOUNDS_MAX_EVENT_AGE_DAYS=100000` runs the same test with a
horizon longer than the stream (nothing ever pruned), and it failed on the dedup entries
(+200 %), the encoded states (+143 %), used_memory (+55 %) and the worker's RSS (+21 %);
with pruning every measure stayed within +8 % of the baseline (2 cores, about 45 s). With
state format 2 (the dedup memory as compact text, 2026-11-26) the same check failed on the
dedup entries (+200 %), the encoded states (+135 %) and used_memory (+39 %).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow.replay import iter_history
from memberflow.services import LocalBroker, LocalRedis, WorkerProcess
from memberflow.synthetic import CATEGORIES, customer_id, write_jsonl
from rules.customer import dedup_entries, dedup_slack_days
from state import keys
from tests.faults.harness import (
    DAY,
    PARTITIONS,
    Feeder,
    KeyGroup,
    check_export,
    engine_clock,
    fault_policy,
    key_census,
    pending_outboxes,
    redis_memory,
    rss_bytes,
    settle,
    tick,
)
from tests.oracle import batch_export, valid_rows

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CUSTOMERS = 400
SPAN_DAYS = 360
SEGMENTS = 6  # a sample after each sixth of the stream (60 days of event time)
WARM_UP = 1  # samples before the baseline: the first 60 days, over twice the longest bound
MEAN_GAP_DAYS = 3.0
DUPLICATES = 300  # redelivered soon after the original: the dedup memory must still know them
WINDOW_DAYS = 14
# BOUNDS_MAX_EVENT_AGE_DAYS=100000 disables pruning (a horizon longer than the stream): the
# test must then fail (see the module docstring).
MAX_EVENT_AGE_DAYS = int(os.environ.get("BOUNDS_MAX_EVENT_AGE_DAYS", "28"))
TOLERANCE = 0.20
START = datetime(2024, 1, 1, tzinfo=UTC)  # the whole stream lies in the past: no future skew
# Events/s offered, a little over the worker's pace: the backlog stays small, so partitions
# are consumed side by side in event time. (In `event` mode an event is also screened against
# the global event clock: a partition running more than the 28-day horizon ahead of another
# would get the other's events refused as too old; the dead-letter count below would show it.)
RATE = 2500.0
LATENESS_S = 3600  # the stream is in time order; timers fire an hour of event time late
PER_CUSTOMER = 8  # a key pattern holds at most this many elements per customer


def _epoch(row: Mapping[str, Any]) -> int:
    return int(datetime.fromisoformat(str(row["occurred_at"]).replace("Z", "+00:00")).timestamp())


def steady_history(customers: int, days: int, seed: int = 11) -> list[dict[str, str]]:
    """Purchase rows of a steady shop: every customer buys every 0.2 to 5.8 days (mean 3) from
    the start to the end, sorted by time. Unlike synthetic.generate_history nobody lapses, so
    every customer keeps adding to its state all the time: the worst case for the bounds."""
    drafts: list[tuple[int, str, dict[str, str]]] = []
    for number in range(1, customers + 1):
        cid = customer_id(number)
        rng = random.Random(f"{seed}:{cid}")
        day = rng.uniform(0, MEAN_GAP_DAYS)
        while day < days:
            at = int((START + timedelta(days=day)).timestamp())
            category = rng.choice(CATEGORIES)
            drafts.append(
                (
                    at,
                    cid,
                    {
                        "customer_id": cid,
                        "occurred_at": datetime.fromtimestamp(at, UTC)
                        .isoformat()
                        .replace("+00:00", "Z"),
                        "amount": f"{rng.randrange(300, 12000) / 100:.2f}",
                        "currency": "EUR",
                        "category": category,
                        "sku": f"{category}-001",
                        "quantity": "1",
                    },
                )
            )
            day += rng.uniform(0.2, 2 * MEAN_GAP_DAYS - 0.2)
    drafts.sort(key=lambda draft: draft[:2])
    return [{"event_id": f"b{seed}-{n}", **row} for n, (_, _, row) in enumerate(drafts, 1)]


def with_duplicates(rows: list[dict[str, str]], count: int, seed: int = 11) -> list[dict[str, str]]:
    """`rows` with `count` of them delivered again 1 to 200 places later (hours of event time:
    well inside the dedup horizon, so each must be recognised)."""
    rng = random.Random(f"{seed}:duplicates")
    placed = [(float(index), row) for index, row in enumerate(rows)]
    for index in rng.sample(range(len(rows)), count):
        placed.append((index + rng.uniform(1, 200), dict(rows[index])))
    placed.sort(key=lambda item: item[0])
    return [row for _, row in placed]


def bounds_policy(path: Path) -> dict[str, Any]:
    """The fault tests' policy with the retention bounds shortened."""
    document = fault_policy(path)
    document["window_days"] = WINDOW_DAYS
    document["input"]["max_event_age_days"] = MAX_EVENT_AGE_DAYS
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return document


@dataclass
class Sample:
    day: int  # event days since START covered by the stream so far
    published: int
    used_memory: int
    dataset: int
    dbsize: int
    groups: dict[str, KeyGroup]
    state_bytes: int  # the encoded states (field `s` of every customer hash)
    seen_mean: float
    seen_max: int
    buckets_max: int
    others_max: int  # largest of the other per-customer collections (reminded, deferred, ...)
    rss: int

    def gap_fields(self) -> int:
        return sum(g.elements for pattern, g in self.groups.items() if pattern.endswith(":gaps"))

    def per_customer_elements(self) -> int:
        """Elements of every pattern other than the customer hashes and the gap histograms
        (population statistics, timer index, ...): one or a few per customer."""
        return sum(
            group.elements
            for pattern, group in self.groups.items()
            if pattern != keys.CUSTOMER_PATTERN and not pattern.endswith(":gaps")
        )


def sample_state(server: LocalRedis, day: int, published: int, worker: WorkerProcess) -> Sample:
    memory = redis_memory(server)
    groups = key_census(server)
    with server.client() as client:
        dbsize = int(client.dbsize())
        names = [k.decode() for k in client.scan_iter(match=keys.CUSTOMER_PATTERN, count=1000)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hget(name, "s")
        encoded = [raw for raw in pipe.execute() if raw]
    states = [json.loads(raw) for raw in encoded]
    assert worker.pid is not None
    return Sample(
        day=day,
        published=published,
        used_memory=memory["used_memory"],
        dataset=memory["used_memory_dataset"],
        dbsize=dbsize,
        groups=groups,
        state_bytes=sum(len(raw) for raw in encoded),  # HSTRLEN of each `s`
        seen_mean=sum(dedup_entries(s.get("s")) for s in states) / max(len(states), 1),
        seen_max=max((dedup_entries(s.get("s")) for s in states), default=0),
        buckets_max=max((len(s.get("b", {})) for s in states), default=0),
        others_max=max(
            (max(len(s.get(f, ())) for f in ("c", "r", "d", "m")) for s in states),
            default=0,
        ),
        rss=rss_bytes(worker.pid),
    )


def seen_bound(rows: Sequence[Mapping[str, Any]], until: int) -> dict[str, int]:
    """Per customer, how many distinct events of the `max_event_age_days` before its last
    purchase (up to `until`) it may remember: the engine prunes at every purchase and window
    expiry, each at a time no earlier than that last purchase, once the oldest entry is more
    than the slack past the horizon."""
    slack = dedup_slack_days(MAX_EVENT_AGE_DAYS)
    times: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        if (at := _epoch(row)) <= until:
            times[str(row["customer_id"])][str(row["event_id"])] = at
    bound = {}
    for cid, events in times.items():
        oldest_day = max(events.values()) // DAY - MAX_EVENT_AGE_DAYS - slack
        bound[cid] = sum(1 for at in events.values() if at // DAY >= oldest_day)
    return bound


def check_seen(server: LocalRedis, rows: Sequence[Mapping[str, Any]], until: int) -> None:
    bound = seen_bound(rows, until)
    with server.client() as client:
        pipe = client.pipeline(transaction=False)
        for cid in bound:
            pipe.hget(keys.customer(cid), "s")
        held = {
            cid: dedup_entries(json.loads(raw).get("s"))
            for cid, raw in zip(bound, pipe.execute(), strict=True)
        }
    over = {cid: (held[cid], bound[cid]) for cid in bound if held[cid] > bound[cid]}
    assert not over, (
        f"dedup memory beyond max_event_age_days (held, bound): {list(over.items())[:5]}"
    )


def _mb(value: int) -> str:
    return f"{value / 2**20:7.2f}"


def table(samples: Sequence[Sample]) -> str:
    lines = [
        " day  events  used_MB  data_MB  dbsize  states_kB  seen_avg  seen_max  buckets_max"
        "  others_max  per_cust_elems  gap_fields  worker_RSS_MB"
    ]
    for number, s in enumerate(samples):
        mark = "w" if number < WARM_UP else ("b" if number == WARM_UP else " ")
        lines.append(
            f"{s.day:4d}{mark}{s.published:7d}  {_mb(s.used_memory)}  {_mb(s.dataset)}"
            f"  {s.dbsize:6d}"
            f"  {s.state_bytes / 1024:9.1f}  {s.seen_mean:8.1f}  {s.seen_max:8d}"
            f"  {s.buckets_max:11d}  {s.others_max:10d}  {s.per_customer_elements():14d}"
            f"  {s.gap_fields():10d}"
            f"  {_mb(s.rss):>13}"
        )
    lines.append("(w: warm-up, b: the baseline later samples are compared with)")
    last = samples[-1]
    lines.append("keys per pattern at the end (keys / elements / largest / kB):")
    for pattern, group in last.groups.items():
        lines.append(
            f"  {pattern:24s} {group.keys:6d} {group.elements:8d} {group.largest:7d}"
            f" {group.bytes / 1024:9.1f}"
        )
    return "\n".join(lines)


@pytest.mark.timeout(240)
def test_memory_stays_flat_over_a_long_run(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    policy_path = tmp_path / "bounds-policy.yaml"
    bounds_policy(policy_path)
    rows = with_duplicates(steady_history(CUSTOMERS, SPAN_DAYS), DUPLICATES)
    path = tmp_path / "steady.jsonl"
    write_jsonl(rows, path)
    records = list(iter_history(path, "EUR"))
    accepted = valid_rows(rows, datetime.now(UTC))
    assert len(records) == len(accepted) == len(rows)
    day_of = [(_epoch(row) - int(START.timestamp())) // DAY for row in rows]

    env = make_env(
        MEMBERFLOW_RULES_FILE=str(policy_path),
        MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S),
        MEMBERFLOW_BATCH_MAX="500",
    )
    worker = make_worker(env)
    worker.start()

    samples: list[Sample] = []
    published = 0
    segment_days = SPAN_DAYS // SEGMENTS
    for number in range(1, SEGMENTS + 1):
        end_day = number * segment_days
        upto = next((i for i, d in enumerate(day_of) if d >= end_day), len(rows))
        feeder = Feeder(broker.bootstrap, records[published:upto], rate=RATE)
        feeder.start()
        feeder.finish()
        published = upto
        settle(broker, aof_redis, published, [worker], LATENESS_S)
        until = int((START + timedelta(days=end_day)).timestamp())
        check_seen(aof_redis, accepted[:published], until)
        samples.append(sample_state(aof_redis, end_day, published, worker))
    print(
        f"[bounds] {CUSTOMERS} customers, {len(rows)} events over {SPAN_DAYS} days; window "
        f"{WINDOW_DAYS} d, max_event_age_days {MAX_EVENT_AGE_DAYS}\n{table(samples)}"
    )

    # Bounded by the population: keys and elements per pattern, and within each customer the
    # buckets by the window, the other collections by the categories (and the marketing cap).
    for sample in samples:
        for pattern, group in sample.groups.items():
            assert group.keys <= CUSTOMERS, (sample.day, pattern, group)
            if pattern.endswith(":gaps"):
                # Repurchase-gap histograms: a field per category and distinct gap in days (per
                # category or per stats shard, as the store lays them out). Bounded by the
                # longest gap, not by the customers (README, Bounds), and tiny: not a growth
                # measure below.
                assert group.largest <= len(CATEGORIES) * (SPAN_DAYS + 1), (sample.day, group)
            else:
                assert group.elements <= PER_CUSTOMER * CUSTOMERS, (sample.day, pattern, group)
        assert sample.buckets_max <= WINDOW_DAYS + 1, sample  # +1: a window expiry not yet due
        assert sample.others_max <= len(CATEGORIES), sample
    # Flat after the warm-up: every measure, every later sample against the baseline. All
    # failures are listed, so that a run with pruning disabled shows which measures caught it.
    baseline = samples[WARM_UP]
    measures: dict[str, Callable[[Sample], float]] = {
        "redis used_memory": lambda s: s.used_memory,
        "redis dbsize": lambda s: s.dbsize,
        "encoded customer states": lambda s: s.state_bytes,
        "dedup entries per customer": lambda s: s.seen_mean,
        "per-customer elements": lambda s: s.per_customer_elements(),
        "worker RSS": lambda s: s.rss,
    }
    grew = [
        f"{name} grew {growth:.0%} from day {baseline.day} to day {later.day} "
        f"({measure(baseline):.0f} -> {measure(later):.0f})"
        for name, measure in measures.items()
        for later in samples[WARM_UP + 1 :]
        if (growth := measure(later) / measure(baseline) - 1) > TOLERANCE
    ]
    assert not grew, f"growth beyond {TOLERANCE:.0%} after the warm-up:\n" + "\n".join(grew)

    # The end: timers up to the last event, and the verdict against the oracle with the same
    # bounds (a shortened horizon must neither lose nor double anything).
    last = datetime.fromtimestamp(max(_epoch(row) for row in rows), UTC)
    tick(env, last)
    settle(broker, aof_redis, len(records) + PARTITIONS, [worker], LATENESS_S)
    assert engine_clock(aof_redis) == int(last.timestamp())
    expected = batch_export(
        accepted, as_of=last, window_days=WINDOW_DAYS, max_event_age_days=MAX_EVENT_AGE_DAYS
    )
    assert len(expected) == CUSTOMERS
    check_export(env, expected)
    assert pending_outboxes(aof_redis) == []
    metrics = worker.metrics()
    outcomes = {
        name: metrics.get(f'memberflow_events_total{{outcome="{name}"}}', 0.0)
        for name in ("applied", "duplicate", "dead_lettered")
    }
    assert outcomes == {
        "applied": len(rows) - DUPLICATES,
        "duplicate": DUPLICATES,
        "dead_lettered": 0,
    }, outcomes
    print(f"[bounds] {outcomes}; total {time.monotonic() - started:.1f}s")
