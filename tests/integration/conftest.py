"""Real services for integration tests: a Tansu broker, a redis-server and worker processes.

Every test gets its own broker and Redis on free ports, so tests never touch data they did not
write. A missing redis-server or broker binary fails the test (CI must install them), it does
not skip it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from memberflow.services import LocalBroker, LocalRedis, LocalRedisCluster, WorkerProcess, free_port
from memberflow.settings import default_rules_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(workdir=tmp_path / "broker") as running:
        yield running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    with LocalRedis(workdir=tmp_path / "redis", appendonly=True) as running:
        yield running


def policy_variant(changes: dict[str, Any], path: Path) -> Path:
    """The default policy with some sections replaced (shallow per section), written to
    `path`: tests state the policy they rely on instead of copying the whole file."""
    doc = yaml.safe_load(default_rules_file().read_text())
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(section), dict):
            doc[section] = {**doc[section], **value}
        else:
            doc[section] = value
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


# The R/F/M oracle (tests/oracle.py) models upgrades only. Replays there span about a year, so
# a grace period of ten years keeps downgrades (tested on their own) out of those comparisons.
UPGRADE_ONLY = {"tier_changes": {"grace_days": 3650}}


def worker_env(
    broker: LocalBroker, redis: LocalRedis | LocalRedisCluster, **overrides: str
) -> dict[str, str]:
    """Environment for a worker or a CLI call against these services. Unless the test names a
    rules file, the policy is the default with downgrades out of reach (UPGRADE_ONLY)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERFLOW_")}
    env.update(
        {
            "MEMBERFLOW_BROKER_URL": broker.url,
            "MEMBERFLOW_REDIS_URL": redis.url,
            "MEMBERFLOW_WEB_PORT": str(free_port()),
            "MEMBERFLOW_PARTITIONS": "4",
            # Tansu's group join waits for the rebalance timeout: keep it short in tests.
            "MEMBERFLOW_BROKER_SESSION_TIMEOUT_S": "6",
            "MEMBERFLOW_BROKER_REBALANCE_TIMEOUT_S": "6",
            "MEMBERFLOW_BROKER_HEARTBEAT_INTERVAL_S": "1",
        }
    )
    if "MEMBERFLOW_RULES_FILE" not in overrides:
        path = Path(redis.work_dir) / "upgrade-only-policy.yaml"
        env["MEMBERFLOW_RULES_FILE"] = str(policy_variant(UPGRADE_ONLY, path))
    env.update(overrides)
    return env


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Any]:
    """Build WorkerProcess objects that are stopped when the test ends."""
    started: list[WorkerProcess] = []

    def make(env: dict[str, str], name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(env, workdir=tmp_path / f"{name}-{len(started)}", name=name)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop(timeout=30)


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memberflow.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_topic(bootstrap: str, topic: str, timeout_s: float = 20.0) -> list[Any]:
    """Every record of a topic, from the beginning to the end offsets seen now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in {timeout_s}s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def read_json_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [json.loads(record.value) for record in read_topic(bootstrap, topic)]


def wait_timers_settled(redis_url: str, partitions: int, until: int, timeout: float = 120) -> None:
    """Wait until every partition's event clock reached `until` and no timer (or relabelling
    wake-up) is due up to it: the worker has finished its time-driven work. A timer index
    entry is what a worker still has to do, so this is a completion check, not a sleep."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            clocks = [client.get(f"mf:{{t:{p}}}:clock") for p in range(partitions)]
            due = sum(client.zcount(f"mf:{{t:{p}}}:due", "-inf", until) for p in range(partitions))
            if all(c is not None and int(c) >= until for c in clocks) and due == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timers not settled by {until}: clocks {clocks}, due {due}")
            time.sleep(0.3)
    finally:
        client.close()
