"""Time-driven behaviour, pure: timers derived from state, advance(), marketing gates.

Every time is injected: nothing here reads a clock. T0 is 10:00 UTC (12:00 in Berlin), so
timers that keep T0's time of day are outside the default quiet hours (21:00-08:00 Berlin)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from memberflow.settings import default_rules_file
from rules.customer import (
    DAY,
    CustomerState,
    Decision,
    Stage,
    apply,
    epoch,
    event_key,
    iso,
    order_tag,
)
from rules.policy import Marketing, Policy, parse_policy
from rules.timeline import (
    Advance,
    Timer,
    advance,
    describe_pending,
    learned_interval,
    next_allowed,
    next_due,
    pending_timers,
    wake_at,
)
from streams.events import Cause, Item, Notification, NotificationType, Purchase, Refund

DEFAULT_TEXT = default_rules_file().read_text(encoding="utf-8")
POLICY = parse_policy(DEFAULT_TEXT)
VERSION = "2026.11-1"
CUSTOMER = "cust-1"
FORMULA = "infant_formula"
T0 = epoch(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))  # a Monday, 12:00 in Berlin
LIFECYCLE = NotificationType.LIFECYCLE_CHANGED
REMINDER = NotificationType.REPURCHASE_REMINDER
WIN_BACK = NotificationType.WIN_BACK_OFFER
THRESHOLDS = {"at_risk_after_days": 60, "churned_after_days": 180}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return epoch(datetime(year, month, day, hour, minute, second, tzinfo=UTC))


def policy_with(change: Callable[[dict[str, Any]], None]) -> Policy:
    doc = yaml.safe_load(DEFAULT_TEXT)
    change(doc)
    return parse_policy(yaml.safe_dump(doc))


def purchase(
    event_id: str,
    when: int,
    categories: Sequence[str] = (FORMULA,),
    amount: str = "10",
    customer: str = CUSTOMER,
) -> Purchase:
    return Purchase(
        event_id=event_id,
        customer_id=customer,
        occurred_at=datetime.fromtimestamp(when, UTC),
        amount=Decimal(amount),
        currency="EUR",
        items=tuple(Item(sku=f"sku-{i}", category=c) for i, c in enumerate(categories)),
    )


def bought(state: CustomerState | None, event: Purchase, policy: Policy = POLICY) -> Decision:
    """What the engine does with an event in `event` clock mode: bring the customer's timers
    up to the event's time (they must all have fired), then apply it at that time."""
    now = epoch(event.occurred_at)
    if state is not None:
        assert advance(state, policy, now).changed is False, "advance() before bought()"
    decision = apply(state, event, policy, now)
    assert decision.rejection is None and not decision.duplicate
    assert decision.state is not None
    return decision


def moved(state: CustomerState, now: int, policy: Policy = POLICY, **kw: Any) -> Advance:
    result = advance(state, policy, now, **kw)
    # Idempotent: a second advance to the same time finds nothing to do.
    again = advance(result.state, policy, now, **kw)
    assert (again.changed, again.notifications, again.effects) == (False, (), ())
    assert again.state is result.state
    return result


def kinds(notes: Sequence[Notification]) -> list[tuple[str, int]]:
    return [(n.type.value, epoch(n.occurred_at)) for n in notes]


def nid(kind: str, rule: str, cause: str, customer: str = CUSTOMER) -> str:
    return hashlib.sha256(f"{customer}|{kind}|{rule}|{cause}".encode()).hexdigest()[:32]


def first_formula(when: int = T0) -> CustomerState:
    return bought(None, purchase("p1", when)).state  # type: ignore[return-value]


# -- repurchase reminders --------------------------------------------------------------------


def test_infant_formula_purchase_schedules_a_reminder_on_day_14() -> None:
    decision = bought(None, purchase("p1", T0))
    state = decision.state
    assert state is not None
    assert decision.effects == (("repurchase_reminder", "scheduled"),)
    assert decision.gaps == ()
    assert pending_timers(state, POLICY) == [
        Timer(
            "repurchase_reminder",
            "reminder:infant_formula",
            T0 + 14 * DAY,
            "infant_formula is rebought every 21 days (configured): remind 7 days before",
            T0,
        ),
        Timer(
            "lifecycle", "at_risk", T0 + 60 * DAY, "at risk after 60 days without a purchase", T0
        ),
        Timer(
            "win_back",
            "win_back",
            T0 + 120 * DAY,
            "win-back offer after 120 days without a purchase",
            T0,
        ),
        Timer(
            "window_expiry",
            "window",
            utc(2027, 6, 1),
            "purchases of 2026-06-01 leave the 365-day window",
            T0 // DAY,
        ),
        Timer(
            "memory_expiry",
            "memory",
            utc(2028, 7, 1),  # 730 days of duplicate check, pruned up to 30 days late
            "event ids of 2026-06-01 leave the 730-day duplicate check",
            T0 // DAY,
        ),
    ]
    assert next_due(state, POLICY) == T0 + 14 * DAY
    assert describe_pending(state, POLICY)[0] == {
        "kind": "repurchase_reminder",
        "key": "reminder:infant_formula",
        "due_at": "2026-06-15T10:00:00Z",
        "why": "infant_formula is rebought every 21 days (configured): remind 7 days before",
        "deferred": False,
        "sends_at": "2026-06-15T10:00:00Z",  # 12:00 in Berlin: no gate holds it
    }

    early = moved(state, T0 + 14 * DAY - 1)
    assert (early.changed, early.state) == (False, state)
    on_time = moved(state, T0 + 14 * DAY)
    assert on_time.effects == (("repurchase_reminder", "fired"),)
    assert kinds(on_time.notifications) == [("repurchase_reminder", T0 + 14 * DAY)]
    assert [t.key for t in on_time.fired] == ["reminder:infant_formula"]
    assert on_time.state.reminded == {FORMULA: T0}
    assert on_time.state.marketing_sent == [T0 + 14 * DAY]
    assert next_due(on_time.state, POLICY) == T0 + 60 * DAY  # no second reminder
    assert "sends_at" not in describe_pending(on_time.state, POLICY)[0]  # at risk: no message
    assert state.reminded == {}  # advance() does not mutate its input


def test_category_without_a_cycle_schedules_no_reminder() -> None:
    decision = bought(None, purchase("p1", T0, ["toys"]))
    assert decision.effects == ()
    assert decision.state is not None
    assert [t.kind for t in pending_timers(decision.state, POLICY)] == [
        "lifecycle",
        "win_back",
        "window_expiry",
        "memory_expiry",
    ]


def test_purchase_in_the_category_before_the_reminder_reschedules_it() -> None:
    state = first_formula()
    decision = bought(state, purchase("p2", T0 + 10 * DAY))
    assert decision.effects == (
        ("repurchase_reminder", "scheduled"),
        ("repurchase_reminder", "rescheduled"),
    )
    assert decision.gaps == ((FORMULA, 10),)
    assert decision.state is not None
    state = decision.state
    assert pending_timers(state, POLICY)[0].due == T0 + 24 * DAY

    assert moved(state, T0 + 24 * DAY - 1).changed is False  # nothing on day 14
    fired = moved(state, T0 + 24 * DAY)
    assert kinds(fired.notifications) == [("repurchase_reminder", T0 + 24 * DAY)]
    note = fired.notifications[0]
    assert note.cause == Cause(kind="timer", id=f"reminder:infant_formula@{T0 + 10 * DAY}")
    assert note.explanation["last_purchase_at"] == iso(T0 + 10 * DAY)


@pytest.mark.parametrize(("days", "counted"), [(730, True), (731, False)])
def test_a_gap_longer_than_the_duplicate_horizon_is_not_a_repurchase_sample(
    days: int, counted: bool
) -> None:
    """Each distinct gap is a histogram field: gaps of customers back after years grew the
    histograms with the shop's age, past the bound the README gives."""
    later = T0 + days * DAY
    decision = apply(moved(first_formula(), later).state, purchase("p2", later), POLICY, later)
    assert decision.gaps == (((FORMULA, days),) if counted else ())


def _refund(event_id: str, of: str, when: int, amount: str) -> Refund:
    return Refund(
        event_id=event_id,
        customer_id=CUSTOMER,
        refund_of=of,
        occurred_at=datetime.fromtimestamp(when, UTC),
        amount=Decimal(amount),
        currency="EUR",
    )


@pytest.mark.parametrize(
    ("amount", "reminded"), [("10", False), ("4", True)], ids=["whole", "part"]
)
def test_a_returned_order_cancels_its_reminder(amount: str, reminded: bool) -> None:
    """The only formula order came back whole the next day: "formula is due again, 20 % off"
    went out on day 14 all the same. A partial refund keeps the order, and its reminder."""
    state = first_formula()
    back = T0 + DAY
    decision = apply(state, _refund("r1", "p1", back, amount), POLICY, back)
    assert decision.state is not None
    expected = () if reminded else (("repurchase_reminder", "cancelled"),)
    assert decision.effects == expected
    sent = moved(decision.state, T0 + 30 * DAY)
    assert [n.type for n in sent.notifications].count(REMINDER) == (1 if reminded else 0)


def test_returning_an_older_order_keeps_the_newer_ones_reminder() -> None:
    state = first_formula()
    later = T0 + 3 * DAY
    state = apply(state, purchase("p2", later), POLICY, later).state
    assert state is not None
    decision = apply(state, _refund("r1", "p1", later, "10"), POLICY, later)
    assert decision.effects == ()
    assert decision.state is not None
    (note,) = [n for n in moved(decision.state, later + 14 * DAY).notifications]
    assert note.cause.id == f"reminder:infant_formula@{later}"


def _fold_events(events: Sequence[Purchase | Refund]) -> CustomerState:
    state: CustomerState | None = None
    for event in events:
        when = max(epoch(event.occurred_at), state.latest_event_at if state else 0)  # type: ignore[arg-type]
        decision = apply(state, event, POLICY, when)
        assert decision.rejection is None and not decision.duplicate
        state = decision.state
    assert state is not None
    return state


def _reminders(state: CustomerState) -> list[tuple[str, int]]:
    return [
        (t.key, t.due) for t in pending_timers(state, POLICY) if t.kind == "repurchase_reminder"
    ]


def test_a_returned_order_cancels_only_its_own_reminders_in_any_order() -> None:
    """The order is known exactly (its tag in the category entry): returning the formula order
    cancelled that day's diapers reminder too, an order with no items cancelled every reminder
    of its day, and of two formula orders on one day the result depended on arrival order."""
    day = T0 - 10 * 3600  # midnight UTC
    formula = purchase("f1", day + 9 * 3600, [FORMULA], "30")
    diapers = purchase("d1", day + 15 * 3600, ["diapers"], "20")
    returned = _refund("r1", "f1", day + 20 * 3600, "30")
    assert _reminders(_fold_events([formula, diapers, returned])) == [
        ("reminder:diapers", day + 15 * 3600 + 25 * DAY)
    ]
    empty = purchase("e1", day + 9 * 3600, [], "5")
    kept = _fold_events([empty, diapers, _refund("r2", "e1", day + 20 * 3600, "5")])
    assert _reminders(kept) == _reminders(_fold_events([empty, diapers]))

    morning = purchase("m1", day + 9 * 3600, [FORMULA], "30")
    evening = purchase("v1", day + 15 * 3600, [FORMULA], "30")
    back = _refund("r3", "m1", day + 20 * 3600, "30")
    one, other = _fold_events([morning, evening, back]), _fold_events([morning, back, evening])
    assert (one.categories, one.reminded, one.deferred) == (
        other.categories,
        other.reminded,
        other.deferred,
    )
    assert _reminders(one) == [("reminder:infant_formula", day + 15 * 3600 + 14 * DAY)]


def test_late_older_purchase_in_the_category_moves_nothing() -> None:
    state = first_formula(T0 + 5 * DAY)
    decision = bought(state, purchase("p0", T0))
    assert decision.effects == ()  # the cycle still follows the newest purchase
    assert decision.gaps == ()
    assert decision.state is not None
    assert pending_timers(decision.state, POLICY)[0].due == T0 + 19 * DAY


def test_purchase_after_the_reminder_was_sent_only_schedules_the_next() -> None:
    state = moved(first_formula(), T0 + 15 * DAY).state
    decision = bought(state, purchase("p2", T0 + 15 * DAY))
    assert decision.effects == (("repurchase_reminder", "scheduled"),)
    assert decision.state is not None
    assert pending_timers(decision.state, POLICY)[0].due == T0 + 29 * DAY


def test_reminder_carries_the_promotion_and_a_deterministic_id() -> None:
    sent = T0 + 14 * DAY
    result = moved(first_formula(), sent)
    (note,) = result.notifications
    cause = f"reminder:infant_formula@{T0}"
    assert note == Notification(
        notification_id=nid("repurchase_reminder", "repurchase.infant_formula", cause),
        type=REMINDER,
        customer_id=CUSTOMER,
        occurred_at=datetime.fromtimestamp(sent, UTC),
        cause=Cause(kind="timer", id=cause),
        policy_version=VERSION,
        summary="20 % off everything else this week (valid until 2026-06-22): infant_formula "
        "is due again around 2026-06-22",
        explanation={
            "rule": "repurchase.infant_formula",
            "category": FORMULA,
            "last_purchase_at": "2026-06-01T10:00:00Z",
            "interval_days": 21,
            "interval_source": "configured",
            "lead_days": 7,
            "expected_repurchase_at": "2026-06-22T10:00:00Z",
            "scheduled_for": "2026-06-15T10:00:00Z",
            "sent_at": "2026-06-15T10:00:00Z",
            "deferred": False,
            "promotion": {
                "description": "20 % off everything else this week",
                "discount_percent": "20",
                "applies_to": "other_categories",
                "valid_until": iso(sent + 7 * DAY),
            },
            "policy_version": VERSION,
        },
    )
    # The same decision again (a replay, a redelivery) is the same notification.
    assert moved(first_formula(), T0 + 20 * DAY).notifications == (note,)
    other = bought(None, purchase("p1", T0, customer="cust-2")).state
    assert other is not None
    (theirs,) = moved(other, sent).notifications
    assert theirs.notification_id == nid(
        "repurchase_reminder", "repurchase.infant_formula", cause, customer="cust-2"
    )
    assert theirs.notification_id != note.notification_id


def test_a_learned_interval_schedules_the_reminder_and_is_explained() -> None:
    learned = {"diapers": 20}
    bought_at = purchase("d1", T0, ["diapers"])
    state = apply(None, bought_at, POLICY, T0, learned).state
    assert state is not None
    # the interval it was scheduled with (learned), and its order
    assert state.categories["diapers"] == [T0, 1, 20, 1, order_tag(event_key("d1"))]
    assert pending_timers(state, POLICY)[0].due == T0 + 15 * DAY  # 20 learned - 5 lead
    (note,) = moved(state, T0 + 15 * DAY).notifications
    assert note.explanation["interval_days"] == 20
    assert note.explanation["interval_source"] == "learned"
    assert note.explanation["expected_repurchase_at"] == iso(T0 + 20 * DAY)
    # Sent when it was due: not reported as deferred, scheduled for when it went out.
    assert note.explanation["scheduled_for"] == note.explanation["sent_at"] == iso(T0 + 15 * DAY)
    assert note.explanation["deferred"] is False
    # Without a learned value (too few samples), the configured 30 days.
    plain = apply(None, bought_at, POLICY, T0).state
    assert plain is not None
    assert pending_timers(plain, POLICY)[0].due == T0 + 25 * DAY
    # infant_formula does not learn: a learned value for it is ignored.
    formula = apply(None, purchase("f1", T0), POLICY, T0, {FORMULA: 3}).state
    assert formula is not None
    assert pending_timers(formula, POLICY)[0].due == T0 + 14 * DAY


def test_a_reminder_keeps_the_interval_it_was_scheduled_with() -> None:
    """The timer index holds each customer's next wake-up, computed when it was written. A
    learned interval that shrank afterwards moved the reminder earlier than its wake-up: it
    went out late, or past its usefulness was cancelled and never sent. A new interval (learned
    or configured) applies to purchases from then on."""
    state = apply(None, purchase("d1", T0, ["diapers"]), POLICY, T0).state
    assert state is not None
    wake = wake_at(state, POLICY)
    assert wake == T0 + 25 * DAY
    assert wake_at(state, POLICY, {"diapers": 20}) == wake
    shorter = policy_with(
        lambda d: d["repurchase"]["categories"]["diapers"].update(interval_days=10)
    )
    assert pending_timers(state, shorter, {"diapers": 20})[0].due == wake
    (note,) = moved(state, wake, learned={"diapers": 20}).notifications
    assert (note.explanation["interval_days"], note.explanation["interval_source"]) == (
        30,
        "configured",
    )
    # The next purchase is scheduled with the interval in force then.
    again = apply(
        state, purchase("d2", T0 + 2 * DAY, ["diapers"]), POLICY, T0 + 2 * DAY, {"diapers": 20}
    )
    assert again.state is not None
    assert pending_timers(again.state, POLICY)[0].due == T0 + 17 * DAY


# -- quiet hours -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bought_at", "deferred_to"),
    [
        # Summer (CEST, UTC+2): 22:30 Berlin is 20:30 UTC; 08:00 Berlin is 06:00 UTC.
        (utc(2026, 6, 1, 20, 30), utc(2026, 6, 16, 6, 0)),
        # Winter (CET, UTC+1): 22:30 Berlin is 21:30 UTC; 08:00 Berlin is 07:00 UTC.
        (utc(2026, 1, 5, 21, 30), utc(2026, 1, 20, 7, 0)),
        # 03:00 Berlin: deferred to 08:00 the same morning.
        (utc(2026, 6, 1, 1, 0), utc(2026, 6, 15, 6, 0)),
    ],
    ids=["summer-evening", "winter-evening", "after-midnight"],
)
def test_reminder_in_quiet_hours_is_deferred_to_the_morning_then_sent(
    bought_at: int, deferred_to: int
) -> None:
    due = bought_at + 14 * DAY
    state = first_formula(bought_at)
    assert next_due(state, POLICY) == due
    # Woken at its due time it would only be deferred: the index points past the quiet hours,
    # and the customer's view says when it goes out, not only when it is due.
    assert wake_at(state, POLICY) == deferred_to
    pending = describe_pending(state, POLICY)[0]
    assert (pending["due_at"], pending["sends_at"], pending["deferred"]) == (
        iso(due),
        iso(deferred_to),
        False,
    )

    held = moved(state, due)
    assert held.effects == (("repurchase_reminder", "deferred_quiet_hours"),)
    assert held.notifications == ()
    assert held.state.deferred == {"reminder:infant_formula": [bought_at, deferred_to]}
    assert held.state.reminded == {}
    assert held.state.marketing_sent == []
    assert next_due(held.state, POLICY) == deferred_to
    pending = describe_pending(held.state, POLICY)[0]
    assert (pending["due_at"], pending["deferred"]) == (iso(deferred_to), True)
    assert moved(held.state, deferred_to - 1).changed is False

    sent = moved(held.state, deferred_to)
    assert sent.effects == (("repurchase_reminder", "fired"),)
    (note,) = sent.notifications
    assert note.occurred_at == datetime.fromtimestamp(deferred_to, UTC)
    assert note.explanation["deferred"] is True
    assert note.explanation["scheduled_for"] == iso(due)
    assert note.explanation["sent_at"] == iso(deferred_to)
    assert note.explanation["promotion"]["valid_until"] == iso(deferred_to + 7 * DAY)
    assert sent.state.deferred == {}
    assert sent.state.reminded == {FORMULA: bought_at}
    assert sent.state.marketing_sent == [deferred_to]

    # One advance over the whole span does the same, firing each step at its own time.
    straight = moved(state, deferred_to + DAY)
    assert straight.effects == (
        ("repurchase_reminder", "deferred_quiet_hours"),
        ("repurchase_reminder", "fired"),
    )
    assert straight.notifications == (note,)
    assert straight.state == sent.state
    # So does the one wake-up at the end of the quiet hours (wake_at): deferred, then sent.
    woken = moved(state, deferred_to)
    assert woken.effects == straight.effects
    assert woken.notifications == (note,)
    assert woken.state == sent.state


def test_wake_at_is_the_earliest_due_when_no_message_waits_for_quiet_hours_to_end() -> None:
    # Out of quiet hours (12:00 Berlin): the reminder's own due time.
    state = first_formula()
    assert wake_at(state, POLICY) == next_due(state, POLICY) == T0 + 14 * DAY
    # A customer without timers: nothing to wake for.
    assert wake_at(CustomerState(customer_id=CUSTOMER), POLICY) is None
    # A reminder due in quiet hours (22:30 Berlin) and a state timer due after it but before
    # they end (at risk, 23:30): the state timer is not held back to 08:00.
    evening = utc(2026, 6, 1, 20, 30)
    lapsing = policy_with(lambda doc: doc["lifecycle"].update(at_risk_after_days=14))
    formula = bought(None, purchase("p1", evening), lapsing).state
    assert formula is not None
    state = bought(formula, purchase("p2", evening + 3600, ("toys",)), lapsing).state
    assert state is not None
    assert next_due(state, lapsing) == evening + 14 * DAY  # the reminder
    assert wake_at(state, lapsing) == evening + 3600 + 14 * DAY  # at risk, in quiet hours


BERLIN = Marketing(timezone="Europe/Berlin", quiet_hours={"start_hour": 21, "end_hour": 8})


@pytest.mark.parametrize(
    ("at", "allowed", "gate"),
    [
        (utc(2026, 6, 15, 18, 59, 59), utc(2026, 6, 15, 18, 59, 59), ""),  # 20:59:59 Berlin
        (utc(2026, 6, 15, 19, 0), utc(2026, 6, 16, 6, 0), "quiet_hours"),  # 21:00
        (utc(2026, 6, 15, 21, 59, 59), utc(2026, 6, 16, 6, 0), "quiet_hours"),  # 23:59:59
        (utc(2026, 6, 15, 22, 0), utc(2026, 6, 16, 6, 0), "quiet_hours"),  # 00:00
        (utc(2026, 6, 16, 5, 59, 59), utc(2026, 6, 16, 6, 0), "quiet_hours"),  # 07:59:59
        (utc(2026, 6, 16, 6, 0), utc(2026, 6, 16, 6, 0), ""),  # 08:00
        # The night the clocks go forward (29 March 2026, 02:00 -> 03:00): 08:00 CEST.
        (utc(2026, 3, 28, 21, 0), utc(2026, 3, 29, 6, 0), "quiet_hours"),
        # The night they go back (25 October 2026): 08:00 CET.
        (utc(2026, 10, 24, 20, 0), utc(2026, 10, 25, 7, 0), "quiet_hours"),
    ],
)
def test_next_allowed_quiet_hours_in_the_policy_time_zone(at: int, allowed: int, gate: str) -> None:
    assert next_allowed([], BERLIN, at) == (allowed, gate)


def test_quiet_hours_that_do_not_wrap_midnight() -> None:
    marketing = Marketing(timezone="UTC", quiet_hours={"start_hour": 1, "end_hour": 5})
    day = utc(2026, 6, 15)
    assert next_allowed([], marketing, day + 3600 - 1) == (day + 3600 - 1, "")
    assert next_allowed([], marketing, day + 3600) == (day + 5 * 3600, "quiet_hours")
    assert next_allowed([], marketing, day + 5 * 3600) == (day + 5 * 3600, "")
    assert next_allowed([], Marketing(), day + 3600) == (day + 3600, "")  # no quiet hours


# -- frequency cap ---------------------------------------------------------------------------


def test_frequency_cap_defers_a_third_message_to_the_oldest_plus_seven_days() -> None:
    state = first_formula()
    due = T0 + 14 * DAY
    capped = state.copy()
    capped.marketing_sent = [due - 6 * DAY, due - 2 * DAY]

    held = moved(capped, due)
    assert held.effects == (("repurchase_reminder", "deferred_cap"),)
    assert held.notifications == ()
    assert held.state.deferred == {"reminder:infant_formula": [T0, due + DAY]}
    assert moved(held.state, due + DAY - 1).changed is False
    sent = moved(held.state, due + DAY)
    (note,) = sent.notifications
    assert note.occurred_at == datetime.fromtimestamp(due + DAY, UTC)
    assert note.explanation["deferred"] is True
    assert sent.state.marketing_sent == [due - 2 * DAY, due + DAY]  # the last max_messages

    # Messages at least 7 days old do not count.
    assert moved(capped, due).effects != moved(_sent_at(state, due - 7 * DAY), due).effects
    aged = moved(_sent_at(state, due - 7 * DAY, due - 2 * DAY), due)
    assert aged.effects == (("repurchase_reminder", "fired"),)
    # One recent message is below the cap of two.
    assert moved(_sent_at(state, due - DAY), due).effects == (("repurchase_reminder", "fired"),)


def test_a_longer_interval_moves_a_deferred_reminder_to_its_new_due_time() -> None:
    """A deferral only ever moves a reminder later: once a new interval puts the due time past
    the deferred one, the deferral no longer holds it (it fired 13 days early, at the old
    deferred time, quoting the new expected repurchase). A state written before reminders kept
    their interval: it follows the interval in force."""
    state = first_formula()
    state.categories[FORMULA] = state.categories[FORMULA][:2]
    due = T0 + 14 * DAY
    state.marketing_sent = [due - 6 * DAY, due - 2 * DAY]
    held = moved(state, due)
    assert held.state.deferred == {"reminder:infant_formula": [T0, due + DAY]}

    longer = policy_with(
        lambda d: d["repurchase"]["categories"][FORMULA].update(interval_days=35, learn=False)
    )
    new_due = T0 + 28 * DAY
    reminders = [t for t in pending_timers(held.state, longer) if t.kind == "repurchase_reminder"]
    assert [t.due for t in reminders] == [new_due]
    assert moved(held.state, new_due - 1, longer).notifications == ()
    sent = moved(held.state, new_due, longer)
    assert kinds(sent.notifications) == [("repurchase_reminder", new_due)]
    # Sent at its new due time: the old deferral held nothing.
    assert sent.notifications[0].explanation["deferred"] is False
    # Under a shorter interval the deferral still holds (the cap that deferred it stands).
    shorter = policy_with(
        lambda d: d["repurchase"]["categories"][FORMULA].update(interval_days=18, learn=False)
    )
    assert moved(held.state, due + DAY - 1, shorter).notifications == ()
    assert kinds(moved(held.state, due + DAY, shorter).notifications) == [
        ("repurchase_reminder", due + DAY)
    ]


def _sent_at(state: CustomerState, *times: int) -> CustomerState:
    out = state.copy()
    out.marketing_sent = list(times)
    return out


def test_next_allowed_cap_then_quiet_hours() -> None:
    marketing = BERLIN
    at = utc(2026, 6, 15, 10)
    # The cap frees a slot at 21:30 Berlin, inside quiet hours: 08:00 the next morning.
    sent = [utc(2026, 6, 8, 19, 30), utc(2026, 6, 12, 10)]
    assert next_allowed(sent, marketing, at) == (utc(2026, 6, 16, 6), "cap")
    assert next_allowed(sent[1:], marketing, at) == (at, "")


def test_two_reminders_due_together_share_a_cap_of_one() -> None:
    policy = policy_with(lambda d: d["marketing"].update(max_messages=1))
    # Diapers bought 11 days earlier: both reminders are due on day 14.
    state = bought(None, purchase("d1", T0 - 11 * DAY, ["diapers"]), policy).state
    state = bought(state, purchase("f1", T0), policy).state
    assert state is not None
    result = moved(state, T0 + 30 * DAY, policy)
    assert result.effects == (
        ("repurchase_reminder", "fired"),  # reminder:diapers sorts first
        ("repurchase_reminder", "deferred_cap"),
        ("repurchase_reminder", "fired"),
    )
    assert [(n.explanation["category"], epoch(n.occurred_at)) for n in result.notifications] == [
        ("diapers", T0 + 14 * DAY),
        (FORMULA, T0 + 21 * DAY),  # one per 7 days
    ]


# -- deferred reminders: cancelled by a purchase, or once too late ---------------------------


def test_deferred_reminder_is_cancelled_by_a_purchase_in_the_category() -> None:
    bought_at = utc(2026, 6, 1, 20, 30)  # due 22:30 Berlin: deferred to 08:00
    held = moved(first_formula(bought_at), bought_at + 14 * DAY + 3600)
    assert held.effects == (("repurchase_reminder", "deferred_quiet_hours"),)
    again = bought_at + 14 * DAY + 3600  # 23:30 Berlin, while the reminder waits
    decision = bought(held.state, purchase("p2", again))
    assert decision.effects == (
        ("repurchase_reminder", "scheduled"),
        ("repurchase_reminder", "cancelled"),
    )
    state = decision.state
    assert state is not None
    assert state.deferred == {}
    assert state.reminded == {}
    assert [t.due for t in pending_timers(state, POLICY) if t.kind == "repurchase_reminder"] == [
        again + 14 * DAY
    ]
    # Nothing the next morning; the new cycle's reminder later (it too in quiet hours).
    assert moved(state, again + 14 * DAY - 1).changed is False
    result = moved(state, again + 15 * DAY)
    assert [n.cause.id for n in result.notifications] == [f"reminder:infant_formula@{again}"]


def test_deferred_win_back_is_dropped_by_a_new_purchase() -> None:
    bought_at = utc(2026, 6, 1, 20, 30)  # win-back due 22:30 Berlin: deferred
    state = first_formula(bought_at)
    state.reminded[FORMULA] = bought_at  # keep the reminder out of the way
    held = moved(state, bought_at + 120 * DAY + 60)
    assert held.state.deferred == {"win_back": [bought_at, utc(2026, 9, 30, 6)]}
    decision = bought(held.state, purchase("p2", bought_at + 120 * DAY + 60, ["toys"]))
    assert decision.state is not None
    assert decision.state.deferred == {}
    assert [t.due for t in pending_timers(decision.state, POLICY) if t.kind == "win_back"] == [
        bought_at + 240 * DAY + 60
    ]


@pytest.mark.parametrize(
    ("until", "effects"),
    [
        # expected repurchase (day 21) + lead (7 days) = day 28: too late from then on
        (T0 + 28 * DAY, ("cancelled",)),
        (T0 + 28 * DAY - 1, ("fired",)),
    ],
    ids=["at-expiry", "just-before"],
)
def test_reminder_deferred_past_expected_repurchase_plus_lead_is_cancelled(
    until: int, effects: tuple[str, ...]
) -> None:
    policy = policy_with(lambda d: d["marketing"].update(per_days=30))
    state = bought(None, purchase("p1", T0), policy).state
    assert state is not None
    # Two messages whose 30-day cap ends exactly at `until`.
    state.marketing_sent = [until - 30 * DAY, until - 30 * DAY + 60]
    held = moved(state, T0 + 14 * DAY, policy)
    assert held.effects == (("repurchase_reminder", "deferred_cap"),)
    assert held.state.deferred == {"reminder:infant_formula": [T0, until]}
    result = moved(held.state, until, policy)
    assert result.effects == tuple(("repurchase_reminder", e) for e in effects)
    assert result.state.deferred == {}
    assert result.state.reminded == {FORMULA: T0}  # settled either way: no retry
    if effects == ("cancelled",):
        assert result.notifications == ()
        assert result.state.marketing_sent == state.marketing_sent
    else:
        assert kinds(result.notifications) == [("repurchase_reminder", until)]
    assert "reminder:infant_formula" not in [t.key for t in pending_timers(result.state, policy)]


def test_a_reminder_with_no_lead_goes_out_on_the_expected_day_and_may_be_deferred_a_day() -> None:
    """lead_days 0: reminded when the repurchase is expected (day 21), which a cut-off of
    "expected + lead" would cancel at its own due time, every time."""
    policy = policy_with(lambda d: d["repurchase"]["categories"][FORMULA].update(lead_days=0))
    state = bought(None, purchase("p1", T0), policy).state
    assert state is not None
    sent = moved(state, T0 + 21 * DAY, policy)
    assert kinds(sent.notifications) == [("repurchase_reminder", T0 + 21 * DAY)]
    state.marketing_sent = [T0 + 21 * DAY - 7 * DAY + 60, T0 + 21 * DAY - 7 * DAY + 120]
    # The cap holds it for a minute (the older send turns 7 days old): still sent, not cancelled.
    held = moved(state, T0 + 22 * DAY - 1, policy)
    assert kinds(held.notifications) == [("repurchase_reminder", T0 + 21 * DAY + 60)]


def test_a_reminder_that_fires_late_is_judged_when_it_really_goes_out() -> None:
    """`wall` clock mode (sends_from): workers were down, or a purchase that arrived late made
    the reminder due in the past. Sent at its due time it would carry a promotion that had
    already run out, or go out at night with `deferred: False`. `deferred` says whether a gate
    held it; lateness alone shows as sent_at after scheduled_for (a poll one second after the
    due time flagged every on-time reminder as deferred)."""
    state = bought(None, purchase("p1", T0)).state  # reminder due day 14, expected day 21
    assert state is not None
    polled = T0 + 14 * DAY + 1
    (on_time,) = moved(state, polled, sends_from=polled).notifications
    assert on_time.explanation["deferred"] is False
    assert on_time.explanation["sent_at"] == iso(polled)

    late = T0 + 20 * DAY  # 12:00 in Berlin, six days late
    sent = moved(state, late, sends_from=late)
    (note,) = sent.notifications
    assert kinds([note]) == [("repurchase_reminder", late)]
    assert note.explanation["sent_at"] == iso(late)
    assert note.explanation["scheduled_for"] == iso(T0 + 14 * DAY)
    assert note.explanation["deferred"] is False  # late, but no gate held it
    assert note.explanation["promotion"]["valid_until"] == iso(late + 7 * DAY)
    assert sent.state.marketing_sent == [late]

    night = utc(2026, 6, 21, 1, 0)  # 03:00 in Berlin: quiet hours until 08:00
    held = moved(state, night, sends_from=night)
    assert held.effects == (("repurchase_reminder", "deferred_quiet_hours"),)
    morning = utc(2026, 6, 21, 6, 0)
    (woke,) = moved(held.state, morning, sends_from=morning).notifications
    assert kinds([woke]) == [("repurchase_reminder", morning)]
    assert woke.explanation["deferred"] is True  # quiet hours held it

    stale = T0 + 28 * DAY  # past the expected repurchase plus the lead: no longer useful
    assert moved(state, stale, sends_from=stale).effects == (("repurchase_reminder", "cancelled"),)
    # Without sends_from (event mode) it still goes out at its due time, as before.
    assert kinds(moved(state, late).notifications) == [("repurchase_reminder", T0 + 14 * DAY)]


# -- the window ------------------------------------------------------------------------------


def test_window_expiry_drops_the_oldest_bucket_exactly_at_day_plus_window() -> None:
    day = T0 // DAY
    state = bought(None, purchase("p1", T0, ["toys"], "100")).state
    state = bought(state, purchase("p2", T0 + 3 * DAY, ["toys"], "30")).state
    assert state is not None
    state.win_back_for = state.last_purchase_at  # only the window and lifecycle are left
    expiry = (day + 365) * DAY
    assert [t.due for t in pending_timers(state, POLICY) if t.kind == "window_expiry"] == [expiry]

    before = moved(state, expiry - 1)
    assert before.state.buckets == {day: [1, 10000], day + 3: [1, 3000]}
    assert before.state.window(expiry - 1, 365) == (2, 13000)
    after = moved(before.state, expiry)
    assert after.effects == (("window_expiry", "fired"),)
    assert after.notifications == ()
    assert after.state.buckets == {day + 3: [1, 3000]}
    assert after.state.window(expiry, 365) == (1, 3000)
    assert (after.state.lifetime_orders, after.state.lifetime_spend) == (2, 13000)
    assert next_due(after.state, POLICY) == (day + 3 + 365) * DAY
    last = moved(after.state, (day + 3 + 365) * DAY)
    assert last.state.buckets == {}
    # Churned, nothing in the window; the event ids stay for the duplicate check, 730 days
    # (pruned once the oldest is 30 days past that), then nothing is left at all.
    assert [(t.kind, t.due) for t in pending_timers(last.state, POLICY)] == [
        ("memory_expiry", (day + 761) * DAY)
    ]
    assert len(last.state.seen) == 2
    forgotten = moved(last.state, (day + 761) * DAY)
    assert forgotten.effects == (("memory_expiry", "fired"),)
    assert len(forgotten.state.seen) == 0
    assert pending_timers(forgotten.state, POLICY) == []
    assert forgotten.notifications == ()


# -- lifecycle -------------------------------------------------------------------------------


def lifecycle_note(
    previous: str,
    new: str,
    at: int,
    cause: Cause,
    reason: str,
    inputs: dict[str, Any],
    customer: str = CUSTOMER,
) -> Notification:
    return Notification(
        notification_id=nid("lifecycle_changed", f"lifecycle.{new}", cause.id, customer),
        type=LIFECYCLE,
        customer_id=customer,
        occurred_at=datetime.fromtimestamp(at, UTC),
        cause=cause,
        policy_version=VERSION,
        summary=f"Lifecycle {previous} -> {new}: {reason}.",
        explanation={
            "rule": f"lifecycle.{new}",
            "previous_stage": previous,
            "new_stage": new,
            "reason": reason,
            "inputs": inputs,
            "thresholds": THRESHOLDS,
            "policy_version": VERSION,
        },
    )


def lapse_note(previous: str, new: str, last: int, days: int) -> Notification:
    return lifecycle_note(
        previous,
        new,
        last + days * DAY,
        Cause(kind="timer", id=f"{new}@{last}"),
        f"no purchase for {days} days",
        {"last_purchase_at": iso(last), "days_without_purchase": days},
    )


def purchase_note(previous: str, new: str, reason: str, at: int, orders: int, prior: int | None):
    return lifecycle_note(
        previous,
        new,
        at,
        Cause(kind="event", id=f"e{orders}"),
        reason,
        {"lifetime_orders": orders, "purchase_at": iso(at), "previous_purchase_at": iso(prior)},
    )


def lifecycle_only(notes: Sequence[Notification]) -> list[Notification]:
    return [n for n in notes if n.type is LIFECYCLE]


def toys(state: CustomerState | None, orders: int, at: int) -> Decision:
    return bought(state, purchase(f"e{orders}", at, ["toys"]))


def test_first_and_repeat_purchases_move_potential_to_new_to_active() -> None:
    first = toys(None, 1, T0)
    assert first.notifications == (
        purchase_note("potential", "new", "first purchase", T0, 1, None),
    )
    assert first.state is not None
    assert (first.state.stage, first.state.stage_since) == (Stage.NEW, T0)
    second = toys(first.state, 2, T0 + DAY)
    assert second.notifications == (
        purchase_note("new", "active", "repeat purchase", T0 + DAY, 2, T0),
    )
    assert second.state is not None
    assert (second.state.stage, second.state.stage_since) == ("active", T0 + DAY)
    third = toys(second.state, 3, T0 + 2 * DAY)
    assert third.notifications == ()
    assert third.state is not None
    assert (third.state.stage, third.state.stage_since) == ("active", T0 + DAY)


def test_lapse_to_at_risk_and_churned_at_exact_days_then_reactivated() -> None:
    state = toys(None, 1, T0).state
    assert state is not None
    assert moved(state, T0 + 60 * DAY - 1).changed is False
    at_risk = moved(state, T0 + 60 * DAY)
    assert at_risk.notifications == (lapse_note("new", "at_risk", T0, 60),)
    assert (at_risk.state.stage, at_risk.state.stage_since) == ("at_risk", T0 + 60 * DAY)
    assert next_due(at_risk.state, POLICY) == T0 + 120 * DAY  # the win-back comes first
    assert [t.due for t in pending_timers(at_risk.state, POLICY) if t.kind == "lifecycle"] == [
        T0 + 180 * DAY
    ]

    churned = moved(at_risk.state, T0 + 180 * DAY)
    assert lifecycle_only(churned.notifications) == [lapse_note("at_risk", "churned", T0, 180)]
    assert (churned.state.stage, churned.state.stage_since) == ("churned", T0 + 180 * DAY)
    assert [t.kind for t in pending_timers(churned.state, POLICY)] == [
        "window_expiry",
        "memory_expiry",
    ]

    back = T0 + 200 * DAY
    decision = toys(churned.state, 2, back)
    assert decision.notifications == (
        purchase_note("churned", "reactivated", "purchased again after churning", back, 2, T0),
    )
    state = decision.state
    assert state is not None
    assert (state.stage, state.stage_since) == ("reactivated", back)
    # Reactivated customers lapse like anyone else, and a repeat makes them active.
    lapsed = moved(state, back + 60 * DAY)
    assert lapsed.notifications == (lapse_note("reactivated", "at_risk", back, 60),)
    active = toys(moved(state, back + DAY).state, 3, back + DAY)
    assert active.notifications == (
        purchase_note("reactivated", "active", "repeat purchase", back + DAY, 3, back),
    )


def test_purchase_while_at_risk_makes_the_customer_active() -> None:
    state = moved(toys(None, 1, T0).state, T0 + 70 * DAY).state  # type: ignore[arg-type]
    assert state.stage == "at_risk"
    decision = toys(state, 2, T0 + 70 * DAY)
    assert decision.notifications == (
        purchase_note("at_risk", "active", "purchased again while at risk", T0 + 70 * DAY, 2, T0),
    )
    assert decision.state is not None
    assert (decision.state.stage, decision.state.stage_since) == ("active", T0 + 70 * DAY)
    assert [t.due for t in pending_timers(decision.state, POLICY) if t.kind == "lifecycle"] == [
        T0 + 130 * DAY
    ]


def test_late_older_purchase_while_at_risk_changes_counts_not_the_stage() -> None:
    state = moved(toys(None, 1, T0).state, T0 + 70 * DAY).state  # type: ignore[arg-type]
    decision = apply(state, purchase("late", T0 - DAY, ["toys"]), POLICY, T0 + 70 * DAY)
    assert decision.notifications == ()
    assert decision.state is not None
    assert (decision.state.stage, decision.state.lifetime_orders) == ("at_risk", 2)
    assert decision.state.last_purchase_at == T0


def test_every_timer_of_one_purchase_over_a_year() -> None:
    result = moved(first_formula(), T0 + 400 * DAY)
    assert result.effects == (
        ("repurchase_reminder", "fired"),
        ("lifecycle", "fired"),
        ("win_back", "fired"),
        ("lifecycle", "fired"),
        ("window_expiry", "fired"),
    )
    assert kinds(result.notifications) == [
        ("repurchase_reminder", T0 + 14 * DAY),
        ("lifecycle_changed", T0 + 60 * DAY),
        ("win_back_offer", T0 + 120 * DAY),
        ("lifecycle_changed", T0 + 180 * DAY),
    ]
    assert [t.due for t in result.fired] == [
        T0 + 14 * DAY,
        T0 + 60 * DAY,
        T0 + 120 * DAY,
        T0 + 180 * DAY,
        utc(2027, 6, 1),
    ]
    assert [t.kind for t in pending_timers(result.state, POLICY)] == ["memory_expiry"]


# -- win-back --------------------------------------------------------------------------------


def test_win_back_fires_once_per_lapse() -> None:
    state = toys(None, 1, T0).state
    assert state is not None
    first = moved(state, T0 + 119 * DAY)
    assert [n.type for n in first.notifications] == [LIFECYCLE]
    lapse = moved(first.state, T0 + 120 * DAY)
    (offer,) = lapse.notifications
    cause = f"win_back@{T0}"
    assert offer == Notification(
        notification_id=nid("win_back_offer", "win_back", cause),
        type=WIN_BACK,
        customer_id=CUSTOMER,
        occurred_at=datetime.fromtimestamp(T0 + 120 * DAY, UTC),
        cause=Cause(kind="timer", id=cause),
        policy_version=VERSION,
        summary="15 % off your next order (valid until 2026-10-13)",
        explanation={
            "rule": "win_back",
            "last_purchase_at": iso(T0),
            "after_days": 120,
            "scheduled_for": iso(T0 + 120 * DAY),
            "sent_at": iso(T0 + 120 * DAY),
            "deferred": False,
            "promotion": {
                "description": "15 % off your next order",
                "discount_percent": "15",
                "applies_to": "all",
                "valid_until": iso(T0 + 134 * DAY),
            },
            "policy_version": VERSION,
        },
    )
    assert lapse.state.win_back_for == T0
    # Not again without a new purchase, however long it lasts.
    quiet = moved(lapse.state, T0 + 1000 * DAY)
    assert WIN_BACK not in [n.type for n in quiet.notifications]

    # A new purchase starts a new lapse: one more offer, 120 days after it.
    back = T0 + 1000 * DAY
    state = toys(quiet.state, 2, back).state
    assert state is not None
    second = moved(state, back + 2000 * DAY)
    offers = [n for n in second.notifications if n.type is WIN_BACK]
    assert [(epoch(n.occurred_at), n.cause.id) for n in offers] == [
        (back + 120 * DAY, f"win_back@{back}")
    ]
    assert offers[0].notification_id != offer.notification_id


def test_purchase_before_the_win_back_moves_it() -> None:
    state = toys(None, 1, T0).state
    state = toys(moved(state, T0 + 100 * DAY).state, 2, T0 + 100 * DAY).state  # type: ignore[arg-type]
    assert state is not None
    result = moved(state, T0 + 300 * DAY)
    offers = [epoch(n.occurred_at) for n in result.notifications if n.type is WIN_BACK]
    assert offers == [T0 + 220 * DAY]


# -- advance(): idempotent and the same in one step or many ----------------------------------


def _busy(d: dict[str, Any]) -> None:
    """Short cycles and lapses, so that caps, quiet hours and cancellations happen often."""
    promotion = {"description": "5 % off", "discount_percent": "5", "valid_days": 2}
    d["repurchase"]["categories"] = {
        "tea": {"interval_days": 4, "lead_days": 1, "promotion": promotion},
        "diapers": {"interval_days": 5, "lead_days": 2, "learn": True, "promotion": promotion},
        "coffee": {"interval_days": 9, "lead_days": 3, "promotion": promotion},
    }
    d["lifecycle"] = {"at_risk_after_days": 5, "churned_after_days": 12}
    d["win_back"]["after_days"] = 8
    d["window_days"] = 30


BUSY = policy_with(_busy)
SCENARIOS = {
    "default": (POLICY, [FORMULA, "diapers", "toys"]),
    "busy": (BUSY, ["tea", "diapers", "coffee", "toys"]),
}


@st.composite
def customers(draw: st.DrawFn) -> tuple[Policy, CustomerState, dict[str, int], int]:
    """A customer after a random purchase history, folded the way the engine does it."""
    policy, categories = SCENARIOS[draw(st.sampled_from(sorted(SCENARIOS)))]
    start = draw(st.integers(min_value=utc(2025, 1, 1), max_value=utc(2027, 1, 1)))
    gaps = st.one_of(
        st.integers(min_value=0, max_value=3 * DAY),  # bursts: the cap and quiet hours
        st.integers(min_value=0, max_value=200 * DAY),  # lapses: lifecycle and win-back
    )
    learned = draw(st.dictionaries(st.just("diapers"), st.integers(min_value=3, max_value=60)))
    state: CustomerState | None = None
    now = start
    for index in range(draw(st.integers(min_value=1, max_value=12))):
        now += draw(gaps)
        if state is not None:
            state = advance(state, policy, now, learned).state
        event = purchase(f"o{index}", now, draw(st.lists(st.sampled_from(categories), max_size=2)))
        decision = apply(state, event, policy, now)
        assert decision.state is not None
        state = decision.state
    assert state is not None
    return policy, state, learned, now


@settings(max_examples=200, deadline=None)
@given(
    customer=customers(),
    first=st.integers(min_value=-30 * DAY, max_value=700 * DAY),
    second=st.integers(min_value=0, max_value=700 * DAY),
)
def test_advance_in_steps_equals_advance_at_once_and_is_idempotent(
    customer: tuple[Policy, CustomerState, dict[str, int], int], first: int, second: int
) -> None:
    policy, state, learned, last = customer
    t1, t2 = last + first, last + first + second
    before = state.to_json()
    straight = advance(state, policy, t2, learned)
    step1 = advance(state, policy, t1, learned)
    step2 = advance(step1.state, policy, t2, learned)
    assert state.to_json() == before  # the input is never mutated
    assert step2.state == straight.state
    assert step1.notifications + step2.notifications == straight.notifications
    assert step1.effects + step2.effects == straight.effects
    assert step1.fired + step2.fired == straight.fired
    # Every timer fired at its own due time, in order, and none is left due.
    dues = [t.due for t in straight.fired]
    assert dues == sorted(dues)
    assert all(t.due <= t2 for t in straight.fired)
    assert all(t.due > t2 for t in pending_timers(straight.state, policy, learned))
    for note in straight.notifications:
        assert epoch(note.occurred_at) <= t2
    ids = [n.notification_id for n in straight.notifications]
    assert len(ids) == len(set(ids))
    # Idempotent.
    again = advance(straight.state, policy, t2, learned)
    assert (again.changed, again.notifications, again.effects) == (False, (), ())
    assert again.state == straight.state
    # What was sent kept the frequency cap (with what had been sent before) and quiet hours.
    marketing = policy.marketing
    sent = [epoch(n.occurred_at) for n in straight.notifications if n.type in (REMINDER, WIN_BACK)]
    assert sent == sorted(sent)
    history = sorted(state.marketing_sent) + sent
    cap = marketing.max_messages
    for index in range(cap, len(history)):
        assert history[index] - history[index - cap] >= marketing.per_days * DAY
    for moment in sent:
        assert next_allowed([], marketing, moment) == (moment, "")  # not in quiet hours


# -- learned intervals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("histogram", "min_samples", "expected"),
    [
        ({}, 1, None),
        ({21: 1}, 1, 21),
        ({21: 1}, 2, None),
        ({10: 1, 30: 1}, 2, 10),  # an even count takes the lower middle
        ({10: 1, 20: 1, 30: 1}, 3, 20),
        ({30: 5, 10: 1, 20: 1}, 7, 30),  # unordered keys, weighted by count
        ({14: 29}, 30, None),
        ({14: 30}, 30, 14),
        ({0: 3}, 1, 1),  # never below one day
    ],
)
def test_learned_interval_is_the_median_once_there_are_enough_samples(
    histogram: dict[int, int], min_samples: int, expected: int | None
) -> None:
    assert learned_interval(histogram, min_samples) == expected


# -- state -----------------------------------------------------------------------------------


def test_timer_state_round_trips_through_json() -> None:
    bought_at = utc(2026, 6, 1, 20, 30)
    state = moved(first_formula(bought_at), bought_at + 14 * DAY).state
    state.win_back_for = 7
    state.marketing_sent = [1, 2]
    restored = CustomerState.from_json(state.to_json())
    assert restored == state
    assert restored.deferred == {"reminder:infant_formula": [bought_at, utc(2026, 6, 16, 6)]}
    # A state written before lifecycle fields existed reads as new (or potential).
    old = json.loads(state.to_json())
    for key in ("st", "ss", "r", "d", "m", "w"):
        old.pop(key, None)  # absent when empty, too
    legacy = CustomerState.from_json(json.dumps(old))
    assert (legacy.stage, legacy.stage_since, legacy.reminded, legacy.deferred) == (
        "new",
        None,
        {},
        {},
    )
    assert (legacy.marketing_sent, legacy.win_back_for) == ([], None)


def test_the_summary_gives_dates_in_the_marketing_time_zone() -> None:
    """Sent at 18:00 in Los Angeles (01:00 UTC the next day): the offer runs out at 18:00 local
    a week later, which the summary gave as the UTC date, a day the offer does not run."""
    from zoneinfo import ZoneInfo

    policy = policy_with(lambda d: d["marketing"].update(timezone="America/Los_Angeles"))
    la = ZoneInfo("America/Los_Angeles")
    sent = epoch(datetime(2026, 6, 1, 18, 0, tzinfo=la))
    state = bought(None, purchase("p1", sent), policy).state
    assert state is not None
    (note,) = moved(state, sent + 14 * DAY, policy).notifications
    valid_until = note.explanation["promotion"]["valid_until"]
    assert valid_until == "2026-06-23T01:00:00Z"  # 2026-06-22 18:00 in Los Angeles
    assert "(valid until 2026-06-22)" in note.summary
    assert note.summary.endswith("infant_formula is due again around 2026-06-22")
