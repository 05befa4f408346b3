"""Read-only views of the stored state, shared by the CLI and the worker's HTTP API.

`memberflow customer ID` and `GET /customers/{id}` print the same document: both call
`customer_view`, so the two can never drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from memberflow.metrics import CUSTOMER_DIMENSIONS
from memberflow.population import current_snapshot
from rules.customer import (
    CustomerState,
    Stage,
    downgrade_due,
    epoch,
    iso,
    qualifying_tier,
    summarize,
)
from rules.money import format_minor, minor
from rules.names import RFM_TYPES, TYPE_NAMES
from rules.policy import Policy
from rules.segments import Snapshot, classify, customer_values, thresholds_view
from rules.timeline import describe_pending, learned_interval
from state.store import Store
from streams.events import Identifier

# The times a user may evaluate at or tick to (--as-of, `tick TIME`, and the worker's ?as_of=,
# which parses with parse_time too). Nothing happened before the Unix epoch: an as_of there
# only gives negative recency_days. The end of 9998 stays a year short of the last moment a
# datetime holds (9999-12-31 UTC): the views print as_of, and a time like
# 9999-12-31T23:59:59-14:00 (year 10000 in UTC) crashed them.
EARLIEST_TIME = 0  # 1970-01-01T00:00:00Z
LATEST_TIME = epoch(datetime(9998, 12, 31, 23, 59, 59, tzinfo=UTC))


class TimeOutOfRange(ValueError):
    """An ISO 8601 time outside EARLIEST_TIME..LATEST_TIME."""


def parse_time(text: str) -> int:
    """An ISO 8601 time (a bare date or naive time means UTC) as epoch seconds. ValueError if
    it is not one, TimeOutOfRange (a ValueError) if it is outside the supported range."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Compared unrounded: epoch() truncates toward zero, which would let 1969-12-31T23:59:59.5Z in.
    if not EARLIEST_TIME <= moment.timestamp() <= LATEST_TIME:
        raise TimeOutOfRange(
            f"{text!r} is outside the supported range {iso(EARLIEST_TIME)} to {iso(LATEST_TIME)}"
        )
    return epoch(moment)


DIMENSIONS = CUSTOMER_DIMENSIONS  # the label prefixes of Store.distribution()

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)


class InvalidCustomerId(ValueError):
    """A customer id that no event could carry (see `Identifier` in streams/events.py)."""


def check_customer_id(text: str) -> str:
    """`text` if it is a valid customer id, else InvalidCustomerId saying why."""
    try:
        return _IDENTIFIER.validate_python(text)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise InvalidCustomerId(
            f"invalid customer id {text[:140]!r}: {problem} (1-128 characters of "
            "A-Z a-z 0-9 . _ : @ / + = -)"
        ) from None


async def learned_intervals(store: Store, policy: Policy) -> dict[str, int]:
    """Median repurchase gaps per learning category, as the engine computes them."""
    categories = [c for c, rule in policy.repurchase.categories.items() if rule.learn]
    histograms = await store.gap_histograms(categories) if categories else {}
    learned = {}
    for category, histogram in histograms.items():
        days = learned_interval(histogram, policy.repurchase.min_samples)
        if days is not None:
            learned[category] = days
    return learned


async def default_as_of(store: Store, clock_mode: str, wall_now: int) -> int:
    """The engine's notion of now: the event clock in `event` mode (once there is one), else
    wall time."""
    if clock_mode == "event":
        clock = await store.clock()
        if clock is not None:
            return int(clock)
    return wall_now


class AsOfTooEarly(ValueError):
    """An evaluation time asked for before the customer's last purchase: the state keeps no
    history to look back with (recency would be negative, the labels newer than the time)."""


def looked_at(state: CustomerState, as_of: int) -> int:
    """The time a state can be evaluated at for `as_of`: that time, or its last purchase if
    that is later (a state keeps no history to look back with)."""
    last = state.last_purchase_at
    return as_of if last is None or last <= as_of else last


def check_as_of(state: CustomerState, as_of: int) -> None:
    """Refuse an as-of the user asked for that is before the customer's last purchase."""
    last = state.last_purchase_at
    if looked_at(state, as_of) != as_of:
        raise AsOfTooEarly(
            f"as of {iso(as_of)} is before {state.customer_id}'s last purchase ({iso(last)}): "
            "the state can be evaluated at that time or later, not looked back at"
        )


async def customer_view(
    store: Store,
    policy: Policy,
    customer_id: str,
    as_of: int,
    learned: dict[str, int] | None = None,
    asked_as_of: bool = False,
) -> dict[str, Any] | None:
    """One customer's R/F/M, labels, why it holds them, what is scheduled and what is still
    to be sent; None if there is no such customer. `asked_as_of`: the time came from the user,
    and one before the last purchase is refused (AsOfTooEarly)."""
    stored = (await store.load([customer_id]))[customer_id]
    if stored.state is None:
        return None
    state = stored.state
    if asked_as_of:
        check_as_of(state, as_of)
    if learned is None:
        learned = await learned_intervals(store, policy)
    snapshot = await current_snapshot(store)
    view = summarize(state, policy, as_of)
    view["state_version"] = stored.version
    view["explanation"] = {
        "tier": explain_tier(state, policy, as_of),
        "segment": explain_segment(state, policy, snapshot, as_of),
    }
    view["pending_timers"] = describe_pending(state, policy, learned)
    view["pending_notifications"] = [n.model_dump(mode="json") for n in stored.outbox]
    return view


def explain_tier(state: CustomerState, policy: Policy, as_of: int) -> dict[str, Any]:
    """Why the customer holds its tier: the window at `as_of` against every tier's entry rule,
    and the grace period it is in, if its window no longer meets its tier."""
    orders, spend = state.window(as_of, policy.window_days)
    qualifies = qualifying_tier(policy, orders, spend)
    due = downgrade_due(state, policy)
    return {
        "tier": state.tier,
        "qualifies_for": qualifies.name,
        "inputs": {
            "window_orders": orders,
            "window_spend": format_minor(spend),
            "window_days": policy.window_days,
            "evaluated_at": iso(as_of),
        },
        "tiers": [
            {
                "name": tier.name,
                "min_window_orders": tier.min_window_orders,
                "min_window_spend": str(tier.min_window_spend),
                "met": orders >= tier.min_window_orders and spend >= minor(tier.min_window_spend),
            }
            for tier in policy.tiers
        ],
        "currency": policy.base_currency,
        "below_tier_since": iso(state.below_since),
        "downgrade_due_at": iso(due),
        "policy_version": policy.version,
    }


def explain_segment(
    state: CustomerState, policy: Policy, snapshot: Snapshot | None, as_of: int
) -> dict[str, Any] | None:
    """The customer's values against the current population snapshot: flags, 1-5 scores and
    the thresholds. `label` is the stored RFM type; `at_as_of` what the current snapshot gives
    at `as_of` (they differ while a relabelling is pending). None without a snapshot."""
    values = customer_values(state, policy, as_of)
    if snapshot is None or values is None:
        return None
    segment = classify(values, snapshot, policy)
    return {
        "rule": f"segments.{policy.segments.method}",
        "label": state.segment[0] if state.segment else None,
        "labelled_with_snapshot": state.segment[3] if state.segment else None,
        "at_as_of": segment.rfm_type,
        "grade_at_as_of": segment.grade,
        "inputs": {
            "last_purchase_at": iso(values.r),
            "window_orders": values.f,
            "window_spend": format_minor(values.m),
        },
        "flags": dict(zip(("r_high", "f_high", "m_high"), segment.flags, strict=True)),
        "scores": dict(zip(("r", "f", "m"), segment.scores, strict=True)),
        "thresholds": thresholds_view(snapshot),
    }


def group_distribution(distribution: dict[str, int]) -> dict[str, dict[str, int]]:
    """{"tier:gold": 3, ...} from Store.distribution() as {"tier": {"gold": 3}, ...}."""
    grouped: dict[str, dict[str, int]] = {d: {} for d in DIMENSIONS}
    for key, count in distribution.items():
        dimension, _, label = key.partition(":")
        if dimension in grouped and label:
            grouped[dimension][label] = count
    return grouped


def known_labels(policy: Policy) -> dict[str, list[str]]:
    """Every label of each dimension in display order (so empty ones show as 0)."""
    return {
        "tier": [t.name for t in policy.tiers],
        "segment": list(RFM_TYPES.values()),
        "grade": sorted(set(policy.segments.grades.values())),
        "stage": [s.value for s in Stage],
    }


def segment_names() -> dict[str, dict[str, str]]:
    return {code: {"zh": zh, "en": en} for code, (zh, en) in TYPE_NAMES.items()}
