"""Scenario 1: a worker is killed with SIGKILL at random moments under load, five times, and
restarted each time. Nothing acknowledged may be lost and nothing counted twice.

A kill lands anywhere in a batch: before its Redis step, between the compare-and-set writes of
a pipeline, between the Redis step and producing the outbox, half-way through producing,
between producing and clearing the outbox, or after that but before the input offsets were
committed. Redelivery then re-applies nothing (event ids are in the state) and re-sends any
outbox still stored, so a notification id may appear twice on the topic with the same payload:
tolerated and reported (consumers drop repeats by id). The set of distinct notifications must
equal the oracles exactly.
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
    KillSwitch,
    alive,
    feeding,
    make_workload,
    pending_outboxes,
    seeded_rng,
    settle,
    tick,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LATENESS_S = 7 * DAY  # timers fire during the replay too, so kills hit timer batches as well
FEED_S = 35.0  # the replay is spread over the kill phase


@pytest.mark.timeout(240)
def test_worker_kill_9_under_load_loses_and_doubles_nothing(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    rng = seeded_rng("worker-kill")
    workload = make_workload(tmp_path, customers=200, days=420)
    assert workload.disorder_s < LATENESS_S
    env = make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S))
    worker = make_worker(env)
    worker.start()

    # Random moments, and moments picked by Redis keyspace events (KillSwitch): inside a save
    # pipeline, after an outbox write and before producing it, and after producing an outbox
    # and before clearing it (its re-send gives duplicate ids on the topic).
    plans = [None, ("state", 0.0), ("outbox", rng.uniform(0.0, 0.003)), ("produced", 0.0), None]
    kills: list[str] = []
    with feeding(broker.bootstrap, workload.records, FEED_S) as feeder:
        for number, plan in enumerate(plans, start=1):
            time.sleep(rng.uniform(0.5, 4.0))  # long enough, at times, for offsets to commit
            alive([worker])
            if plan is None:
                how = "at a random moment"
                worker.kill()
            else:
                switch = KillSwitch(aof_redis, worker, *plan, broker=broker).arm()
                how = switch.describe()
                try:
                    assert switch.fired.wait(20), f"not killed within 20 s ({how})"
                finally:
                    switch.disarm()
                worker.kill()  # reap it
            # An outbox still in Redis: this kill came after a Redis step and before confirm().
            kills.append(
                f"kill {number} {how}: {feeder.sent} published, "
                f"{len(pending_outboxes(aof_redis))} outboxes pending"
            )
            worker.start()
    faults_done = time.monotonic()

    tick(env, workload.last_event)  # every partition's clock to the end: its timers fire
    settle(broker, aof_redis, len(workload.records) + PARTITIONS, [worker], LATENESS_S)
    report = verify(
        "worker-kill", env, broker, aof_redis, workload, policy[1], lateness_s=LATENESS_S
    )
    report.notes.extend(kills)
    duplicates = worker.metrics().get('memberflow_events_total{outcome="duplicate"}', 0)
    report.notes.append(
        f"{len(workload.records)} messages; last worker saw {duplicates:.0f} duplicates "
        f"(redelivered or upstream); faults {faults_done - started:.1f}s, "
        f"total {time.monotonic() - started:.1f}s"
    )
    print(report.summary())
