"""Scenario 3: redis-server is killed with SIGKILL while a worker runs under load, and
restarted from its append-only file on the same port and dir, twice.

The worker must wait and retry (memberflow_redis_retries_total grows), neither crash nor ack
anything meanwhile, and end with exactly the oracle's state. A write in flight when Redis died
may or may not have been applied: the retried compare-and-set then loses, the customer is
reloaded and its events are found applied; its outbox is still there to be produced.

The AOF here is fsynced on every write (`appendfsync always`), so a write Redis acknowledged
survives the kill. With the production default `everysec` Redis fsyncs once a second: a crash of
its host (power, kernel) can lose up to about one second of writes it had acknowledged (a kill
of the process alone usually loses nothing, the kernel still holds what was written, unless a
slow fsync had made Redis postpone its write, up to 2 s). Kafka replay covers such a loss only
for input offsets not yet committed: a batch whose offsets were committed after its write was
acknowledged is not redelivered, and its events (and any unsent outbox) are gone from the
state. Use `appendfsync always`, or replicated Redis, where that second matters.
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
    feeding,
    make_workload,
    metric_sum,
    publish_all,
    retries,
    seeded_rng,
    settle,
    tick,
    verify,
    wait_drained,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LATENESS_S = 7 * DAY
FEED_S = 25.0
OUTAGES = 2


@pytest.mark.timeout(240)
def test_redis_kill_9_and_aof_restart_under_load(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    rng = seeded_rng("redis-restart")
    workload = make_workload(tmp_path, customers=200, days=420, seed=7)
    assert workload.disorder_s < LATENESS_S
    env = make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S))
    worker = make_worker(env)
    worker.start()
    pid = worker.pid

    notes: list[str] = []
    with feeding(broker.bootstrap, workload.records, FEED_S) as feeder:
        for number in range(1, OUTAGES + 1):
            time.sleep(rng.uniform(2.0, 6.0))
            before = retries(worker)
            aof_redis.kill()
            down_at, published = time.monotonic(), feeder.sent
            time.sleep(rng.uniform(1.5, 3.0))
            alive([worker])
            aof_redis.start()  # same port and dir: reloads the AOF
            notes.append(
                f"outage {number}: {time.monotonic() - down_at:.1f}s at {published} published; "
                f"worker retried {retries(worker) - before:.0f} times"
            )

    tick(env, workload.last_event)
    settle(broker, aof_redis, len(workload.records) + PARTITIONS, [worker], LATENESS_S)
    assert worker.pid == pid, "the worker was restarted"
    assert retries(worker) > 0
    report = verify(
        "redis-restart", env, broker, aof_redis, workload, policy[1], lateness_s=LATENESS_S
    )
    report.notes.extend(notes)
    report.notes.append(f"total {time.monotonic() - started:.1f}s")
    print(report.summary())


@pytest.mark.timeout(240)
def test_redis_refusing_writes_under_load_is_waited_for(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    """Redis up but refusing writes (maxmemory reached: OOM), then mended. The worker must
    wait, counting errors for the critical alert, and end with exactly the oracle's state; it
    used to exit at the first refusal (and, supervised, restart into the same refusal)."""
    import redis

    workload = make_workload(tmp_path, customers=200, days=420, seed=11)
    env = make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S))
    worker = make_worker(env)
    worker.start()
    pid = worker.pid
    admin = redis.Redis.from_url(aof_redis.url)
    try:
        with feeding(broker.bootstrap, workload.records, 15.0):
            time.sleep(4.0)
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", str(used))  # full: the next write is refused
            time.sleep(4.0)
            alive([worker])
            refused = metric_sum(worker, "memberflow_redis_errors_total")
            admin.config_set("maxmemory", "0")
    finally:
        admin.close()
    assert refused > 0, "no write was refused: the test did not test anything"
    tick(env, workload.last_event)
    settle(broker, aof_redis, len(workload.records) + PARTITIONS, [worker], LATENESS_S)
    assert worker.pid == pid, "the worker was restarted"
    report = verify(
        "redis-refuses", env, broker, aof_redis, workload, policy[1], lateness_s=LATENESS_S
    )
    report.notes.append(f"{refused:.0f} refused operations while memory was full")
    print(report.summary())


@pytest.mark.timeout(180)
def test_a_stalled_worker_exports_its_whole_backlog_as_lag(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    """Redis refusing every write stalls the worker; the lag it exports must grow with the
    backlog. Taken from the consumer's own high-water marks it froze once the worker's buffers
    were full (the consumer stops fetching then, so the marks stop moving): the second burst
    below never showed, and the lag alert never fired for the stuck worker it is for."""
    import redis

    records = make_workload(tmp_path, customers=1000, days=420, seed=17).records
    warm, first, second = records[:1000], records[1000:6000], records[6000:]
    assert len(second) > len(first) > 4096  # the first fills Faust's buffer (4096 events)
    worker = make_worker(make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S)))
    worker.start()
    publish_all(broker.bootstrap, warm)
    wait_drained(broker, len(warm), [worker])
    admin = redis.Redis.from_url(aof_redis.url)
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", str(int(admin.info("memory")["used_memory"])))
        publish_all(broker.bootstrap, first)
        time.sleep(6.0)  # fetched into the worker's buffers, which are then full
        publish_all(broker.bootstrap, second)
        backlog = len(first) + len(second)
        # Bad lines only need the broker, so a batch of them may still go through: not all of
        # the backlog is necessarily stuck, but nearly all of it is.
        lag = wait_for(
            f"exported lag near the backlog of {backlog}",
            lambda: (
                (lag := metric_sum(worker, "memberflow_consumer_lag_events")) >= 0.95 * backlog
                and lag
            ),
            timeout=20,
        )
        assert metric_sum(worker, "memberflow_redis_errors_total") > 0
        alive([worker])
        admin.config_set("maxmemory", "0")
    finally:
        admin.close()
    wait_drained(broker, len(records), [worker])
    print(f"[stalled] backlog {backlog}, exported lag {lag:.0f}")
