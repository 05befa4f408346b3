"""The timeline oracle (tests/oracle_timeline.py) on hand-made histories with exact values, its
independence from the engine, and its agreement with the engine's pure rules on a synthetic
shop (the fast counterpart of tests/integration/test_timeline_exactness.py)."""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow.synthetic import add_noise, generate_history, purchase_json
from rules.customer import CustomerState, apply, epoch, evaluation_time, screen
from rules.policy import Policy, parse_policy
from rules.timeline import advance
from streams.codec import decode_event
from streams.events import Notification, NotificationType, Rejection, Tick
from tests.oracle import valid_rows
from tests.oracle_timeline import (
    customer_timelines,
    expected_timeline,
    quiet_hours_end,
    send_time,
    timeline_policy,
)

ROOT = Path(__file__).resolve().parents[2]
UNTIL = datetime(2025, 12, 31, tzinfo=UTC)
TIMELINE_TYPES = {
    NotificationType.LIFECYCLE_CHANGED,
    NotificationType.REPURCHASE_REMINDER,
    NotificationType.WIN_BACK_OFFER,
}


def default_document() -> dict[str, Any]:
    """The default policy with diapers on its configured interval (learning is no batch fact)."""
    document = yaml.safe_load((ROOT / "rules" / "default_policy.yaml").read_text())
    document["repurchase"]["categories"]["diapers"]["learn"] = False
    return document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The default policy (diapers not learning) plus two short cycles for the cap cases:
    baby_food reminds on day 7 (too late from day 21), clothing on day 7 (too late from day 13)."""
    document = default_document()
    promotion = {"description": "5 % off", "discount_percent": "5"}
    document["repurchase"]["categories"]["baby_food"] = {
        "interval_days": 14,
        "lead_days": 7,
        "promotion": promotion,
    }
    document["repurchase"]["categories"]["clothing"] = {
        "interval_days": 10,
        "lead_days": 3,
        "promotion": promotion,
    }
    parse_policy(yaml.safe_dump(document))  # a valid policy for the engine too
    return document


_numbers = iter(range(1, 1_000_000))


def buy(customer: str, at: str, *categories: str, event_id: str | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id or f"e{next(_numbers)}",
        "customer_id": customer,
        "occurred_at": at,
        "amount": "20.00",
        "currency": "EUR",
        "items": [{"sku": f"{c}-1", "category": c, "quantity": 1} for c in categories],
    }


def timeline(rows: list[dict[str, Any]], document: dict[str, Any]) -> list[tuple[str, str, str]]:
    (only,) = customer_timelines(rows, UNTIL, document).values()
    return only


def test_plain_formula_buyer(document: dict[str, Any]) -> None:
    # 2025-01-06T10:00Z is 11:00 in Berlin: no gate holds anything.
    assert timeline([buy("plain", "2025-01-06T10:00:00Z", "infant_formula")], document) == [
        ("2025-01-06T10:00:00Z", "lifecycle_changed", "new"),
        ("2025-01-20T10:00:00Z", "repurchase_reminder", "infant_formula"),  # day 21 - 7
        ("2025-03-07T10:00:00Z", "lifecycle_changed", "at_risk"),  # day 60
        ("2025-05-06T10:00:00Z", "win_back_offer", ""),  # day 120
        ("2025-07-05T10:00:00Z", "lifecycle_changed", "churned"),  # day 180
    ]


def test_quiet_hours_defer_to_eight_in_berlin_in_winter_and_summer(
    document: dict[str, Any],
) -> None:
    # 22:30 CET: the reminder waits for 08:00 CET (07:00Z) the next morning; the win-back is
    # due at 23:30 CEST and waits for 08:00 CEST (06:00Z). Lifecycle steps are not marketing.
    assert timeline([buy("night", "2025-01-06T21:30:00Z", "infant_formula")], document) == [
        ("2025-01-06T21:30:00Z", "lifecycle_changed", "new"),
        ("2025-01-21T07:00:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-03-07T21:30:00Z", "lifecycle_changed", "at_risk"),
        ("2025-05-07T06:00:00Z", "win_back_offer", ""),
        ("2025-07-05T21:30:00Z", "lifecycle_changed", "churned"),
    ]
    # 07:00 CET is quiet (same morning's 08:00); 08:00 CEST on the dot is not.
    assert timeline([buy("early", "2025-01-06T06:00:00Z", "infant_formula")], document) == [
        ("2025-01-06T06:00:00Z", "lifecycle_changed", "new"),
        ("2025-01-20T07:00:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-03-07T06:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-05-06T06:00:00Z", "win_back_offer", ""),
        ("2025-07-05T06:00:00Z", "lifecycle_changed", "churned"),
    ]


def test_frequency_cap_defers_the_third_message_of_a_week(document: dict[str, Any]) -> None:
    rows = [
        buy("capped", "2025-01-06T10:00:00Z", "diapers"),  # reminder 01-31 10:00Z
        buy("capped", "2025-01-17T09:00:00Z", "infant_formula"),  # reminder 01-31 09:00Z
        buy("capped", "2025-01-24T11:00:00Z", "baby_food"),  # reminder 01-31 11:00Z: third
    ]
    assert timeline(rows, document) == [
        ("2025-01-06T10:00:00Z", "lifecycle_changed", "new"),
        ("2025-01-17T09:00:00Z", "lifecycle_changed", "active"),
        ("2025-01-31T09:00:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-01-31T10:00:00Z", "repurchase_reminder", "diapers"),
        # two sent since 01-24 11:00Z: wait until the older is 7 days old
        ("2025-02-07T09:00:00Z", "repurchase_reminder", "baby_food"),
        ("2025-03-25T11:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-05-24T11:00:00Z", "win_back_offer", ""),
        ("2025-07-23T11:00:00Z", "lifecycle_changed", "churned"),
    ]


def test_a_reminder_deferred_past_its_usefulness_is_dropped(document: dict[str, Any]) -> None:
    rows = [
        buy("too-late", "2025-01-06T10:00:00Z", "diapers"),
        buy("too-late", "2025-01-17T09:00:00Z", "infant_formula"),
        # due 01-31 11:00Z, capped to 02-07 09:00Z, but useless from 02-06 11:00Z (10 + 3 days)
        buy("too-late", "2025-01-24T11:00:00Z", "clothing"),
    ]
    assert timeline(rows, document) == [
        ("2025-01-06T10:00:00Z", "lifecycle_changed", "new"),
        ("2025-01-17T09:00:00Z", "lifecycle_changed", "active"),
        ("2025-01-31T09:00:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-01-31T10:00:00Z", "repurchase_reminder", "diapers"),
        ("2025-03-25T11:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-05-24T11:00:00Z", "win_back_offer", ""),
        ("2025-07-23T11:00:00Z", "lifecycle_changed", "churned"),
    ]


def test_same_second_reminders_go_in_category_order(document: dict[str, Any]) -> None:
    rows = [
        buy("order", "2024-12-27T22:00:00Z", "diapers"),  # due 01-21 23:00 CET: quiet
        buy("order", "2025-01-07T23:00:00Z", "infant_formula"),  # due 01-22 00:00 CET: quiet
        buy("order", "2025-01-08T10:00:00Z", "baby_food"),  # sent 01-15 10:00Z
    ]
    # Both wait for 08:00 CET on 01-22; one more fits in the week: diapers (first by name),
    # then infant_formula once the baby_food reminder is 7 days old.
    assert timeline(rows, document) == [
        ("2024-12-27T22:00:00Z", "lifecycle_changed", "new"),
        ("2025-01-07T23:00:00Z", "lifecycle_changed", "active"),
        ("2025-01-15T10:00:00Z", "repurchase_reminder", "baby_food"),
        ("2025-01-22T07:00:00Z", "repurchase_reminder", "diapers"),
        ("2025-01-22T10:00:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-03-09T10:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-05-08T10:00:00Z", "win_back_offer", ""),
        ("2025-07-07T10:00:00Z", "lifecycle_changed", "churned"),
    ]


def test_cap_then_quiet_hours_across_the_summer_time_change(document: dict[str, Any]) -> None:
    rows = [
        buy("dst", "2025-03-01T19:00:00Z", "diapers"),  # reminder 03-26 19:00Z (20:00 CET)
        buy("dst", "2025-03-11T19:30:00Z", "infant_formula"),  # reminder 03-25 19:30Z
        buy("dst", "2025-03-20T19:00:00Z", "baby_food"),  # reminder 03-27 19:00Z: capped
    ]
    # Capped to 04-01 19:30Z, which is 21:30 CEST after the change: quiet until 08:00 CEST.
    # The win-back is due at 21:00 CEST on the dot: quiet too.
    assert timeline(rows, document) == [
        ("2025-03-01T19:00:00Z", "lifecycle_changed", "new"),
        ("2025-03-11T19:30:00Z", "lifecycle_changed", "active"),
        ("2025-03-25T19:30:00Z", "repurchase_reminder", "infant_formula"),
        ("2025-03-26T19:00:00Z", "repurchase_reminder", "diapers"),
        ("2025-04-02T06:00:00Z", "repurchase_reminder", "baby_food"),
        ("2025-05-19T19:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-07-19T06:00:00Z", "win_back_offer", ""),
        ("2025-09-16T19:00:00Z", "lifecycle_changed", "churned"),
    ]


def test_a_newer_purchase_moves_a_scheduled_or_deferred_reminder(
    document: dict[str, Any],
) -> None:
    rows = [
        buy("moved", "2025-01-06T10:00:00Z", "infant_formula"),
        buy("moved", "2025-01-16T10:00:00Z", "infant_formula"),  # before day 14: moved
    ]
    assert [t for t in timeline(rows, document) if t[1] == "repurchase_reminder"] == [
        ("2025-01-30T10:00:00Z", "repurchase_reminder", "infant_formula"),
    ]
    rows = [
        buy("waiting", "2025-01-06T21:30:00Z", "infant_formula"),  # due 01-20, waits for 01-21
        buy("waiting", "2025-01-21T06:00:00Z", "infant_formula"),  # bought while it waited
    ]
    assert [t for t in timeline(rows, document) if t[1] == "repurchase_reminder"] == [
        ("2025-02-04T07:00:00Z", "repurchase_reminder", "infant_formula"),  # 07:00 CET: quiet
    ]


def test_lifecycle_steps_and_a_purchase_at_the_due_second(document: dict[str, Any]) -> None:
    rows = [
        buy("cycle", "2025-10-02T10:00:00Z", "toys"),
        buy("cycle", "2025-03-07T10:00:00Z", "toys"),  # exactly day 60: at risk first
        buy("cycle", "2025-10-01T10:00:00Z", "toys", event_id="again"),
        buy("cycle", "2025-01-06T10:00:00Z", "toys"),
        buy("cycle", "2025-10-01T10:00:00Z", "toys", event_id="again"),  # a duplicate
    ]
    assert timeline(rows, document) == [
        ("2025-01-06T10:00:00Z", "lifecycle_changed", "new"),
        ("2025-03-07T10:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-03-07T10:00:00Z", "lifecycle_changed", "active"),
        ("2025-05-06T10:00:00Z", "lifecycle_changed", "at_risk"),
        ("2025-07-05T10:00:00Z", "win_back_offer", ""),
        ("2025-09-03T10:00:00Z", "lifecycle_changed", "churned"),
        ("2025-10-01T10:00:00Z", "lifecycle_changed", "reactivated"),
        ("2025-10-02T10:00:00Z", "lifecycle_changed", "active"),
        ("2025-12-01T10:00:00Z", "lifecycle_changed", "at_risk"),
        # the win-back for 10-02 is due 2026-01-30, after UNTIL
    ]
    assert ("cycle", "lifecycle_changed", "new", "2025-01-06T10:00:00Z") in expected_timeline(
        rows, UNTIL, document
    )


def test_gates_directly(document: dict[str, Any]) -> None:
    policy = timeline_policy(document)
    evening = epoch(datetime(2025, 1, 6, 19, 59, 59, tzinfo=UTC))  # 20:59:59 CET
    assert quiet_hours_end(evening, policy) is None
    assert quiet_hours_end(evening + 1, policy) == epoch(datetime(2025, 1, 7, 7, tzinfo=UTC))
    # Two sends in the week: wait until the older one is 7 days old ...
    sent = [evening - 6 * 86_400, evening - 3 * 86_400]
    assert send_time(sent, evening, policy) == evening + 86_400
    assert send_time(sent[1:], evening, policy) == evening
    # ... and if that is in quiet hours, until they end.
    assert send_time([s + 1 for s in sent], evening, policy) == epoch(
        datetime(2025, 1, 8, 7, tzinfo=UTC)
    )


def test_a_learning_category_is_refused() -> None:
    document = default_document()
    document["repurchase"]["categories"]["diapers"]["learn"] = True
    with pytest.raises(ValueError, match="diapers learns its interval"):
        timeline_policy(document)


def test_the_oracle_is_independent_of_the_engine() -> None:
    tree = ast.parse((ROOT / "tests" / "oracle_timeline.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported, "no imports found: the check would pass vacuously"
    assert not {
        name
        for name in imported
        if name.split(".")[0] in {"rules", "state", "streams", "memberflow", "agents"}
    }


# -- the oracle against the engine's pure rules ------------------------------------------------


def _engine_timeline(
    entries: list[Any], policy: Policy, until: datetime, wall: datetime
) -> Iterator[tuple[str, str, str, str]]:
    """decode -> screen -> advance to the event -> apply, per customer in stream order, as the
    worker's fold does in `event` mode; then advance every customer to `until`."""
    states: dict[str, CustomerState] = {}
    notes: list[Notification] = []
    for entry in entries:
        event = decode_event(entry if isinstance(entry, bytes) else purchase_json(entry))
        if isinstance(event, Rejection | Tick):
            continue
        state = states.get(event.customer_id)
        now = evaluation_time("event", state, event, epoch(wall))
        if screen(event, policy, now, epoch(wall)) is not None:
            continue
        if state is not None:
            moved = advance(state, policy, now)
            state = moved.state
            notes.extend(moved.notifications)
        decision = apply(state, event, policy, now)
        if decision.changed:
            assert decision.state is not None
            states[event.customer_id] = decision.state
            notes.extend(decision.notifications)
    for state in states.values():
        notes.extend(advance(state, policy, epoch(until)).notifications)
    for note in notes:
        if note.type in TIMELINE_TYPES:
            detail = note.explanation.get("new_stage") or note.explanation.get("category") or ""
            at = note.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            yield note.customer_id, note.type.value, detail, at


def test_oracle_and_engine_rules_agree_on_a_synthetic_shop() -> None:
    document = default_document()
    policy = parse_policy(yaml.safe_dump(document))
    rows = generate_history(customers=150, start=datetime(2024, 1, 1, tzinfo=UTC), days=400)
    noisy = add_noise(rows, seed=11, duplicates=50, bad=12, shuffle_window=0)
    wall = datetime(2026, 1, 1, tzinfo=UTC)
    until = datetime(2025, 12, 31, tzinfo=UTC)
    engine = list(_engine_timeline(noisy, policy, until, wall))
    assert len(engine) == len(set(engine))
    expected = expected_timeline(valid_rows(noisy, wall), until, copy.deepcopy(document))
    assert set(engine) == expected
    kinds = {kind for _, kind, _, _ in expected}
    assert kinds == {"lifecycle_changed", "repurchase_reminder", "win_back_offer"}
