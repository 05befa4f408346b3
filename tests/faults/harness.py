"""The fault-test harness: a workload with a known outcome, load, faults, and the verdict.

A fault test starts the real services (Tansu broker, redis-server with AOF, `memberflow worker`
processes), publishes a synthetic shop's history at a steady rate (`Feeder`, through the
replay's own publisher), injects faults (kill -9 of workers or Redis, a broker swap), lets the
system settle and then checks it against independent batch computations (`verify`):

- the export equals tests/oracle.py on the R/F/M fields: nothing lost, nothing counted twice;
- the distinct notifications equal the oracles exactly: tier upgrades (tests/oracle.py) and
  lifecycle, reminder and win-back messages (tests/oracle_timeline.py);
- a notification id seen twice carries the identical payload. kill -9 between producing an
  outbox and clearing it (`Engine.confirm`) re-sends it by design (README, Architecture), so
  such duplicates are tolerated, counted and printed; two different payloads under one id, or
  one decision under two ids, fail;
- every bad line is dead-lettered (a redelivered one may be dead-lettered twice: the dead
  letter is produced before the input offset is committed), and nothing else is;
- no outbox is left unsent and no timer is left due in Redis.

Determinism: `event` clock mode; every customer's own events in time order with events of
different customers shuffled by less than the timer lateness (so a timer fired by the poller
could not have been cancelled by a straggler); learned repurchase intervals off (they depend on
how many gaps the population showed so far); downgrades out of reach (the oracle models
upgrades only). Segment notifications depend on when a wall-clock snapshot was published and
are checked for duplicates only.

Run: `.venv/bin/python -m pytest -m faults -s tests/faults` (about 3.5 minutes on 2 cores; -s
shows each scenario's report). Fault timings are random; a run prints its FAULT_SEED, and
FAULT_SEED=N repeats its choices.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from memberflow.replay import ReplayRecord, iter_history
from memberflow.replay import publish as replay_publish
from memberflow.services import LocalBroker, LocalRedis, WorkerProcess, free_port
from memberflow.synthetic import add_noise, generate_history, write_jsonl
from state import keys
from tests.integration.conftest import ROOT, run_cli
from tests.oracle import batch_export, expected_upgrades, parse_time, valid_rows
from tests.oracle_timeline import expected_timeline

PARTITIONS = 4
GROUP = "memberflow"  # MEMBERFLOW_APP_ID's default: the consumer group
DAY = 86_400
EXPORT_FIELDS = (
    "customer_id",
    "first_purchase_at",
    "last_purchase_at",
    "recency_days",
    "frequency",
    "monetary",
    "lifetime_orders",
    "lifetime_spend",
    "tier",
)
CUSTOMER_KEY = keys.customer("").removesuffix("}").encode()  # b"mf:{c:"
TIMELINE_TYPES = ("lifecycle_changed", "repurchase_reminder", "win_back_offer")
ORACLE_TYPES = ("tier_upgraded", *TIMELINE_TYPES)

# Worker settings for every fault test, on top of tests.integration.conftest.worker_env.
FAULT_SETTINGS = {
    "MEMBERFLOW_CLOCK": "event",
    "MEMBERFLOW_PARTITIONS": str(PARTITIONS),
    # A dead member is noticed after the session timeout, and a join waits for the rebalance
    # timeout: 3 s each keeps a restart near 5 s (6 s made it 14 s). Heartbeats run in the
    # consumer's own thread, so a long batch does not starve them.
    "MEMBERFLOW_BROKER_SESSION_TIMEOUT_S": "3",
    "MEMBERFLOW_BROKER_REBALANCE_TIMEOUT_S": "3",
    "MEMBERFLOW_BROKER_HEARTBEAT_INTERVAL_S": "1",
    # Small batches: more Redis steps and produce steps per second for a kill to land in.
    "MEMBERFLOW_BATCH_MAX": "50",
    "MEMBERFLOW_TIMER_POLL_S": "0.3",
    "MEMBERFLOW_REDIS_RETRY_MAX_BACKOFF_S": "0.5",
}


# -- policy ----------------------------------------------------------------------------------


def fault_policy(path: Path) -> dict[str, Any]:
    """Write the policy the fault tests run with to `path` and return it as a document: the
    default, with downgrades out of reach and every repurchase interval configured."""
    document: dict[str, Any] = yaml.safe_load((ROOT / "rules" / "default_policy.yaml").read_text())
    if isinstance(document.get("tier_changes"), dict):
        document["tier_changes"]["grace_days"] = 3650
    for rule in document["repurchase"]["categories"].values():
        rule["learn"] = False
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return document


# -- the workload ----------------------------------------------------------------------------


def _at(row: Mapping[str, Any]) -> int:
    moment = parse_time(str(row["occurred_at"]))
    assert moment is not None, row
    return int(moment.timestamp())


@dataclass
class Workload:
    """A noisy purchase stream in publish order, the records `memberflow replay` publishes for
    it, and what the oracles expect of it."""

    entries: list[dict[str, str] | bytes]
    records: list[ReplayRecord]
    accepted: list[Mapping[str, Any]]  # valid purchases in arrival order (with duplicates)
    bad: list[bytes]
    disorder_s: int  # how far (event time) an event arrives after a newer one

    @property
    def last_event(self) -> datetime:
        return datetime.fromtimestamp(max(_at(row) for row in self.accepted), UTC)

    def expected_export(self, as_of: datetime | None = None) -> dict[str, dict[str, Any]]:
        return batch_export(self.accepted, as_of=as_of or self.last_event)

    def expected_upgrades(self) -> set[tuple[str, str, str, str]]:
        return expected_upgrades(self.accepted)


def noisy_stream(
    rows: list[dict[str, str]], seed: int, duplicates: int, bad: int, shuffle_window: int
) -> list[dict[str, str] | bytes]:
    """`rows` (sorted by time) shuffled across customers by up to `shuffle_window` places, with
    every customer's own rows still in time order (its own events out of order are a
    documented limit of `event` mode, not a fault); then `duplicates` rows delivered again
    after their first copy, and `bad` bad lines anywhere (synthetic.add_noise's kinds)."""
    rng = random.Random(f"{seed}:faults")
    shuffled = [e for e in add_noise(rows, seed, 0, 0, shuffle_window) if isinstance(e, dict)]
    slots: dict[str, list[int]] = defaultdict(list)
    for slot, row in enumerate(shuffled):
        slots[row["customer_id"]].append(slot)
    for customer_slots in slots.values():
        own = sorted((shuffled[slot] for slot in customer_slots), key=_at)
        for slot, row in zip(customer_slots, own, strict=True):
            shuffled[slot] = row
    size = len(shuffled)
    placed: list[tuple[float, int, dict[str, str] | bytes]] = [
        (float(index), index, row) for index, row in enumerate(shuffled)
    ]
    for number, index in enumerate(sorted(rng.sample(range(size), duplicates))):
        later = index + 0.5 + rng.random() * (size - index)
        placed.append((later, size + number, dict(shuffled[index])))
    bad_lines = [e for e in add_noise(rows, seed, 0, bad, 0) if isinstance(e, bytes)]
    for number, entry in enumerate(bad_lines):
        placed.append((rng.uniform(-0.5, size), 2 * size + number, entry))
    placed.sort(key=lambda item: (item[0], item[1]))
    return [entry for _, _, entry in placed]


def event_disorder(entries: Iterable[dict[str, str] | bytes]) -> int:
    """The largest amount of event time by which an event arrives after a newer one (first
    copies; a later copy changes nothing). Fails if a customer's own events are out of order."""
    newest, disorder = 0, 0
    seen: set[str] = set()
    latest_of: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, dict) and entry["event_id"] not in seen:
            seen.add(entry["event_id"])
            at = _at(entry)
            assert latest_of.get(entry["customer_id"], at) <= at, f"out of order: {entry}"
            latest_of[entry["customer_id"]] = at
            disorder, newest = max(disorder, newest - at), max(newest, at)
    return disorder


def make_workload(
    tmp_path: Path,
    customers: int,
    days: int,
    start: datetime = datetime(2025, 6, 1, tzinfo=UTC),
    seed: int = 5,
    duplicates: int = 40,
    bad: int = 12,
    shuffle_window: int = 12,
    name: str = "history",
) -> Workload:
    rows = generate_history(customers=customers, start=start, days=days, seed=seed)
    noisy = noisy_stream(rows, seed, duplicates, bad, shuffle_window)
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(noisy, path)
    records = list(iter_history(path, "EUR"))  # exactly what `memberflow replay` publishes
    assert len(records) == len(noisy)
    accepted = valid_rows(noisy, datetime.now(UTC))
    assert len(accepted) == len(rows) + duplicates
    return Workload(
        entries=noisy,
        records=records,
        accepted=accepted,
        bad=[entry for entry in noisy if isinstance(entry, bytes)],
        disorder_s=event_disorder(noisy),
    )


class Feeder(threading.Thread):
    """Publishes records to the purchases topic at `rate` per second, with the replay's
    publisher (keyed by customer, acks=all, one request in flight: file order per partition)."""

    def __init__(self, bootstrap: str, records: Sequence[ReplayRecord], rate: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.bootstrap, self.records, self.rate = bootstrap, records, rate
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def _paced(self) -> Iterator[ReplayRecord]:
        started = time.monotonic()
        for index, record in enumerate(self.records):
            delay = started + index / self.rate - time.monotonic()
            if delay > 0 and self._halt.wait(delay):
                return
            yield record
            self.sent = index + 1

    def run(self) -> None:
        try:
            replay_publish(self._paced(), self.bootstrap, "purchases", progress=False)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 120.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"feeder still publishing after {timeout}s"
        if self.error is not None:
            raise AssertionError(f"feeder failed after {self.sent} records") from self.error
        assert self.sent == len(self.records)

    def halt(self) -> None:
        self._halt.set()
        self.join(10)


@contextlib.contextmanager
def feeding(bootstrap: str, records: Sequence[ReplayRecord], seconds: float) -> Iterator[Feeder]:
    """A Feeder spreading `records` over `seconds` while the block injects its faults; the
    block's end waits for the last record (a failing block stops the feeder instead)."""
    feeder = Feeder(bootstrap, records, rate=len(records) / seconds)
    feeder.start()
    try:
        yield feeder
        feeder.finish()
    finally:
        feeder.halt()


# -- processes -------------------------------------------------------------------------------


def start_all(workers: Sequence[WorkerProcess]) -> None:
    """Start workers in parallel (each start waits for its partition assignment)."""
    errors: list[BaseException] = []

    def start(worker: WorkerProcess) -> None:
        try:
            worker.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def assigned_partitions(worker: WorkerProcess, topic: str = "purchases") -> set[int]:
    """The partitions of `topic` in the worker's latest assignment, read from its log (Faust
    prints a table on every assignment; rows look like `| purchases | {0-1, 3} |`)."""
    text = worker.log_path.read_text(errors="replace")
    marker = "Setting newly assigned partitions"
    at = text.rfind(marker)
    if at < 0:
        return set()
    table = text[at : at + 2000].split("for group", 1)[0]
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == topic:
            found: set[int] = set()
            for part in cells[1].strip("{}").split(","):
                low, _, high = part.strip().partition("-")
                if low:
                    found.update(range(int(low), int(high or low) + 1))
            return found
    return set()


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, poll: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def alive(workers: Iterable[WorkerProcess]) -> None:
    for worker in workers:
        assert worker.running, f"{worker.name} exited ({worker.returncode}):\n{worker.log_tail()}"


# -- what Kafka and Redis hold ---------------------------------------------------------------


def committed_total(admin: KafkaAdminClient, topic: str = "purchases") -> int:
    """Sum of the group's committed offsets on `topic` (offsets start at 0 and nothing is
    compacted, so this is the number of messages fully processed). Not compared with the end
    offsets: Tansu answers ListOffsets(latest) short of the end for multi-record batches."""
    try:
        groups = admin.list_group_offsets(GROUP)
    except Exception:  # coordinator moving or rebalancing: not known yet
        return -1
    offsets = groups.get(GROUP, {}) if isinstance(groups, dict) else {}
    return sum(max(meta.offset, 0) for tp, meta in offsets.items() if tp.topic == topic)


def wait_drained(
    broker: LocalBroker, published: int, workers: Sequence[WorkerProcess], timeout: float = 90
) -> None:
    """Until the group has committed every published message (acks follow confirm())."""
    with broker.admin() as client:

        def drained() -> bool:
            alive(workers)
            return committed_total(client) >= published

        wait_for(f"{published} messages committed", drained, timeout)


def pending_outboxes(server: LocalRedis) -> list[str]:
    """Customers whose outbox was written but not yet confirmed as produced."""
    with server.client() as client:
        names = [key.decode() for key in client.scan_iter(match=keys.CUSTOMER_PATTERN, count=1000)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hexists(name, "o")
        flags = pipe.execute()
    return sorted(keys.customer_id_of(n) for n, flag in zip(names, flags, strict=True) if flag)


def due_timers(server: LocalRedis, lateness_s: int) -> int:
    """Index entries whose timer is due by its partition's event clock (the poller owes them)."""
    with server.client() as client:
        due = 0
        for shard in range(PARTITIONS):
            clock = client.get(keys.shard_clock(shard))
            if clock is not None:
                due += int(client.zcount(keys.timer_index(shard), "-inf", int(clock) - lateness_s))
        return due


def wait_settled(
    server: LocalRedis, lateness_s: int, workers: Sequence[WorkerProcess], timeout: float = 60
) -> None:
    """Until no timer is due and no outbox is waiting: every notification has been produced."""

    def settled() -> bool:
        alive(workers)
        return due_timers(server, lateness_s) == 0 and not pending_outboxes(server)

    wait_for("timers and outboxes to settle", settled, timeout)


def settle(
    broker: LocalBroker,
    server: LocalRedis,
    published: int,
    workers: Sequence[WorkerProcess],
    lateness_s: int,
    drain_timeout: float = 90,
) -> None:
    """Until every published message is committed and every due timer and outbox is done."""
    wait_drained(broker, published, workers, drain_timeout)
    wait_settled(server, lateness_s, workers)


def engine_clock(server: LocalRedis) -> int | None:
    with server.client() as client:
        raw = client.get(keys.event_clock())
    return int(raw) if raw is not None else None


def read_all(bootstrap: str, topic: str, quiet_s: float = 1.5, timeout: float = 60) -> list[Any]:
    """Every record of `topic`: read from the beginning until nothing new came for `quiet_s`
    (not to the end offsets, which Tansu reports short; see committed_total)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, f"no topic {topic} on {bootstrap}"
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() - last_new < quiet_s:
            assert time.monotonic() < deadline, f"{topic} kept growing for {timeout}s"
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
                last_new = time.monotonic()
        return records
    finally:
        consumer.close()


# -- the verdict -----------------------------------------------------------------------------


def _normal_time(text: str) -> str:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def timeline_key(note: Mapping[str, Any]) -> tuple[str, str, str, str]:
    explanation = note["explanation"]
    detail = explanation.get("new_stage") or explanation.get("category") or ""
    return (note["customer_id"], note["type"], detail, _normal_time(note["occurred_at"]))


def upgrade_key(note: Mapping[str, Any]) -> tuple[str, str, str, str]:
    explanation = note["explanation"]
    return (
        note["customer_id"],
        explanation["previous_tier"],
        explanation["new_tier"],
        note["cause"]["id"],
    )


@dataclass
class Report:
    """What a fault run produced, for the assertions and the printed summary."""

    scenario: str
    notifications: int = 0
    distinct: int = 0
    duplicate_ids: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    duplicate_dead_letters: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"[{self.scenario}] {self.notifications} notifications, {self.distinct} distinct "
            f"{self.by_type}; {len(self.duplicate_ids)} ids seen more than once "
            f"({sum(self.duplicate_ids.values()) - len(self.duplicate_ids)} extra copies, "
            f"identical payloads); {self.dead_letters} dead letters, "
            f"{self.duplicate_dead_letters} re-sent",
            *self.notes,
        ]
        if self.duplicate_ids:
            shown = sorted(self.duplicate_ids.items())
            lines.append("duplicate notification ids: " + ", ".join(f"{i} x{n}" for i, n in shown))
        return "\n".join(lines)


def distinct_notifications(
    notes: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Mapping[str, Any]], dict[str, int]]:
    """id -> payload, and the ids seen more than once. Fails if one id has two payloads."""
    by_id: dict[str, Mapping[str, Any]] = {}
    counts: Counter[str] = Counter()
    for note in notes:
        nid = note["notification_id"]
        counts[nid] += 1
        first = by_id.setdefault(nid, note)
        assert first == note, f"notification {nid} sent with two payloads:\n{first}\n{note}"
    return by_id, {nid: n for nid, n in counts.items() if n > 1}


def check_export(env: dict[str, str], expected: Mapping[str, Mapping[str, Any]]) -> None:
    exported = run_cli(env, "export")
    assert exported.returncode == 0, exported.stderr
    actual = {
        doc["customer_id"]: {name: doc[name] for name in EXPORT_FIELDS}
        for doc in map(json.loads, exported.stdout.splitlines())
    }
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, (len(actual), len(expected), missing[:10], extra[:10])
    wrong = [cid for cid in expected if actual.get(cid) != expected[cid]]
    assert not wrong, (
        f"{len(wrong)} customers differ from the oracle, e.g.",
        [(actual.get(c), expected[c]) for c in wrong[:3]],
    )


def check_notifications(
    report: Report,
    notes: list[Mapping[str, Any]],
    upgrades: set[tuple[str, str, str, str]],
    timeline: set[tuple[str, str, str, str]] | None,
) -> None:
    """Distinct notifications against the oracles; duplicates only as identical re-sends."""
    by_id, duplicates = distinct_notifications(notes)
    report.notifications, report.distinct = len(notes), len(by_id)
    report.duplicate_ids = duplicates
    report.by_type = dict(Counter(n["type"] for n in by_id.values()))

    unknown = {n["type"] for n in by_id.values()} - {*ORACLE_TYPES, "segment_changed"}
    assert not unknown, f"notification types no oracle covers: {unknown}"
    tier = [upgrade_key(n) for n in by_id.values() if n["type"] == "tier_upgraded"]
    assert len(tier) == len(set(tier)), "one tier upgrade under two notification ids"
    missing, extra = upgrades - set(tier), set(tier) - upgrades
    assert not (missing or extra), (
        f"tier upgrades: {len(missing)} missing, {len(extra)} unexpected",
        sorted(missing)[:5],
        sorted(extra)[:5],
    )
    if timeline is None:
        return
    actual_list = [timeline_key(n) for n in by_id.values() if n["type"] in TIMELINE_TYPES]
    actual = set(actual_list)
    assert len(actual) == len(actual_list), "one timeline decision under two notification ids"
    missing, extra = timeline - actual, actual - timeline
    assert not (missing or extra), (
        f"timeline: {len(missing)} missing, {len(extra)} unexpected",
        sorted(missing)[:5],
        sorted(extra)[:5],
    )


def check_dead_letters(report: Report, letters: list[Mapping[str, Any]], bad: list[bytes]) -> None:
    """Each bad line dead-lettered, distinct by source offset; re-sent copies identical."""
    by_source: dict[tuple[int, int], Mapping[str, Any]] = {}
    for letter in letters:
        source = (letter["source_partition"], letter["source_offset"])
        first = by_source.setdefault(source, letter)
        assert (first["raw_b64"], first["reason"]) == (letter["raw_b64"], letter["reason"])
    raw = Counter(base64.b64decode(letter["raw_b64"]) for letter in by_source.values())
    assert raw == Counter(bad), (raw - Counter(bad), Counter(bad) - raw)
    report.dead_letters = len(letters)
    report.duplicate_dead_letters = len(letters) - len(by_source)


def verify(
    scenario: str,
    env: dict[str, str],
    broker: LocalBroker,
    server: LocalRedis,
    workload: Workload,
    policy_doc: Mapping[str, Any],
    lateness_s: int,
    as_of: datetime | None = None,
) -> Report:
    """The whole verdict after a run has settled (see wait_drained, wait_settled)."""
    report = Report(scenario)
    as_of = as_of or workload.last_event
    assert engine_clock(server) == int(as_of.timestamp())
    check_export(env, workload.expected_export(as_of))
    assert pending_outboxes(server) == []
    until = as_of - timedelta(seconds=lateness_s)
    notes = [json.loads(r.value) for r in read_all(broker.bootstrap, "notifications")]
    check_notifications(
        report,
        notes,
        workload.expected_upgrades(),
        expected_timeline(workload.accepted, until, policy_doc),
    )
    letters = [json.loads(r.value) for r in read_all(broker.bootstrap, "purchases.dlq")]
    check_dead_letters(report, letters, workload.bad)
    return report


def tick(env: dict[str, str], at: datetime) -> None:
    """`memberflow tick AT`: one watermark on every partition."""
    ticked = run_cli(env, "tick", at.isoformat())
    assert ticked.returncode == 0, ticked.stderr


def metric_sum(worker: WorkerProcess, metric: str) -> float:
    """A counter's total over its labels, from the worker's /metrics."""
    return sum(value for name, value in worker.metrics().items() if name.startswith(metric))


def retries(worker: WorkerProcess) -> float:
    return metric_sum(worker, "memberflow_redis_retries_total")


# -- kill switch -----------------------------------------------------------------------------


PAUSE_MS = 5000  # a safety net: Redis resumes writes by itself if the test does not


def _watch_redis(
    port: int,
    broker_pid: int,
    trigger: str,
    delay_s: float,
    ready: Any,
    paused: Any,
    halt: Any,
) -> None:
    """KillSwitch's watcher, in a process of its own: a thread of the test process can be
    kept from running for milliseconds (the GIL, held by the feeder's Kafka client) while the
    worker moves on. Pauses Redis writes at the trigger and says so."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    control = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    client.config_set("notify-keyspace-events", "Eh")  # hash commands only
    pubsub = client.pubsub()
    pubsub.subscribe("__keyevent@0__:hset", "__keyevent@0__:hdel")
    ready.set()
    last_hset = None
    while not halt.is_set():
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is None or not message["data"].startswith(CUSTOMER_KEY):
            continue  # no message, or not a customer's hash (population statistics)
        event, key = message["channel"].rpartition(b":")[2], message["data"]
        # The save script sets v and s, then o if there is an outbox: the same key twice in a
        # row is an outbox write. confirm() clears outboxes with hdel.
        repeated = event == b"hset" and key == last_hset
        if event == b"hset":
            last_hset = key
        hit = (
            (trigger == "state" and event == b"hset")
            or (trigger in ("outbox", "produced") and repeated)
            or (trigger == "confirm" and event == b"hdel")
        )
        if not hit:
            continue
        if delay_s:
            time.sleep(delay_s)
        if trigger == "produced":
            # Hold the worker at its produce step: the broker stops answering while the worker
            # finishes its Redis calls, Redis writes pause, the broker resumes: the worker gets
            # its acks, and its confirm() waits.
            os.kill(broker_pid, signal.SIGSTOP)
            try:
                time.sleep(0.1)
                control.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            finally:
                os.kill(broker_pid, signal.SIGCONT)
        else:
            control.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        paused.set()
        return


class KillSwitch:
    """kill -9 a worker at a chosen step of its batch protocol. Redis keyspace events tell the
    moment, and Redis pauses writes right there (CLIENT PAUSE WRITE; EVALSHA counts as a
    write), so the worker cannot get past its next write; it is killed while it waits, the
    write it had sent dies with its connection, and writes resume. Triggers:

    - "state": a customer's state written (`hset` of v and s in the save script): the kill
      lands inside the save pipeline (the rest of it is never executed) or right after it;
    - "outbox": an outbox written (the script's second `hset` of the key): likewise;
    - "produced": an outbox written, and the broker stopped for a moment (SIGSTOP) so that the
      worker reaches its produce step with the outbox still stored; writes pause, the broker
      resumes: the worker produces the outbox and dies waiting in confirm(). The next worker
      finds the outbox and produces it again: duplicate ids, by design. Unheld, this window
      is one Redis round trip wide;
    - "confirm": outboxes cleared (`hdel` in confirm()): the kill lands before the timer index
      update and the offset commit.

    `delay_s` moves the pause later."""

    TRIGGERS = ("state", "outbox", "produced", "confirm")
    HOLD_S = 0.5  # writes paused this long before the kill: producing takes milliseconds

    def __init__(
        self,
        server: LocalRedis,
        worker: WorkerProcess,
        trigger: str,
        delay_s: float = 0.0,
        broker: LocalBroker | None = None,
    ) -> None:
        assert trigger in self.TRIGGERS, trigger
        assert broker is not None or trigger != "produced", "'produced' holds the broker too"
        self.server, self.worker, self.trigger, self.delay_s = server, worker, trigger, delay_s
        self.broker = broker
        self.fired = threading.Event()
        context = multiprocessing.get_context("spawn")
        self._ready, self._paused, self._halt = context.Event(), context.Event(), context.Event()
        self._context = context
        self._watcher: Any = None
        self._killer: threading.Thread | None = None

    def describe(self) -> str:
        step = {
            "state": "a state write",
            "outbox": "an outbox write",
            "produced": "an outbox write, held until produced",
            "confirm": "an outbox clear",
        }[self.trigger]
        delay = f" + {self.delay_s * 1000:.1f} ms" if self.delay_s else ""
        return f"writes paused at {step}{delay}, worker killed"

    def arm(self) -> KillSwitch:
        broker_pid = self.broker.pid if self.broker is not None else None
        assert broker_pid or self.trigger != "produced"
        self._watcher = self._context.Process(
            target=_watch_redis,
            args=(
                self.server.port,
                broker_pid or -1,
                self.trigger,
                self.delay_s,
                self._ready,
                self._paused,
                self._halt,
            ),
            daemon=True,
        )
        self._watcher.start()
        assert self._ready.wait(30), "kill switch did not subscribe"
        self._killer = threading.Thread(target=self._kill_when_paused, daemon=True)
        self._killer.start()
        return self

    def _kill_when_paused(self) -> None:
        while not self._halt.is_set():
            if not self._paused.wait(0.1):
                continue
            try:
                time.sleep(self.HOLD_S)
                pid = self.worker.pid
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                    self.fired.set()
                time.sleep(0.2)  # Redis sees the connection closed: its queued writes go
            finally:
                self._unpause()
            return

    def _unpause(self) -> None:
        with self.server.client() as client:
            client.execute_command("CLIENT", "UNPAUSE")

    def disarm(self) -> None:
        self._halt.set()
        if self._killer is not None:
            self._killer.join(10)
        if self._watcher is not None:
            self._watcher.join(5)
            if self._watcher.is_alive():
                self._watcher.kill()
                self._watcher.join(5)
        if self.broker is not None and self.broker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.broker.pid, signal.SIGCONT)  # never leave the broker stopped
        self._unpause()
        with self.server.client() as client:
            client.config_set("notify-keyspace-events", "")


def seeded_rng(scenario: str) -> random.Random:
    """Fault timings are random, but reproducible: FAULT_SEED=N replays a run's choices."""
    seed = int(os.environ.get("FAULT_SEED", str(time.time_ns() % 1_000_000)))
    print(f"[{scenario}] FAULT_SEED={seed}")
    return random.Random(f"{scenario}:{seed}")


# -- resources: memory, keys, publishing at full speed, a slow link ---------------------------


def rss_bytes(pid: int) -> int:
    """A process's resident set size (VmRSS in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise AssertionError(f"no VmRSS for pid {pid}")


def redis_memory(server: LocalRedis) -> dict[str, int]:
    """`INFO memory`'s byte counts (used_memory, used_memory_dataset, ...)."""
    with server.client() as client:
        info = client.info("memory")
    return {name: int(value) for name, value in info.items() if isinstance(value, int)}


def key_pattern(key: str) -> str:
    """A key with the variable part of its hash tag folded: `mf:{c:cust-1}` -> `mf:{c:*}`,
    `mf:{s:3}:meta` -> `mf:{s:*}:meta`; fixed keys (`mf:{clock}:event`) stay as they are."""
    return re.sub(r"\{([a-z]+):[^}]*\}", r"{\1:*}", key)


@dataclass
class KeyGroup:
    """Keys sharing a pattern: how many, how many elements (hash fields, set or sorted-set
    members; 1 per string) and the bytes Redis accounts to them (MEMORY USAGE)."""

    keys: int = 0
    elements: int = 0
    largest: int = 0  # elements of the biggest key
    bytes: int = 0


def key_census(server: LocalRedis) -> dict[str, KeyGroup]:
    """Every key in Redis, grouped by key_pattern (a SCAN, then two pipelined rounds)."""
    with server.client() as client:
        names = [key.decode() for key in client.scan_iter(count=1000)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
        types = [t.decode() if isinstance(t, bytes) else str(t) for t in pipe.execute()]
        size_of = {"hash": pipe.hlen, "zset": pipe.zcard, "set": pipe.scard, "list": pipe.llen}
        for name, kind in zip(names, types, strict=True):
            size_of.get(kind, pipe.exists)(name)
            pipe.memory_usage(name, samples=0)  # 0: every element, not an estimate
        replies = pipe.execute()
    groups: dict[str, KeyGroup] = defaultdict(KeyGroup)
    for index, name in enumerate(names):
        elements, used = int(replies[2 * index]), int(replies[2 * index + 1] or 0)
        group = groups[key_pattern(name)]
        group.keys += 1
        group.elements += elements
        group.largest = max(group.largest, elements)
        group.bytes += used
    return dict(sorted(groups.items()))


def publish_all(bootstrap: str, records: Sequence[ReplayRecord]) -> float:
    """Publish records to the purchases topic as fast as the replay publisher goes (a burst);
    returns the seconds it took."""
    started = time.monotonic()
    replay_publish(iter(records), bootstrap, "purchases", total=len(records), progress=False)
    return time.monotonic() - started


class DelayProxy:
    """A TCP proxy on a free loopback port in front of `target_port` that holds every chunk
    the target sends back for `delay_s` before passing it on: a slow server (or link) as the
    client sees it. Requests go through at once; each reply chunk is released `delay_s` after
    it arrived, in order, so a pipelined round trip costs one delay (latency, not a bandwidth
    cap). `delay_s` may be changed at any time; chunks already waiting are then released by
    the new value. Runs its own event loop in a daemon thread."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port, self._delay_s = target_port, delay_s
        self.port = free_port()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._changed = asyncio.Event()  # replaced (and the old one set) on every new delay
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # one per connection

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def delay_s(self) -> float:
        return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        def changed() -> None:
            woken, self._changed = self._changed, asyncio.Event()
            woken.set()

        self._delay_s = value
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(changed)

    def start(self) -> DelayProxy:
        self._thread.start()
        serve = asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(serve, self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):  # each closes its two sockets on the way out
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            pumps = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._hold(up_reader, held)),
                asyncio.ensure_future(self._release(held, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass  # the target is down: the client sees its connection closed
        finally:
            self._tasks.discard(task)
            for end in (writer, up_writer):
                if end is not None:
                    end.close()
                    with contextlib.suppress(OSError):
                        await end.wait_closed()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()

    @staticmethod
    async def _hold(reader: asyncio.StreamReader, held: asyncio.Queue[tuple[float, bytes]]) -> None:
        while chunk := await reader.read(65536):
            held.put_nowait((time.monotonic(), chunk))
        held.put_nowait((time.monotonic(), b""))  # the target closed: close the client too

    async def _release(
        self, held: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            arrived, chunk = await held.get()
            while (wait := arrived + self.delay_s - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):  # woken early by a new delay
                    await asyncio.wait_for(self._changed.wait(), wait)
            if not chunk:
                return
            writer.write(chunk)
            await writer.drain()
