"""Tier hysteresis, pure: upgrades at once; downgrades only after the grace period below the
tier's entry rule and the minimum time in the tier, announced by one warning, one step down or
straight to the qualifying tier (rules.customer evaluate_tier / downgrade*, rules.timeline).

Events go through what the engine does in `event` clock mode: the customer's due timers fire
first (rules.timeline.advance), then the event is applied at its own time. Default policy:
member; silver 300 EUR and 2 orders; gold 1000 and 4; platinum 3000 and 8; grace 30 days,
90 days minimum in a tier, warning 14 days ahead, one step at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from memberflow.settings import default_rules_file
from rules.customer import (
    DAY,
    CustomerState,
    apply,
    downgrade_due,
    epoch,
    iso,
    qualifying_tier,
)
from rules.policy import Policy, parse_policy
from rules.timeline import advance, pending_timers
from streams.events import Item, Notification, NotificationType, Purchase, Refund

DEFAULT_TEXT = default_rules_file().read_text(encoding="utf-8")
POLICY = parse_policy(DEFAULT_TEXT)
T0 = epoch(datetime(2026, 1, 5, 10, 0, tzinfo=UTC))
CUSTOMER = "cust-1"
UP = NotificationType.TIER_UPGRADED
DOWN = NotificationType.TIER_DOWNGRADED
WARN = NotificationType.TIER_DOWNGRADE_WARNING
TIER_TYPES = (UP, DOWN, WARN)


def policy_with(change: Callable[[dict[str, Any]], None]) -> Policy:
    doc = yaml.safe_load(DEFAULT_TEXT)
    change(doc)
    return parse_policy(yaml.safe_dump(doc, allow_unicode=True))


@cache
def tier_changes(**values: Any) -> Policy:
    return policy_with(lambda d: d["tier_changes"].update(values))


QUALIFYING = tier_changes(downgrade_to="qualifying")


@dataclass
class Customer:
    """One customer driven through the rules the way the engine drives it."""

    policy: Policy = POLICY
    state: CustomerState | None = None
    notes: list[Notification] = field(default_factory=list)
    # per notification: how many events had been applied when it was made (processing order)
    marks: list[int] = field(default_factory=list)
    count: int = 0
    applied: int = 0

    def _advance(self, now: int) -> list[Notification]:
        if self.state is None:
            return []
        moved = advance(self.state, self.policy, now)
        self.state = moved.state
        self.notes.extend(moved.notifications)
        self.marks.extend([self.applied] * len(moved.notifications))
        return list(moved.notifications)

    def buy(self, at: int, amount: str) -> list[Notification]:
        self.count += 1
        event = Purchase(
            event_id=f"p{self.count}",
            customer_id=CUSTOMER,
            occurred_at=datetime.fromtimestamp(at, UTC),
            amount=Decimal(amount),
            currency="EUR",
            items=(Item(sku="sku", category="shoes"),),
        )
        return self._apply(at, event)

    def refund(self, at: int, of: str, amount: str) -> list[Notification]:
        self.count += 1
        event = Refund(
            event_id=f"r{self.count}",
            customer_id=CUSTOMER,
            refund_of=of,
            occurred_at=datetime.fromtimestamp(at, UTC),
            amount=Decimal(amount),
            currency="EUR",
        )
        return self._apply(at, event)

    def _apply(self, at: int, event: Purchase | Refund) -> list[Notification]:
        fired = self._advance(at)
        decision = apply(self.state, event, self.policy, at)
        assert decision.rejection is None, decision.rejection
        self.state = decision.state
        self.applied += 1
        self.notes.extend(decision.notifications)
        self.marks.extend([self.applied] * len(decision.notifications))
        return fired + list(decision.notifications)

    def at(self, now: int) -> list[Notification]:
        """Time passes to `now` (a timer poll): every due timer fires at its due time."""
        return [n for n in self._advance(now) if n.type in TIER_TYPES]

    @property
    def s(self) -> CustomerState:
        assert self.state is not None
        return self.state

    def tier_notes(self) -> list[tuple[Notification, int]]:
        return [(n, m) for n, m in zip(self.notes, self.marks, strict=True) if n.type in TIER_TYPES]


def tier_only(notes: list[Notification]) -> list[Notification]:
    return [n for n in notes if n.type in TIER_TYPES]


def kinds(notes: list[Notification]) -> list[tuple[NotificationType, int]]:
    return [(n.type, epoch(n.occurred_at)) for n in notes if n.type in TIER_TYPES]


def gold_customer(policy: Policy = POLICY) -> Customer:
    """4 x 300 EUR on days 0-3: silver on day 1, gold on day 3."""
    c = Customer(policy)
    for day in range(4):
        c.buy(T0 + day * DAY, "300")
    assert c.s.tier == "gold" and c.s.tier_since == T0 + 3 * DAY
    return c


# -- upgrades -------------------------------------------------------------------------------


def test_upgrade_at_once_on_the_event_that_crosses() -> None:
    c = Customer()
    assert kinds(c.buy(T0, "200")) == []
    assert c.s.tier == "member"
    notes = tier_only(c.buy(T0 + 60, "200"))
    assert kinds(notes) == [(UP, T0 + 60)]
    assert c.s.tier == "silver" and c.s.tier_since == T0 + 60
    x = notes[-1].explanation
    assert (x["previous_tier"], x["new_tier"], x["rule"]) == (
        "member",
        "silver",
        "tier.silver.entry",
    )
    assert x["inputs"]["window_orders"] == 2 and x["inputs"]["window_spend"] == "400.00"
    assert x["thresholds"] == {"min_window_orders": 2, "min_window_spend": "300", "currency": "EUR"}


def test_an_upgrade_can_skip_tiers() -> None:
    c = Customer()
    for i in range(3):
        c.buy(T0 + i * 60, "50")  # 3 orders, 150 EUR: member
    assert c.s.tier == "member"
    notes = tier_only(c.buy(T0 + DAY, "900"))  # 4 orders, 1050 EUR
    assert kinds(notes) == [(UP, T0 + DAY)]
    assert notes[-1].explanation["previous_tier"] == "member"
    assert c.s.tier == "gold"


# -- the grace period and the downgrade -----------------------------------------------------


def test_a_refund_below_the_rule_starts_the_grace_period_without_downgrading() -> None:
    c = gold_customer()
    refund_at = T0 + 10 * DAY
    assert kinds(c.refund(refund_at, "p1", "250")) == []  # 950 EUR < 1000
    assert (c.s.tier, c.s.below_since, c.s.warned_for) == ("gold", refund_at, None)
    # min_days_in_tier dominates: gold since day 3 -> day 93; grace alone would be day 40.
    due = T0 + 93 * DAY
    assert downgrade_due(c.s, POLICY) == due
    tier_timers = [(t.key, t.due) for t in pending_timers(c.s, POLICY) if t.kind == "tier"]
    assert tier_timers == [("tier_warning", due - 14 * DAY), ("tier_downgrade", due)]


def test_warning_14_days_ahead_then_one_step_down_at_the_later_of_grace_and_min_days() -> None:
    c = gold_customer()
    below = T0 + 10 * DAY
    c.refund(below, "p1", "250")
    due = T0 + 93 * DAY
    assert c.at(due - 14 * DAY - 1) == []
    [warning] = c.at(due - 14 * DAY)
    assert warning.type is WARN
    assert epoch(warning.occurred_at) == due - 14 * DAY
    x = warning.explanation
    assert x["tier"] == "gold"
    assert x["downgrade_at"] == iso(due)
    assert x["below_since"] == iso(below)
    assert x["missing"] == {"orders": 0, "spend": "50.00"}
    assert x["grace_days"] == 30 and x["min_days_in_tier"] == 90
    assert iso(due) in warning.summary and "50.00" in warning.summary
    assert c.s.warned_for == below and c.s.tier == "gold"
    assert c.at(due - 1) == []  # one warning per episode
    [down] = c.at(due)
    assert down.type is DOWN and epoch(down.occurred_at) == due
    assert (down.explanation["previous_tier"], down.explanation["new_tier"]) == ("gold", "silver")
    assert down.explanation["below_since"] == iso(below)
    assert down.explanation["downgrade_to"] == "one_step"
    assert (c.s.tier, c.s.tier_since, c.s.below_since, c.s.warned_for) == (
        "silver",
        due,
        None,
        None,
    )
    assert c.at(due + 200 * DAY) == []  # 950 EUR in 4 orders meets silver


def test_grace_dominates_when_the_customer_has_been_in_the_tier_long_enough() -> None:
    c = gold_customer()
    below = T0 + 200 * DAY
    c.refund(below, "p2", "300")  # a whole order: 3 orders, 900 EUR
    assert c.s.below_since == below
    due = below + 30 * DAY
    assert downgrade_due(c.s, POLICY) == due
    assert kinds(c.at(due)) == [(WARN, due - 14 * DAY), (DOWN, due)]
    assert c.s.tier == "silver"


def test_window_expiry_starts_the_grace_period() -> None:
    c = Customer()
    c.buy(T0, "200")
    c.buy(T0 + 5 * DAY, "200")
    assert c.s.tier == "silver"
    expiry = (T0 // DAY + POLICY.window_days) * DAY  # the first purchase leaves the window
    assert c.at(expiry - 1) == [] and c.s.below_since is None
    assert c.at(expiry) == []  # no downgrade yet, only the start of the grace period
    assert (c.s.tier, c.s.below_since) == ("silver", expiry)
    assert c.s.window(expiry, POLICY.window_days) == (1, 20_000)
    notes = c.at(expiry + 30 * DAY)
    assert kinds(notes) == [(WARN, expiry + 16 * DAY), (DOWN, expiry + 30 * DAY)]
    # by the warning the second purchase has left the window too (day 5 + 365)
    assert notes[0].explanation["missing"] == {"orders": 2, "spend": "300.00"}
    assert c.s.tier == "member" and c.s.below_since is None
    assert downgrade_due(c.s, POLICY) is None  # the entry tier: nothing below it


def test_one_step_keeps_stepping_down_with_a_new_grace_period_per_step() -> None:
    c = Customer()
    for i in range(8):
        c.buy(T0 + i * DAY, "400")  # 8 orders, 3200 EUR: platinum on day 7
    assert c.s.tier == "platinum"
    below = T0 + 20 * DAY
    for i in range(2, 9):
        c.refund(below + i - 2, f"p{i}", "400")  # 7 whole orders back: 1 order, 400 EUR
    assert c.s.below_since == below
    first = T0 + 97 * DAY  # platinum since day 7, + 90 days
    assert kinds(c.at(first)) == [(WARN, first - 14 * DAY), (DOWN, first)]
    assert (c.s.tier, c.s.below_since, c.s.warned_for) == ("gold", first, None)
    second = first + 90 * DAY  # a fresh tier: its minimum time again
    assert kinds(c.at(second)) == [(WARN, second - 14 * DAY), (DOWN, second)]
    assert c.s.tier == "silver" and c.s.below_since == second
    third = second + 90 * DAY
    assert kinds(c.at(third)) == [(WARN, third - 14 * DAY), (DOWN, third)]
    assert c.s.tier == "member" and c.s.below_since is None


def test_qualifying_goes_straight_to_the_tier_the_customer_meets() -> None:
    c = Customer(QUALIFYING)
    for i in range(8):
        c.buy(T0 + i * DAY, "400")
    below = T0 + 20 * DAY
    for i in range(2, 9):
        c.refund(below + i - 2, f"p{i}", "400")
    due = T0 + 97 * DAY
    notes = c.at(due + 365 * DAY)
    assert kinds(notes) == [(WARN, due - 14 * DAY), (DOWN, due)]
    x = notes[-1].explanation
    assert (x["previous_tier"], x["new_tier"], x["downgrade_to"]) == (
        "platinum",
        "member",
        "qualifying",
    )
    assert (c.s.tier, c.s.tier_since, c.s.below_since) == ("member", due, None)


def test_qualifying_stops_at_a_middle_tier_the_customer_still_meets() -> None:
    c = Customer(QUALIFYING)
    for i in range(8):
        c.buy(T0 + i * DAY, "400")
    c.refund(T0 + 20 * DAY, "p8", "400")  # 7 orders, 2800 EUR: gold
    notes = c.at(T0 + 97 * DAY)
    assert kinds(notes)[-1] == (DOWN, T0 + 97 * DAY)
    assert c.s.tier == "gold" and c.s.below_since is None


def test_a_purchase_that_meets_the_tier_again_ends_the_grace_period() -> None:
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "250")
    c.buy(T0 + 20 * DAY, "10")  # 5 orders, 960 EUR: still below gold
    assert c.s.below_since == T0 + 10 * DAY
    assert kinds(c.buy(T0 + 30 * DAY, "100")) == []  # 1060 EUR: meets gold, not an upgrade
    assert (c.s.tier, c.s.below_since, c.s.warned_for) == ("gold", None, None)
    assert [t for t in pending_timers(c.s, POLICY) if t.kind == "tier"] == []
    assert c.at(T0 + 360 * DAY) == []
    assert c.s.tier == "gold"


def test_a_lowered_bar_ends_the_grace_period_at_the_warning_or_downgrade_without_notice() -> None:
    """A new policy version lowers gold's bar below what a customer in its grace period has.
    The worker adopting it wakes the customer, and the due tier timers fire before the
    re-evaluation: they must see that gold is met (no "downgraded from gold to gold"), end
    the grace period and not come back."""
    lowered = policy_with(
        lambda d: d["tiers"][2].update(min_window_orders=3, min_window_spend="800")
    )
    for until in (T0 + 79 * DAY, T0 + 100 * DAY):  # at the warning; at the downgrade
        c = gold_customer()
        c.refund(T0 + 10 * DAY, "p1", "300")  # 3 orders, 900 EUR: below gold (4, 1000)
        assert c.s.below_since == T0 + 10 * DAY
        c.policy = lowered  # gold: 3 orders and 800 EUR
        assert c.at(until) == []
        assert (c.s.tier, c.s.below_since, c.s.warned_for) == ("gold", None, None)
        assert [t for t in pending_timers(c.s, c.policy) if t.kind == "tier"] == []


def test_a_renamed_tier_keeps_its_holders_when_listed_under_formerly() -> None:
    """gold becomes premium. Listed under `formerly`, its holders are premium from their next
    evaluation on (a purchase or a timer), with tier_since kept and no notification; not
    listed, they count as the entry tier and are "upgraded" to premium (the known limit)."""

    def renamed(formerly: list[str]) -> Policy:
        return policy_with(lambda d: d["tiers"][2].update(name="premium", formerly=formerly))

    c = gold_customer()
    since = c.s.tier_since
    c.policy = renamed(["gold"])
    assert tier_only(c.buy(T0 + 5 * DAY, "10")) == []
    assert (c.s.tier, c.s.tier_since) == ("premium", since)

    # In a grace period, the rename changes neither it nor when the downgrade is due.
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "300")
    due = downgrade_due(c.s, POLICY)
    c.policy = renamed(["gold"])
    assert downgrade_due(c.s, c.policy) == due
    notes = c.at(T0 + 365 * DAY)
    assert kinds(notes) == [(WARN, T0 + 79 * DAY), (DOWN, T0 + 93 * DAY)]
    assert "Your premium status ends" in notes[0].summary
    assert notes[1].explanation["previous_tier"] == "premium"
    assert c.s.tier == "silver"

    c = gold_customer()
    c.policy = renamed([])
    notes = tier_only(c.buy(T0 + 5 * DAY, "10"))
    assert [(n.type, n.explanation["previous_tier"]) for n in notes] == [(UP, "gold")]


def test_a_new_policy_that_makes_timers_overdue_fires_them_now_not_back_dated() -> None:
    """A shorter window adopted on day 300: the purchases of days 0-3 left the new 180-day
    window on days 180-183. The customer falls below gold now, and its grace period starts
    now: it used to start on day 180, with the warning and the downgrade sent at once,
    dated months back."""
    c = gold_customer()
    c.policy = policy_with(lambda d: d.update(window_days=180, version="2026.12-1"))
    assert c.at(T0 + 300 * DAY) == []
    assert (c.s.tier, c.s.below_since, c.s.policy_version) == ("gold", T0 + 300 * DAY, "2026.12-1")
    assert kinds(c.at(T0 + 400 * DAY)) == [(WARN, T0 + 316 * DAY), (DOWN, T0 + 330 * DAY)]

    # A grace period shortened under a customer already warned: the warning gave day 93, and
    # the downgrade keeps that date (it went out at adoption, day 86, a week early).
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "300")
    [warning] = c.at(T0 + 85 * DAY)
    assert (warning.type, warning.explanation["downgrade_at"]) == (WARN, iso(T0 + 93 * DAY))
    c.policy = policy_with(
        lambda d: (
            d["tier_changes"].update(grace_days=7, min_days_in_tier=7),
            d.update(version="2026.12-1"),
        )
    )
    assert c.at(T0 + 93 * DAY - 1) == []
    assert kinds(c.at(T0 + 93 * DAY)) == [(DOWN, T0 + 93 * DAY)]
    # Its next episode (silver, below since day 93) runs on the new rules: no promise carried.
    assert c.s.warned_until is None
    # A longer grace period moves the downgrade later than the warned date.
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "300")
    c.at(T0 + 85 * DAY)
    c.policy = policy_with(
        lambda d: (d["tier_changes"].update(grace_days=120), d.update(version="2026.12-1"))
    )
    assert c.at(T0 + 129 * DAY) == []
    assert kinds(c.at(T0 + 130 * DAY)) == [(DOWN, T0 + 130 * DAY)]

    # The same policy version: timers fire at their own due times, as a batch computation
    # over the events would (event clock exactness).
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "300")
    assert kinds(c.at(T0 + 200 * DAY)) == [(WARN, T0 + 79 * DAY), (DOWN, T0 + 93 * DAY)]


def test_an_upgrade_found_by_an_overdue_window_expiry_is_announced() -> None:
    """A new policy with a shorter window and a lower silver bar: the window expiry it makes
    overdue fires first and finds silver met. The upgrade happened without a tier_upgraded
    (the expiry's evaluation dropped it, and the wake's own evaluation found nothing left)."""
    c = Customer()
    c.buy(T0, "100")
    c.buy(T0 + 190 * DAY, "50")
    c.buy(T0 + 195 * DAY, "50")
    assert c.s.tier == "member"  # 200 EUR: silver needs 300
    c.policy = policy_with(
        lambda d: (
            d.update(window_days=180, version="2026.12-1"),
            d["tiers"][1].update(min_window_spend=100),
        )
    )
    [up] = c.at(T0 + 200 * DAY)
    assert (up.type, epoch(up.occurred_at), up.explanation["new_tier"]) == (
        UP,
        T0 + 200 * DAY,
        "silver",
    )
    assert c.s.tier == "silver"


def test_recovering_after_the_warning_cancels_the_downgrade_and_a_new_episode_warns_again() -> None:
    c = gold_customer()
    c.refund(T0 + 10 * DAY, "p1", "250")
    assert kinds(c.at(T0 + 80 * DAY)) == [(WARN, T0 + 79 * DAY)]
    c.buy(T0 + 85 * DAY, "100")
    assert (c.s.below_since, c.s.warned_for) == (None, None)
    assert c.at(T0 + 94 * DAY) == []
    assert c.s.tier == "gold"
    # A second episode: its own warning and downgrade.
    second = T0 + 100 * DAY
    c.refund(second, "p2", "300")  # a whole order back: 4 orders, 750 EUR
    notes = c.at(second + 30 * DAY)
    assert kinds(notes) == [(WARN, second + 16 * DAY), (DOWN, second + 30 * DAY)]
    assert notes[0].explanation["below_since"] == iso(second)
    assert c.s.tier == "silver"


def test_no_warning_when_warning_days_is_zero() -> None:
    policy = tier_changes(warning_days=0)
    c = gold_customer(policy)
    c.refund(T0 + 10 * DAY, "p1", "250")
    assert kinds(c.at(T0 + 200 * DAY)) == [(DOWN, T0 + 93 * DAY)]


def test_a_warning_longer_than_the_grace_period_goes_out_when_the_episode_starts() -> None:
    policy = tier_changes(grace_days=7, min_days_in_tier=0, warning_days=14)
    c = gold_customer(policy)
    below = T0 + 10 * DAY
    c.refund(below, "p1", "250")
    assert kinds(c.at(below + 7 * DAY)) == [(WARN, below), (DOWN, below + 7 * DAY)]


def test_with_no_grace_the_warning_still_precedes_the_downgrade() -> None:
    policy = tier_changes(grace_days=0, min_days_in_tier=0, warning_days=14)
    c = gold_customer(policy)
    below = T0 + 10 * DAY
    c.refund(below, "p1", "250")
    assert kinds(c.at(below)) == [(WARN, below), (DOWN, below)]


# -- the property ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # buy | refund | poll
    gap: int  # seconds after the previous operation
    amount: int = 0  # minor units (buy), or for a refund: whole (0) or a share in percent
    target: int = 0  # refund: which earlier purchase (index modulo the purchases so far)


ops = st.lists(
    st.one_of(
        st.builds(
            Op,
            kind=st.just("buy"),
            gap=st.integers(0, 40 * DAY) | st.integers(0, 3 * DAY),
            amount=st.sampled_from([5_000, 15_000, 30_000, 50_000, 120_000])
            | st.integers(100, 200_000),
        ),
        st.builds(
            Op,
            kind=st.just("refund"),
            gap=st.integers(0, 20 * DAY),
            amount=st.sampled_from([0, 0, 10, 50, 90]),
            target=st.integers(0, 1_000),
        ),
        st.builds(Op, kind=st.just("poll"), gap=st.integers(0, 120 * DAY)),
    ),
    max_size=30,
)


Change = tuple[int, int, int, int]  # apply time, purchase day, orders, spend


def window_model(changes: list[Change], at: int, window_days: int) -> tuple[int, int]:
    """(orders, spend) in the window ending at `at`, from these applied changes."""
    today = at // DAY
    orders = spend = 0
    for _, day, d_orders, d_spend in changes:
        if today - window_days < day <= today:
            orders += d_orders
            spend += d_spend
    return orders, spend


def run_history(policy: Policy, history: list[Op]) -> tuple[Customer, list[Change]]:
    """Drive a customer through `history`, then two years on; returns it and the changes it
    applied, in processing order."""
    c = Customer(policy)
    applied: list[Change] = []
    purchases: list[list[Any]] = []  # [event id, time, amount, refunded]
    now = T0
    for op in history:
        now += op.gap
        if op.kind == "poll":
            c.at(now)
            continue
        if op.kind == "buy":
            c.buy(now, f"{op.amount / 100:.2f}")
            purchases.append([f"p{c.count}", now, op.amount, 0])
            applied.append((now, now // DAY, 1, op.amount))
        else:
            # Refunds of purchases the customer still remembers (input.max_event_age_days).
            open_ = [
                p
                for p in purchases
                if p[2] > p[3] and p[1] // DAY >= now // DAY - policy.input.max_event_age_days
            ]
            if not open_:
                continue
            purchase = open_[op.target % len(open_)]
            remaining = purchase[2] - purchase[3]
            amount = remaining if op.amount == 0 else max(1, remaining * op.amount // 100)
            whole = purchase[3] + amount == purchase[2]
            c.refund(now, purchase[0], f"{amount / 100:.2f}")
            purchase[3] += amount
            applied.append((now, purchase[1] // DAY, -1 if whole else 0, -amount))
        # Upgrades happen at once: after any event the tier is at least the qualifying one.
        orders, spend = window_model(applied, now, policy.window_days)
        assert c.s.window(now, policy.window_days) == (orders, spend)
        qualifying = qualifying_tier(policy, orders, spend)
        assert policy.tier_rank(c.s.tier) >= policy.tier_rank(qualifying.name)
    c.at(now + 2 * 365 * DAY)  # every purchase leaves the window, every downgrade fires
    return c, applied


def check_hysteresis(policy: Policy, history: list[Op]) -> None:
    """Check every tier change of one history against the hysteresis rules."""
    c, applied = run_history(policy, history)
    changes = policy.tier_changes
    notes = c.tier_notes()
    times = [epoch(n.occurred_at) for n, _ in notes]
    assert times == sorted(times)
    # The moments the window can change, in processing order, as (time, events applied):
    # after each event, and when a purchase day leaves the window (the expiry timer fires
    # before the events of that second).
    moments = {(when, i + 1) for i, (when, *_) in enumerate(applied)}
    for _, day, _, _ in applied:
        expiry = (day + policy.window_days) * DAY
        moments.add((expiry, sum(1 for when, *_ in applied if when < expiry)))
    tier, entered = policy.tiers[0].name, (0, 0)
    warnings: dict[tuple[str, str], int] = {}  # (tier, below_since) -> warnings seen
    for n, mark in notes:
        at = epoch(n.occurred_at)
        x = n.explanation
        if n.type is UP:
            assert x["previous_tier"] == tier
            tier, entered = x["new_tier"], (at, mark)
            continue
        if n.type is WARN:
            assert x["tier"] == tier
            key = (tier, x["below_since"])
            warnings[key] = warnings.get(key, 0) + 1
            assert warnings[key] == 1, f"second warning for {key}"
            assert changes.warning_days > 0
            assert at == max(
                _epoch(x["downgrade_at"]) - changes.warning_days * DAY, _epoch(x["below_since"])
            )
            continue
        assert n.type is DOWN and x["previous_tier"] == tier
        rule = policy.tiers[policy.tier_rank(tier)]

        def meets(moment: tuple[int, int], rule: Any = rule) -> bool:
            orders, spend = window_model(applied[: moment[1]], moment[0], policy.window_days)
            return orders >= rule.min_window_orders and spend >= int(rule.min_window_spend * 100)

        # Never before tier_since + min_days_in_tier ...
        assert at >= entered[0] + changes.min_days_in_tier * DAY
        # ... nor before grace_days of missing the rule without a break, computed here from
        # the applied events (not from the engine's below_since).
        assert not meets((at, mark)), "downgraded while meeting the tier's rule"
        start = at
        for moment in sorted(m for m in moments | {entered} if entered <= m < (at, mark))[::-1]:
            if meets(moment):
                break
            start = moment[0]
        assert at >= start + changes.grace_days * DAY
        # The engine's own below_since is exactly when the episode started, and the
        # downgrade comes at the later of its two conditions, not later.
        assert _epoch(x["below_since"]) == start
        assert at == max(
            start + changes.grace_days * DAY, entered[0] + changes.min_days_in_tier * DAY
        )
        # Exactly one warning for this episode (none when warning_days is 0).
        expected = 1 if changes.warning_days > 0 else 0
        assert warnings.get((tier, x["below_since"]), 0) == expected
        # One step, or straight to the qualifying tier.
        orders, spend = window_model(applied[:mark], at, policy.window_days)
        qualifying = policy.tier_rank(qualifying_tier(policy, orders, spend).name)
        rank = policy.tier_rank(tier)
        new_rank = max(qualifying, rank - 1) if changes.downgrade_to == "one_step" else qualifying
        assert x["new_tier"] == policy.tiers[new_rank].name
        tier, entered = x["new_tier"], (at, mark)
    # Two years after the last event every purchase has left the window, and every step
    # down has happened.
    assert tier == (c.s.tier if c.state else policy.tiers[0].name) == policy.tiers[0].name
    assert c.state is None or downgrade_due(c.s, policy) is None
    downgrades = sum(1 for n, _ in notes if n.type is DOWN)
    event(f"downgrades: {min(downgrades, 3)}{'+' if downgrades > 3 else ''}")
    event(f"warnings without a downgrade: {len(warnings) - downgrades > 0}")


def _epoch(text: str) -> int:
    return epoch(datetime.fromisoformat(text.replace("Z", "+00:00")))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([POLICY, QUALIFYING]), ops)
def test_never_downgraded_early_and_always_warned_once(policy: Policy, history: list[Op]) -> None:
    check_hysteresis(policy, history)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        lambda grace, min_days, warning, to: tier_changes(
            grace_days=grace, min_days_in_tier=min_days, warning_days=warning, downgrade_to=to
        ),
        st.sampled_from([0, 1, 7, 30]),
        st.sampled_from([0, 1, 30, 90]),
        st.sampled_from([0, 1, 14, 45]),
        st.sampled_from(["one_step", "qualifying"]),
    ),
    ops,
)
def test_hysteresis_holds_for_any_tier_changes_policy(policy: Policy, history: list[Op]) -> None:
    check_hysteresis(policy, history)
