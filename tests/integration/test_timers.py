"""Time-driven behaviour on a real broker and Redis, in `event` clock mode.

A formula buyer gets exactly one day-14 reminder; one who repurchased on day 10 gets none for
the first can (and one for the second); at-risk and churned transitions fire with no further
events for those customers; and timers that come due while every worker is down fire exactly
once after restart.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis
from tests.integration.conftest import read_json_topic, run_cli, worker_env

pytestmark = pytest.mark.integration

BASE = datetime(2025, 1, 6, 10, 0, tzinfo=UTC)  # 11:00 in Berlin: outside quiet hours


def _purchase(event_id: str, customer: str, day: int, category: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "customer_id": customer,
        "occurred_at": (BASE + timedelta(days=day)).isoformat(),
        "amount": "25.00",
        "currency": "EUR",
        "items": [{"sku": f"{category}-1", "category": category, "quantity": 1}],
    }


def _wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(300)
def test_reminders_and_lifecycle_fire_once_across_a_restart(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    env = worker_env(
        broker,
        redis_server,
        MEMBERFLOW_CLOCK="event",
        MEMBERFLOW_TIMER_LATENESS_S="3600",
        MEMBERFLOW_TIMER_POLL_S="0.5",
    )
    purchases = [
        _purchase("a-1", "formula-a", 0, "infant_formula"),
        _purchase("b-1", "formula-b", 0, "infant_formula"),
        _purchase("b-2", "formula-b", 10, "infant_formula"),
        _purchase("t-1", "toys-only", 0, "toys"),
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in purchases))

    first = make_worker(env, name="first")
    first.start()
    assert run_cli(env, "replay", "--quiet", str(path)).returncode == 0
    first.wait_for_events(len(purchases))
    first.stop(timeout=30)

    # While no worker runs, event time moves 200 days on: every timer below comes due then.
    tick = run_cli(env, "tick", (BASE + timedelta(days=200)).isoformat())
    assert tick.returncode == 0, tick.stderr

    second = make_worker(env, name="second")
    second.start()
    expected_timer_notes = 11  # see the table asserted below

    def timer_notes() -> list[dict[str, Any]]:
        notes = read_json_topic(broker.bootstrap, "notifications")
        timed = [n for n in notes if n["cause"]["kind"] == "timer"]
        return notes if len(timed) >= expected_timer_notes else []

    notes = _wait_for(timer_notes)
    # A third worker after a second tick at the same time: nothing fires twice.
    second.stop(timeout=30)
    assert run_cli(env, "tick", (BASE + timedelta(days=200)).isoformat()).returncode == 0
    third = make_worker(env, name="third")
    third.start()
    time.sleep(4)
    notes = read_json_topic(broker.bootstrap, "notifications")

    ids = Counter(n["notification_id"] for n in notes)
    assert [i for i, count in ids.items() if count > 1] == []

    def day(note: dict[str, Any]) -> int:
        at = datetime.fromisoformat(note["occurred_at"].replace("Z", "+00:00"))
        return (at - BASE).days

    timed = sorted(
        (n["customer_id"], n["type"], n["explanation"].get("new_stage", ""), day(n))
        for n in notes
        if n["cause"]["kind"] == "timer"
    )
    assert timed == sorted(
        [
            ("formula-a", "repurchase_reminder", "", 14),
            ("formula-a", "lifecycle_changed", "at_risk", 60),
            ("formula-a", "win_back_offer", "", 120),
            ("formula-a", "lifecycle_changed", "churned", 180),
            # the day-10 purchase moved the first can's reminder to day 24
            ("formula-b", "repurchase_reminder", "", 24),
            ("formula-b", "lifecycle_changed", "at_risk", 70),
            ("formula-b", "win_back_offer", "", 130),
            ("formula-b", "lifecycle_changed", "churned", 190),
            # toys have no repurchase cycle: lifecycle and win-back only
            ("toys-only", "lifecycle_changed", "at_risk", 60),
            ("toys-only", "win_back_offer", "", 120),
            ("toys-only", "lifecycle_changed", "churned", 180),
        ]
    )
    reminder = next(
        n for n in notes if n["type"] == "repurchase_reminder" and n["customer_id"] == "formula-a"
    )
    promotion = reminder["explanation"]["promotion"]
    assert promotion["discount_percent"] == "20"
    assert promotion["applies_to"] == "other_categories"
    assert day({"occurred_at": promotion["valid_until"]}) == 21

    shown = run_cli(env, "customer", "formula-a")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["lifecycle"] == "churned"
    # only the window expiry is left (the purchase leaves the 365-day window), and the end of
    # the duplicate check for its event id
    assert [t["kind"] for t in view["pending_timers"]] == ["window_expiry", "memory_expiry"]
