"""Scenario 4: the broker goes away after a stream was processed and a new, empty one takes its
place on the same address, while the worker keeps running.

Tansu keeps everything in memory, so a broker restart is a new broker: topics, records and the
group's committed offsets are gone. What happens (observed with faust-streaming 0.15.3 and
aiokafka 0.14.0; this test asserts it): the worker does not exit. During the outage it logs a
connection error several times a second (metadata, fetch and coordinator requests), then the
new broker does not know its member id, the heartbeat fails, the consumer re-joins the group,
its partitions are revoked (which also clears Faust's per-partition read offsets, so offsets
that restart at 0 are not dropped as already read) and assigned again with no committed offset,
so it reads the recreated topic from the beginning. Redis state is untouched by all this: new
purchases continue each customer's R/F/M where it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis, WorkerProcess
from tests.faults.harness import (
    DAY,
    PARTITIONS,
    Report,
    check_dead_letters,
    check_export,
    check_notifications,
    engine_clock,
    make_workload,
    read_all,
    settle,
    tick,
    verify,
)
from tests.integration.conftest import run_cli
from tests.oracle import batch_export, expected_upgrades
from tests.oracle_timeline import expected_timeline

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LATENESS_S = 7 * DAY
START = datetime(2025, 3, 1, tzinfo=UTC)
BEFORE_DAYS = 300
OUTAGE_S = 5.0  # longer than the session timeout (3 s)


@pytest.mark.timeout(240)
def test_worker_survives_a_broker_swap_with_state_intact(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    # Two histories with their own event-id prefixes (the seed); the second continues the
    # first's customers (and adds some) strictly after the first one's last event.
    before = make_workload(
        tmp_path, customers=60, days=BEFORE_DAYS, start=START, seed=8, name="before"
    )
    after = make_workload(
        tmp_path,
        customers=80,
        days=60,
        start=START + timedelta(days=BEFORE_DAYS),
        seed=9,
        duplicates=10,
        bad=6,
        name="after",
    )
    assert before.last_event < min(
        datetime.fromisoformat(str(r["occurred_at"]).replace("Z", "+00:00")) for r in after.accepted
    )
    env = make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S))
    worker = make_worker(env)
    worker.start()
    pid = worker.pid

    path = tmp_path / "before.jsonl"
    replayed = run_cli(env, "replay", "--quiet", str(path))
    assert replayed.returncode == 0, replayed.stderr
    tick(env, before.last_event)
    settle(broker, aof_redis, len(before.records) + PARTITIONS, [worker], LATENESS_S)
    first = verify("broker-swap, before", env, broker, aof_redis, before, policy[1], LATENESS_S)

    broker.kill()
    time.sleep(OUTAGE_S)
    assert worker.pid == pid, f"the worker exited during the outage:\n{worker.log_tail()}"
    with LocalBroker(port=broker.port, workdir=tmp_path / "broker-2") as fresh:
        # Tansu creates a topic a client asks metadata for (with 4 partitions, as observed), so
        # the worker may have recreated them already: create_topics accepts equal counts.
        fresh.create_topics(
            {"purchases": PARTITIONS, "notifications": PARTITIONS, "purchases.dlq": PARTITIONS}
        )
        replayed = run_cli(env, "replay", "--quiet", str(tmp_path / "after.jsonl"))
        assert replayed.returncode == 0, replayed.stderr
        tick(env, after.last_event)
        settle(fresh, aof_redis, len(after.records) + PARTITIONS, [worker], LATENESS_S, 60)
        assert worker.pid == pid, "the worker was restarted"

        # State: both histories, as if nothing had happened in between.
        everything = [*before.accepted, *after.accepted]
        assert engine_clock(aof_redis) == int(after.last_event.timestamp())
        check_export(env, batch_export(everything, as_of=after.last_event))
        # The new broker carries what the second history caused, exactly.
        report = Report("broker-swap, after")
        until = after.last_event - timedelta(seconds=LATENESS_S)
        earlier = before.last_event - timedelta(seconds=LATENESS_S)
        notes = [json.loads(r.value) for r in read_all(fresh.bootstrap, "notifications")]
        check_notifications(
            report,
            notes,
            expected_upgrades(everything) - expected_upgrades(before.accepted),
            expected_timeline(everything, until, policy[1])
            - expected_timeline(before.accepted, earlier, policy[1]),
        )
        letters = [json.loads(r.value) for r in read_all(fresh.bootstrap, "purchases.dlq")]
        check_dead_letters(report, letters, after.bad)
    log = worker.log_path.read_text(errors="replace")
    report.notes.append(
        f"{log.count('[ERROR]')} error lines logged during the outage; re-joined the group: "
        f"{'re-joining group' in log}; total {time.monotonic() - started:.1f}s"
    )
    print(first.summary())
    print(report.summary())
