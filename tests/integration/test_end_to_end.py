"""The first end-to-end slice on a real broker, a real redis-server and a worker process.

A synthetic shop's history (shuffled, with duplicates and bad lines) is replayed twice through
`memberflow replay`; the export, the notifications topic and the dead-letter topic must equal
an independent batch computation over the same rows.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis
from memberflow.synthetic import add_noise, generate_history, write_csv, write_jsonl
from tests.integration.conftest import read_json_topic, run_cli, worker_env
from tests.oracle import batch_export, expected_upgrades, valid_rows

pytestmark = pytest.mark.integration

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


@pytest.mark.timeout(420)
def test_replay_twice_equals_batch_computation(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    rows = generate_history(customers=120, start=datetime(2025, 6, 1, tzinfo=UTC), days=420)
    noisy = add_noise(rows, seed=3, duplicates=60, bad=12, shuffle_window=25)
    good = [entry for entry in noisy if isinstance(entry, dict)]
    bad = [entry for entry in noisy if isinstance(entry, bytes)]
    csv_path, jsonl_path = tmp_path / "history.csv", tmp_path / "bad.jsonl"
    write_csv(good, csv_path)
    write_jsonl(bad, jsonl_path)

    env = worker_env(broker, redis_server, MEMBERFLOW_CLOCK="event")
    worker = make_worker(env)
    worker.start()
    for _ in range(2):  # a replay of the same history must change nothing the second time
        for path in (csv_path, jsonl_path):
            result = run_cli(env, "replay", "--quiet", str(path))
            assert result.returncode == 0, result.stderr
    published = 2 * (len(good) + len(bad))
    worker.wait_for_events(published)

    wall_now = datetime.now(UTC)
    accepted = valid_rows(good + good, wall_now)
    assert len(accepted) == 2 * len(good)  # the CSV carries no bad rows; bad.jsonl does
    as_of = max(datetime.fromisoformat(r["occurred_at"].replace("Z", "+00:00")) for r in accepted)
    expected = batch_export(accepted, as_of=as_of)

    exported = run_cli(env, "export")
    assert exported.returncode == 0, exported.stderr
    actual = {
        doc["customer_id"]: {field: doc[field] for field in EXPORT_FIELDS}
        for doc in map(json.loads, exported.stdout.splitlines())
    }
    assert len(actual) == len(expected) == 120
    mismatched = [cid for cid in expected if actual.get(cid) != expected[cid]]
    assert not mismatched, (
        mismatched[:3],
        [actual.get(c) for c in mismatched[:3]],
        [expected[c] for c in mismatched[:3]],
    )
    tiers = Counter(doc["tier"] for doc in actual.values())
    assert {"silver", "gold", "platinum"} <= set(tiers), tiers

    everything = read_json_topic(broker.bootstrap, "notifications")
    ids = Counter(n["notification_id"] for n in everything)
    assert [i for i, n in ids.items() if n > 1] == []  # nothing emitted twice
    # Lifecycle and repurchase notifications are checked by test_timeline_exactness.py.
    notifications = [n for n in everything if n["type"].startswith("tier_")]
    assert {
        (
            n["customer_id"],
            n["explanation"]["previous_tier"],
            n["explanation"]["new_tier"],
            n["cause"]["id"],
        )
        for n in notifications
    } == expected_upgrades(accepted)
    for n in notifications:
        assert n["type"] == "tier_upgraded"  # no downgrade within the grace of UPGRADE_ONLY
        assert set(n["explanation"]) >= {"rule", "inputs", "thresholds", "policy_version"}

    dead = read_json_topic(broker.bootstrap, "purchases.dlq")
    assert Counter(base64.b64decode(d["raw_b64"]) for d in dead) == Counter(bad + bad)
    assert all(d["reason"] and d["detail"] for d in dead)
    reasons = Counter(d["reason"] for d in dead)
    assert set(reasons) >= {
        "malformed_json",
        "invalid_amount",
        "schema_violation",
        "future_timestamp",
        "unknown_currency",
    }, reasons

    metrics = worker.metrics()
    assert metrics['memberflow_events_total{outcome="applied"}'] == len(
        {r["event_id"] for r in accepted}
    )
    assert metrics['memberflow_events_total{outcome="dead_lettered"}'] == 2 * len(bad)


@pytest.mark.timeout(240)
def test_customer_command_explains_tier(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    env = worker_env(broker, redis_server)
    worker = make_worker(env)
    worker.start()
    now = datetime.now(UTC).replace(microsecond=0)
    lines = [
        {
            "event_id": f"o{i}",
            "customer_id": "alice",
            "occurred_at": now.isoformat(),
            "amount": "400.00",
            "currency": "EUR",
            "items": [{"sku": "f-1", "category": "infant_formula", "quantity": 1}],
        }
        for i in range(4)
    ]
    path = tmp_path / "alice.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_cli(env, "replay", "--quiet", str(path)).returncode == 0
    worker.wait_for_events(4)

    shown = run_cli(env, "customer", "alice")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["tier"], view["frequency"], view["monetary"]) == ("gold", 4, "1600.00")
    assert view["categories"]["infant_formula"]["count"] == 4
    assert view["pending_notifications"] == []
    missing = run_cli(env, "customer", "nobody")
    assert missing.returncode == 1 and "no such customer" in missing.stderr
