"""The synthetic shop (deterministic, realistic enough to reach every tier), the noise it adds,
and the independent oracle: exact values on a hand-written example, and agreement with the
engine's fold on a noisy synthetic stream."""

from __future__ import annotations

import ast
import json
import re
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow.replay import iter_history
from memberflow.synthetic import (
    BAD_KINDS,
    BEHAVIOURS,
    CATEGORIES,
    FORMULA_BUYER,
    add_noise,
    customer_behaviours,
    generate_history,
    purchase_json,
    write_csv,
    write_jsonl,
)
from rules.customer import apply, epoch, evaluation_time, screen, summarize
from rules.policy import Policy, parse_policy
from streams.codec import decode_event
from streams.events import NotificationType, Purchase, Rejection, RejectReason
from tests import oracle
from tests.oracle import batch_export, expected_upgrades, is_valid_row, valid_rows

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2025, 1, 1, tzinfo=UTC)
WALL = datetime(2026, 3, 1, tzinfo=UTC)
AS_OF = datetime(2026, 2, 5, tzinfo=UTC)
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


@pytest.fixture(scope="module")
def history() -> list[dict[str, str]]:
    return generate_history(200, START, 400, seed=7)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy((ROOT / "rules" / "default_policy.yaml").read_text())


# -- the synthetic shop ----------------------------------------------------------------------


def test_same_seed_same_history_other_seed_other_history(history: list[dict[str, str]]) -> None:
    assert generate_history(200, START, 400, seed=7) == history
    assert generate_history(200, START, 400, seed=8) != history
    # A naive start is UTC.
    assert generate_history(20, START.replace(tzinfo=None), 60) == generate_history(20, START, 60)


def test_rows_are_well_formed_sorted_and_unique(history: list[dict[str, str]]) -> None:
    assert len({row["event_id"] for row in history}) == len(history)
    assert [row["occurred_at"] for row in history] == sorted(row["occurred_at"] for row in history)
    end = START + timedelta(days=400)
    for row in history:
        assert set(row) == {
            "event_id",
            "customer_id",
            "occurred_at",
            "amount",
            "currency",
            "category",
            "sku",
            "quantity",
        }
        assert all(isinstance(value, str) for value in row.values())
        assert re.fullmatch(r"7-\d+", row["event_id"])
        assert re.fullmatch(r"cust-\d{5}", row["customer_id"])
        assert re.fullmatch(r"\d+\.\d\d", row["amount"])
        assert row["category"] in CATEGORIES and row["currency"] == "EUR"
        assert START <= datetime.fromisoformat(row["occurred_at"]) < end
        assert row["occurred_at"].endswith("Z")
        assert is_valid_row(row, WALL)
    for row in history[:200]:
        assert isinstance(decode_event(purchase_json(row)), Purchase)


def test_every_behaviour_is_present() -> None:
    behaviours = customer_behaviours(200)
    assert sorted(behaviours) == [f"cust-{n:05d}" for n in range(1, 201)]
    assert set(behaviours.values()) == set(BEHAVIOURS)
    assert Counter(customer_behaviours(3).values()) == Counter(BEHAVIOURS[:3])
    assert customer_behaviours(0) == {}


def test_customers_reach_every_tier(history: list[dict[str, str]]) -> None:
    tiers = Counter(entry["tier"] for entry in batch_export(history, AS_OF).values())
    assert set(tiers) == {"member", "silver", "gold", "platinum"}
    assert tiers["platinum"] < tiers["gold"] < tiers["silver"]


def test_formula_buyers_come_back_about_every_three_weeks(
    history: list[dict[str, str]],
) -> None:
    buyers = {cid for cid, kind in customer_behaviours(200).items() if kind == FORMULA_BUYER}
    last: dict[str, datetime] = {}
    gaps: list[float] = []
    for row in history:
        if row["category"] == "infant_formula":
            assert row["customer_id"] in buyers
            moment = datetime.fromisoformat(row["occurred_at"])
            if row["customer_id"] in last:
                gaps.append((moment - last[row["customer_id"]]) / timedelta(days=1))
            last[row["customer_id"]] = moment
    assert len(gaps) > 100
    assert 18 <= statistics.median(gaps) <= 24
    assert min(gaps) >= 17 and max(gaps) <= 25


def test_add_noise(history: list[dict[str, str]]) -> None:
    rows = history[:500]
    before = [dict(row) for row in rows]
    noisy = add_noise(rows, seed=3, duplicates=40, bad=18, shuffle_window=25)
    assert rows == before  # the input is not modified
    assert noisy == add_noise(rows, seed=3, duplicates=40, bad=18, shuffle_window=25)
    assert noisy != add_noise(rows, seed=4, duplicates=40, bad=18, shuffle_window=25)
    assert len(noisy) == 500 + 40 + 18

    bad = [entry for entry in noisy if isinstance(entry, bytes)]
    good = [entry for entry in noisy if not isinstance(entry, bytes)]
    assert len(bad) == 18
    counts = Counter(row["event_id"] for row in good)
    assert set(counts.values()) == {1, 2} and list(counts.values()).count(2) == 40
    # A duplicate has the same payload and comes after the first delivery.
    first_at: dict[str, int] = {}
    for position, row in enumerate(good):
        if row["event_id"] in first_at:
            assert row == good[first_at[row["event_id"]]]
        else:
            first_at[row["event_id"]] = position
    # Out of order, but only locally.
    order = [
        row["event_id"]
        for row in good
        if counts[row["event_id"]] == 1 or row is good[first_at[row["event_id"]]]
    ]
    original = {row["event_id"]: index for index, row in enumerate(rows)}
    moves = [abs(original[event_id] - index) for index, event_id in enumerate(order)]
    assert 0 < max(moves) <= 25
    # Every bad entry is invalid, and the worker's decoder or screen refuses it.
    assert not any(is_valid_row(entry, WALL) for entry in bad)
    assert all(is_valid_row(row, WALL) for row in good)


def test_bad_entries_cover_every_kind_and_are_refused_for_the_right_reason(
    history: list[dict[str, str]], policy: Policy
) -> None:
    noisy = add_noise(history[:50], seed=1, duplicates=0, bad=len(BAD_KINDS), shuffle_window=0)
    bad = {
        json.loads(e)["event_id"] if e.endswith(b"}") else "broken": e
        for e in noisy
        if isinstance(e, bytes)
    }
    reasons = {}
    for entry in bad.values():
        decoded = decode_event(entry)
        if isinstance(decoded, Rejection):
            reasons[decoded.reason] = decoded.detail
        else:
            now = evaluation_time("event", None, decoded, epoch(WALL))
            rejection = screen(decoded, policy, now, epoch(WALL))
            assert rejection is not None
            reasons[rejection.reason] = rejection.detail
    assert set(reasons) == {
        RejectReason.MALFORMED_JSON,
        RejectReason.INVALID_AMOUNT,  # negative and NaN
        RejectReason.SCHEMA,  # missing customer_id
        RejectReason.FUTURE_TIMESTAMP,
        RejectReason.UNKNOWN_CURRENCY,
    }
    assert b'"amount":NaN' in b"".join(bad.values())
    assert "customer_id" in reasons[RejectReason.SCHEMA]


def test_no_shuffle_no_noise_is_the_identity(history: list[dict[str, str]]) -> None:
    assert add_noise(history[:100], seed=9, duplicates=0, bad=0, shuffle_window=0) == history[:100]
    with pytest.raises(ValueError):
        add_noise(history[:3], seed=9, duplicates=4, bad=0, shuffle_window=0)


def test_files_replay_to_the_same_messages(tmp_path: Path, history: list[dict[str, str]]) -> None:
    rows = history[:30]
    write_csv(rows, tmp_path / "h.csv")
    from_csv = [record.value for record in iter_history(tmp_path / "h.csv", "EUR")]
    assert from_csv == [purchase_json(row) for row in rows]

    noisy = add_noise(rows, seed=2, duplicates=3, bad=6, shuffle_window=4)
    write_jsonl(noisy, tmp_path / "h.jsonl")
    from_jsonl = [record.value for record in iter_history(tmp_path / "h.jsonl", "EUR")]
    assert from_jsonl == [e if isinstance(e, bytes) else purchase_json(e) for e in noisy]
    with pytest.raises(TypeError, match="JSONL"):
        write_csv(noisy, tmp_path / "bad.csv")  # type: ignore[arg-type]


# -- the oracle on a hand-written example ----------------------------------------------------


def _row(
    event_id: str, customer: str, at: str, amount: str, currency: str = "EUR"
) -> dict[str, str]:
    return {
        "event_id": event_id,
        "customer_id": customer,
        "occurred_at": at,
        "amount": amount,
        "currency": currency,
    }


# Arrival order. as_of 2025-01-10T12:00Z: the window is the UTC days 2024-01-12 .. 2025-01-10.
EXAMPLE = [
    _row("a1", "cust-a", "2024-01-11T23:59:59Z", "500.00"),  # one second before the window
    _row("a2", "cust-a", "2024-01-12T00:00:00Z", "100.00"),  # first second of the window
    _row("b1", "cust-b", "2024-06-01T10:00:00Z", "50"),
    _row("a3", "cust-a", "2025-01-10T08:00:00Z", "50.00", "USD"),  # 46.00 EUR
    _row("b2", "cust-b", "2024-06-02", "50"),  # bare date: midnight UTC
    _row("a2", "cust-a", "2024-01-12T00:00:00Z", "100.00"),  # duplicate: ignored
    _row("b3", "cust-b", "2024-06-03T10:00:00Z", "50"),
    _row("b4", "cust-b", "2024-06-04T10:00:00+02:00", "900"),  # member -> gold in one step
    # Arrives late and lies outside the window at b's evaluation time (latest = b4): it counts
    # for lifetime and first purchase, not for the tier (else 5850 EUR would make platinum).
    _row("b5", "cust-b", "2023-03-01", "5000", "GBP"),
    _row("c1", "cust-c", "2025-01-01T00:00:00Z", "0.125"),  # 0.12 (half-even)
    _row("c2", "cust-c", "2025-01-02T00:00:00Z", "0.135"),  # 0.14
    _row("c3", "cust-c", "2022-12-31T12:00:00Z", "99"),  # > 730 days before c2: refused
    _row("c4", "cust-c", "2025-01-03T00:00:00Z", "10.005", "USD"),  # 9.2046 -> 9.20
]
EXAMPLE_AS_OF = datetime(2025, 1, 10, 12, tzinfo=UTC)


def test_oracle_exact_values_on_a_hand_written_example() -> None:
    assert batch_export(EXAMPLE, EXAMPLE_AS_OF) == {
        "cust-a": {
            "customer_id": "cust-a",
            "first_purchase_at": "2024-01-11T23:59:59Z",
            "last_purchase_at": "2025-01-10T08:00:00Z",
            "recency_days": 0,
            "frequency": 2,  # a1 left the window; a2 is on its first day
            "monetary": "146.00",
            "lifetime_orders": 3,
            "lifetime_spend": "646.00",
            "tier": "silver",  # reached at a2 (a1 + a2 in the window then); tiers do not fall
        },
        "cust-b": {
            "customer_id": "cust-b",
            "first_purchase_at": "2023-03-01T00:00:00Z",
            "last_purchase_at": "2024-06-04T08:00:00Z",
            "recency_days": 220,
            "frequency": 4,
            "monetary": "1050.00",
            "lifetime_orders": 5,
            "lifetime_spend": "6900.00",
            "tier": "gold",
        },
        "cust-c": {
            "customer_id": "cust-c",
            "first_purchase_at": "2025-01-01T00:00:00Z",
            "last_purchase_at": "2025-01-03T00:00:00Z",
            "recency_days": 7,
            "frequency": 3,
            "monetary": "9.46",
            "lifetime_orders": 3,
            "lifetime_spend": "9.46",
            "tier": "member",
        },
    }
    assert expected_upgrades(EXAMPLE) == {
        ("cust-a", "member", "silver", "a2"),
        ("cust-b", "member", "gold", "b4"),
    }


def test_oracle_window_edges_follow_utc_days() -> None:
    rows = [_row("x1", "c", "2024-01-12T00:00:00+01:00", "1")]  # 2024-01-11T23:00Z: outside
    assert batch_export(rows, EXAMPLE_AS_OF)["c"]["frequency"] == 0
    rows = [_row("x1", "c", "2025-01-10T23:59:59Z", "1")]  # after as_of, same day: inside
    export = batch_export(rows, EXAMPLE_AS_OF)["c"]
    assert (export["frequency"], export["recency_days"]) == (1, -1)
    assert batch_export(rows, EXAMPLE_AS_OF, window_days=1)["c"]["frequency"] == 1


def test_oracle_tier_steps_with_custom_tiers() -> None:
    tiers = [("basic", Decimal(0), 0), ("plus", Decimal(10), 1), ("max", Decimal(20), 2)]
    rows = [_row("1", "c", "2024-01-01T00:00:00Z", "25"), _row("2", "c", "2024-01-02", "1")]
    assert expected_upgrades(rows, tiers=tiers) == {
        ("c", "basic", "plus", "1"),
        ("c", "plus", "max", "2"),
    }
    assert batch_export(rows, EXAMPLE_AS_OF, tiers=tiers)["c"]["tier"] == "max"


@pytest.mark.parametrize(
    ("entry", "valid"),
    [
        (_row("e", "c", "2026-03-01T00:10:00Z", "1"), True),  # exactly the allowed skew
        (_row("e", "c", "2026-03-01T00:10:01Z", "1"), False),
        (_row("e", "c", "2024-01-01T10:00:00", "1"), True),  # CSV: no zone means UTC
        (_row("e", "c", "2024-01-01", "1"), True),
        (_row("e", "c", "2024-02-30", "1"), False),
        (_row("e", "c", "2024-01-01", "-0.01"), False),
        (_row("e", "c", "2024-01-01", "1e13"), False),
        (_row("e", "c", "2024-01-01", "Infinity"), False),
        (_row("e", "c", "2024-01-01", "1", "XXX"), False),
        (_row("e", "c", "2024-01-01", "1", "eur"), False),
        (_row("e{1}", "c", "2024-01-01", "1"), False),
        (_row("e", "", "2024-01-01", "1"), False),
        (_row("e", "c" * 129, "2024-01-01", "1"), False),
        ({**_row("e", "c", "2024-01-01", "1"), "category": "toys", "quantity": "abc"}, False),
        ({**_row("e", "c", "2024-01-01", "1"), "category": "toys", "quantity": ""}, True),
        ({**_row("e", "c", "2024-01-01", "1"), "type": "refund", "refund_of": "x"}, False),
        (
            b'{"event_id":"e","customer_id":"c","occurred_at":"2024-01-01T00:00:00Z",'
            b'"amount":1.5,"currency":"EUR","items":[{"sku":"s","category":"k","quantity":2}]}',
            True,
        ),
        (
            b'{"event_id":"e","customer_id":"c","occurred_at":"2024-01-01T00:00:00",'
            b'"amount":"1","currency":"EUR"}',
            False,
        ),  # JSON: a zone is required
        (
            b'{"event_id":"e","customer_id":"c","occurred_at":"2024-01-01",'
            b'"amount":"1","currency":"EUR"}',
            False,
        ),
        (
            b'{"event_id":"e","customer_id":"c","occurred_at":"2024-01-01T00:00:00Z",'
            b'"amount":NaN,"currency":"EUR"}',
            False,
        ),
        (
            b'{"event_id":"e","customer_id":"c","occurred_at":"2024-01-01T00:00:00Z",'
            b'"amount":"1","currency":"EUR","colour":"red"}',
            False,
        ),
        (b'{"event_id":"e",', False),
        (b"[]", False),
    ],
)
def test_is_valid_row(entry: dict[str, str] | bytes, valid: bool, policy: Policy) -> None:
    assert is_valid_row(entry, WALL) is valid
    # The oracle's rule agrees with what the worker does with the same message.
    raw = entry if isinstance(entry, bytes) else purchase_json(entry)
    decoded = decode_event(raw)
    accepted = (
        isinstance(decoded, Purchase)
        and screen(decoded, policy, epoch(decoded.occurred_at), epoch(WALL)) is None
    )
    assert accepted is valid


def test_oracle_defaults_match_the_default_policy_file() -> None:
    document = yaml.safe_load((ROOT / "rules" / "default_policy.yaml").read_text())
    assert {k: Decimal(v) for k, v in document["currencies"].items()} == oracle.DEFAULT_RATES
    assert document["window_days"] == oracle.DEFAULT_WINDOW_DAYS
    assert document["input"]["max_event_age_days"] == oracle.DEFAULT_MAX_EVENT_AGE_DAYS
    assert document["input"]["max_future_skew_minutes"] * 60 == (
        oracle.MAX_FUTURE_SKEW.total_seconds()
    )
    tiers = [
        (t["name"], Decimal(t.get("min_window_spend", 0)), t.get("min_window_orders", 0))
        for t in document["tiers"]
    ]
    assert tiers == oracle.DEFAULT_TIERS


def test_oracle_is_independent_of_the_engine() -> None:
    tree = ast.parse((ROOT / "tests" / "oracle.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {
        name
        for name in imported
        if name.split(".")[0] in {"rules", "state", "streams", "memberflow", "agents"}
    }


# -- the oracle against the engine's fold ----------------------------------------------------


def _engine(
    entries: list[dict[str, str] | bytes], policy: Policy, as_of: datetime
) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str, str, str]]]:
    """Feed a stream through decode -> screen -> apply as the worker does (event clock)."""
    states: dict[str, Any] = {}
    upgrades: set[tuple[str, str, str, str]] = set()
    wall = epoch(WALL)
    for entry in entries:
        event = decode_event(entry if isinstance(entry, bytes) else purchase_json(entry))
        if isinstance(event, Rejection):
            continue
        state = states.get(event.customer_id)
        now = evaluation_time("event", state, event, wall)
        if screen(event, policy, now, wall) is not None:
            continue
        decision = apply(state, event, policy, now)
        if decision.changed:
            states[event.customer_id] = decision.state
        for note in decision.notifications:
            if note.type == NotificationType.TIER_UPGRADED:
                upgrades.add(
                    (
                        note.customer_id,
                        note.explanation["previous_tier"],
                        note.explanation["new_tier"],
                        note.cause.id,
                    )
                )
    export = {
        cid: {name: summarize(state, policy, epoch(as_of))[name] for name in EXPORT_FIELDS}
        for cid, state in sorted(states.items())
    }
    return export, upgrades


def test_oracle_and_engine_agree_on_the_hand_written_example(policy: Policy) -> None:
    export, upgrades = _engine(list(EXAMPLE), policy, EXAMPLE_AS_OF)
    assert export == batch_export(EXAMPLE, EXAMPLE_AS_OF)
    assert upgrades == expected_upgrades(EXAMPLE)


def test_oracle_and_engine_agree_on_a_noisy_synthetic_stream(
    history: list[dict[str, str]], policy: Policy
) -> None:
    noisy = add_noise(history, seed=5, duplicates=60, bad=30, shuffle_window=50)
    export, upgrades = _engine(noisy, policy, AS_OF)
    rows = valid_rows(noisy, WALL)
    assert len(rows) == len(history) + 60
    assert export == batch_export(rows, AS_OF)
    assert upgrades == expected_upgrades(rows)
    assert len(upgrades) > 100
