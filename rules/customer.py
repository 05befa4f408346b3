"""Per-customer rolling R/F/M state and the fold that applies one input event to it.

The state is built so that the same set of events gives the same state in any order and with
any duplication: counters are integer sums in day buckets, times are min/max, and every applied
event id is remembered (for `input.max_event_age_days`, beyond which events are refused anyway).
"""

from __future__ import annotations

import hashlib
import json
from base64 import urlsafe_b64encode
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rules.money import format_minor, minor, to_minor
from rules.policy import Policy, TierRule
from streams.events import (
    Cause,
    InputEvent,
    Notification,
    NotificationType,
    Purchase,
    Refund,
    Rejection,
    RejectReason,
)

DAY = 86_400
STATE_FORMAT = 1

# Entry kinds in `CustomerState.seen`.
_PURCHASE = 0
_REFUND = 1


def epoch(moment: datetime) -> int:
    return int(moment.timestamp())


def iso(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def event_key(event_id: str) -> str:
    """A short fixed-size key for the dedup memory (72 bits: collisions within one customer's
    two years of events are not a practical concern), so that long ids cost no more memory."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=9).digest()
    return urlsafe_b64encode(digest).decode()


@dataclass(slots=True)
class CustomerState:
    customer_id: str
    first_purchase_at: int | None = None  # epoch seconds, event time
    last_purchase_at: int | None = None
    latest_event_at: int | None = None  # latest event of any kind: this customer's event clock
    lifetime_orders: int = 0
    lifetime_spend: int = 0  # base-currency minor units, net of refunds
    # day index (epoch // DAY) -> [orders, spend]; only days inside the window are kept
    buckets: dict[int, list[int]] = field(default_factory=dict)
    # category -> [last purchase epoch, purchase count]
    categories: dict[str, list[int]] = field(default_factory=dict)
    # event key -> [kind, day, amount, refunded]; the idempotency memory
    seen: dict[str, list[int]] = field(default_factory=dict)
    tier: str = ""
    tier_since: int | None = None

    def copy(self) -> CustomerState:
        return CustomerState(
            customer_id=self.customer_id,
            first_purchase_at=self.first_purchase_at,
            last_purchase_at=self.last_purchase_at,
            latest_event_at=self.latest_event_at,
            lifetime_orders=self.lifetime_orders,
            lifetime_spend=self.lifetime_spend,
            buckets={day: list(v) for day, v in self.buckets.items()},
            categories={cat: list(v) for cat, v in self.categories.items()},
            seen={key: list(v) for key, v in self.seen.items()},
            tier=self.tier,
            tier_since=self.tier_since,
        )

    def window(self, now: int, window_days: int) -> tuple[int, int]:
        """(orders, spend) of the purchases in the rolling window ending at `now`."""
        today = now // DAY
        first_day = today - window_days + 1
        orders = spend = 0
        for day, (day_orders, day_spend) in self.buckets.items():
            if first_day <= day <= today:
                orders += day_orders
                spend += day_spend
        return orders, spend

    # -- serialisation (compact: this is what Redis holds per customer) --------------------

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "f": STATE_FORMAT,
            "id": self.customer_id,
            "fp": self.first_purchase_at,
            "lp": self.last_purchase_at,
            "le": self.latest_event_at,
            "lo": self.lifetime_orders,
            "ls": self.lifetime_spend,
            "b": self.buckets,
            "c": self.categories,
            "s": self.seen,
            "t": self.tier,
            "ts": self.tier_since,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CustomerState:
        doc = json.loads(text)
        if doc.get("f") != STATE_FORMAT:
            raise ValueError(f"unknown customer state format {doc.get('f')!r}")
        return cls(
            customer_id=doc["id"],
            first_purchase_at=doc["fp"],
            last_purchase_at=doc["lp"],
            latest_event_at=doc["le"],
            lifetime_orders=doc["lo"],
            lifetime_spend=doc["ls"],
            buckets={int(day): v for day, v in doc["b"].items()},
            categories=doc["c"],
            seen=doc["s"],
            tier=doc["t"],
            tier_since=doc["ts"],
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of applying one event: the new state, what to emit, or why it was refused."""

    state: CustomerState | None
    notifications: tuple[Notification, ...] = ()
    rejection: Rejection | None = None
    duplicate: bool = False

    @property
    def changed(self) -> bool:
        return self.rejection is None and not self.duplicate


def new_customer(customer_id: str, policy: Policy) -> CustomerState:
    return CustomerState(customer_id=customer_id, tier=policy.tiers[0].name)


def evaluation_time(
    clock_mode: str, state: CustomerState | None, event: InputEvent, wall_now: int
) -> int:
    """The `now` an event is judged at. In `event` mode it is this customer's own latest event
    time, so the result does not depend on how other customers' events were batched or
    partitioned (1 worker and 3 workers give identical results)."""
    if clock_mode == "wall":
        return wall_now
    latest = state.latest_event_at if state and state.latest_event_at is not None else 0
    return max(latest, epoch(event.occurred_at))


def screen(event: InputEvent, policy: Policy, now: int, wall_now: int) -> Rejection | None:
    """Policy checks on an event that parsed: currency, and how old or how far ahead it is."""
    if event.currency not in policy.currencies:
        return Rejection(reason=RejectReason.UNKNOWN_CURRENCY, detail=event.currency)
    occurred = epoch(event.occurred_at)
    skew = policy.input.max_future_skew_minutes * 60
    # Details quote the event's own time: iso(occurred) fails when its UTC year is out of range
    # (0001-01-01T00:00:00+05:00 is year 0 in UTC).
    if occurred > wall_now + skew:
        return Rejection(
            reason=RejectReason.FUTURE_TIMESTAMP,
            detail=f"occurred_at {event.occurred_at.isoformat()} is more than {skew}s ahead of "
            f"{iso(wall_now)}",
        )
    oldest = now - policy.input.max_event_age_days * DAY
    if occurred < oldest:
        return Rejection(
            reason=RejectReason.TOO_OLD,
            detail=f"occurred_at {event.occurred_at.isoformat()} is older than {iso(oldest)}",
        )
    return None


def apply(state: CustomerState | None, event: InputEvent, policy: Policy, now: int) -> Decision:
    """Fold one screened event into a customer's state, at evaluation time `now`."""
    current = state if state is not None else new_customer(event.customer_id, policy)
    amount = to_minor(event.amount, event.currency, policy)
    if amount is None:  # screen() refuses these; kept total so apply() is safe on its own
        return Decision(
            state, rejection=Rejection(reason=RejectReason.UNKNOWN_CURRENCY, detail=event.currency)
        )
    key = event_key(event.event_id)
    occurred = epoch(event.occurred_at)
    day = occurred // DAY
    previous = current.seen.get(key)
    if previous is not None:
        kind = _PURCHASE if isinstance(event, Purchase) else _REFUND
        if previous[0] != kind or previous[1] != day or previous[2] != amount:
            return Decision(
                state,
                rejection=Rejection(
                    reason=RejectReason.CONFLICTING_DUPLICATE,
                    detail=f"event_id {event.event_id} was applied before with another payload",
                ),
            )
        return Decision(state, duplicate=True)

    if isinstance(event, Refund):
        return _apply_refund(current, event, key, day, amount, policy, now)

    new = current.copy()
    new.seen[key] = [_PURCHASE, day, amount, 0]
    new.first_purchase_at = (
        occurred if new.first_purchase_at is None else min(new.first_purchase_at, occurred)
    )
    new.last_purchase_at = (
        occurred if new.last_purchase_at is None else max(new.last_purchase_at, occurred)
    )
    new.latest_event_at = max(new.latest_event_at or occurred, occurred)
    new.lifetime_orders += 1
    new.lifetime_spend += amount
    bucket = new.buckets.setdefault(day, [0, 0])
    bucket[0] += 1
    bucket[1] += amount
    for category in event.categories():
        entry = new.categories.get(category)
        if entry is None:
            new.categories[category] = [occurred, 1]
        else:
            entry[0] = max(entry[0], occurred)
            entry[1] += 1
    _expire(new, policy, now)
    return Decision(new, notifications=_tier_changes(current, new, policy, now, event))


def _apply_refund(
    current: CustomerState,
    event: Refund,
    key: str,
    day: int,
    amount: int,
    policy: Policy,
    now: int,
) -> Decision:
    original = current.seen.get(event_key(event.refund_of))
    if original is None or original[0] != _PURCHASE:
        # Refunds must follow their purchase. Dead-lettered (not dropped), so an operator can
        # replay it once the purchase is in.
        return Decision(
            current if current.seen else None,
            rejection=Rejection(
                reason=RejectReason.UNKNOWN_PURCHASE,
                detail=f"no purchase {event.refund_of} for customer {event.customer_id}",
            ),
        )
    _, purchase_day, purchase_amount, refunded = original
    if refunded + amount > purchase_amount:
        return Decision(
            current,
            rejection=Rejection(
                reason=RejectReason.REFUND_EXCEEDS_PURCHASE,
                detail=f"refund of {format_minor(amount)} exceeds the remaining "
                f"{format_minor(purchase_amount - refunded)} of {event.refund_of}",
            ),
        )
    new = current.copy()
    occurred = epoch(event.occurred_at)
    new.seen[key] = [_REFUND, day, amount, 0]
    new.seen[event_key(event.refund_of)][3] = refunded + amount
    new.latest_event_at = max(new.latest_event_at or occurred, occurred)
    # A whole order returned no longer counts as an order (F drops); a partial refund only
    # lowers M. The purchase stays the customer's latest visit for recency.
    # `refunded < purchase_amount`: a zero refund after a full one must not return it twice.
    whole = refunded < purchase_amount and refunded + amount == purchase_amount
    new.lifetime_spend -= amount
    new.lifetime_orders -= 1 if whole else 0
    bucket = new.buckets.get(purchase_day)
    if bucket is not None:
        bucket[1] -= amount
        bucket[0] -= 1 if whole else 0
    _expire(new, policy, now)
    # No downgrade here: tiers only go down through the downgrade policy (grace period).
    return Decision(new)


def _expire(state: CustomerState, policy: Policy, now: int) -> None:
    """Drop buckets that left the window and dedup entries older than any acceptable event."""
    today = now // DAY
    first_window_day = today - policy.window_days + 1
    for day in [d for d in state.buckets if d < first_window_day]:
        del state.buckets[day]
    first_seen_day = today - policy.input.max_event_age_days
    for key in [k for k, v in state.seen.items() if v[1] < first_seen_day]:
        del state.seen[key]


def qualifying_tier(policy: Policy, window_orders: int, window_spend: int) -> TierRule:
    best = policy.tiers[0]
    for tier in policy.tiers[1:]:
        if window_orders >= tier.min_window_orders and window_spend >= minor(tier.min_window_spend):
            best = tier
    return best


def notification_id(customer_id: str, kind: str, rule: str, cause: str) -> str:
    """Deterministic: the same decision for the same cause always has the same id."""
    text = f"{customer_id}|{kind}|{rule}|{cause}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _tier_changes(
    before: CustomerState, after: CustomerState, policy: Policy, now: int, event: Purchase
) -> tuple[Notification, ...]:
    orders, spend = after.window(now, policy.window_days)
    target = qualifying_tier(policy, orders, spend)
    if policy.tier_rank(target.name) <= policy.tier_rank(after.tier):
        return ()
    previous = after.tier
    after.tier = target.name
    after.tier_since = now
    rule = f"tier.{target.name}.entry"
    explanation: dict[str, Any] = {
        "rule": rule,
        "previous_tier": previous,
        "new_tier": target.name,
        "inputs": {
            "window_orders": orders,
            "window_spend": format_minor(spend),
            "window_days": policy.window_days,
            "evaluated_at": iso(now),
        },
        "thresholds": {
            "min_window_orders": target.min_window_orders,
            "min_window_spend": str(target.min_window_spend),
            "currency": policy.base_currency,
        },
        "policy_version": policy.version,
    }
    del before  # the previous state is only needed for symmetry with later rules
    return (
        Notification(
            notification_id=notification_id(
                after.customer_id, NotificationType.TIER_UPGRADED, rule, event.event_id
            ),
            type=NotificationType.TIER_UPGRADED,
            customer_id=after.customer_id,
            occurred_at=datetime.fromtimestamp(now, UTC),
            cause=Cause(kind="event", id=event.event_id),
            policy_version=policy.version,
            summary=(
                f"Upgraded from {previous} to {target.name}: {orders} orders and "
                f"{format_minor(spend)} {policy.base_currency} in the last {policy.window_days} "
                f"days meet {target.name}'s {target.min_window_orders} orders and "
                f"{target.min_window_spend} {policy.base_currency}."
            ),
            explanation=explanation,
        ),
    )


def summarize(state: CustomerState, policy: Policy, as_of: int) -> dict[str, Any]:
    """The export view of one customer, with R/F/M evaluated at `as_of`."""
    orders, spend = state.window(as_of, policy.window_days)
    recency = None if state.last_purchase_at is None else (as_of - state.last_purchase_at) // DAY
    return {
        "customer_id": state.customer_id,
        "first_purchase_at": iso(state.first_purchase_at),
        "last_purchase_at": iso(state.last_purchase_at),
        "recency_days": recency,
        "frequency": orders,
        "monetary": format_minor(spend),
        "average_order_value": format_minor(spend // orders) if orders else None,
        "lifetime_orders": state.lifetime_orders,
        "lifetime_spend": format_minor(state.lifetime_spend),
        "currency": policy.base_currency,
        "tier": state.tier,
        "tier_since": iso(state.tier_since),
        "categories": {
            name: {"last_purchase_at": iso(last), "count": count}
            for name, (last, count) in sorted(state.categories.items())
        },
        "as_of": iso(as_of),
        "policy_version": policy.version,
    }
