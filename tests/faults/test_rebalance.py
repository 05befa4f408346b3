"""Scenario 2: rebalance under load. Two workers share the partitions; one is killed with
SIGKILL and the other takes its partitions over (after the session timeout), then a third
joins and takes some back, all while purchases keep coming.

A killed worker's uncommitted batches are redelivered to the survivor; a worker that loses
partitions in the join may still be finishing a batch of them while the newcomer starts on the
same offsets: the compare-and-set write lets only one of them apply each event, and outboxes
may be produced by both (same ids, same payloads: tolerated, reported).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis, WorkerProcess
from tests.faults.harness import (
    DAY,
    PARTITIONS,
    alive,
    assigned_partitions,
    feeding,
    make_workload,
    seeded_rng,
    settle,
    start_all,
    tick,
    verify,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LATENESS_S = 7 * DAY
FEED_S = 30.0
ALL = set(range(PARTITIONS))


@pytest.mark.timeout(240)
def test_worker_killed_then_partitions_taken_over_then_third_joins(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    rng = seeded_rng("rebalance")
    workload = make_workload(tmp_path, customers=200, days=420, seed=6)
    assert workload.disorder_s < LATENESS_S
    settings = {"MEMBERFLOW_TIMER_LATENESS_S": str(LATENESS_S)}
    first = make_worker(make_env(**settings), name="first")
    second = make_worker(make_env(**settings), name="second")
    start_all([first, second])
    wait_for(
        "the two workers to share the partitions",
        lambda: (
            assigned_partitions(first) | assigned_partitions(second) == ALL
            and assigned_partitions(first).isdisjoint(assigned_partitions(second))
        ),
        timeout=30,
    )

    notes: list[str] = []
    with feeding(broker.bootstrap, workload.records, FEED_S) as feeder:
        time.sleep(rng.uniform(2.0, 6.0))
        alive([first, second])
        lost = assigned_partitions(first)
        first.kill()
        killed_at = time.monotonic()
        notes.append(f"killed first (partitions {sorted(lost)}) at {feeder.sent} published")
        wait_for(
            "the second worker to own every partition",
            lambda: assigned_partitions(second) == ALL,
            timeout=30,
        )
        notes.append(f"second owns all partitions {time.monotonic() - killed_at:.1f}s later")

        time.sleep(rng.uniform(0.5, 3.0))
        third = make_worker(make_env(**settings), name="third")
        third.start()

        def shared() -> bool:
            mine, theirs = assigned_partitions(second), assigned_partitions(third)
            return bool(mine and theirs) and mine | theirs == ALL and not mine & theirs

        wait_for("the second and third workers to share the partitions", shared, timeout=30)
        notes.append(
            f"third joined at {feeder.sent} published: second {sorted(assigned_partitions(second))}"
            f", third {sorted(assigned_partitions(third))}"
        )
    assert feeder.sent == len(workload.records)

    tick(make_env(**settings), workload.last_event)
    survivors = [second, third]
    settle(broker, aof_redis, len(workload.records) + PARTITIONS, survivors, LATENESS_S)
    report = verify(
        "rebalance",
        make_env(**settings),
        broker,
        aof_redis,
        workload,
        policy[1],
        lateness_s=LATENESS_S,
    )
    seen = {w.name: w.events_seen() for w in survivors}
    assert seen["third"] > 0, "the third worker never processed anything"

    # Each survivor exports the lag of the partitions it owns, and only those: the second
    # owned all of them before the third joined, and the figures of the ones it lost stayed
    # exported (the lag alert takes the max over workers). Reported every 5 s.
    def lag_partitions(worker: WorkerProcess) -> set[int]:
        prefix = 'memberflow_consumer_lag_events{partition="'
        return {
            int(k[len(prefix) :].split('"')[0]) for k in worker.metrics() if k.startswith(prefix)
        }

    wait_for(
        "each survivor to report the lag of its own partitions only",
        lambda: all(lag_partitions(w) == assigned_partitions(w) for w in survivors),
        timeout=15,
    )
    report.notes.extend(notes)
    report.notes.append(
        f"events finished per survivor: {seen}; total {time.monotonic() - started:.1f}s"
    )
    print(report.summary())
