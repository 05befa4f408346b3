#!/usr/bin/env python
"""memberflow throughput, latency and memory benchmark (issue 7), on real local services.

One run starts a Kafka-protocol broker (Tansu) and a redis-server (or a 3-node Redis Cluster)
with memberflow/services.py, pre-loads N purchases for M customers into a purchases topic, and
then reads that SAME topic from the beginning, each time with a fresh consumer group and the
same consumer settings (session 6 s, rebalance 6 s, heartbeat 1 s, the same take batch size and
wait, the same faust.App arguments as memberflow/app.py):

  (a)  a Faust agent that only consumes, with memberflow's ``noack_take`` batching and acks
       and memberflow's tuned consumer path (memberflow.app.faust_app: inline delivery of
       fetched messages, a Monitor without per-event stats): the framework ceiling
       (ops/bench_consume_only.py, BENCH_MODE=take);
  (a-stock) the same on Faust's own consumer path (BENCH_FAUST_PATH=stock);
  (a') Faust's defaults: its own path and ``async for value in stream`` (BENCH_MODE=default);
  (b)  the naive design: one event at a time, 4 awaited Redis round trips per event
       (ops/bench_naive.py);
  (c)  memberflow itself: real ``memberflow worker`` processes (WorkerProcess), event clock,
       Redis flushed first.

Throughput is measured after the first completed unit of work, so group join time is excluded:
rate = (events done at the end - events done at the first observation) / (time between them).
The baselines timestamp their own progress (status files, in-process clocks); memberflow is
observed from outside through its /metrics ``memberflow_events_total`` (polled every 0.2 s, and
every 0.02 s near the end), which is what an operator sees.

Latency: with the memberflow worker(s) still running, fresh events are offered at a fixed rate
(default: half the measured memberflow throughput) for ``--latency-seconds``. Among them are
probe purchases whose event ids embed their send time (``lat-<run>-p<i>-<ns>``). Each probe
customer got one small priming purchase before the timed phase, so the probe (400 EUR) makes it
cross silver; the phase starts once the workers' counters have stopped moving after that (the
primes are one large batch whose notifications and timers would otherwise fall in the phase).
Two latencies are measured per probe, both from the embedded send time:

  applied   - until its event key appears in the customer's state in Redis (the harness polls
              the pending probes' state every 2 ms with one pipelined round trip);
  notified  - until the tier_upgraded notification it caused is read from the notifications
              topic (a consumer with fetch_max_wait 5 ms, so the measuring consumer itself adds
              little: Tansu answers a fetch only when its max wait expires if no data is there).

The shop's producer lingers ``--producer-linger-ms`` (default 5 ms, the producer default since
Kafka 4.0, KIP-1030) and the time it lingers counts: the send time is taken before the send.
With 1 ms (the default here until 2026-11-26) it sent about three times as many produce requests
to the broker that shares the two cores; alternating runs at 1,300 events/s: broker 0.66-0.70
-> 0.58 cores, applied p99 144 / 242 ms at 1 ms against 78 / 87 ms at 5 ms.

``applied`` is the produce -> state-applied latency of the issue; ``notified`` adds the
notification's produce and fetch and is what a downstream consumer experiences. To tell where a
slow probe waited, the phase also records when the broker acked each probe's send, prints the
applied p50 / p99 of each tenth of the phase (a tail that grows through the phase is the
broker filling up, one that is spread is not), and with ``--latency-input-reader`` runs a bare
aiokafka consumer of the input topic beside the workers (produce -> fetched, the broker's part;
it makes the broker serve one more consumer, so it is off by default) and the worker's part of
each probe (fetched -> state in Redis, applied less fetched).
``--latency-burst N`` sends N extra events at once a quarter into the phase and prints applied
p50 / p99 per second: how long the backlog of a burst takes to clear at half load.
``--latency-rounds N`` repeats the phase on the same worker(s) with fresh probe customers and
prints each round's p99 with the worker's and the broker's CPU; the round with the median
applied p99 is reported. On this machine kind successive rounds get slower because the
embedded broker does: its CPU grew from 0.70 to 0.86 cores over three rounds as its in-memory
topics grew, on the same two cores as the worker (ops/PERFORMANCE.md).

Memory: Redis ``used_memory`` after the run minus after FLUSHALL, divided by the customer hashes
stored; plus MEMORY USAGE of sampled keys and the share of the state taken by the dedup memory.
Worker RSS from /proc/PID/status (VmRSS and the peak VmHWM). CPU shares of the consumer
process(es), the broker and Redis during each run come from /proc/PID/stat.

Scaling (``--customers-sweep 10000,100000,1000000``) reruns (c) with the same N at each size.
Unless ``--no-sweep-prefill``, Redis is first filled with every one of the M customers (one
earlier purchase each, written in the store's own format), so the 1M run really runs against a
keyspace of 1M customers instead of the ~N customers that N events can create.

``--profile`` adds one more memberflow run under ``py-spy record`` (not the measured run) and
reports the top frames. Results are printed as tables and written as JSON, with the CPU used by
everything else on the machine during each run ("cpu other": these machines are shared and
noisy; compare ratios within one run, and use ``--repeat``).

Experiments (recorded in the JSON and the report header, never the default):
``--fetch-max-wait-ms N`` sets the fetch max wait of every Faust consumer of the run (Faust
hard-codes 1500 ms and Tansu holds a fetch that long when it finds no data, which dominates
latency); ``--worker-env MEMBERFLOW_X=V`` passes one more setting to every consumer.
To measure a private copy of the code, copy the tree and run its ops/benchmark.py: the
consumers import the tree the script lives in.

Example: ``python ops/benchmark.py --quick`` (a few minutes), ``python ops/benchmark.py
--profile --customers-sweep 10k,100k,1M`` (the full issue-7 run, about 45 minutes here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # run as a script from anywhere, with the project importable
    sys.path.insert(0, str(ROOT))

from memberflow.replay import row_to_json  # noqa: E402
from memberflow.services import (  # noqa: E402
    LocalBroker,
    LocalRedis,
    LocalRedisCluster,
    WorkerProcess,
    free_port,
)
from memberflow.settings import Settings  # noqa: E402
from memberflow.synthetic import CATEGORIES, customer_id  # noqa: E402
from rules.customer import DAY, Seen, dedup_entries, event_key  # noqa: E402
from state import keys  # noqa: E402

DEFAULT_EVENTS = 200_000
DEFAULT_CUSTOMERS = 10_000
QUICK_EVENTS = 30_000
QUICK_CUSTOMERS = 3_000
QUICK_SWEEP_MAX = 100_000

TARGET_VS_CONSUME = 0.90  # memberflow >= 90% of the consume-only ceiling (a)
TARGET_VS_NAIVE = 6.0  # memberflow >= 6x the naive design (b)
TARGET_P99_MS = 100.0  # produce -> applied p99 at half load
TARGET_BYTES_PER_CUSTOMER = 1024
TARGET_SWEEP_DROP = 0.15  # 1M-customer throughput within 15% of the 10k one

PROBE_PRIME_AMOUNT = "10.00"
PROBE_AMOUNT = "400.00"  # prime + probe: 2 orders and 410 EUR, over silver (2 orders, 300 EUR)
SUFFIXES = {"k": 1_000, "m": 1_000_000}

_STARTED = time.monotonic()
FAUST_FETCH_MAX_WAIT_MS = 1500  # hard-coded in faust/transport/drivers/aiokafka.py

# Loaded (as sitecustomize) by the benchmark's consumer processes only, with --fetch-max-wait-ms:
# an experiment on Faust's consumer setting, not a change to memberflow.
SITE_PATCH = """
import os
import sys

_MS = int(os.environ.get("BENCH_FETCH_MAX_WAIT_MS", "0") or 0)
if _MS:
    from faust.transport.drivers import aiokafka as _driver

    _create = _driver.AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = _create(self, transport)
        consumer._fetch_max_wait_ms = _MS  # read by the Fetcher that start() creates
        print(f"benchmark: Faust consumer fetch_max_wait_ms={_MS}", file=sys.stderr, flush=True)
        return consumer

    _driver.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
"""


def say(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- pure helpers (unit-tested in tests/unit/test_benchmark_smoke.py) -------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default), so p50 of [1, 2, 3, 4] is 2.5. Raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


BULK_WORK_LOGGED = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*?\] "
    r"((?:published population snapshot|policy \S+ adopted).*?)\s*$"
)


def bulk_work_logged(log: str, start: float, seconds: float) -> list[list[Any]]:
    """[seconds into the phase, message] for each snapshot published or policy adopted (the
    work that wakes customers in bulk) that a worker logged within `seconds` from `start`
    (epoch). Log times are the worker's local time, as Python's logging writes them."""
    found: list[list[Any]] = []
    for line in log.splitlines():
        match = BULK_WORK_LOGGED.match(line)
        if match is None:
            continue
        moment = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000
        if start <= moment <= start + seconds:
            found.append([round(moment - start, 2), match[3]])
    return found


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99 and max of latencies in milliseconds (None when empty)."""
    if not values_ms:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(values_ms),
        "mean": round(statistics.fmean(values_ms), 2),
        "p50": round(percentile(values_ms, 50), 2),
        "p95": round(percentile(values_ms, 95), 2),
        "p99": round(percentile(values_ms, 99), 2),
        "max": round(max(values_ms), 2),
    }


def throughput(first_count: int, first_t: float, count: int, last_t: float) -> float | None:
    """Events per second between two observations of a cumulative counter (None when the
    interval is empty, e.g. everything arrived in one batch)."""
    if last_t <= first_t or count <= first_count:
        return None
    return (count - first_count) / (last_t - first_t)


def parse_sizes(text: str) -> list[int]:
    """'10000,100k,1M' -> [10000, 100000, 1000000]."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        factor = SUFFIXES.get(part[-1], 1)
        number = part[:-1] if part[-1] in SUFFIXES else part
        try:
            value = int(float(number) * factor)
        except ValueError as exc:
            raise ValueError(f"not a size: {part!r}") from exc
        if value < 1:
            raise ValueError(f"sizes must be >= 1, got {part!r}")
        sizes.append(value)
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def parse_probe_id(event_id: str) -> float | None:
    """The send time (epoch seconds) embedded in a probe event id, else None."""
    head, _, ns = event_id.rpartition("-")
    number = head.rpartition("-")[2]
    # "<prefix>-p<n>-<ns>"; a prime ("<prefix>-prime-<i>") is not a probe.
    if not (number[:1] == "p" and number[1:].isdigit() and ns.isdigit()):
        return None
    return int(ns) / 1e9


def frame_area(frame: str) -> str:
    """Which part of the stack a py-spy frame ('func (path/file.py)') belongs to."""
    path = "/" + frame.rpartition("(")[2]
    areas = (
        ("/rules/", "rules (pure fold)"),
        ("/state/", "state (redis store)"),
        ("/streams/", "streams (codec, models)"),
        ("/agents/", "agents"),
        ("/memberflow/", "memberflow (engine, app)"),
        ("pydantic", "pydantic"),
        ("/faust/", "faust"),
        ("/mode/", "mode (faust runtime)"),
        ("/aiokafka/", "aiokafka"),
        ("/kafka/", "kafka-python"),
        ("/redis/", "redis-py"),
        ("/prometheus_client/", "prometheus_client"),
        ("/json/", "json"),
        ("/asyncio/", "asyncio"),
    )
    for needle, area in areas:
        if needle in path:
            return area
    return "other"


_NOT_A_FRAME = re.compile(r"^(process \d+:|thread \(0x[0-9a-fA-F]+\)$)")


def top_frames(lines: Iterable[str], limit: int = 15) -> dict[str, Any]:
    """Summarise py-spy raw (collapsed) output: 'frame;frame;...;leaf COUNT' per line.

    Returns the sample total, the leaf frames with the most samples (self time), the frames
    present in the most stacks (inclusive time, counted once per stack) and self time by area.
    Shares are fractions of all samples."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            f
            for f in stack.split(";")
            if f.endswith(")") and "(" in f and not _NOT_A_FRAME.match(f)
        ]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        areas[frame_area(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "samples": samples, "share": round(samples / total, 4)}
            for frame, samples in counter.most_common(n)
        ]

    if total == 0:
        return {"samples": 0, "self": [], "inclusive": [], "areas": []}
    return {
        "samples": total,
        "self": shares(self_time, limit),
        "inclusive": shares(inclusive, limit),
        "areas": shares(areas, len(areas)),
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue-7 target with the measured value and pass/fail (None: not measured)."""
    runs = results.get("throughput", {})

    def rate(name: str) -> float | None:
        run = runs.get(name)
        return run.get("events_per_s") if run else None

    checks: list[dict[str, Any]] = []
    a, b, c = rate("a_take"), rate("b_naive"), rate("c_memberflow")
    ratio_a = c / a if a and c else None
    ratio_b = c / b if b and c else None
    checks.append(
        {
            "target": f"memberflow >= {TARGET_VS_CONSUME:.0%} of consume-only (a)",
            "value": None if ratio_a is None else f"{ratio_a:.1%}",
            "pass": None if ratio_a is None else ratio_a >= TARGET_VS_CONSUME,
        }
    )
    checks.append(
        {
            "target": f"memberflow >= {TARGET_VS_NAIVE:g}x naive (b)",
            "value": None if ratio_b is None else f"{ratio_b:.1f}x",
            "pass": None if ratio_b is None else ratio_b >= TARGET_VS_NAIVE,
        }
    )
    p99 = (results.get("latency") or {}).get("applied", {}).get("p99")
    checks.append(
        {
            "target": f"p99 produce->applied < {TARGET_P99_MS:g} ms at half load",
            "value": None if p99 is None else f"{p99:.1f} ms",
            "pass": None if p99 is None else p99 < TARGET_P99_MS,
        }
    )
    per_customer = (results.get("memory") or {}).get("bytes_per_customer")
    checks.append(
        {
            "target": f"Redis < {TARGET_BYTES_PER_CUSTOMER} B per customer",
            "value": None if per_customer is None else f"{per_customer:.0f} B",
            "pass": None if per_customer is None else per_customer < TARGET_BYTES_PER_CUSTOMER,
        }
    )
    sweep = {row["customers"]: row for row in results.get("sweep", []) if row.get("events_per_s")}
    small, big = sweep.get(10_000), sweep.get(1_000_000)
    if small and big:
        ratio = big["events_per_s"] / small["events_per_s"]
        value: str | None = f"{ratio:.1%} of 10k"
        passed: bool | None = ratio >= 1 - TARGET_SWEEP_DROP
    else:
        value, passed = None, None
    checks.append(
        {
            "target": f"1M-customer throughput within {TARGET_SWEEP_DROP:.0%} of 10k",
            "value": value,
            "pass": passed,
        }
    )
    return checks


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left/right aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in header]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [
        all(_is_number(r[i]) for r in rows if r[i] is not None and r[i] != "")
        for i in range(len(header))
    ]
    lines = []
    for n, row in enumerate(cells):
        parts = [
            cell.rjust(widths[i]) if numeric[i] and n > 0 else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    text = str(value).replace(",", "").rstrip("x%")
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- /proc ------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU seconds of a process so far (None when it is gone)."""
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_kib(pid: int | None) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    if pid is None:
        return {}
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    except OSError:
        return {}
    return values


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat; idle and iowait excluded)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


def cpu_pressure_seconds() -> float | None:
    """Seconds in which at least one runnable task waited for a CPU, since boot (Linux PSI,
    /proc/pressure/cpu "some"); None where the kernel does not report it."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.split("=", 1) for part in first.split()[1:])
    return int(fields["total"]) / 1e6 if "total" in fields else None


class CpuMeter:
    """CPU share (1.0 = one core) of named groups of processes between two samples, plus the
    benchmark itself ("harness") and everything else on the machine ("other": the noise)."""

    def __init__(self, groups: dict[str, list[int | None]]) -> None:
        self.groups = groups
        self.start_t: float | None = None
        self.start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        sample = {
            name: sum(cpu_seconds(pid) or 0.0 for pid in pids) for name, pids in self.groups.items()
        }
        sample["harness"] = cpu_seconds(os.getpid()) or 0.0
        sample["machine"] = machine_busy_seconds()
        return sample

    def begin(self) -> None:
        self.start_t, self.start = time.monotonic(), self._sample()

    def end(self) -> dict[str, float]:
        if self.start_t is None:
            return {}
        wall = time.monotonic() - self.start_t
        now = self._sample()
        if wall <= 0:
            return {}
        shares = {name: (now[name] - self.start[name]) / wall for name in now}
        machine = shares.pop("machine")
        shares["other"] = max(0.0, machine - sum(shares.values()))
        return {name: round(share, 3) for name, share in shares.items()}


# -- services -----------------------------------------------------------------------------------


class FaustProcess(WorkerProcess):
    """A baseline Faust app (ops/bench_*.py) run like a worker: same env handling and readiness
    check ("Worker]: Ready" in its log), different script."""

    def __init__(self, script: Path, env: dict[str, str], workdir: Path, name: str) -> None:
        super().__init__(env, workdir=workdir, name=name)
        self.argv = [sys.executable, str(script)]


@dataclass
class Bench:
    args: argparse.Namespace
    broker: LocalBroker
    redis_server: LocalRedis | None
    cluster: LocalRedisCluster | None
    tmp: Path
    run_id: str
    notifications_topic: str = "bench.notifications"
    dead_letter_topic: str = "bench.purchases.dlq"
    _clients: list[Any] = field(default_factory=list)
    _data_client: Any = None
    _groups: int = 0

    @property
    def redis_url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.redis_server is not None
        return self.redis_server.url

    def node_clients(self) -> list[Any]:
        """One synchronous client per Redis node (INFO, FLUSHALL, SCAN, DBSIZE)."""
        if not self._clients:
            nodes = self.cluster.nodes if self.cluster is not None else [self.redis_server]
            self._clients = [node.client(socket_timeout=120) for node in nodes if node]
        return self._clients

    def data_client(self) -> Any:
        """A client for keyed commands (a RedisCluster client on a cluster)."""
        if self._data_client is None:
            if self.cluster is not None:
                from redis.cluster import RedisCluster

                self._data_client = RedisCluster.from_url(self.cluster.url, socket_timeout=120)
            else:
                self._data_client = self.node_clients()[0]
        return self._data_client

    def close_clients(self) -> None:
        for client in [*self._clients, self._data_client]:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._clients, self._data_client = [], None

    def flushall(self) -> None:
        for client in self.node_clients():
            client.flushall()

    def used_memory(self) -> int:
        return sum(int(c.info("memory")["used_memory"]) for c in self.node_clients())

    def key_counts(self) -> tuple[int, int]:
        """(customer hashes, other keys: clocks, timer indexes, ...) over all nodes."""
        total = sum(int(c.dbsize()) for c in self.node_clients())
        customers = sum(
            1
            for c in self.node_clients()
            for _ in c.scan_iter(match=keys.CUSTOMER_PATTERN, count=10_000)
        )
        return customers, total - customers

    def redis_pids(self) -> list[int | None]:
        if self.cluster is not None:
            return [node.pid for node in self.cluster.nodes]
        assert self.redis_server is not None
        return [self.redis_server.pid]

    def new_group(self, label: str) -> str:
        """A consumer group (= Faust app id) never used before in this run, so every run reads
        the topic from the beginning (a repeat must not resume from committed offsets)."""
        self._groups += 1
        return f"bench-{label}-{self.run_id}-{self._groups}"

    def env(self, app_id: str, topic: str) -> dict[str, str]:
        """The MEMBERFLOW_* settings every consumer of a run gets (baselines read them too)."""
        args = self.args
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERFLOW_")}
        base.update(
            {
                "MEMBERFLOW_APP_ID": app_id,
                "MEMBERFLOW_BROKER_URL": self.broker.url,
                "MEMBERFLOW_REDIS_URL": self.redis_url,
                "MEMBERFLOW_REDIS_CLUSTER": "true" if self.cluster is not None else "false",
                "MEMBERFLOW_WEB_PORT": str(free_port()),
                "MEMBERFLOW_PURCHASES_TOPIC": topic,
                "MEMBERFLOW_NOTIFICATIONS_TOPIC": self.notifications_topic,
                "MEMBERFLOW_DEAD_LETTER_TOPIC": self.dead_letter_topic,
                "MEMBERFLOW_PARTITIONS": str(args.partitions),
                "MEMBERFLOW_CLOCK": "event",
                "MEMBERFLOW_BATCH_MAX": str(args.batch_max),
                "MEMBERFLOW_BATCH_WITHIN_S": str(args.batch_within),
                "MEMBERFLOW_BROKER_SESSION_TIMEOUT_S": "6",
                "MEMBERFLOW_BROKER_REBALANCE_TIMEOUT_S": "6",
                "MEMBERFLOW_BROKER_HEARTBEAT_INTERVAL_S": "1",
                "MEMBERFLOW_LOG_LEVEL": "info",  # the readiness check reads Faust's "Ready"
                "PYTHONPATH": os.pathsep.join(
                    p for p in (self.site_patch(), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
                ),
            }
        )
        if args.fetch_max_wait_ms is not None:
            base["BENCH_FETCH_MAX_WAIT_MS"] = str(args.fetch_max_wait_ms)
        base.update(args.worker_env)
        return base

    def site_patch(self) -> str:
        """With --fetch-max-wait-ms: a dir with a sitecustomize.py that sets the fetch max wait
        of Faust's consumer in the processes of this run (Faust hard-codes 1500 ms)."""
        if self.args.fetch_max_wait_ms is None:
            return ""
        path = self.tmp / "site-patch"
        if not path.exists():
            path.mkdir()
            (path / "sitecustomize.py").write_text(SITE_PATCH)
        return str(path)

    def run_timeout(self, events: int) -> float:
        return self.args.run_timeout or 120.0 + events / 200.0


def fetch_patch_seen(processes: Sequence[WorkerProcess]) -> bool:
    """True when every process logged that the --fetch-max-wait-ms patch took effect."""
    marker = b"benchmark: Faust consumer fetch_max_wait_ms="
    try:
        return all(marker in p.log_path.read_bytes() for p in processes)
    except OSError:
        return False


def start_all(processes: Sequence[WorkerProcess]) -> None:
    """Start processes concurrently (a second worker joining late would force a rebalance)."""
    errors: list[BaseException] = []

    def start(process: WorkerProcess) -> None:
        try:
            process.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for process in processes:
            process.stop(timeout=10)
        raise errors[0]


def stop_all(processes: Iterable[WorkerProcess]) -> None:
    for process in processes:
        with contextlib.suppress(Exception):
            process.stop(timeout=30)


# -- payloads -----------------------------------------------------------------------------------


def iso_z(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def purchase(
    rng: random.Random, event_id: str, customer: str, occurred: float, amount: str | None = None
) -> tuple[bytes, bytes]:
    """(key, value) of one purchase, encoded exactly as `memberflow replay` encodes a CSV row."""
    category = rng.choice(CATEGORIES)
    if amount is None:
        cents = rng.randint(500, 15_000)
        amount = f"{cents // 100}.{cents % 100:02d}"
    row = {
        "event_id": event_id,
        "customer_id": customer,
        "occurred_at": iso_z(occurred),
        "amount": amount,
        "currency": "EUR",
        "category": category,
        "sku": f"{category}-{rng.randint(1, 12):03d}",
        "quantity": str(rng.randint(1, 3)),
    }
    return customer.encode(), row_to_json(row, "EUR")


def history_payloads(
    events: int, customers: int, seed: int, end: float
) -> list[tuple[bytes, bytes]]:
    """`events` purchases of uniformly drawn customers, in time order over the 330 days before
    `end` (inside the 365-day window and the 730-day age limit of the default policy)."""
    rng = random.Random(f"bench:{seed}:{events}:{customers}")
    start = end - 330 * DAY
    span = 329 * DAY
    return [
        purchase(
            rng,
            f"b{seed}-{i}",
            customer_id(rng.randrange(customers) + 1),
            start + i * span / events,
        )
        for i in range(events)
    ]


async def produce(
    bootstrap: str, topic: str, payloads: Sequence[tuple[bytes, bytes]], partitions: int
) -> float:
    """Send payloads keyed by customer (Kafka's murmur2 partitioner, like every producer in
    this project) with aiokafka's batch API; returns the seconds it took."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    try:
        partitioner = DefaultPartitioner()
        ids = list(range(partitions))
        batches = {p: producer.create_batch() for p in ids}
        futures = []
        for key, value in payloads:
            part = partitioner(key, ids, ids)
            if batches[part].append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batches[part], topic, partition=part))
                batches[part] = producer.create_batch()
                batches[part].append(key=key, value=value, timestamp=None)
        for part, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=part))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def preload(
    bench: Bench, topic: str, events: int, customers: int, end: float | None = None
) -> dict[str, Any]:
    bench.broker.create_topics({topic: bench.args.partitions})
    started = time.perf_counter()
    end = time.time() - DAY if end is None else end
    payloads = history_payloads(events, customers, bench.args.seed, end)
    generated = time.perf_counter() - started
    seconds = asyncio.run(produce(bench.broker.bootstrap, topic, payloads, bench.args.partitions))
    mean_bytes = statistics.fmean(len(v) for _, v in payloads)
    say(
        f"pre-loaded {events:,} purchases for {customers:,} customers into {topic} "
        f"(generated in {generated:.1f}s, produced at {events / seconds:,.0f}/s, "
        f"{mean_bytes:.0f} B each)"
    )
    return {
        "topic": topic,
        "events": events,
        "customers": customers,
        "generate_s": round(generated, 2),
        "produce_events_per_s": round(events / seconds),
        "mean_message_bytes": round(mean_bytes, 1),
    }


def delete_topic(bench: Bench, topic: str) -> None:
    with contextlib.suppress(Exception), bench.broker.admin() as admin:
        admin.delete_topics([topic])


# -- throughput runs ----------------------------------------------------------------------------


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def run_baseline(
    bench: Bench,
    label: str,
    script: str,
    mode: str | None,
    topic: str,
    events: int,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one baseline Faust app (in --workers processes) over `topic` until `events` done."""
    group = bench.new_group(label)
    processes: list[FaustProcess] = []
    statuses: list[Path] = []
    for index in range(bench.args.workers):
        status = bench.tmp / f"{group}-{index}.status.json"
        env = bench.env(group, topic)
        env["BENCH_STATUS_FILE"] = str(status)
        if mode:
            env["BENCH_MODE"] = mode
        env.update(extra_env or {})
        workdir = bench.tmp / f"{group}-{index}"
        processes.append(FaustProcess(OPS / script, env, workdir, name=label))
        statuses.append(status)
    say(f"({label}) starting {len(processes)} x {script} {mode or ''}".rstrip())
    meter = CpuMeter(
        {
            "consumer": [p.pid for p in processes],
            "broker": [bench.broker.pid],
            "redis": bench.redis_pids(),
        }
    )
    try:
        start_all(processes)
        meter.groups["consumer"] = [p.pid for p in processes]
        deadline = time.monotonic() + bench.run_timeout(events)
        docs: list[dict[str, Any]] = []
        while True:
            for process in processes:
                process._check_alive()
            docs = [d for d in (_read_status(s) for s in statuses) if d]
            done = sum(int(d["count"]) for d in docs)
            if done and meter.start_t is None:
                meter.begin()
            if done >= events:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"({label}) only {done} of {events} events in time")
            time.sleep(0.1)
        cpu = meter.end()
        rss = [memory_kib(p.pid) for p in processes]
        patched = fetch_patch_seen(processes)
    finally:
        stop_all(processes)
        for process in processes:
            process.cleanup()
    started = [d for d in docs if d.get("first_t")]
    first_t = min(float(d["first_t"]) for d in started)
    last_t = max(float(d["last_t"]) for d in started)
    first_count = sum(int(d["first_count"]) for d in started)
    done = sum(int(d["count"]) for d in docs)
    rate = throughput(first_count, first_t, done, last_t)
    say(f"({label}) {done:,} events, {rate or 0:,.0f} events/s, cpu {cpu}")
    return {
        "label": label,
        "fetch_max_wait_patched": patched,
        "events": done,
        "measured_events": done - first_count,
        "seconds": round(last_t - first_t, 3),
        "events_per_s": round(rate) if rate else None,
        "cpu_cores": cpu,
        "rss_kib": rss,
    }


def worker_counts(workers: Sequence[WorkerProcess]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for worker in workers:
        for name, value in worker.metrics().items():
            if name.startswith(
                (
                    "memberflow_events_total{",
                    "memberflow_notifications_total{",
                    "memberflow_triggers_total{",
                )
            ):
                totals[name] = totals.get(name, 0.0) + value
    return totals


BATCH_METRICS = (
    "memberflow_batch_size_events_sum",
    "memberflow_batch_size_events_count",
    "memberflow_batch_duration_seconds_sum",
)


REDIS_STEP = "memberflow_redis_call_duration_seconds_"


def batch_totals(workers: Sequence[WorkerProcess]) -> dict[str, float]:
    """Sums of the workers' batch histograms (event batches only, not timer firings) and of
    their Redis step histograms (by operation)."""
    totals = dict.fromkeys(BATCH_METRICS, 0.0)
    for worker in workers:
        for name, value in worker.metrics().items():
            if name in totals or name.startswith((REDIS_STEP + "sum", REDIS_STEP + "count")):
                totals[name] = totals.get(name, 0.0) + value
    return totals


def batch_figures(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, Any]:
    """Batches per second, mean events per batch and mean seconds per batch between two
    batch_totals(): at a fixed load, how often the worker goes round and what a round costs.
    Redis steps are every step the worker took (timer firings and confirms included) per event
    batch, with the mean time of one call."""
    size, count, duration = (after[k] - before[k] for k in BATCH_METRICS)
    redis: dict[str, list[float]] = {}  # operation -> [calls per batch, ms per call]
    for name, value in after.items():
        if name.startswith(REDIS_STEP + "count"):
            calls = value - before.get(name, 0.0)
            spent = after[name.replace("_count", "_sum")] - before.get(
                name.replace("_count", "_sum"), 0.0
            )
            operation = name.partition('operation="')[2].partition('"')[0]
            if calls and count:
                redis[operation] = [round(calls / count, 2), round(spent * 1000 / calls, 2)]
    return {
        "batches_per_s": round(count / seconds, 1) if seconds > 0 else None,
        "events_per_batch": round(size / count, 1) if count else None,
        "ms_per_batch": round(duration * 1000 / count, 2) if count else None,
        "redis_steps": redis,
    }


def events_done(counts: dict[str, float]) -> int:
    return int(sum(v for k, v in counts.items() if k.startswith("memberflow_events_total{")))


@dataclass
class MemberflowRun:
    result: dict[str, Any]
    workers: list[WorkerProcess]


def run_memberflow(
    bench: Bench,
    label: str,
    topic: str,
    events: int,
    *,
    keep_running: bool = False,
    prepare: Callable[[], dict[str, Any]] | None = None,
    attach: Callable[[list[WorkerProcess]], Callable[[], None]] | None = None,
) -> MemberflowRun:
    """Flush Redis, run `memberflow worker` process(es) over `topic` until `events` are done,
    measure throughput, Redis memory and RSS. With keep_running the workers are handed back."""
    bench.flushall()
    memory_before = bench.used_memory()
    prepared = prepare() if prepare else {}
    group = bench.new_group(label)
    workers = [
        WorkerProcess(
            bench.env(group, topic), workdir=bench.tmp / f"{group}-{index}", name=f"worker{index}"
        )
        for index in range(bench.args.workers)
    ]
    say(f"({label}) starting {len(workers)} memberflow worker(s), group {group}")
    meter = CpuMeter({"broker": [bench.broker.pid], "redis": bench.redis_pids()})
    detach: Callable[[], None] | None = None
    try:
        start_all(workers)
        meter.groups["consumer"] = [w.pid for w in workers]
        if attach:
            detach = attach(workers)
        deadline = time.monotonic() + bench.run_timeout(events)
        first: tuple[int, float] | None = None
        last: tuple[int, float] = (0, 0.0)
        step = 0
        while True:
            for worker in workers:
                worker._check_alive()
            done = events_done(worker_counts(workers))
            now = time.time()
            if done and first is None:
                first = (done, now)
                meter.begin()
            if done >= events:
                last = (done, now)
                break
            # Poll every 0.2 s, and finely near the end so the end time is not 0.2 s late.
            remaining = events - done
            interval = 0.02 if step and remaining <= 2 * step else 0.2
            step = max(step, done - last[0])
            last = (done, now)
            if time.monotonic() > deadline:
                raise RuntimeError(f"({label}) memberflow did {done} of {events} events in time")
            time.sleep(interval)
        cpu = meter.end()
        if detach:
            detach()
            detach = None
        counts = worker_counts(workers)
        rss = [memory_kib(w.pid) for w in workers]
        patched = fetch_patch_seen(workers)
        # The workers' own view (batch sizes and durations, retries, conflicts...): histogram
        # sums and counts and every counter, without the buckets.
        worker_metrics = [
            {
                k: v
                for k, v in w.metrics().items()
                if k.startswith("memberflow_")
                and "_bucket{" not in k
                and not k.endswith("_created")
            }
            for w in workers
        ]
        memory = measure_memory(bench, memory_before)
    except BaseException:
        if detach:
            detach()
        stop_all(workers)
        raise
    if not keep_running:
        stop_all(workers)
    assert first is not None
    rate = throughput(first[0], first[1], last[0], last[1])
    outcomes = {
        k.split('"')[1]: int(v) for k, v in counts.items() if k.startswith("memberflow_events")
    }
    notifications = int(
        sum(v for k, v in counts.items() if k.startswith("memberflow_notifications"))
    )
    # Time-driven work the worker did meanwhile (reminders, lifecycle steps...), not in events/s.
    timers_fired = int(
        sum(
            v
            for k, v in counts.items()
            if k.startswith("memberflow_triggers_total{") and 'outcome="fired"' in k
        )
    )
    say(
        f"({label}) {last[0]:,} events, {rate or 0:,.0f} events/s, outcomes {outcomes}, "
        f"{notifications:,} notifications, {timers_fired:,} timers fired, cpu {cpu}, "
        f"{memory.get('bytes_per_customer') or 0:.0f} B/customer"
    )
    # Input events plus the timers the worker fired meanwhile, per second: the work it did.
    work_rate = rate * (last[0] + timers_fired) / last[0] if rate and last[0] else None
    result = {
        "label": label,
        "fetch_max_wait_patched": patched,
        "events": last[0],
        "measured_events": last[0] - first[0],
        "seconds": round(last[1] - first[1], 3),
        "events_per_s": round(rate) if rate else None,
        "events_and_timers_per_s": round(work_rate) if work_rate else None,
        "outcomes": outcomes,
        "notifications": notifications,
        "timers_fired": timers_fired,
        "cpu_cores": cpu,
        "rss_kib": rss,
        "worker_metrics": worker_metrics,
        "memory": memory,
        **({"prepared": prepared} if prepared else {}),
    }
    return MemberflowRun(result, workers if keep_running else [])


def measure_memory(bench: Bench, used_before: int, sample: int = 300) -> dict[str, Any]:
    """Redis bytes per stored customer, and what a customer hash is made of (sampled)."""
    used = bench.used_memory()
    customers, other_keys = bench.key_counts()
    usage, state_bytes, seen_bytes, seen_entries = [], [], [], []
    per_node = max(1, sample // len(bench.node_clients()))
    for client in bench.node_clients():
        scan = client.scan_iter(match=keys.CUSTOMER_PATTERN, count=1000)
        for taken, raw_key in enumerate(scan, start=1):
            usage.append(int(client.memory_usage(raw_key, samples=0) or 0))
            state = client.hget(raw_key, "s")
            if state:
                doc = json.loads(state)
                state_bytes.append(len(state))
                # Format 2 stores the dedup memory as text (rules.customer.Seen), 1 as an object.
                seen = doc.get("s", "")
                if not isinstance(seen, str):
                    seen = json.dumps(seen, separators=(",", ":"))
                seen_bytes.append(len(seen))
                seen_entries.append(dedup_entries(doc.get("s")))
            if taken >= per_node:
                break
    # The keys that are not customer hashes (timer indexes, population statistics, clocks...):
    # MEMORY USAGE summed by family, e.g. "mf:{t:*}:due".
    families: dict[str, int] = {}
    for client in bench.node_clients():
        for raw_key in client.scan_iter(match=f"{keys.PREFIX}:{{[^c]*", count=1000):
            key = raw_key.decode(errors="replace")
            family = re.sub(r"\{([a-z]+):[^}]*\}", r"{\1:*}", key)
            families[family] = families.get(family, 0) + int(
                client.memory_usage(raw_key, samples=0) or 0
            )
    delta = used - used_before
    return {
        "used_memory_before": used_before,
        "used_memory_after": used,
        "customers_stored": customers,
        "other_keys": other_keys,
        "bytes_per_customer": round(delta / customers, 1) if customers else None,
        "sampled_keys": len(usage),
        "memory_usage_mean": round(statistics.fmean(usage), 1) if usage else None,
        "state_json_mean": round(statistics.fmean(state_bytes), 1) if state_bytes else None,
        "dedup_json_mean": round(statistics.fmean(seen_bytes), 1) if seen_bytes else None,
        "dedup_entries_mean": round(statistics.fmean(seen_entries), 2) if seen_entries else None,
        "other_keys_bytes": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "other_keys_bytes_per_customer": round(sum(families.values()) / customers, 1)
        if customers
        else None,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.get("events_per_s") or 0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        chosen["all_events_per_s"] = [r.get("events_per_s") for r in runs]
    return chosen


# -- latency ------------------------------------------------------------------------------------


async def latency_phase(
    bench: Bench,
    workers: list[WorkerProcess],
    topic: str,
    rate: float,
    duration: float,
    probes_per_s: float,
    customers: int,
    round_no: int = 0,
) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from state.redis_store import connect

    rng = random.Random(f"latency:{bench.args.seed}:{round_no}")
    probes = max(1, int(duration * probes_per_s))
    tag = f"{bench.run_id}r{round_no}"  # a round's probes are customers no round used before
    prefix = f"lat-{tag}"
    probe_customers = [f"probe-{tag}-{i}" for i in range(probes)]
    redis = connect(bench.redis_url, cluster=bench.cluster is not None)
    producer = AIOKafkaProducer(
        bootstrap_servers=bench.broker.bootstrap,
        acks="all",
        linger_ms=bench.args.producer_linger_ms,
    )
    input_reader = AIOKafkaConsumer(
        bootstrap_servers=bench.broker.bootstrap,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=consumer_fetch_wait_ms(bench.args),
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bench.broker.bootstrap,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=5,
    )
    await producer.start()
    await consumer.start()
    try:
        # 1. Prime every probe customer with one small purchase and wait until all are applied.
        now = time.time()
        primes = [
            await producer.send(topic, value, key=key)
            for key, value in (
                purchase(rng, f"{prefix}-prime-{i}", cid, now - 60, PROBE_PRIME_AMOUNT)
                for i, cid in enumerate(probe_customers)
            )
        ]
        await asyncio.gather(*primes)
        deadline = time.monotonic() + 90
        while True:
            pipe = redis.pipeline(transaction=False)
            for cid in probe_customers:
                pipe.exists(keys.customer(cid))
            if all(await pipe.execute()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("probe customers were not primed within 90 s")
            await asyncio.sleep(0.2)
        # The primes are one batch of `probes` new customers: applied is not done. Its
        # notifications are still being produced and confirmed, and the clocks it moved may
        # have made timers due. Measured from here, the phase's first probes waited for that
        # (a 2,000-event batch took 350-375 ms after the primes were seen applied).
        settled_s = await wait_quiet(workers)

        await read_from_end(consumer, bench.notifications_topic)

        pending: dict[str, tuple[str, bytes, float]] = {}  # event id -> (key, needle, sent)
        applied: dict[str, float] = {}
        # event id -> ms from the send call to the broker's ack: the part of a probe's latency
        # spent in this process's producer and the broker, before any worker could fetch it.
        broker_acked: dict[str, float] = {}
        notified: dict[str, float] = {}
        sent_offset: dict[str, float] = {}  # event id -> seconds into the offered load
        stopping = asyncio.Event()
        all_seen = asyncio.Event()

        def check_all_seen() -> None:
            if len(applied) >= probes and len(notified) >= probes:
                all_seen.set()

        async def poll_redis() -> None:
            while not stopping.is_set():
                if pending:
                    ids = list(pending)
                    pipe = redis.pipeline(transaction=False)
                    for event_id in ids:
                        pipe.hget(pending[event_id][0], "s")
                    states = await pipe.execute()
                    seen_at = time.time()
                    for event_id, state in zip(ids, states, strict=True):
                        _, needle, sent = pending[event_id]
                        if state and needle in state:
                            applied[event_id] = (seen_at - sent) * 1000
                            sent_offset[event_id] = sent - phase_start
                            del pending[event_id]
                    check_all_seen()
                await asyncio.sleep(0.002)

        async def read_notifications() -> None:
            while not stopping.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                seen_at = time.time()
                for records in batches.values():
                    for record in records:
                        doc = json.loads(record.value)
                        cause = (doc.get("cause") or {}).get("id", "")
                        sent = parse_probe_id(cause) if cause.startswith(prefix) else None
                        if sent is not None and doc.get("type") == "tier_upgraded":
                            notified[cause] = (seen_at - sent) * 1000
                check_all_seen()

        # event id -> ms from the send call to a bare consumer of the input topic seeing it
        # (--latency-input-reader): with the broker ack above, it splits a slow probe into the
        # broker's part and the worker's. Off by default: the broker serves one more consumer.
        fetched: dict[str, float] = {}
        probe_marker = f'"{prefix}-p'.encode()
        reader_ready = asyncio.Event()

        async def read_input() -> None:
            await input_reader.start()
            await read_from_end(input_reader, topic)
            reader_ready.set()
            while not stopping.is_set():
                batches = await input_reader.getmany(timeout_ms=50)
                seen_at = time.time()
                for records in batches.values():
                    for record in records:
                        if probe_marker in record.value:
                            event_id = json.loads(record.value)["event_id"]
                            sent = parse_probe_id(event_id)
                            if sent is not None:
                                fetched[event_id] = (seen_at - sent) * 1000

        tasks = [asyncio.create_task(poll_redis()), asyncio.create_task(read_notifications())]
        if bench.args.latency_input_reader:
            tasks.append(asyncio.create_task(read_input()))
            await reader_ready.wait()
        counts_before = events_done(await asyncio.to_thread(worker_counts, workers))
        batches_before = await asyncio.to_thread(batch_totals, workers)

        # 2. Offer `rate` events/s for `duration` s; probes are spread evenly among them.
        say(
            f"(latency) offering {rate:,.0f} events/s for {duration:g}s with "
            f"{probes} probes ({probes_per_s:g}/s)"
        )
        meter = CpuMeter(
            {
                "consumer": [w.pid for w in workers],
                "broker": [bench.broker.pid],
                "redis": bench.redis_pids(),
            }
        )
        meter.begin()
        pressure_before, pressure_t = cpu_pressure_seconds(), time.monotonic()
        # Delivery is checked by a callback per send, not by gathering every future at the end:
        # a gather of the phase's ~26,000 futures took this process long enough that the
        # probes sent last were seen applied late (the applied time is when this process looks).
        failures: list[BaseException] = []

        def delivered(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is not None:
                failures.append(future.exception())  # type: ignore[arg-type]

        def probe_acked(event_id: str, sent_at: float, future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is None:
                broker_acked[event_id] = (time.time() - sent_at) * 1000

        sent = probes_sent = 0
        # --latency-burst: that many extra events sent at once a quarter into the phase (a
        # flash sale on top of the steady load); the per-second figures show the recovery.
        burst, burst_at = bench.args.latency_burst, duration / 4
        burst_sent_at: float | None = None
        extra = 0
        started = time.perf_counter()
        phase_start = time.time()  # probes are sent from here on: poll_redis reads it after
        while (elapsed := time.perf_counter() - started) < duration:
            due = events_due(rate, elapsed, burst, burst_at)
            if burst and burst_sent_at is None and elapsed >= burst_at:
                burst_sent_at, extra = round(elapsed, 2), burst
            due_probes = min(probes, int(probes_per_s * elapsed) + 1)
            while probes_sent < due_probes:
                send_ns = time.time_ns()
                event_id = f"{prefix}-p{probes_sent}-{send_ns}"
                cid = probe_customers[probes_sent]
                key, value = purchase(rng, event_id, cid, send_ns / 1e9, PROBE_AMOUNT)
                pending[event_id] = (
                    keys.customer(cid),
                    event_key(event_id).encode(),
                    send_ns / 1e9,
                )
                future = await producer.send(topic, value, key=key)
                future.add_done_callback(delivered)
                future.add_done_callback(partial(probe_acked, event_id, send_ns / 1e9))
                probes_sent += 1
                sent += 1
            while sent < due:
                cid = customer_id(rng.randrange(customers) + 1)
                key, value = purchase(rng, f"{prefix}-{sent}", cid, time.time())
                (await producer.send(topic, value, key=key)).add_done_callback(delivered)
                sent += 1
            await asyncio.sleep(0.002)
        offered_s = time.perf_counter() - started
        await producer.flush()
        if failures:
            raise RuntimeError(
                f"{len(failures)} sends failed in the latency phase: {failures[0]!r}"
            )

        # 3. Wait for the stragglers, then for the worker(s) to drain the offered load.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), timeout=30)
        # Scraped once the probes are in: rendering /metrics takes the worker's event loop
        # for a while, and scraped at the end of the offered load it delayed the last probes.
        batches = batch_figures(
            batches_before,
            await asyncio.to_thread(batch_totals, workers),
            time.perf_counter() - started,
        )
        target = counts_before + sent
        lag_deadline = time.monotonic() + 30
        done = counts_before
        while time.monotonic() < lag_deadline:
            done = events_done(await asyncio.to_thread(worker_counts, workers))
            if done >= target:
                break
            await asyncio.sleep(0.1)
        drained_after_s = round(time.perf_counter() - started - offered_s, 2)
        cpu = meter.end()
        pressure_after = cpu_pressure_seconds()
        # Share of the phase in which some process (worker, broker, Redis, this harness) was
        # ready to run and waited for one of the machine's cores.
        cpu_waiting = (
            round((pressure_after - pressure_before) / (time.monotonic() - pressure_t), 3)
            if pressure_before is not None and pressure_after is not None
            else None
        )
        stopping.set()
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
        await consumer.stop()
        await input_reader.stop()
        await redis.aclose()

    result = {
        "offered_rate": round(rate),
        "achieved_rate": round((sent - extra) / offered_s),
        "burst": {"events": extra, "at_s": burst_sent_at} if extra else None,
        "seconds": round(offered_s, 2),
        "events_sent": sent,
        "events_processed": done - counts_before,
        "drained_after_s": drained_after_s,
        "probes": probes,
        "settled_before_s": settled_s,
        "applied": latency_summary(list(applied.values())),
        "broker_acked": latency_summary(list(broker_acked.values())),
        # Applied p50/p99 per tenth of the phase: whether the tail is spread or grows with time.
        "applied_by_tenth": by_part(
            ((sent_offset[key], ms) for key, ms in applied.items()), offered_s, parts=10
        ),
        # With a burst: per second, to see how long the backlog it made took to clear.
        "applied_by_second": by_part(
            ((sent_offset[key], ms) for key, ms in applied.items()),
            offered_s,
            parts=max(1, round(offered_s)),
        )
        if extra
        else None,
        "fetched": latency_summary(list(fetched.values())),
        # The worker's part of each probe (--latency-input-reader): applied less fetched.
        "after_fetch": latency_summary(
            [applied[key] - fetched[key] for key in applied if key in fetched]
        ),
        "notified": latency_summary(list(notified.values())),
        "cpu_cores": cpu,
        "cpu_waiting_share": cpu_waiting,
        "batches": batches,
        # When in the phase the tail happened: [seconds into the offered load, ms], slowest
        # first; and the bulk work (snapshots, policy adoption) the workers logged meanwhile.
        # [seconds into the offered load, ms applied, ms until the broker acked the send,
        # ms until the bare consumer fetched it (--latency-input-reader)]
        "slowest_applied": [
            [
                round(sent_offset[event_id], 2),
                round(ms, 1),
                round(broker_acked[event_id], 1) if event_id in broker_acked else None,
                round(fetched[event_id], 1) if event_id in fetched else None,
            ]
            for event_id, ms in sorted(applied.items(), key=lambda item: -item[1])[:10]
        ],
        "bulk_work": [
            entry
            for w in workers
            for entry in bulk_work_logged(
                await asyncio.to_thread(Path(w.log_path).read_text, errors="replace"),
                phase_start,
                offered_s,
            )
        ],
    }
    say(
        f"(latency) applied {result['applied']}, notified {result['notified']}, "
        f"processed {result['events_processed']:,}/{sent:,}"
    )
    return result


def events_due(rate: float, elapsed: float, burst: int = 0, burst_at: float = 0.0) -> int:
    """How many events the latency phase has offered `elapsed` s in: `rate` per second, plus
    `burst` sent at once at `burst_at` s."""
    return int(rate * elapsed) + (burst if burst and elapsed >= burst_at else 0)


async def wait_quiet(
    workers: Sequence[WorkerProcess], quiet_s: float = 0.5, timeout_s: float = 20.0
) -> float:
    """Wait until the workers' event, notification and trigger counters stop moving for
    `quiet_s` (at most `timeout_s`); returns the seconds waited."""
    started = time.monotonic()
    last = await asyncio.to_thread(worker_counts, workers)
    while time.monotonic() - started < timeout_s:
        await asyncio.sleep(quiet_s)
        now = await asyncio.to_thread(worker_counts, workers)
        if now == last:
            break
        last = now
    return round(time.monotonic() - started, 2)


def by_part(
    samples: Iterable[tuple[float, float]], seconds: float, parts: int
) -> list[list[float | None]]:
    """[p50, p99] of the latencies (seconds into the phase it was sent, ms) sent in each of
    `parts` equal parts of a `seconds`-long phase (a straggler past the end counts in the last)."""
    split: list[list[float]] = [[] for _ in range(parts)]
    for offset, ms in samples:
        index = int(offset / seconds * parts) if seconds > 0 else 0
        split[min(parts - 1, max(0, index))].append(ms)
    return [
        [round(percentile(v, 50), 1), round(percentile(v, 99), 1)] if v else [None, None]
        for v in split
    ]


async def read_from_end(consumer: Any, topic: str) -> None:
    """Assign every partition of `topic` to a started aiokafka consumer, positioned at the end
    (only what is produced from now on is read)."""
    from aiokafka import TopicPartition

    await consumer.topics()  # loads the metadata partitions_for_topic reads
    partitions = [
        TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
    ]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)


def slowest_text(entry: Sequence[Any]) -> str:
    """A slowest probe as "at: ms", then "(ms until the broker acked)" and "[ms until a bare
    consumer fetched it]" where measured (results written before them have fewer fields)."""
    at, ms = entry[0], entry[1]
    acked = entry[2] if len(entry) > 2 else None
    fetched = entry[3] if len(entry) > 3 else None
    return (
        f"{at:g}: {ms:g}"
        + ("" if acked is None else f" ({acked:g})")
        + ("" if fetched is None else f" [{fetched:g}]")
    )


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median applied p99 (the lower middle for an even count), with each
    round's p99s beside it."""
    ranked = sorted(rounds, key=lambda r: r["applied"]["p99"] or 0.0)
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["rounds"] = [
        {
            "applied_p99": r["applied"]["p99"],
            "notified_p99": r["notified"]["p99"],
            "cpu_cores": r.get("cpu_cores"),
        }
        for r in rounds
    ]
    return chosen


def consumer_fetch_wait_ms(args: argparse.Namespace) -> int:
    """The fetch max wait the run's Faust consumers use: the experiment flag, else the worker
    setting (memberflow.app applies it to every Faust consumer, the baselines' included)."""
    if args.fetch_max_wait_ms:
        return int(args.fetch_max_wait_ms)
    configured = args.worker_env.get("MEMBERFLOW_BROKER_FETCH_MAX_WAIT_MS")
    if configured:
        return int(configured)
    return int(Settings.model_fields["broker_fetch_max_wait_ms"].default)


async def broker_floor(
    bench: Bench, rate: float, duration: float, fetch_max_wait_ms: int
) -> dict[str, Any]:
    """Produce -> consumed latency of a bare aiokafka consumer at the same offered rate and
    fetch max wait as the Faust consumers: the floor the broker and the fetch setting set,
    below any framework or processing."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = "bench.floor"
    bench.broker.create_topics({topic: bench.args.partitions})
    producer = AIOKafkaProducer(
        bootstrap_servers=bench.broker.bootstrap,
        acks="all",
        linger_ms=bench.args.producer_linger_ms,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bench.broker.bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await producer.start()
    await consumer.start()
    latencies: list[float] = []
    stopping = asyncio.Event()

    async def consume() -> None:
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batches.values():
                latencies.extend((now - float(r.value)) * 1000 for r in records)

    try:
        await consumer.seek_to_end()
        await asyncio.sleep(1.0)
        task = asyncio.create_task(consume())
        sent = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < duration:
            while sent < int(rate * elapsed):
                key = customer_id(sent % 1000 + 1).encode()
                await producer.send(topic, repr(time.time()).encode(), key=key)
                sent += 1
            await asyncio.sleep(0.002)
        await producer.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_until(lambda: len(latencies) >= sent), timeout=10)
        stopping.set()
        await task
    finally:
        await producer.stop()
        await consumer.stop()
    delete_topic(bench, topic)
    result = {"fetch_max_wait_ms": fetch_max_wait_ms, "sent": sent, **latency_summary(latencies)}
    say(f"(latency) broker floor, bare aiokafka consumer: {result}")
    return result


async def _until(condition: Callable[[], bool], interval: float = 0.05) -> None:
    while not condition():  # noqa: ASYNC110 - polling a plain counter
        await asyncio.sleep(interval)


# -- profile ------------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def run_profile(bench: Bench, topic: str, events: int, out: Path) -> dict[str, Any]:
    """One extra memberflow run with py-spy sampling worker 0 (not the measured run)."""
    binary = py_spy_binary()
    if binary is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    raw = out.with_suffix(".profile.txt")
    holder: dict[str, subprocess.Popen[bytes]] = {}

    def attach(workers: list[WorkerProcess]) -> Callable[[], None]:
        log = open(bench.tmp / "py-spy.log", "wb")  # noqa: SIM115 - closed in detach
        holder["proc"] = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(workers[0].pid),
                "--rate",
                "100",
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def detach() -> None:
            proc = holder["proc"]
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()

        return detach

    run = run_memberflow(bench, "c-profiled", topic, events, attach=attach)
    if not raw.exists():
        return {
            "skipped": "py-spy wrote no profile: "
            + (bench.tmp / "py-spy.log").read_text(errors="replace")[-500:]
        }
    with raw.open() as handle:
        summary = top_frames(handle)
    summary["raw_file"] = str(raw)
    summary["events_per_s_while_profiled"] = run.result["events_per_s"]
    return summary


# -- sweep --------------------------------------------------------------------------------------


def prefill_customers(
    bench: Bench, first: int, last: int, purchased_at: float, partitions: int
) -> dict[str, Any]:
    """Store customers `first`..`last` as dormant customers of a big shop: each with one
    purchase at `purchased_at`, written through the product's own paths (rules.customer.apply
    for the state, RedisStore.contribute for the population statistics, the timer index at the
    state's real next due time, the policy version recorded), then a population snapshot
    published from them. Their timers come due after the run's events (`purchased_at` is at
    the end of the history) and the snapshot is fresh, so nothing wakes them during the run:
    what grows with the shop is the keyspace, the sorted sets and the index, not the work."""
    import copy

    from aiokafka.partitioner import DefaultPartitioner

    from memberflow.policy_file import load_policy
    from memberflow.population import compute_snapshot
    from memberflow.settings import default_rules_file
    from rules.customer import apply
    from rules.timeline import next_due
    from state.redis_store import RedisStore, connect
    from state.store import Contribution
    from streams.codec import decode_event

    started = time.perf_counter()
    count = max(0, last - first + 1)
    policy = load_policy(default_rules_file())
    _, raw = purchase(random.Random(1), "pre-template", "cust-template", purchased_at, "59.90")
    event = decode_event(raw)
    template = apply(None, event, policy, int(purchased_at)).state  # type: ignore[arg-type]
    if template is None or len(template.seen) != 1:
        raise RuntimeError("could not build a prefill state with rules.customer.apply")
    (seen_value,) = template.seen.as_dict().values()
    due = next_due(template, policy)
    orders, spend = template.window(int(purchased_at), policy.window_days)
    partitioner = DefaultPartitioner()
    ids = list(range(partitions))

    async def write() -> dict[str, Any]:
        store = RedisStore(
            connect(bench.redis_url, cluster=bench.cluster is not None), stats_shards=16
        )
        try:
            await store.set_policy_version(policy.version)
            chunk = 5_000
            for low in range(first, last + 1, chunk):
                numbers = range(low, min(last, low + chunk - 1) + 1)
                pipe = store.client.pipeline(transaction=False)
                contributions = []
                for number in numbers:
                    cid = customer_id(number)
                    state = copy.copy(template)
                    state.customer_id = cid
                    state.seen = Seen.from_mapping({event_key(f"pre-{number}"): seen_value})
                    pipe.hset(keys.customer(cid), mapping={"v": 1, "s": state.to_json()})
                    shard = partitioner(cid.encode(), ids, ids)
                    if due is not None:
                        pipe.zadd(keys.timer_index(shard), {cid: due})
                    contributions.append(
                        Contribution(
                            customer_id=cid,
                            version=1,
                            partition=shard,
                            r=int(purchased_at),
                            f=orders,
                            m=spend,
                            tier=template.tier,
                            segment="",
                            grade="",
                            stage=template.stage,
                        )
                    )
                await pipe.execute()
                await store.contribute(contributions)
            snapshot = None
            if count:
                snapshot = await compute_snapshot(store, 1, int(time.time()))
                if snapshot is not None:
                    await store.publish_snapshot(snapshot.version, snapshot.model_dump_json())
            return {"snapshot_version": snapshot.version if snapshot else None}
        finally:
            await store.close()

    published = asyncio.run(write())
    seconds = time.perf_counter() - started
    say(f"prefilled {count:,} dormant customers in {seconds:.1f}s")
    return {
        "customers": count,
        "seconds": round(seconds, 1),
        "state_bytes": len(template.to_json()),
        **published,
    }


def run_sweep_size(
    bench: Bench, size: int, events: int, active: int, history_end: float
) -> dict[str, Any]:
    """(c) over the same `events` purchases of `active` customers, in a shop of `size`
    customers: the other size - active are pre-filled as dormant customers (by default)."""
    topic = f"bench.sweep.{size}"
    loaded = preload(bench, topic, events, active, end=history_end)
    prepare = None
    if bench.args.sweep_prefill:

        def prepare() -> dict[str, Any]:
            return prefill_customers(
                bench, active + 1, size, history_end - DAY, bench.args.partitions
            )

    try:
        run = run_memberflow(bench, f"sweep-{size}", topic, events, prepare=prepare)
    finally:
        delete_topic(bench, topic)
    memory = run.result["memory"]
    return {
        "customers": size,
        "active_customers": active,
        "events": events,
        "events_per_s": run.result["events_per_s"],
        "notifications": run.result["notifications"],
        "timers_fired": run.result["timers_fired"],
        "events_and_timers_per_s": run.result["events_and_timers_per_s"],
        "customers_stored": memory["customers_stored"],
        "bytes_per_customer": memory["bytes_per_customer"],
        "memory_usage_mean": memory["memory_usage_mean"],
        "used_memory_after": memory["used_memory_after"],
        "prefilled": bool(bench.args.sweep_prefill),
        "preload": loaded,
        "run": run.result,
    }


@contextlib.contextmanager
def phase_errors(results: dict[str, Any], phase: str) -> Iterator[None]:
    """Record a phase that failed (e.g. a worker that crashed) and go on with the others."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        results.setdefault("errors", {})[phase] = text[-4000:]
        first = text.strip().splitlines()[0] if text.strip() else repr(exc)
        say(f"({phase}) FAILED: {first}")
        crash = [line for line in text.splitlines() if "Error" in line or "Exception" in line]
        if crash:
            say(f"({phase}) last error line: {crash[-1].strip()[:300]}")


# -- report -------------------------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "" if kib is None else f"{kib / 1024:.0f}"


def report(results: dict[str, Any]) -> str:
    out = []
    config = results["config"]
    out.append(
        f"memberflow benchmark {results['started_at']}  events={config['events']:,} "
        f"customers={config['customers']:,} partitions={config['partitions']} "
        f"workers={config['workers']} redis={'cluster x3' if config['redis_cluster'] else 'single'}"
        f" batch={config['batch_max']}/{config['batch_within']}s"
        + ("  [quick]" if config["quick"] else "")
    )
    experiments = []
    if config.get("fetch_max_wait_patched"):
        experiments.append(f"Faust fetch_max_wait_ms={config['faust_fetch_max_wait_ms']}")
    experiments.extend(f"{k}={v}" for k, v in (config.get("worker_env") or {}).items())
    if experiments:
        out.append("experiment settings: " + ", ".join(experiments))
    git = config.get("git") or {}
    out.append(
        f"code: {git.get('commit') or 'unknown'}"
        + (f" + {git['dirty_files']} uncommitted file(s)" if git.get("dirty_files") else "")
    )
    runs = results.get("throughput", {})
    names = {
        "a_take": "(a)  Faust consume-only, noack_take + ack, tuned consumer path",
        "a_stock": "(a-stock) the same on Faust's own consumer path",
        "a_default": "(a') Faust defaults: own path, default iteration",
        "b_naive": "(b)  naive: 1 event, 4 Redis round trips",
        "c_memberflow": "(c)  memberflow worker",
    }
    rows = []
    for key, name in names.items():
        run = runs.get(key)
        if not run:
            continue
        cpu = run.get("cpu_cores", {})
        rss = [r.get("VmHWM") for r in run.get("rss_kib", []) if r]
        rows.append(
            [
                name,
                f"{run['measured_events']:,}",
                f"{run['seconds']:.1f}",
                f"{run['events_per_s']:,}" if run.get("events_per_s") else "n/a",
                cpu.get("consumer"),
                cpu.get("broker"),
                cpu.get("redis"),
                cpu.get("other"),
                "/".join(_mib(r) for r in rss),
            ]
        )
    if rows:
        out.append("")
        out.append(
            format_table(
                [
                    "throughput",
                    "events",
                    "seconds",
                    "events/s",
                    "cpu consumer",
                    "cpu broker",
                    "cpu redis",
                    "cpu other",
                    "peak RSS MiB",
                ],
                rows,
            )
        )
        c = (runs.get("c_memberflow") or {}).get("events_per_s")
        ratios = []
        for key, short in (
            ("a_take", "a"),
            ("a_stock", "a-stock"),
            ("a_default", "a'"),
            ("b_naive", "b"),
        ):
            other = (runs.get(key) or {}).get("events_per_s")
            if c and other:
                ratios.append(f"c/{short} = {c / other:.2f}")
        if ratios:
            out.append("ratios: " + ", ".join(ratios))
        mf = runs.get("c_memberflow")
        if mf:
            out.append(
                f"memberflow meanwhile: {mf.get('notifications', 0):,} notifications produced, "
                f"{mf.get('timers_fired', 0):,} timers fired, outcomes {mf.get('outcomes')}"
            )
    latency = results.get("latency")
    if latency:
        out.append("")
        out.append(
            f"latency at {latency['achieved_rate']:,} events/s offered "
            f"(target {latency['offered_rate']:,}) for {latency['seconds']}s, "
            f"{latency['probes']} probes; processed {latency['events_processed']:,} of "
            f"{latency['events_sent']:,}"
        )
        cores = latency.get("cpu_cores") or {}
        out.append(
            "meanwhile, cores busy: "
            + ", ".join(f"{name} {value}" for name, value in cores.items())
            + (
                f"; some process waiting for a core {latency['cpu_waiting_share']:.0%} of the "
                "time (PSI)"
                if latency.get("cpu_waiting_share") is not None
                else ""
            )
        )
        batches = latency.get("batches") or {}
        if batches.get("batches_per_s"):
            out.append(
                f"worker batches: {batches['batches_per_s']}/s, "
                f"{batches['events_per_batch']} events and {batches['ms_per_batch']} ms each; "
                "Redis steps per batch (ms each): "
                + ", ".join(
                    f"{op} {calls} ({ms})"
                    for op, (calls, ms) in sorted(batches.get("redis_steps", {}).items())
                )
            )
        if latency.get("slowest_applied"):
            out.append(
                "slowest applied (s into the phase: ms, (broker ack), [bare consumer fetch]): "
                + ", ".join(slowest_text(entry) for entry in latency["slowest_applied"])
            )
        if latency.get("burst"):
            out.append(
                f"burst: {latency['burst']['events']:,} extra events sent at once "
                f"{latency['burst']['at_s']:g} s into the phase; applied p50 / p99 by second "
                "(ms): " + ", ".join(f"{p50} / {p99}" for p50, p99 in latency["applied_by_second"])
            )
        if latency.get("applied_by_tenth"):
            out.append(
                "applied p50 / p99 by tenth of the phase (ms): "
                + ", ".join(f"{p50} / {p99}" for p50, p99 in latency["applied_by_tenth"])
            )
        for at, message in latency.get("bulk_work") or []:
            out.append(f"at {at:g} s a worker logged: {message}")
        lrows = [
            [
                name,
                latency[key]["count"],
                latency[key]["p50"],
                latency[key]["p95"],
                latency[key]["p99"],
                latency[key]["max"],
            ]
            for key, name in (
                ("applied", "produce -> state in Redis"),
                ("notified", "produce -> notification read"),
                ("broker_acked", "produce -> acked by the broker (probes)"),
                ("fetched", "produce -> fetched by a bare consumer (probes)"),
                ("after_fetch", "fetched -> state in Redis (the worker's part)"),
            )
            if (latency.get(key) or {}).get("count")
        ]
        floor = latency.get("broker_floor")
        if floor:
            lrows.append(
                [
                    f"floor: bare aiokafka consumer, fetch wait {floor['fetch_max_wait_ms']} ms",
                    floor["count"],
                    floor["p50"],
                    floor["p95"],
                    floor["p99"],
                    floor["max"],
                ]
            )
        out.append(format_table(["latency (ms)", "n", "p50", "p95", "p99", "max"], lrows))
        rounds = latency.get("rounds") or []
        if len(rounds) > 1:
            each = ", ".join(
                f"{r['applied_p99']} / {r['notified_p99']} ms (cores: worker "
                f"{(r.get('cpu_cores') or {}).get('consumer')}, broker "
                f"{(r.get('cpu_cores') or {}).get('broker')})"
                for r in rounds
            )
            out.append(
                f"{len(rounds)} rounds, p99 applied / notified: {each}; the median round by "
                "applied p99 is shown"
            )
    memory = results.get("memory")
    if memory:
        out.append("")
        biggest = list((memory.get("other_keys_bytes") or {}).items())[:4]
        families = ", ".join(f"{name} {size:,} B" for name, size in biggest)
        out.append(
            f"Redis: {memory['bytes_per_customer']} B/customer (used_memory delta over "
            f"{memory['customers_stored']:,} customers); MEMORY USAGE mean "
            f"{memory['memory_usage_mean']} B; state JSON mean {memory['state_json_mean']} B, "
            f"of which dedup memory {memory['dedup_json_mean']} B "
            f"({memory['dedup_entries_mean']} event ids); other keys "
            f"{memory.get('other_keys_bytes_per_customer')} B/customer ({families})"
        )
    worker_rss = results.get("worker_rss_kib")
    if worker_rss:
        out.append(
            "worker RSS after the run: "
            + ", ".join(
                f"VmRSS {_mib(r.get('VmRSS'))} MiB (peak {_mib(r.get('VmHWM'))} MiB)"
                for r in worker_rss
            )
        )
    sweep = results.get("sweep")
    if sweep:
        out.append("")
        srows = [
            [
                f"{row['customers']:,}",
                f"{row['customers_stored']:,}",
                f"{row['events']:,}",
                f"{row['events_per_s']:,}" if row["events_per_s"] else "n/a",
                f"{row['notifications'] / row['events']:.2f}",
                f"{row['timers_fired']:,}",
                f"{row['events_and_timers_per_s']:,}" if row["events_and_timers_per_s"] else "n/a",
                row["bytes_per_customer"],
                row["memory_usage_mean"],
            ]
            for row in sweep
        ]
        out.append(
            format_table(
                [
                    "sweep customers",
                    "stored",
                    "events",
                    "events/s",
                    "notif./event",
                    "timers fired",
                    "events+timers/s",
                    "B/customer",
                    "MEMORY USAGE",
                ],
                srows,
            )
        )
        skipped = results.get("sweep_skipped")
        if skipped:
            out.append(f"sweep sizes not run (--quick): {skipped}")
    profile = results.get("profile")
    if profile and profile.get("samples"):
        out.append("")
        out.append(
            f"profile of worker 0 (py-spy, {profile['samples']} samples, "
            f"{profile['events_per_s_while_profiled']:,} events/s while profiled)"
        )
        out.append(
            "by area (self): "
            + ", ".join(f"{a['frame']} {a['share']:.0%}" for a in profile["areas"][:10])
        )
        out.append(
            format_table(
                ["top self frames", "share"],
                [[f["frame"], f"{f['share']:.1%}"] for f in profile["self"][:12]],
            )
        )
    elif profile:
        out.append(f"profile: {profile.get('skipped')}")
    errors = results.get("errors")
    if errors:
        out.append("")
        for phase, text in errors.items():
            lines = [line for line in text.splitlines() if line.strip()]
            cause = next(
                (ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[0]
            )
            out.append(f"FAILED {phase}: {lines[0][:160]}")
            out.append(f"       cause: {cause.strip()[:300]}")
    out.append("")
    out.append(
        format_table(
            ["target", "measured", "result"],
            [
                [
                    t["target"],
                    t["value"] or "not measured",
                    {True: "PASS", False: "FAIL", None: "-"}[t["pass"]],
                ]
                for t in results["targets"]
            ],
        )
    )
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings.model_fields
    parser = argparse.ArgumentParser(
        prog="ops/benchmark.py",
        description="Throughput, latency and memory of memberflow against a Faust consume-only "
        "ceiling and a naive baseline, on a local broker and redis-server started for the run.",
    )
    parser.add_argument("--events", type=int, help=f"purchases pre-loaded [{DEFAULT_EVENTS:,}]")
    parser.add_argument("--customers", type=int, help=f"customers [{DEFAULT_CUSTOMERS:,}]")
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions of the topics (default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        choices=(1, 2),
        default=1,
        help="consumer processes per run (default %(default)s)",
    )
    parser.add_argument(
        "--redis-cluster", action="store_true", help="a 3-node Redis Cluster instead of one server"
    )
    parser.add_argument(
        "--batch-max",
        type=int,
        default=defaults["batch_max"].default,
        help="take batch size (default %(default)s, as the worker)",
    )
    parser.add_argument(
        "--batch-within",
        type=float,
        default=defaults["batch_within_s"].default,
        help="take batch wait, seconds (default %(default)s)",
    )
    parser.add_argument(
        "--phases",
        default="a,a-stock,a-default,b,c,latency",
        help="which of a, a-stock, a-default, b, c, latency to run, or none (e.g. for a sweep "
        "alone; default %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of a/b/c each; the median is kept (default %(default)s)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, help="duration of the fixed-load phase [20]"
    )
    parser.add_argument(
        "--latency-rate", type=float, help="offered events/s [half of memberflow's rate]"
    )
    parser.add_argument(
        "--producer-linger-ms",
        type=float,
        default=5.0,
        help="linger.ms of the shop's producer in the latency phase and its floor [5, Kafka "
        "4.0's default]",
    )
    parser.add_argument(
        "--latency-input-reader",
        action="store_true",
        help="diagnostic: a bare consumer of the input topic in the latency phase, to tell the "
        "broker's delay from the worker's (the broker serves one more consumer)",
    )
    parser.add_argument(
        "--latency-burst",
        type=int,
        default=0,
        metavar="N",
        help="N extra events sent at once a quarter into the latency phase, on top of the "
        "offered rate: how quickly latency recovers after a burst (default: none)",
    )
    parser.add_argument(
        "--latency-rounds",
        type=int,
        help="fixed-load rounds; the one with the median applied p99 is reported (default 1)",
    )
    parser.add_argument(
        "--probes-per-second",
        type=float,
        default=50.0,
        help="latency probes per second (default %(default)s)",
    )
    parser.add_argument(
        "--customers-sweep",
        type=parse_sizes,
        help="run (c) at each customer count, e.g. 10000,100000,1000000 (or 10k,100k,1M)",
    )
    parser.add_argument(
        "--no-sweep-prefill",
        dest="sweep_prefill",
        action="store_false",
        help="do not pre-fill Redis with every sweep customer before the sweep run",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one extra memberflow run under py-spy"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="MEMBERFLOW_X=VALUE",
        help="experiment: one more MEMBERFLOW_* setting for every consumer of the run "
        "(repeatable), e.g. MEMBERFLOW_TIMER_POLL_S=3600",
    )
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        help="experiment: set the fetch max wait of every Faust consumer in the run (Faust "
        f"hard-codes {FAUST_FETCH_MAX_WAIT_MS} ms, and Tansu holds a fetch for about that long)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small defaults ({QUICK_EVENTS:,} events, {QUICK_CUSTOMERS:,} customers, "
        f"8 s latency) and sweep sizes <= {QUICK_SWEEP_MAX:,}",
    )
    parser.add_argument("--seed", type=int, default=7, help="data seed (default %(default)s)")
    parser.add_argument("--run-timeout", type=float, help="seconds per run [120 + events/200]")
    parser.add_argument(
        "--output", type=Path, help="JSON results [ops/results/benchmark-<timestamp>.json]"
    )
    args = parser.parse_args(argv)
    args.events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    args.customers = args.customers or (QUICK_CUSTOMERS if args.quick else DEFAULT_CUSTOMERS)
    args.latency_seconds = args.latency_seconds or (8.0 if args.quick else 20.0)
    args.latency_rounds = args.latency_rounds or 1
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()} - {"none"}
    worker_env = {}
    for item in args.worker_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MEMBERFLOW_"):
            parser.error(f"--worker-env takes MEMBERFLOW_NAME=VALUE, not {item!r}")
        worker_env[name] = value
    args.worker_env = worker_env
    unknown = args.phases - {"a", "a-stock", "a-default", "b", "c", "latency"}
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")
    if "latency" in args.phases and "c" not in args.phases:
        parser.error("the latency phase runs on the memberflow worker of phase c")
    if args.events < 1 or args.customers < 1 or args.repeat < 1:
        parser.error("--events, --customers and --repeat must be >= 1")
    return args


def git_state() -> dict[str, Any]:
    """Commit and uncommitted changes of the checkout, so a result names the code it measured."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    diff = git("diff", "HEAD")
    commit = git("rev-parse", "HEAD")
    snapshot = ROOT / "COMMIT"  # a `git archive` copy: the commit it was made from
    if not commit and snapshot.exists():
        commit = snapshot.read_text().strip() + " (snapshot at " + str(ROOT) + ")"
    return {
        "commit": commit,
        "dirty_files": len(git("status", "--porcelain").splitlines()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    output = args.output or OPS / "results" / f"benchmark-{stamp}.json"
    results: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "config": {
            "events": args.events,
            "customers": args.customers,
            "partitions": args.partitions,
            "workers": args.workers,
            "redis_cluster": args.redis_cluster,
            "batch_max": args.batch_max,
            "batch_within": args.batch_within,
            "phases": sorted(args.phases),
            "repeat": args.repeat,
            "quick": args.quick,
            "latency_seconds": args.latency_seconds,
            "probes_per_second": args.probes_per_second,
            "customers_sweep": args.customers_sweep,
            "sweep_prefill": args.sweep_prefill,
            "profile": args.profile,
            "latency_input_reader": args.latency_input_reader,
            "latency_burst": args.latency_burst,
            "seed": args.seed,
            "faust_fetch_max_wait_ms": consumer_fetch_wait_ms(args),
            "fetch_max_wait_patched": args.fetch_max_wait_ms is not None,
            "worker_env": args.worker_env,
            "git": git_state(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "throughput": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="memberflow-bench-"))
    broker = LocalBroker(workdir=tmp / "broker")
    redis_server = None if args.redis_cluster else LocalRedis(workdir=tmp / "redis")
    cluster = LocalRedisCluster(workdir=tmp / "redis-cluster") if args.redis_cluster else None
    bench = Bench(args, broker, redis_server, cluster, tmp, run_id=stamp.replace("-", ""))
    workers: list[WorkerProcess] = []
    try:
        broker.start()
        if cluster is not None:
            cluster.start()
        elif redis_server is not None:
            redis_server.start()
        say(f"broker {broker.bootstrap}, redis {bench.redis_url}, work dir {tmp}")
        topic = "bench.purchases"
        broker.create_topics(
            {
                topic: args.partitions,
                bench.notifications_topic: args.partitions,
                bench.dead_letter_topic: args.partitions,
            }
        )
        if args.phases:  # a sweep alone pre-loads its own topics
            results["preload"] = preload(bench, topic, args.events, args.customers)
        events = args.events

        stock = {"BENCH_FAUST_PATH": "stock"}  # Faust's own consumer path (no memberflow tuning)
        baselines: tuple[tuple[str, str, str, str | None, dict[str, str]], ...] = (
            ("a", "a_take", "bench_consume_only.py", "take", {}),
            ("a-stock", "a_stock", "bench_consume_only.py", "take", stock),
            ("a-default", "a_default", "bench_consume_only.py", "default", stock),
            ("b", "b_naive", "bench_naive.py", None, {}),
        )
        for phase, key, script, mode, extra_env in baselines:
            if phase in args.phases:
                with phase_errors(results, key):
                    bench.flushall()
                    runs = [
                        run_baseline(bench, key, script, mode, topic, events, extra_env)
                        for _ in range(args.repeat)
                    ]
                    results["throughput"][key] = median_run(runs)

        if "c" in args.phases:
            with phase_errors(results, "c_memberflow"):
                keep = "latency" in args.phases
                mf_runs = []
                for attempt in range(args.repeat):
                    last_one = attempt == args.repeat - 1
                    mf = run_memberflow(
                        bench, "c_memberflow", topic, events, keep_running=keep and last_one
                    )
                    mf_runs.append(mf.result)
                    workers = mf.workers
                results["throughput"]["c_memberflow"] = median_run(mf_runs)
                results["memory"] = mf_runs[-1]["memory"]
                results["worker_rss_kib"] = mf_runs[-1]["rss_kib"]

        if "latency" in args.phases and workers:
            with phase_errors(results, "latency"):
                c_rate = results["throughput"]["c_memberflow"]["events_per_s"] or 1000
                rate = args.latency_rate or c_rate / 2
                floor = asyncio.run(
                    broker_floor(
                        bench,
                        rate,
                        min(args.latency_seconds, 8.0),
                        consumer_fetch_wait_ms(args),
                    )
                )
                rounds = [
                    asyncio.run(
                        latency_phase(
                            bench,
                            workers,
                            topic,
                            rate,
                            args.latency_seconds,
                            args.probes_per_second,
                            args.customers,
                            round_no,
                        )
                    )
                    for round_no in range(args.latency_rounds)
                ]
                results["latency"] = median_round(rounds)
                results["latency"]["broker_floor"] = floor
                results["worker_rss_kib_after_latency"] = [memory_kib(w.pid) for w in workers]
        stop_all(workers)
        workers = []

        if args.profile:
            with phase_errors(results, "profile"):
                results["profile"] = run_profile(bench, topic, events, output)

        if args.customers_sweep:
            sizes = args.customers_sweep
            if args.quick:
                results["sweep_skipped"] = [s for s in sizes if s > QUICK_SWEEP_MAX]
                sizes = [s for s in sizes if s <= QUICK_SWEEP_MAX]
            results["sweep"] = []
            # The same events of the same customers in every run (at most half the smallest
            # size are active), so only the shop's size differs between the runs.
            active = max(1, min(args.customers, min(sizes) // 2))
            history_end = time.time() - DAY
            for size in sizes:
                with phase_errors(results, f"sweep-{size}"):
                    results["sweep"].append(
                        run_sweep_size(bench, size, events, active, history_end)
                    )
    finally:
        stop_all(workers)
        bench.close_clients()
        if cluster is not None:
            cluster.cleanup()
        if redis_server is not None:
            redis_server.cleanup()
        broker.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    results["targets"] = check_targets(results)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nresults: {output}")
    return results


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM, and SIGINT even when started in the background (where it is ignored), unwind
    # through the finally blocks, so no broker, Redis or worker is left running.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(args)
    except KeyboardInterrupt:
        say("interrupted; services stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
