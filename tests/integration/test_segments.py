"""Population-relative segmentation with two worker processes on a real broker and Redis.

After a replay, a final snapshot published on demand and the relabelling it triggers, every
customer's RFM type, 1-5 scores and grade in `memberflow export` must equal an independent
batch classification of the exported R/F/M values; and the snapshot's means and quintile cut
points must equal a batch computation over the same customers (exactly: the statistics are
exact, not sketched).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from memberflow.services import LocalBroker, LocalRedis, free_port
from memberflow.synthetic import generate_history, write_csv
from tests.integration.conftest import run_cli, worker_env
from tests.oracle import batch_export

pytestmark = pytest.mark.integration

GRADES = {
    "important_value": "A",
    "important_development": "A",
    "important_retention": "A",
    "important_win_back": "B",
    "general_value": "B",
    "general_development": "B",
    "general_retention": "C",
    "general_win_back": "C",
}
TYPES = {
    (True, True, True): "important_value",
    (True, False, True): "important_development",
    (False, True, True): "important_retention",
    (False, False, True): "important_win_back",
    (True, True, False): "general_value",
    (True, False, False): "general_development",
    (False, True, False): "general_retention",
    (False, False, False): "general_win_back",
}


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def _batch(values: dict[str, tuple[int, int, int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Means, nearest-rank 20/40/60/80 % cut points, and each customer's type/scores/grade."""
    n = len(values)
    means, cuts = {}, {}
    for i, dim in enumerate("rfm"):
        column = sorted(v[i] for v in values.values())
        means[dim] = sum(column) / n
        cuts[dim] = [column[-(-n * p // 100) - 1] for p in (20, 40, 60, 80)]
    labels = {}
    for cid, v in values.items():
        scores = {d: 1 + sum(v[i] > c for c in cuts[d]) for i, d in enumerate("rfm")}
        flags = tuple(v[i] > means[d] for i, d in enumerate("rfm"))
        rfm_type = TYPES[flags]
        labels[cid] = {"rfm_type": rfm_type, "rfm_scores": scores, "grade": GRADES[rfm_type]}
    return {"means": means, "cuts": cuts}, labels


# CI replays a 400-customer shop; MF_SEGMENT_CUSTOMERS=20000 runs the same check at the size
# issue 4 asks for (a few minutes on two cores).
CUSTOMERS = int(os.environ.get("MF_SEGMENT_CUSTOMERS", "400"))


@pytest.mark.timeout(420 + CUSTOMERS // 20)
def test_two_workers_label_customers_as_a_batch_computation_would(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    rows = generate_history(customers=CUSTOMERS, start=datetime(2025, 3, 1, tzinfo=UTC), days=400)
    write_csv(rows, tmp_path / "history.csv")
    env = worker_env(
        broker,
        redis_server,
        MEMBERFLOW_CLOCK="event",
        MEMBERFLOW_TIMER_LATENESS_S="0",
        MEMBERFLOW_SNAPSHOT_CHECK_S="1",
        MEMBERFLOW_TIMER_POLL_S="0.5",
    )
    workers = [
        make_worker({**env, "MEMBERFLOW_WEB_PORT": str(port)}, name=f"w{port}")
        for port in (int(env["MEMBERFLOW_WEB_PORT"]), free_port())
    ]
    for worker in workers:
        worker.start()
    assert run_cli(env, "replay", "--quiet", str(tmp_path / "history.csv")).returncode == 0
    deadline = time.monotonic() + 180 + len(rows) / 500
    while sum(w.events_seen() for w in workers) < len(rows):
        assert time.monotonic() < deadline, "workers did not process the replay"
        time.sleep(0.5)

    end = max(_epoch(r["occurred_at"]) for r in rows) + 86400
    as_of = datetime.fromtimestamp(end, UTC).isoformat()
    assert run_cli(env, "tick", as_of).returncode == 0
    client = redis.Redis.from_url(redis_server.url)

    def settled() -> bool:
        # Every partition's clock reached the tick and nothing is due up to it.
        clocks = [client.get(f"mf:{{t:{p}}}:clock") for p in range(4)]
        due = sum(client.zcount(f"mf:{{t:{p}}}:due", "-inf", end) for p in range(4))
        return all(c is not None and int(c) >= end for c in clocks) and due == 0

    def wait_settled() -> None:
        limit = time.monotonic() + 120 + CUSTOMERS / 50
        while not settled():
            if time.monotonic() > limit:
                detail = {
                    p: (
                        client.get(f"mf:{{t:{p}}}:clock"),
                        client.zrangebyscore(
                            f"mf:{{t:{p}}}:due", "-inf", end, withscores=True, start=0, num=5
                        ),
                    )
                    for p in range(4)
                }
                raise AssertionError(f"timers did not settle by {end}: {detail}")
            time.sleep(0.5)

    wait_settled()
    published = run_cli(env, "segments", "--publish", "--json")
    assert published.returncode == 0, published.stderr
    snapshot = json.loads(published.stdout)["snapshot"]
    assert json.loads(published.stdout)["published_now"]
    time.sleep(1.0)
    wait_settled()  # the relabelling wake-ups are processed like timers

    exported = run_cli(env, "export", "--as-of", as_of)
    assert exported.returncode == 0, exported.stderr
    docs = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(docs) == CUSTOMERS
    values = {
        d["customer_id"]: (
            _epoch(d["last_purchase_at"]),
            d["frequency"],
            int(Decimal(d["monetary"]) * 100),
        )
        for d in docs
    }
    stats, expected = _batch(values)
    assert snapshot["customers"] == CUSTOMERS
    assert snapshot["cuts"] == {d: list(c) for d, c in stats["cuts"].items()}
    for d in "rfm":
        assert snapshot["means"][d] == pytest.approx(stats["means"][d], rel=1e-12)
    actual = {
        d["customer_id"]: {
            "rfm_type": d["rfm_type"],
            "rfm_scores": d["rfm_scores"],
            "grade": d["grade"],
        }
        for d in docs
    }
    wrong = [cid for cid in expected if actual[cid] != expected[cid]]
    assert wrong == [], [(cid, values[cid], actual[cid], expected[cid]) for cid in wrong[:5]]
    # Tiers too: the R/F/M oracle over the same history (downgrades out of reach here).
    oracle = batch_export(rows, as_of=datetime.fromtimestamp(end, UTC))
    assert {d["customer_id"]: d["tier"] for d in docs} == {
        cid: doc["tier"] for cid, doc in oracle.items()
    }
    types = Counter(label["rfm_type"] for label in actual.values())
    assert len(types) >= 5, types  # the synthetic shop spreads over most types

    shown = run_cli(env, "segments")
    assert shown.returncode == 0 and "important_value" in shown.stdout
    assert (
        sum(
            w.metrics().get('memberflow_notifications_total{type="segment_changed"}', 0)
            for w in workers
        )
        > 0
    )


@pytest.mark.timeout(300)
def test_a_new_policy_version_relabels_through_the_stream(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    from tests.integration.conftest import UPGRADE_ONLY, policy_variant, read_json_topic

    now = datetime.now(UTC).replace(microsecond=0)
    lines = [
        {
            "event_id": f"{cid}-{i}",
            "customer_id": cid,
            "occurred_at": now.isoformat(),
            "amount": amount,
            "currency": "EUR",
        }
        for cid, amount in (("low", "20.00"), ("mid", "60.00"), ("high", "400.00"))
        for i in range(2)
    ]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = worker_env(
        broker, redis_server, MEMBERFLOW_SNAPSHOT_CHECK_S="1", MEMBERFLOW_TIMER_POLL_S="0.5"
    )
    first = make_worker(env, name="v1")
    first.start()
    assert run_cli(env, "replay", "--quiet", str(path)).returncode == 0
    first.wait_for_events(len(lines))
    first.stop(timeout=30)
    before = {n["notification_id"] for n in read_json_topic(broker.bootstrap, "notifications")}

    # Version 2 lowers silver to 100 EUR: only "mid" moves (from member to silver).
    silver = {"name": "silver", "min_window_spend": "100", "min_window_orders": 2}
    doc_tiers = [
        {"name": "member"},
        silver,
        {"name": "gold", "min_window_spend": "1000", "min_window_orders": 4},
        {"name": "platinum", "min_window_spend": "3000", "min_window_orders": 8},
    ]
    v2 = policy_variant(
        {**UPGRADE_ONLY, "version": "v2-test", "tiers": doc_tiers}, tmp_path / "v2.yaml"
    )
    assert run_cli(env, "rules", "check", str(v2)).returncode == 0
    second = make_worker({**env, "MEMBERFLOW_RULES_FILE": str(v2)}, name="v2")
    second.start()
    deadline = time.monotonic() + 60
    while True:
        new = [
            n
            for n in read_json_topic(broker.bootstrap, "notifications")
            if n["notification_id"] not in before and n["type"].startswith("tier_")
        ]
        if new or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2)  # anything else it would wrongly send arrives meanwhile
    new = [
        n
        for n in read_json_topic(broker.bootstrap, "notifications")
        if n["notification_id"] not in before and n["type"].startswith("tier_")
    ]
    assert [
        (n["customer_id"], n["type"], n["explanation"]["new_tier"], n["policy_version"])
        for n in new
    ] == [("mid", "tier_upgraded", "silver", "v2-test")]
    assert new[0]["cause"]["kind"] == "snapshot"
    shown = json.loads(
        run_cli({**env, "MEMBERFLOW_RULES_FILE": str(v2)}, "customer", "high").stdout
    )
    assert shown["tier"] == "silver"  # unchanged: no notification for it
