"""Scale-out: the same history through 1 worker and through 3 workers over 6 partitions gives
identical exports (R/F/M, tiers, lifecycle, segments against the final snapshot)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis, free_port
from memberflow.synthetic import generate_history, write_csv
from tests.integration.conftest import run_cli, wait_timers_settled, worker_env

pytestmark = pytest.mark.integration

COMPARED = (
    "customer_id",
    "first_purchase_at",
    "last_purchase_at",
    "recency_days",
    "frequency",
    "monetary",
    "lifetime_orders",
    "lifetime_spend",
    "tier",
    "lifecycle",
    "rfm_type",
    "rfm_scores",
    "grade",
    "categories",
)


def _run(
    tmp: Path, history: Path, events: int, workers: int, make_worker: Any, as_of: str
) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """The export, and the events each worker processed."""
    with (
        LocalBroker(workdir=tmp / "broker") as broker,
        LocalRedis(workdir=tmp / "redis") as redis_server,
    ):
        env = worker_env(
            broker,
            redis_server,
            MEMBERFLOW_CLOCK="event",
            MEMBERFLOW_PARTITIONS="6",
            MEMBERFLOW_TIMER_LATENESS_S="0",
        )
        started = []
        for _ in range(workers):
            worker = make_worker(
                {**env, "MEMBERFLOW_WEB_PORT": str(free_port())}, name=f"{tmp.name}-w"
            )
            worker.start()
            started.append(worker)
        assert run_cli(env, "replay", "--quiet", str(history)).returncode == 0
        deadline = time.monotonic() + 240
        while sum(w.events_seen() for w in started) < events:
            assert time.monotonic() < deadline, "the workers did not process the history"
            time.sleep(0.5)
        until = int(datetime.fromisoformat(as_of).timestamp())
        assert run_cli(env, "tick", as_of).returncode == 0
        wait_timers_settled(redis_server.url, 6, until)
        # publish returns once the customers it relabels are in the timer index
        assert run_cli(env, "segments", "--publish").returncode == 0
        wait_timers_settled(redis_server.url, 6, until)
        exported = run_cli(env, "export", "--as-of", as_of)
        assert exported.returncode == 0, exported.stderr
        seen = [worker.events_seen() for worker in started]
        for worker in started:
            worker.stop(timeout=30)
    return {
        doc["customer_id"]: {field: doc[field] for field in COMPARED}
        for doc in map(json.loads, exported.stdout.splitlines())
    }, seen


@pytest.mark.timeout(600)
def test_one_and_three_workers_give_identical_exports(tmp_path: Path, make_worker: Any) -> None:
    rows = generate_history(customers=200, start=datetime(2025, 4, 1, tzinfo=UTC), days=400)
    history = tmp_path / "history.csv"
    write_csv(rows, history)
    last = max(datetime.fromisoformat(r["occurred_at"].replace("Z", "+00:00")) for r in rows)
    as_of = last.replace(microsecond=0).isoformat()
    one, _ = _run(tmp_path / "one", history, len(rows), 1, make_worker, as_of)
    three, seen = _run(tmp_path / "three", history, len(rows), 3, make_worker, as_of)
    # The history really was shared: every worker processed part of it.
    assert all(count > 0 for count in seen), seen
    assert len(one) == 200
    assert set(three) == set(one)
    assert all(doc["rfm_type"] for doc in one.values())
    differing = [cid for cid in one if one[cid] != three.get(cid)]
    assert differing == [], [(one[c], three.get(c)) for c in differing[:3]]
