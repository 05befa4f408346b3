"""The pure fold: apply(state, event, policy, now) -> Decision, and its order/duplication laws."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memberflow.settings import default_rules_file
from rules.customer import (
    DAY,
    CustomerState,
    Decision,
    apply,
    dedup_entries,
    dedup_slack_days,
    epoch,
    evaluation_time,
    event_key,
    expire,
    new_customer,
    notification_id,
    order_tag,
    qualifying_tier,
    screen,
    summarize,
)
from rules.money import from_minor, minor, to_minor
from rules.policy import parse_policy
from streams.codec import decode_event, encode_model
from streams.events import (
    Cause,
    InputEvent,
    Item,
    Notification,
    NotificationType,
    Purchase,
    Refund,
    RejectReason,
)

POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))
NOW = epoch(datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC))  # midday: day boundaries are visible
TODAY = NOW // DAY
CUSTOMER = "cust-1"
CENT = Decimal("0.01")


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def purchase(
    event_id: str,
    when: int,
    amount: str | Decimal = "10.00",
    currency: str = "EUR",
    categories: Sequence[str] = (),
    customer: str = CUSTOMER,
) -> Purchase:
    return Purchase(
        event_id=event_id,
        customer_id=customer,
        occurred_at=at(when),
        amount=Decimal(amount),
        currency=currency,
        items=tuple(Item(sku=f"sku-{i}", category=c) for i, c in enumerate(categories)),
    )


def refund(
    event_id: str,
    refund_of: str,
    when: int,
    amount: str | Decimal,
    currency: str = "EUR",
    customer: str = CUSTOMER,
) -> Refund:
    return Refund(
        event_id=event_id,
        customer_id=customer,
        refund_of=refund_of,
        occurred_at=at(when),
        amount=Decimal(amount),
        currency=currency,
    )


def fold(events: Sequence[InputEvent], now: int = NOW) -> tuple[CustomerState, list[Decision]]:
    """Apply events in order; every event must be accepted (applied or a duplicate)."""
    state: CustomerState | None = None
    decisions = []
    for event in events:
        decision = apply(state, event, POLICY, now)
        assert decision.rejection is None, decision.rejection
        if decision.changed:
            state = decision.state
        decisions.append(decision)
    assert state is not None
    return state, decisions


def tier_notes(decisions: Sequence[Decision]) -> list[Notification]:
    """The tier notifications of a fold (purchases also emit lifecycle changes)."""
    return [
        n
        for d in decisions
        for n in d.notifications
        if n.type in (NotificationType.TIER_UPGRADED, NotificationType.TIER_DOWNGRADED)
    ]


def applied(state: CustomerState | None, event: InputEvent, now: int = NOW) -> Decision:
    decision = apply(state, event, POLICY, now)
    assert decision.rejection is None, decision.rejection
    assert not decision.duplicate
    assert decision.state is not None
    return decision


# -- purchases -------------------------------------------------------------------------------


def test_first_purchase_sets_first_last_lifetime_and_window() -> None:
    when = NOW - 3 * DAY
    decision = applied(None, purchase("p1", when, "19.99", categories=["formula"]))
    state = decision.state
    assert state is not None
    # The only notification is the lifecycle step potential -> new, at the evaluation time.
    assert [
        (n.type, n.explanation["previous_stage"], n.explanation["new_stage"])
        for n in decision.notifications
    ] == [(NotificationType.LIFECYCLE_CHANGED, "potential", "new")]
    assert decision.notifications[0].cause == Cause(kind="event", id="p1")
    assert decision.notifications[0].occurred_at == at(NOW)
    assert (decision.effects, decision.gaps) == ((), ())  # "formula" has no repurchase cycle
    assert decision.changed
    assert state.customer_id == CUSTOMER
    assert state.first_purchase_at == when
    assert state.last_purchase_at == when
    assert state.latest_event_at == when
    assert state.lifetime_orders == 1
    assert state.lifetime_spend == 1999
    assert state.buckets == {when // DAY: [1, 1999]}
    assert state.window(NOW, POLICY.window_days) == (1, 1999)
    assert state.categories == {"formula": [when, 1]}
    assert state.seen.as_dict() == {event_key("p1"): [0, when // DAY, 1999, 0]}
    assert state.tier == "member"
    assert state.tier_since is None
    assert (state.stage, state.stage_since) == ("new", NOW)
    assert (state.reminded, state.deferred, state.marketing_sent, state.win_back_for) == (
        {},
        {},
        [],
        None,
    )


def test_earlier_purchase_moves_first_not_last() -> None:
    later, earlier = NOW - 2 * DAY, NOW - 30 * DAY
    state, _ = fold([purchase("p1", later, "5"), purchase("p2", earlier, "7")])
    assert (state.first_purchase_at, state.last_purchase_at) == (earlier, later)
    assert state.latest_event_at == later
    assert (state.lifetime_orders, state.lifetime_spend) == (2, 1200)
    assert state.buckets == {later // DAY: [1, 500], earlier // DAY: [1, 700]}


def test_apply_does_not_mutate_the_input_state() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "10", categories=["toys"])])
    before = state.to_json()
    applied(state, purchase("p2", NOW - DAY, "20", categories=["toys"]))
    assert state.to_json() == before


def test_same_day_purchases_share_a_bucket() -> None:
    day_start = TODAY * DAY
    state, _ = fold([purchase("p1", day_start, "1"), purchase("p2", day_start + DAY - 1, "2")])
    assert state.buckets == {TODAY: [2, 300]}


# -- the window ------------------------------------------------------------------------------


def test_window_includes_a_purchase_window_days_minus_one_old() -> None:
    when = NOW - (POLICY.window_days - 1) * DAY
    state, _ = fold([purchase("p1", when, "10")])
    assert state.window(NOW, POLICY.window_days) == (1, 1000)
    assert state.buckets == {TODAY - 364: [1, 1000]}


def test_window_excludes_a_purchase_window_days_old() -> None:
    when = NOW - POLICY.window_days * DAY
    state, _ = fold([purchase("p1", when, "10")])
    assert state.window(NOW, POLICY.window_days) == (0, 0)
    assert state.buckets == {}  # dropped at once: it can never re-enter the window
    assert (state.lifetime_orders, state.lifetime_spend) == (1, 1000)
    assert state.last_purchase_at == when


def test_window_is_by_whole_utc_days() -> None:
    first_window_day = TODAY - (POLICY.window_days - 1)
    oldest_in = first_window_day * DAY  # 364.5 days before NOW (midday)
    newest_out = oldest_in - 1  # 364.5 days and one second before NOW
    state, _ = fold([purchase("in", oldest_in, "1"), purchase("out", newest_out, "2")])
    assert state.window(NOW, POLICY.window_days) == (1, 100)
    assert list(state.buckets) == [first_window_day]


def test_window_method_bounds() -> None:
    day = 20_000
    state = CustomerState(customer_id="c", buckets={day: [1, 100], day + 1: [2, 50]})
    # `now` anywhere in the last day of the window still counts `day`.
    assert state.window((day + 364) * DAY, 365) == (3, 150)
    assert state.window((day + 364) * DAY + DAY - 1, 365) == (3, 150)
    assert state.window((day + 365) * DAY, 365) == (2, 50)
    assert state.window((day + 366) * DAY, 365) == (0, 0)
    # Buckets after `now` are not in the window ending at `now`.
    assert state.window(day * DAY, 365) == (1, 100)
    assert state.window(day * DAY - 1, 365) == (0, 0)
    assert state.window((day + 1) * DAY, 1) == (2, 50)


def test_the_remembered_window_follows_every_change_to_the_buckets() -> None:
    """window() remembers its last answer per day and window length (it is asked for several
    times per event); a purchase, a refund or an expiry must never see an old answer."""
    state, _ = fold([purchase("p1", NOW - 2 * DAY, "10")])
    assert state.window(NOW, 365) == (1, 1000)
    after = applied(state, purchase("p2", NOW, "5")).state
    assert after is not None
    assert after.window(NOW, 365) == (2, 1500)
    assert after.window(NOW, 1) == (1, 500)  # another window length is another answer
    assert state.window(NOW, 365) == (1, 1000)  # the state it came from is unchanged
    refunded = applied(after, refund("r1", "p1", NOW, "10")).state
    assert refunded is not None
    assert refunded.window(NOW, 365) == (1, 500)
    # The same object, expired a year later: both buckets go, the remembered answer with them.
    expire(refunded, POLICY, NOW + 365 * DAY)
    assert refunded.buckets == {}
    assert refunded.window(NOW, 365) == (0, 0)


def test_evaluation_later_drops_old_buckets() -> None:
    when = NOW - 100 * DAY
    state, _ = fold([purchase("p1", when, "10")])
    later = when + 365 * DAY
    state = applied(state, purchase("p2", later, "20"), now=later).state
    assert state is not None
    assert state.buckets == {later // DAY: [1, 2000]}
    assert state.window(later, POLICY.window_days) == (1, 2000)
    assert (state.lifetime_orders, state.lifetime_spend) == (2, 3000)


# -- categories and money --------------------------------------------------------------------


def test_categories_keep_last_time_and_count_in_any_order() -> None:
    t1, t2, t3 = NOW - 30 * DAY, NOW - 20 * DAY, NOW - 10 * DAY
    events = [
        purchase("p1", t1, categories=["formula", "diapers"]),
        purchase("p2", t3, categories=["formula"]),
        purchase("p3", t2, categories=["formula", "formula", "toys"]),  # counted once per order
        purchase("p4", t2, categories=[]),
    ]
    # diapers has a repurchase rule: its reminder's interval (30 days, configured) is kept
    tag = order_tag(event_key("p1"))  # the order that anchors the diapers reminder
    expected = {"formula": [t3, 3], "diapers": [t1, 1, 30, 0, tag], "toys": [t2, 1]}
    assert fold(events)[0].categories == expected
    assert fold(list(reversed(events)))[0].categories == expected


@pytest.mark.parametrize(
    ("amount", "currency", "cents"),
    [
        ("10.00", "USD", 920),
        ("10.00", "GBP", 1170),
        ("10.00", "EUR", 1000),
        ("0.05", "CNY", 1),  # 0.0065 -> 0.01
        ("0.005", "USD", 0),  # 0.0046 -> 0.00
        ("0.125", "EUR", 12),  # half-even
        ("0.135", "EUR", 14),  # half-even
        ("1000000000000", "GBP", 117_000_000_000_000),
    ],
)
def test_conversion_to_base_minor_units(amount: str, currency: str, cents: int) -> None:
    assert to_minor(Decimal(amount), currency, POLICY) == cents
    state, _ = fold([purchase("p1", NOW, amount, currency)])
    assert state.lifetime_spend == cents
    assert state.window(NOW, POLICY.window_days) == (1, cents)


def test_money_helpers() -> None:
    assert to_minor(Decimal("1"), "JPY", POLICY) is None
    assert from_minor(920) == Decimal("9.20")
    assert str(from_minor(-5)) == "-0.05"
    assert minor(Decimal("300")) == 30_000


# -- duplicates ------------------------------------------------------------------------------


def test_duplicate_event_is_reported_and_changes_nothing() -> None:
    event = purchase("p1", NOW - DAY, "10", categories=["toys"])
    state, _ = fold([event])
    before = state.to_json()
    decision = apply(state, event, POLICY, NOW)
    assert decision.duplicate is True
    assert decision.rejection is None
    assert decision.notifications == ()
    assert decision.changed is False
    assert decision.state is not None
    assert decision.state.to_json() == before
    # A redelivered copy (re-decoded from bytes) is the same event.
    copy = decode_event(encode_model(event))
    assert isinstance(copy, Purchase)
    assert apply(state, copy, POLICY, NOW).duplicate is True


@pytest.mark.parametrize(
    "conflicting",
    [
        purchase("p1", NOW - DAY, "10.01"),
        purchase("p1", NOW - DAY, "10", currency="USD"),
        purchase("p1", NOW - 2 * DAY, "10"),
        refund("p1", "p1", NOW - DAY, "10"),
    ],
    ids=["amount", "currency", "day", "kind"],
)
def test_same_event_id_with_another_payload_is_a_conflicting_duplicate(
    conflicting: InputEvent,
) -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "10")])
    before = state.to_json()
    decision = apply(state, conflicting, POLICY, NOW)
    assert decision.rejection is not None
    assert decision.rejection.reason is RejectReason.CONFLICTING_DUPLICATE
    assert decision.rejection.detail == "event_id p1 was applied before with another payload"
    assert decision.duplicate is False
    assert decision.changed is False
    assert decision.state is not None
    assert decision.state.to_json() == before


# -- refunds ---------------------------------------------------------------------------------


def test_partial_refund_lowers_spend_only() -> None:
    buy = NOW - 10 * DAY
    state, _ = fold([purchase("p1", buy, "100")])
    state = applied(state, refund("r1", "p1", NOW - DAY, "30")).state
    assert state is not None
    assert (state.lifetime_orders, state.lifetime_spend) == (1, 7000)
    assert state.window(NOW, POLICY.window_days) == (1, 7000)
    assert state.buckets == {buy // DAY: [1, 7000]}
    assert state.seen.get(event_key("p1")) == [0, buy // DAY, 10000, 3000]
    assert state.seen.get(event_key("r1")) == [1, (NOW - DAY) // DAY, 3000, 0]
    assert state.last_purchase_at == buy  # a refund is not a visit
    assert state.latest_event_at == NOW - DAY


def test_full_refund_lowers_orders_too() -> None:
    buy = NOW - 10 * DAY
    state, _ = fold([purchase("p1", buy, "100"), purchase("p2", buy, "5")])
    state = applied(state, refund("r1", "p1", NOW - DAY, "30")).state
    state = applied(state, refund("r2", "p1", NOW - DAY, "70")).state
    assert state is not None
    assert (state.lifetime_orders, state.lifetime_spend) == (1, 500)
    assert state.window(NOW, POLICY.window_days) == (1, 500)
    assert state.buckets == {buy // DAY: [1, 500]}
    assert (state.seen.get(event_key("p1")) or [])[3] == 10000


def test_refund_after_a_full_refund_does_not_lower_orders_again() -> None:
    buy = NOW - 10 * DAY
    state, _ = fold([purchase("p1", buy, "10")])
    state = applied(state, refund("r1", "p1", NOW, "10")).state
    assert state is not None
    assert (state.lifetime_orders, state.window(NOW, 365)) == (0, (0, 0))
    # A zero refund (or one that rounds to zero cents) keeps the order returned once.
    for event_id, amount, currency in [("r2", "0", "EUR"), ("r3", "0.004", "USD")]:
        state = applied(state, refund(event_id, "p1", NOW, amount, currency)).state
        assert state is not None
        assert state.lifetime_orders == 0
        assert state.lifetime_spend == 0
        assert state.window(NOW, POLICY.window_days) == (0, 0)


def test_refund_in_another_currency_is_converted() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "20", "EUR")])
    state = applied(state, refund("r1", "p1", NOW, "10", "USD")).state
    assert state is not None
    assert state.lifetime_spend == 2000 - 920


def test_a_whole_order_refunded_in_parts_in_another_currency_is_returned_once() -> None:
    """Each part is converted and rounded on its own: 3.33 + 3.33 + 3.34 USD of a 10.00 USD
    order came to 919 of its 920 cents, so F never dropped (and other splits went over the
    purchase and were dead-lettered). The part that comes within the slack returns the rest."""
    buy = NOW - 10 * DAY
    state, _ = fold([purchase("p1", buy, "10", "USD"), purchase("p2", buy, "5")])
    for event_id, amount in [("r1", "3.33"), ("r2", "3.33"), ("r3", "3.34")]:
        state = applied(state, refund(event_id, "p1", NOW, amount, "USD")).state
        assert state is not None
    assert (state.lifetime_orders, state.lifetime_spend) == (1, 500)
    assert state.window(NOW, POLICY.window_days) == (1, 500)
    assert (state.seen.get(event_key("p1")) or [])[3] == 920
    # Each refund's entry keeps its own converted amount: a redelivery is a duplicate.
    redelivered = apply(state, refund("r3", "p1", NOW, "3.34", "USD"), POLICY, NOW)
    assert redelivered.duplicate is True and redelivered.rejection is None
    # Nothing is left to refund; a base-currency refund is exact (no slack).
    over = apply(state, refund("r4", "p1", NOW, "0.01", "USD"), POLICY, NOW)
    assert over.rejection is not None
    assert over.rejection.reason is RejectReason.REFUND_EXCEEDS_PURCHASE
    state, _ = fold([purchase("p1", buy, "10")])
    state = applied(state, refund("r1", "p1", NOW, "9.99")).state
    assert state is not None and state.lifetime_orders == 1


@settings(max_examples=300, deadline=None)
@given(
    paid=st.decimals(min_value=Decimal("0.10"), max_value=1000, places=2),
    cut=st.one_of(st.none(), st.decimals(min_value=Decimal("0.01"), max_value=1000, places=2)),
    currency=st.sampled_from(["USD", "GBP", "CNY"]),
)
def test_refunding_a_foreign_order_in_one_or_two_parts_returns_it_whole(
    paid: Decimal, cut: Decimal | None, currency: str
) -> None:
    parts = [paid] if cut is None else [cut, paid - cut]
    rate = POLICY.currencies[currency]
    # A part worth less than 2 cents is within the conversion slack of the whole: out of scope.
    assume(all(part * rate >= Decimal("0.02") for part in parts))
    state, _ = fold([purchase("p1", NOW - DAY, paid, currency)])
    for index, part in enumerate(parts):
        decision = apply(state, refund(f"r{index}", "p1", NOW, part, currency), POLICY, NOW)
        assert decision.rejection is None, (parts, decision.rejection)
        assert decision.state is not None
        state = decision.state
        returned = index == len(parts) - 1
        assert state.lifetime_orders == (0 if returned else 1), parts
    assert (state.lifetime_orders, state.lifetime_spend) == (0, 0)
    assert state.window(NOW, POLICY.window_days) == (0, 0)


def test_refund_of_a_purchase_outside_the_window_changes_lifetime_only() -> None:
    buy = NOW - 400 * DAY
    state, _ = fold([purchase("p1", buy, "50"), purchase("p2", NOW - DAY, "5")])
    state = applied(state, refund("r1", "p1", NOW, "50")).state
    assert state is not None
    assert (state.lifetime_orders, state.lifetime_spend) == (1, 500)
    assert state.window(NOW, POLICY.window_days) == (1, 500)


def test_refund_of_unknown_purchase() -> None:
    lone = apply(None, refund("r1", "nope", NOW, "5"), POLICY, NOW)
    assert lone.rejection is not None
    assert lone.rejection.reason is RejectReason.UNKNOWN_PURCHASE
    assert lone.rejection.detail == f"no purchase nope for customer {CUSTOMER}"
    assert lone.state is None

    state, _ = fold([purchase("p1", NOW - DAY, "10")])
    state = applied(state, refund("r1", "p1", NOW, "1")).state
    assert state is not None
    before = state.to_json()
    for event in [refund("r2", "nope", NOW, "5"), refund("r3", "r1", NOW, "1")]:
        decision = apply(state, event, POLICY, NOW)
        assert decision.rejection is not None
        assert decision.rejection.reason is RejectReason.UNKNOWN_PURCHASE
        assert decision.state is not None
        assert decision.state.to_json() == before


def test_refund_over_the_remaining_amount() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "100")])
    state = applied(state, refund("r1", "p1", NOW, "30")).state
    assert state is not None
    before = state.to_json()
    decision = apply(state, refund("r2", "p1", NOW, "70.01"), POLICY, NOW)
    assert decision.rejection is not None
    assert decision.rejection.reason is RejectReason.REFUND_EXCEEDS_PURCHASE
    assert decision.rejection.detail == "refund of 70.01 exceeds the remaining 70.00 of p1"
    assert decision.state is not None
    assert decision.state.to_json() == before
    # The exact remainder is still accepted.
    assert applied(state, refund("r2", "p1", NOW, "70")).state is not None


def test_duplicate_refund_is_a_duplicate() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "100")])
    event = refund("r1", "p1", NOW, "30")
    state = applied(state, event).state
    assert state is not None
    before = state.to_json()
    decision = apply(state, event, POLICY, NOW)
    assert decision.duplicate is True
    assert decision.rejection is None
    assert decision.state is not None
    assert decision.state.to_json() == before
    assert decision.state.lifetime_spend == 7000


def test_refund_does_not_downgrade_or_notify() -> None:
    state, _ = fold([purchase("p1", NOW - 2 * DAY, "200"), purchase("p2", NOW - DAY, "200")])
    assert state.tier == "silver"
    decision = applied(state, refund("r1", "p1", NOW, "200"))
    assert decision.notifications == ()
    assert decision.state is not None
    assert decision.state.tier == "silver"
    assert decision.state.window(NOW, POLICY.window_days) == (1, 20000)


def test_a_returned_order_leaves_the_same_stage_whenever_its_refund_arrives() -> None:
    """A returned order still was a visit (it stays the latest purchase for recency), so the
    second purchase makes the customer a repeat buyer whether the first order's refund came
    before it or after it: the same events give the same stage in either order."""
    first, second = purchase("p1", NOW - 3 * DAY), purchase("p2", NOW - DAY)
    returned = refund("r1", "p1", NOW - 2 * DAY, "10.00")
    after, _ = fold([first, second, returned])
    before, _ = fold([first, returned, second])
    assert (after.lifetime_orders, before.lifetime_orders) == (1, 1)
    assert (after.stage, before.stage) == ("active", "active")
    assert after == before


def test_a_purchase_after_the_evaluation_time_has_recency_zero() -> None:
    """A purchase within the accepted clock skew (minutes ahead of the wall clock) evaluated at
    the wall clock gave a recency of -1 day."""
    state, _ = fold([purchase("p1", NOW + 300)], now=NOW + 300)
    assert summarize(state, POLICY, NOW)["recency_days"] == 0
    assert summarize(state, POLICY, NOW + 2 * DAY)["recency_days"] == 1


# -- screen ----------------------------------------------------------------------------------


def test_screen_accepts_a_normal_event() -> None:
    assert screen(purchase("p1", NOW - DAY), POLICY, NOW, NOW) is None


def test_screen_unknown_currency() -> None:
    rejection = screen(purchase("p1", NOW, currency="JPY"), POLICY, NOW, NOW)
    assert rejection is not None
    assert rejection.reason is RejectReason.UNKNOWN_CURRENCY
    assert rejection.detail == "JPY"
    refund_rejection = screen(refund("r1", "p1", NOW, "1", "CHF"), POLICY, NOW, NOW)
    assert refund_rejection is not None
    assert refund_rejection.reason is RejectReason.UNKNOWN_CURRENCY


def test_screen_future_beyond_skew_uses_the_wall_clock() -> None:
    skew = POLICY.input.max_future_skew_minutes * 60
    assert skew == 600
    assert screen(purchase("p1", NOW + skew), POLICY, NOW, NOW) is None
    rejection = screen(purchase("p1", NOW + skew + 1), POLICY, NOW, NOW)
    assert rejection is not None
    assert rejection.reason is RejectReason.FUTURE_TIMESTAMP
    # Judged against wall_now, not against the (event-time) evaluation time.
    assert screen(purchase("p1", NOW + skew + 1), POLICY, NOW + DAY, NOW) is not None
    assert screen(purchase("p1", NOW + DAY), POLICY, NOW - DAY, NOW + DAY) is None


def test_screen_too_old_uses_the_evaluation_time() -> None:
    max_age = POLICY.input.max_event_age_days * DAY
    assert screen(purchase("p1", NOW - max_age), POLICY, NOW, NOW) is None
    rejection = screen(purchase("p1", NOW - max_age - 1), POLICY, NOW, NOW)
    assert rejection is not None
    assert rejection.reason is RejectReason.TOO_OLD
    later = NOW + 30 * DAY
    assert screen(purchase("p1", NOW - max_age), POLICY, later, later) is not None


@pytest.mark.parametrize(
    ("occurred_at", "reason"),
    [
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), RejectReason.TOO_OLD),
        (datetime(1, 1, 1, tzinfo=UTC), RejectReason.TOO_OLD),
        (
            datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
            RejectReason.FUTURE_TIMESTAMP,
        ),
    ],
    ids=["year-0-in-utc", "year-1", "year-10000-in-utc"],
)
def test_screen_survives_timestamps_at_the_edge_of_the_calendar(
    occurred_at: datetime, reason: RejectReason
) -> None:
    event = purchase("p1", NOW).model_copy(update={"occurred_at": occurred_at})
    rejection = screen(event, POLICY, NOW, NOW)
    assert rejection is not None
    assert rejection.reason is reason


# -- evaluation time -------------------------------------------------------------------------


def test_evaluation_time() -> None:
    event = purchase("p1", NOW - DAY)
    state = CustomerState(customer_id=CUSTOMER, latest_event_at=NOW)
    assert evaluation_time("wall", state, event, NOW + 5) == NOW + 5
    assert evaluation_time("event", None, event, NOW + 5) == NOW - DAY
    assert evaluation_time("event", state, event, NOW + 5) == NOW
    assert evaluation_time("event", state, purchase("p2", NOW + 9), NOW + 5) == NOW + 9
    empty = new_customer(CUSTOMER, POLICY)
    assert evaluation_time("event", empty, event, NOW + 5) == NOW - DAY


# -- tiers -----------------------------------------------------------------------------------


def silver_history(customer: str = CUSTOMER) -> list[Purchase]:
    return [
        purchase("p1", NOW - 10 * DAY, "200", customer=customer),
        purchase("p2", NOW - 5 * DAY, "150", customer=customer),
    ]


def test_crossing_silver_emits_one_explained_upgrade() -> None:
    first, second = silver_history()
    state = applied(None, first).state
    assert state is not None
    assert state.tier == "member"
    decision = applied(state, second)
    assert decision.state is not None
    assert decision.state.tier == "silver"
    assert decision.state.tier_since == NOW
    # The repeat purchase also makes the customer active (after the tier change).
    assert [n.type for n in decision.notifications] == [
        NotificationType.TIER_UPGRADED,
        NotificationType.LIFECYCLE_CHANGED,
    ]
    assert decision.notifications[1].explanation["new_stage"] == "active"
    note = decision.notifications[0]
    assert note.type is NotificationType.TIER_UPGRADED
    assert note.customer_id == CUSTOMER
    assert note.occurred_at == at(NOW)
    assert note.cause == Cause(kind="event", id="p2")
    assert note.policy_version == "2026.11-1"
    assert note.explanation == {
        "rule": "tier.silver.entry",
        "previous_tier": "member",
        "new_tier": "silver",
        "inputs": {
            "window_orders": 2,
            "window_spend": "350.00",
            "window_days": 365,
            "evaluated_at": "2026-06-01T12:00:00Z",
        },
        "thresholds": {"min_window_orders": 2, "min_window_spend": "300", "currency": "EUR"},
        "policy_version": "2026.11-1",
    }
    assert note.summary == (
        "Upgraded from member to silver: 2 orders and 350.00 EUR in the last 365 days "
        "meet silver's 2 orders and 300 EUR."
    )


def test_upgrade_notification_id_is_deterministic() -> None:
    _, decisions = fold(silver_history())
    _, again = fold(silver_history())
    note, note_again = decisions[1].notifications[0], again[1].notifications[0]
    assert note == note_again
    expected = hashlib.sha256(b"cust-1|tier_upgraded|tier.silver.entry|p2").hexdigest()[:32]
    assert note.notification_id == expected
    assert note.notification_id == notification_id(
        CUSTOMER, NotificationType.TIER_UPGRADED, "tier.silver.entry", "p2"
    )
    _, other = fold(silver_history("cust-2"))
    assert other[1].notifications[0].notification_id != note.notification_id


def test_jumping_tiers_emits_one_notification_to_the_highest() -> None:
    small = [purchase(f"s{i}", NOW - (i + 1) * DAY, "10") for i in range(7)]
    state, decisions = fold(small)
    assert state.tier == "member"
    # No tier change on the way; only the lifecycle steps of the first and second purchase.
    assert [[n.explanation["new_stage"] for n in d.notifications] for d in decisions] == [
        ["new"],
        ["active"],
        *[[]] * 5,
    ]
    decision = applied(state, purchase("big", NOW, "3000"))
    assert decision.state is not None
    assert decision.state.tier == "platinum"
    assert [n.explanation["new_tier"] for n in decision.notifications] == ["platinum"]
    assert decision.notifications[0].explanation["previous_tier"] == "member"
    assert decision.notifications[0].explanation["inputs"]["window_orders"] == 8
    assert decision.notifications[0].explanation["inputs"]["window_spend"] == "3070.00"


def test_jumping_member_to_gold() -> None:
    state, _ = fold([purchase(f"s{i}", NOW - (i + 1) * DAY, "50") for i in range(3)])
    decision = applied(state, purchase("big", NOW, "900"))
    assert [
        (n.explanation["previous_tier"], n.explanation["new_tier"]) for n in decision.notifications
    ] == [("member", "gold")]


def test_no_notification_when_staying_in_the_tier() -> None:
    state, _ = fold(silver_history())
    decision = applied(state, purchase("p3", NOW - DAY, "10"), now=NOW + DAY)
    assert decision.notifications == ()
    assert decision.state is not None
    assert decision.state.tier == "silver"
    assert decision.state.tier_since == NOW


def test_purchases_outside_the_window_do_not_qualify() -> None:
    state, decisions = fold(
        [purchase("p1", NOW - 400 * DAY, "200"), purchase("p2", NOW - DAY, "200")]
    )
    assert state.tier == "member"
    assert tier_notes(decisions) == []
    assert [n.type for d in decisions for n in d.notifications] == [
        NotificationType.LIFECYCLE_CHANGED
    ] * 2


@pytest.mark.parametrize(
    ("orders", "spend", "tier"),
    [
        (0, 0, "member"),
        (2, 29_999, "member"),
        (1, 10_000_000, "member"),
        (2, 30_000, "silver"),
        (3, 99_999, "silver"),
        (4, 100_000, "gold"),
        (7, 10_000_000, "gold"),
        (8, 300_000, "platinum"),
    ],
)
def test_qualifying_tier_thresholds(orders: int, spend: int, tier: str) -> None:
    assert qualifying_tier(POLICY, orders, spend).name == tier


# -- summarize and serialisation -------------------------------------------------------------


SUMMARY_KEYS = (
    "customer_id",
    "first_purchase_at",
    "last_purchase_at",
    "recency_days",
    "frequency",
    "monetary",
    "average_order_value",
    "lifetime_orders",
    "lifetime_spend",
    "currency",
    "tier",
    "tier_since",
    "lifecycle",
    "lifecycle_since",
    "categories",
    "as_of",
    "policy_version",
)


def test_summarize() -> None:
    t1, t2 = NOW - 10 * DAY, NOW - 5 * DAY - 3600
    state, _ = fold(
        [
            purchase("p1", t1, "200", categories=["formula"]),
            purchase("p2", t2, "150", "USD", categories=["formula", "toys"]),
            purchase("p0", NOW - 500 * DAY, "1"),
        ]
    )
    view = summarize(state, POLICY, NOW)
    # Segment fields (RFM type, scores, grade, ...) are covered by the segment tests.
    assert {key: view[key] for key in SUMMARY_KEYS} == {
        "customer_id": CUSTOMER,
        "first_purchase_at": "2025-01-17T12:00:00Z",
        "last_purchase_at": "2026-05-27T11:00:00Z",
        "recency_days": 5,
        "frequency": 2,
        "monetary": "338.00",
        "average_order_value": "169.00",
        "lifetime_orders": 3,
        "lifetime_spend": "339.00",
        "currency": "EUR",
        "tier": "silver",
        "tier_since": "2026-06-01T12:00:00Z",
        "lifecycle": "active",
        "lifecycle_since": "2026-06-01T12:00:00Z",
        "categories": {
            "formula": {"last_purchase_at": "2026-05-27T11:00:00Z", "count": 2},
            "toys": {"last_purchase_at": "2026-05-27T11:00:00Z", "count": 1},
        },
        "as_of": "2026-06-01T12:00:00Z",
        "policy_version": "2026.11-1",
    }
    empty = summarize(new_customer("c0", POLICY), POLICY, NOW)
    assert (empty["recency_days"], empty["frequency"], empty["average_order_value"]) == (
        None,
        0,
        None,
    )
    assert (empty["lifecycle"], empty["lifecycle_since"]) == ("potential", None)


def test_state_with_refunds_round_trips_through_json() -> None:
    state, _ = fold(silver_history())
    state = applied(state, refund("r1", "p1", NOW, "20")).state
    assert state is not None
    assert CustomerState.from_json(state.to_json()) == state
    assert CustomerState.from_json(state.to_json().encode()) == state


def test_unknown_state_format_is_refused() -> None:
    text = new_customer("c", POLICY).to_json().replace('"f":3', '"f":4')
    with pytest.raises(ValueError, match="unknown customer state format 4"):
        CustomerState.from_json(text)


def test_format_1_states_read_back_and_are_written_in_the_current_format() -> None:
    """States saved before the compact dedup memory (its entries as a JSON object) keep
    working: read, they are the same state; written again, they are format 3."""
    state, _ = fold(silver_history())
    state = applied(state, refund("r1", "p1", NOW, "20")).state
    assert state is not None
    doc = json.loads(state.to_json())
    assert doc["f"] == 3 and isinstance(doc["s"], str)
    legacy = {**doc, "f": 1, "s": state.seen.as_dict()}
    restored = CustomerState.from_json(json.dumps(legacy))
    assert restored == state
    assert json.loads(restored.to_json()) == doc
    assert dedup_entries(doc["s"]) == dedup_entries(legacy["s"]) == len(state.seen) == 3


def test_the_dedup_memory_is_compact_text_parsed_only_when_needed() -> None:
    """New events are remembered by appending to the stored text; the entries are parsed for a
    duplicate or a refund (what it was matters there), never for a new purchase."""
    state, _ = fold([purchase("p1", NOW - 3 * DAY, "12.50"), purchase("p2", NOW - DAY, "7")])
    text = json.loads(state.to_json())["s"]
    day1, day2 = (NOW - 3 * DAY) // DAY, (NOW - DAY) // DAY
    assert text == f"{day1};{event_key('p1')}:{day1}:1250;{event_key('p2')}:{day2}:700"
    loaded = CustomerState.from_json(state.to_json())
    after = applied(loaded, purchase("p3", NOW, "1")).state
    assert after is not None
    assert after.seen._map is None  # appended, not parsed
    assert loaded.seen.text() == text  # the state it came from is unchanged
    assert apply(after, purchase("p2", NOW - DAY, "7"), POLICY, NOW).duplicate
    conflicting = apply(after, purchase("p2", NOW - DAY, "8"), POLICY, NOW).rejection
    assert conflicting is not None and conflicting.reason is RejectReason.CONFLICTING_DUPLICATE


def test_an_older_event_becomes_the_dedup_memorys_oldest_day() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "1"), purchase("p0", NOW - 9 * DAY, "2")])
    assert state.seen.oldest_day == (NOW - 9 * DAY) // DAY
    assert json.loads(state.to_json())["s"].startswith(f"{(NOW - 9 * DAY) // DAY};")
    restored = CustomerState.from_json(state.to_json())
    assert restored.seen.as_dict() == state.seen.as_dict()
    assert restored.seen.oldest_day == (NOW - 9 * DAY) // DAY


def test_the_dedup_memory_is_pruned_once_the_oldest_is_past_the_slack() -> None:
    """Events past the horizon are forgotten lazily (at most `slack` days late), all at once."""
    max_age = POLICY.input.max_event_age_days
    slack = dedup_slack_days(max_age)
    assert 0 < slack <= 30
    first = NOW - 10 * DAY
    state, _ = fold([purchase("p1", first, "1"), purchase("p2", first + 5 * DAY, "1")])
    # Past the horizon by less than the slack: kept.
    later = first + (max_age + slack) * DAY
    state = applied(state, purchase("p3", later, "1"), now=later).state
    assert state is not None and len(state.seen) == 3
    # Past it by more: p1 goes, and with it p2, which is past the horizon too.
    latest = first + (max_age + slack + 6) * DAY
    state = applied(state, purchase("p4", latest, "1"), now=latest).state
    assert state is not None
    assert sorted(state.seen.as_dict()) == sorted([event_key("p3"), event_key("p4")])
    assert state.seen.oldest_day == later // DAY


def test_a_refund_of_a_purchase_past_the_horizon_is_unknown_even_if_not_pruned_yet() -> None:
    """Whether a lazy prune already dropped the purchase must not change the outcome."""
    max_age = POLICY.input.max_event_age_days
    buy = NOW - 40 * DAY
    state, _ = fold([purchase("p1", buy, "50")], now=buy)
    now = buy + (max_age + 1) * DAY  # past the horizon, within the slack: still remembered
    assert state.seen.get(event_key("p1")) is not None
    decision = apply(state, refund("r1", "p1", now, "10"), POLICY, now)
    assert decision.rejection is not None
    assert decision.rejection.reason is RejectReason.UNKNOWN_PURCHASE
    # One day earlier it is inside the horizon and the refund applies.
    inside = buy + max_age * DAY
    assert applied(state, refund("r1", "p1", inside, "10"), now=inside).rejection is None


# -- properties ------------------------------------------------------------------------------

CURRENCIES = sorted(POLICY.currencies)
CATEGORIES = ["formula", "diapers", "toys", "books"]
MAX_AGE = POLICY.input.max_event_age_days * DAY


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[Purchase]]:
    """One customer's purchases over up to two years (all acceptable at `now`)."""
    now = draw(
        st.integers(
            min_value=epoch(datetime(2025, 1, 1, tzinfo=UTC)),
            max_value=epoch(datetime(2028, 1, 1, tzinfo=UTC)),
        )
    )
    window_edge = 364 * DAY + now % DAY  # start of the first day of the window
    offsets = st.one_of(
        st.integers(min_value=0, max_value=MAX_AGE),
        st.sampled_from([0, window_edge, window_edge + 1, 365 * DAY, MAX_AGE]),
    )
    amounts = st.one_of(
        st.decimals(min_value=0, max_value=400, places=2),
        st.decimals(min_value=0, max_value=5000, places=3),
    )
    count = draw(st.integers(min_value=1, max_value=25))
    events = [
        purchase(
            f"ord-{index}",
            now - draw(offsets),
            draw(amounts),
            draw(st.sampled_from(CURRENCIES)),
            draw(st.lists(st.sampled_from(CATEGORIES), max_size=3)),
        )
        for index in range(count)
    ]
    return now, events


def fold_counting(
    events: Sequence[Purchase], now: int
) -> tuple[CustomerState, int, list[dict[str, object]], list[tuple[str, str]]]:
    """The state, the duplicates, the tier explanations and the lifecycle steps of a fold."""
    state, decisions = fold(events, now)
    duplicates = sum(d.duplicate for d in decisions)
    explanations = [n.explanation for n in tier_notes(decisions)]
    stages = [
        (n.explanation["previous_stage"], n.explanation["new_stage"])
        for d in decisions
        for n in d.notifications
        if n.type is NotificationType.LIFECYCLE_CHANGED
    ]
    others = [d for d in decisions for n in d.notifications]
    assert len(others) == len(explanations) + len(stages)  # no other kind from a purchase
    return state, duplicates, explanations, stages


@settings(max_examples=200, deadline=None)
@given(history=histories(), data=st.data())
def test_any_order_gives_the_same_state(
    history: tuple[int, list[Purchase]], data: st.DataObject
) -> None:
    now, events = history
    for event in events:
        assert screen(event, POLICY, now, now) is None
    state, _, explanations, stages = fold_counting(events, now)
    shuffled = data.draw(st.permutations(events))
    other, duplicates, other_explanations, other_stages = fold_counting(shuffled, now)
    assert other == state
    assert duplicates == 0
    # Without timers (no advance) the lifecycle is new after one purchase, active after two.
    expected = [("potential", "new")] + ([("new", "active")] if len(events) > 1 else [])
    assert stages == other_stages == expected
    assert (state.stage, state.stage_since) == (expected[-1][1], now)
    # The tier is the qualifying tier of the final window, reached by strict upgrades.
    orders, spend = state.window(now, POLICY.window_days)
    assert state.tier == qualifying_tier(POLICY, orders, spend).name
    assert state.tier_since == (None if state.tier == "member" else now)
    for notes in (explanations, other_explanations):
        ranks = [POLICY.tier_rank(str(n["new_tier"])) for n in notes]
        assert ranks == sorted(set(ranks))
        assert [n["new_tier"] for n in notes[-1:]] == ([] if ranks == [] else [state.tier])


@settings(max_examples=200, deadline=None)
@given(history=histories(), data=st.data())
def test_any_duplication_gives_the_same_state(
    history: tuple[int, list[Purchase]], data: st.DataObject
) -> None:
    now, events = history
    state, _, _, stages = fold_counting(events, now)
    repeats = data.draw(
        st.lists(st.integers(min_value=0, max_value=len(events) - 1), min_size=1, max_size=40)
    )
    redelivered = []
    for index in repeats:
        copy = decode_event(encode_model(events[index]))
        assert isinstance(copy, Purchase)
        redelivered.append(copy)
    stream = data.draw(st.permutations(events + redelivered))
    other, duplicates, _, other_stages = fold_counting(stream, now)
    assert other == state
    assert duplicates == len(repeats)
    assert other_stages == stages  # a duplicate never moves the lifecycle again


@settings(max_examples=200, deadline=None)
@given(history=histories())
def test_state_round_trips_through_json(history: tuple[int, list[Purchase]]) -> None:
    now, events = history
    state, _ = fold(events, now)
    restored = CustomerState.from_json(state.to_json())
    assert restored == state
    assert CustomerState.from_json(restored.to_json()) == state
    # Folding on from the restored copy is the same as folding on from the original.
    extra = purchase("extra", now, "1.23", "USD", ["books"])
    assert apply(restored, extra, POLICY, now) == apply(state, extra, POLICY, now)


@settings(max_examples=200, deadline=None)
@given(history=histories())
def test_window_and_lifetime_equal_a_direct_computation(
    history: tuple[int, list[Purchase]],
) -> None:
    now, events = history
    state, _ = fold(events, now)

    def cents(event: Purchase) -> Decimal:
        rate = POLICY.currencies[event.currency]
        return (event.amount * rate).quantize(CENT, rounding=ROUND_HALF_EVEN)

    first_day = now // DAY - POLICY.window_days + 1
    inside = [e for e in events if first_day <= epoch(e.occurred_at) // DAY <= now // DAY]
    orders, spend = state.window(now, POLICY.window_days)
    assert orders == len(inside)
    assert from_minor(spend) == sum((cents(e) for e in inside), Decimal(0))
    assert state.lifetime_orders == len(events)
    assert from_minor(state.lifetime_spend) == sum((cents(e) for e in events), Decimal(0))
    times = [epoch(e.occurred_at) for e in events]
    assert (state.first_purchase_at, state.last_purchase_at) == (min(times), max(times))
    assert state.latest_event_at == max(times)
    expected_categories: dict[str, list[int]] = {}
    for category in {c for event in events for c in event.categories}:
        bought = [
            (when, order_tag(event_key(event.event_id)))
            for event, when in zip(events, times, strict=True)
            if category in event.categories
        ]
        last, tag = max(bought)  # the latest purchase anchors the reminder (ties: larger tag)
        expected_categories[category] = [last, len(bought)]
        rule = POLICY.repurchase.categories.get(category)
        if rule is not None:  # the interval its reminder was scheduled with, and its order
            expected_categories[category] += [rule.interval_days, 0, tag]
    assert state.categories == expected_categories
    summary = summarize(state, POLICY, now)
    assert (summary["frequency"], summary["monetary"]) == (orders, str(from_minor(spend)))


@settings(max_examples=200, deadline=None)
@given(
    paid=st.decimals(min_value=0, max_value=1000, places=2),
    refunds=st.lists(st.decimals(min_value=0, max_value=600, places=2), max_size=6),
)
def test_refunds_never_exceed_the_purchase_and_return_the_order_once(
    paid: Decimal, refunds: list[Decimal]
) -> None:
    state, _ = fold([purchase("p1", NOW - DAY, paid)])
    refunded = Decimal(0)
    for index, amount in enumerate(refunds):
        decision = apply(state, refund(f"r{index}", "p1", NOW, amount), POLICY, NOW)
        if refunded + amount > paid:
            assert decision.rejection is not None
            assert decision.rejection.reason is RejectReason.REFUND_EXCEEDS_PURCHASE
        else:
            assert decision.rejection is None
            assert decision.state is not None
            state = decision.state
            refunded += amount
    returned = paid > 0 and refunded == paid
    assert state.lifetime_orders == (0 if returned else 1)
    assert from_minor(state.lifetime_spend) == paid - refunded
    assert state.window(NOW, POLICY.window_days) == (
        0 if returned else 1,
        minor(paid - refunded),
    )


def test_a_state_records_the_policy_version_it_was_evaluated_under() -> None:
    state, _ = fold([purchase("p1", NOW - DAY, "10")])
    assert state.policy_version == POLICY.version
    assert json.loads(state.to_json())["pv"] == POLICY.version
    assert CustomerState.from_json(state.to_json()) == state
    refunded = applied(state, refund("r1", "p1", NOW, "1")).state
    assert refunded is not None and refunded.policy_version == POLICY.version


def test_state_json_leaves_out_what_is_empty() -> None:
    """Redis holds this text per customer: a field that is None or empty takes no bytes, and a
    document without it reads back as the same state."""
    state = new_customer("c", POLICY)
    assert json.loads(state.to_json()) == {
        "f": 3,
        "id": "c",
        "lo": 0,
        "ls": 0,
        "t": state.tier,
        "st": "potential",
    }
    assert CustomerState.from_json(state.to_json()) == state
