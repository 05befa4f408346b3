"""Scenario 5: timers that came due while every worker was down fire exactly once, even when
the worker that fires them is killed with SIGKILL right as it starts, again and again.

Event time moves 200 days on (`memberflow tick`) while no worker runs, so on restart nearly
every customer has lifecycle, win-back and reminder timers due at once. The restarted worker is
killed the moment it writes its first customer (inside the save pipeline of its first timer
batch), then right after it writes an outbox (before producing it), then right after it
cleared the outboxes of a batch it produced (before the timer index update); a last worker
finishes.
A firing is a compare-and-set state change together with its outbox, so a timer fired before
a kill is not fired again (the state says so) and its unsent outbox is produced by the next
worker: the same notification id possibly twice, never a second decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis, WorkerProcess
from tests.faults.harness import (
    DAY,
    PARTITIONS,
    KillSwitch,
    due_timers,
    make_workload,
    pending_outboxes,
    run_cli,
    seeded_rng,
    settle,
    tick,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LATENESS_S = 7 * DAY
DOWNTIME = timedelta(days=200)  # of event time: past at-risk (60), win-back (120), churn (180)


@pytest.mark.timeout(240)
def test_timers_due_while_down_fire_once_across_kill_9(
    tmp_path: Path,
    broker: LocalBroker,
    aof_redis: LocalRedis,
    policy: tuple[Path, dict[str, Any]],
    make_env: Callable[..., dict[str, str]],
    make_worker: Callable[..., WorkerProcess],
) -> None:
    started = time.monotonic()
    rng = seeded_rng("timer-crash")
    workload = make_workload(tmp_path, customers=300, days=60, seed=10, duplicates=20, bad=6)
    assert workload.disorder_s < LATENESS_S
    env = make_env(MEMBERFLOW_TIMER_LATENESS_S=str(LATENESS_S))

    first = make_worker(env, name="first")
    first.start()
    replayed = run_cli(env, "replay", "--quiet", str(tmp_path / "history.jsonl"))
    assert replayed.returncode == 0, replayed.stderr
    settle(broker, aof_redis, len(workload.records), [first], LATENESS_S)
    first.stop(timeout=30)

    until = workload.last_event + DOWNTIME
    tick(env, until)  # no worker runs: the timers come due now, unseen

    notes: list[str] = []
    plans = [
        ("state", 0.0),
        ("outbox", rng.uniform(0.0, 0.003)),
        ("confirm", 0.0),
    ]
    for number, plan in enumerate(plans, start=1):
        worker = make_worker(env, name=f"restart-{number}")
        switch = KillSwitch(aof_redis, worker, *plan).arm()
        try:
            try:
                worker.start()
            except RuntimeError:
                assert switch.fired.is_set(), "the worker failed to start by itself"
            fired = switch.fired.wait(15)
        finally:
            switch.disarm()
        worker.kill()
        notes.append(
            f"restart {number}: "
            + (f"{switch.describe()}; " if fired else "nothing left to fire, not killed; ")
            + f"{len(pending_outboxes(aof_redis))} outboxes pending, "
            f"{due_timers(aof_redis, LATENESS_S)} customers still due"
        )
        assert fired or number > 1, "the first restart fired no timer"

    last = make_worker(env, name="last")
    last.start()
    settle(broker, aof_redis, len(workload.records) + PARTITIONS, [last], LATENESS_S)
    report = verify(
        "timer-crash", env, broker, aof_redis, workload, policy[1], LATENESS_S, as_of=until
    )
    timed = sum(1 for n in report.by_type if n != "tier_upgraded")
    assert timed and report.by_type.get("win_back_offer", 0) > 0
    report.notes.extend(notes)
    report.notes.append(f"total {time.monotonic() - started:.1f}s")
    print(report.summary())
