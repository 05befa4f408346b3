"""Time-driven behaviour: which timers a customer has pending, and firing the due ones.

Timers are not stored as a separate list: they are derived from the customer's state (the last
purchase, the stage, the oldest window bucket, settled reminders), so they can never disagree
with it, and firing one is a state change like any other (atomic, idempotent under replay).
The engine keeps only an index "customer -> next due time" to know whom to wake.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from rules.customer import (
    DAY,
    CustomerState,
    Stage,
    dedup_slack_days,
    downgrade,
    downgrade_due,
    downgrade_warning,
    epoch,
    evaluate_tier,
    expire,
    interval_for,
    iso,
    notification_id,
    stage_change,
)
from rules.policy import Marketing, Policy, Promotion
from streams.events import Cause, Notification, NotificationType

# Fire order for timers due at the same second: state first (window, lifecycle), then messages.
_KIND_ORDER = {
    "window_expiry": 0,
    "memory_expiry": 0,
    "tier": 1,
    "lifecycle": 2,
    "win_back": 3,
    "repurchase_reminder": 4,
}
_MARKETING_ORDER = _KIND_ORDER["win_back"]  # this kind order and later: marketing messages
# Data leaving its window or the duplicate check: nothing a purchase could cancel.
_EXPIRIES = frozenset({"window_expiry", "memory_expiry"})
MAX_FIRINGS = 10_000  # per advance() call; each firing settles or moves its timer forward


@dataclass(frozen=True, slots=True)
class Timer:
    kind: str  # window_expiry | memory_expiry | tier | lifecycle | repurchase_reminder | win_back
    # unique per customer: "window", "memory", "tier_warning", "tier_downgrade", "at_risk",
    # "churned", "reminder:<cat>", "win_back"
    key: str
    due: int  # epoch seconds
    reason: str  # why it exists, for `memberflow customer`
    anchor: int  # the purchase time (or bucket day) it derives from


@dataclass(frozen=True, slots=True)
class Advance:
    state: CustomerState
    notifications: tuple[Notification, ...] = ()
    effects: tuple[tuple[str, str], ...] = ()  # (trigger, outcome) for metrics
    fired: tuple[Timer, ...] = ()  # for lateness metrics

    @property
    def changed(self) -> bool:
        return bool(self.fired)


def scheduled_interval(
    state: CustomerState, category: str, policy: Policy, learned: dict[str, int]
) -> tuple[int, str]:
    """The interval a category's reminder was scheduled with (rules.customer.apply), or for a
    state written before that was kept, the one in force now."""
    entry = state.categories[category]
    if len(entry) >= 4:
        return entry[2], "learned" if entry[3] else "configured"
    return interval_for(category, policy, learned)


# (due, kind order, is the downgrade, key, kind, anchor): sorts in fire order as it stands.
_Spec = tuple[int, int, bool, str, str, int]


@cache
def _forget_after(max_age: int) -> int:
    """Days from an event to the prune that forgets it (Seen.prune's slack, the day after)."""
    return max_age + dedup_slack_days(max_age) + 1


def _specs(state: CustomerState, policy: Policy, learned: dict[str, int]) -> list[_Spec]:
    """The customer's timers as plain tuples: the hot path asks for them several times per
    event (is anything due? when is the next one?) and never shows them."""
    specs: list[_Spec] = []
    if state.buckets:
        oldest = min(state.buckets)
        specs.append(
            ((oldest + policy.window_days) * DAY, 0, False, "window", "window_expiry", oldest)
        )
    remembered = state.seen.oldest_day
    if remembered is not None:
        # The dedup memory is pruned when an event is applied; a customer who stopped buying
        # kept every event id forever (about 24 B each) without this timer.
        forget = (remembered + _forget_after(policy.input.max_event_age_days)) * DAY
        specs.append((forget, 0, False, "memory", "memory_expiry", remembered))
    below = state.below_since
    if below is not None:
        downgrade_at = downgrade_due(state, policy)
        if downgrade_at is not None:
            warn_at = downgrade_at - policy.tier_changes.warning_days * DAY
            if state.warned_for != below and warn_at < downgrade_at:
                specs.append((max(warn_at, below), 1, False, "tier_warning", "tier", below))
            specs.append((downgrade_at, 1, True, "tier_downgrade", "tier", below))
    last = state.last_purchase_at
    if last is not None:
        stage = state.stage
        cycle = policy.lifecycle
        if stage in _LAPSING:
            specs.append(
                (last + cycle.at_risk_after_days * DAY, 2, False, "at_risk", "lifecycle", last)
            )
        elif stage == Stage.AT_RISK:
            specs.append(
                (last + cycle.churned_after_days * DAY, 2, False, "churned", "lifecycle", last)
            )
        if policy.win_back is not None and state.win_back_for != last:
            deferred = state.deferred.get("win_back")
            due = last + policy.win_back.after_days * DAY
            if deferred is not None and deferred[0] == last:
                # A deferral only moves a message later; under a new policy whose due time
                # is past it, the deferral no longer holds it back.
                due = max(due, deferred[1])
            specs.append((due, 3, False, "win_back", "win_back", last))
    rules = policy.repurchase.categories
    for category, entry in state.categories.items():
        rule = rules.get(category)
        bought_at = entry[0]
        if rule is None or state.reminded.get(category) == bought_at:
            continue
        interval, _ = scheduled_interval(state, category, policy, learned)
        due = bought_at + max(1, interval - rule.lead_days) * DAY
        key = f"reminder:{category}"
        deferred = state.deferred.get(key)
        if deferred is not None and deferred[0] == bought_at:
            due = max(due, deferred[1])  # as for the win-back: a longer interval wins
        specs.append((due, 4, False, key, "repurchase_reminder", bought_at))
    return specs


_LAPSING = frozenset({Stage.NEW, Stage.ACTIVE, Stage.REACTIVATED})


def _timer(spec: _Spec) -> Timer:
    due, _, _, key, kind, anchor = spec
    return Timer(kind, key, due, "", anchor)


def _reason(timer: Timer, state: CustomerState, policy: Policy, learned: dict[str, int]) -> str:
    """Why a timer exists, for `memberflow customer` and the API."""
    if timer.kind == "window_expiry":
        return f"purchases of {_date(timer.anchor * DAY)} leave the {policy.window_days}-day window"
    if timer.kind == "memory_expiry":
        return (
            f"event ids of {_date(timer.anchor * DAY)} leave the "
            f"{policy.input.max_event_age_days}-day duplicate check"
        )
    if timer.key == "tier_warning":
        return f"{state.tier} downgrade warning, {policy.tier_changes.warning_days} days ahead"
    if timer.key == "tier_downgrade":
        return (
            f"below {state.tier}'s entry rule since {iso(state.below_since)}: downgrade after "
            f"{policy.tier_changes.grace_days} days of grace"
        )
    if timer.key == "at_risk":
        days = policy.lifecycle.at_risk_after_days
        return f"at risk after {days} days without a purchase"
    if timer.key == "churned":
        days = policy.lifecycle.churned_after_days
        return f"churned after {days} days without a purchase"
    if timer.kind == "win_back":
        assert policy.win_back is not None
        return f"win-back offer after {policy.win_back.after_days} days without a purchase"
    category = timer.key.split(":", 1)[1]
    interval, source = scheduled_interval(state, category, policy, learned)
    lead = policy.repurchase.categories[category].lead_days
    return f"{category} is rebought every {interval} days ({source}): remind {lead} days before"


def pending_timers(
    state: CustomerState,
    policy: Policy,
    learned: dict[str, int] | None = None,
    describe: bool = True,
) -> list[Timer]:
    """The customer's timers, earliest first (a warning due with its downgrade, no grace
    left, goes first, or it would never go out). `describe=False` leaves `reason` empty."""
    learned = learned or {}
    timers = [_timer(spec) for spec in sorted(_specs(state, policy, learned))]
    if describe:
        timers = [
            Timer(t.kind, t.key, t.due, _reason(t, state, policy, learned), t.anchor)
            for t in timers
        ]
    return timers


def next_due(
    state: CustomerState, policy: Policy, learned: dict[str, int] | None = None
) -> int | None:
    specs = _specs(state, policy, learned or {})
    return min(specs)[0] if specs else None


def wake_at(
    state: CustomerState, policy: Policy, learned: dict[str, int] | None = None
) -> int | None:
    """When to wake the customer to fire its timers (the engine's timer index): the earliest
    due time, but a marketing message due in quiet hours counts from their end. Woken at its
    own due time it would only be deferred to that end, a wake-up (a load, a fold, a save, a
    confirm) for the deferral alone: in wall-clock time that was 660 of 2,100 wake-ups in a
    simulated day of reminders. Woken at the end, advance() fires it at its own due time,
    defers it and sends it in one pass, with the same state, notifications and effects.
    Deferral is monotone in time, so shifting the earliest marketing timer is enough; the cap
    is left to firing (it depends on what was sent by then)."""
    specs = _specs(state, policy, learned or {})
    if not specs:
        return None
    first = min(specs)
    end = _quiet_end(first[0], policy.marketing) if first[1] >= _MARKETING_ORDER else None
    if end is None:
        return first[0]
    # A state timer (window, tier, lifecycle) due before the quiet hours end is not held back.
    return min([end, *(spec[0] for spec in specs if spec[1] < _MARKETING_ORDER)])


def advance(
    state: CustomerState,
    policy: Policy,
    now: int,
    learned: dict[str, int] | None = None,
    sends_from: int | None = None,
    expiries_until: int | None = None,
) -> Advance:
    """Fire every timer due at or before `now`, each at its own due time, in due order.

    `expiries_until`: also fire the window and memory expiries due up to then (later than
    `now`): in wall clock mode a purchase fires its customer's timers up to its own time only,
    as it may cancel them, but what left the window meanwhile left it whatever the purchase.

    `sends_from`: the earliest time a marketing message can really go out (wall clock mode:
    now). A message whose timer fires later than its due time (workers were down; a purchase
    that arrived late made it due in the past) is judged when it goes out: cancelled if no
    longer useful, held by the cap or quiet hours as they stand then, its promotion valid
    from then. None (event clock mode, simulations): at its due time, as a batch computation
    over the events would send it."""
    learned = learned or {}
    current: CustomerState | None = None
    notifications: list[Notification] = []
    effects: list[tuple[str, str]] = []
    fired: list[Timer] = []
    # Evaluated under another policy version before: what the new policy makes overdue (a
    # shorter window, grace or lifecycle) happens now. Fired at their past due times instead,
    # a shorter window started a grace period months ago, warned and downgraded at once, with
    # back-dated notifications. (An unknown version, None, is taken to be this one.)
    not_before = now if state.policy_version not in (None, policy.version) else None
    for _ in range(MAX_FIRINGS):
        specs = _specs(current or state, policy, learned)
        first = min(specs) if specs else None
        if first is None:
            break
        if first[0] > now:
            if expiries_until is None:
                break
            expiring = [s for s in specs if s[4] in _EXPIRIES and s[0] <= expiries_until]
            if not expiring:
                break
            first = min(expiring)
        if current is None:
            current = state.copy()
            current.policy_version = policy.version
        timer = _timer(first)
        if not_before is not None and timer.due < not_before:
            timer = Timer(timer.kind, timer.key, not_before, timer.reason, timer.anchor)
        fired.append(timer)
        outcome, notification = _fire(current, timer, policy, learned, sends_from)
        effects.append((timer.kind, outcome))
        if notification is not None:
            notifications.append(notification)
    else:  # pragma: no cover - every firing settles its timer or moves it later
        raise RuntimeError(f"timers of {state.customer_id} did not settle")
    return Advance(current or state, tuple(notifications), tuple(effects), tuple(fired))


def _fire(
    state: CustomerState,
    timer: Timer,
    policy: Policy,
    learned: dict[str, int],
    sends_from: int | None = None,
) -> tuple[str, Notification | None]:
    cause = Cause(kind="timer", id=f"{timer.key}@{timer.anchor}")
    if timer.kind == "memory_expiry":
        # The dedup memory only: buckets leaving the window are the window expiry's (its tier
        # evaluation), even when both fall due in the same second.
        max_age = policy.input.max_event_age_days
        state.seen.prune(timer.due // DAY - max_age, dedup_slack_days(max_age))
        return "fired", None
    if timer.kind == "window_expiry":
        expire(state, policy, timer.due)
        # F and M just dropped: the tier may now be below its rule (starts the grace period),
        # or, under a new policy whose bar is lower, above it: that upgrade is announced here.
        upgrades = evaluate_tier(state, policy, timer.due, cause)
        return "fired", upgrades[0] if upgrades else None
    if timer.kind == "tier":
        # The rule is asked again first: a new policy version may have lowered the bar (its
        # wake re-evaluates only after the due timers fire). Met, the grace period ends here
        # with no warning or downgrade (an upgrade if a higher tier is met); still missed,
        # evaluate_tier changes nothing.
        notes = evaluate_tier(state, policy, timer.due, cause)
        if state.below_since is None:
            return "cancelled", notes[0] if notes else None
        if timer.key == "tier_warning":
            return "fired", downgrade_warning(state, policy, timer.due, cause)
        return "fired", downgrade(state, policy, timer.due, cause)
    if timer.kind == "lifecycle":
        to = Stage.AT_RISK if timer.key == "at_risk" else Stage.CHURNED
        days = (timer.due - timer.anchor) // DAY
        return "fired", stage_change(
            state,
            to,
            timer.due,
            policy,
            cause,
            reason=f"no purchase for {days} days",
            inputs={"last_purchase_at": iso(timer.anchor), "days_without_purchase": days},
        )
    sends_at = max(timer.due, sends_from or 0)  # when a marketing message goes out
    if timer.kind == "win_back":
        assert policy.win_back is not None
        return _marketing(
            state,
            timer,
            sends_at,
            policy,
            cause,
            NotificationType.WIN_BACK_OFFER,
            "win_back",
            policy.win_back.promotion,
            expires=None,
            scheduled=timer.anchor + policy.win_back.after_days * DAY,
            details={
                "last_purchase_at": iso(timer.anchor),
                "after_days": policy.win_back.after_days,
            },
            settle=lambda: setattr(state, "win_back_for", timer.anchor),
        )
    category = timer.key.split(":", 1)[1]
    rule = policy.repurchase.categories[category]
    interval, source = scheduled_interval(state, category, policy, learned)
    expected = timer.anchor + interval * DAY
    return _marketing(
        state,
        timer,
        sends_at,
        policy,
        cause,
        NotificationType.REPURCHASE_REMINDER,
        f"repurchase.{category}",
        rule.promotion,
        # Past the expected repurchase (plus the lead again) a reminder no longer helps. With
        # lead_days 0 the reminder is due at the expected repurchase itself: it gets a day, or
        # it would be cancelled at its own due time and never sent.
        expires=expected + max(1, rule.lead_days) * DAY,
        # The due time before any deferral, with the interval pending_timers() used (a
        # learned one too: the configured one would mark an on-time reminder as deferred).
        scheduled=timer.anchor + max(1, interval - rule.lead_days) * DAY,
        details={
            "category": category,
            "last_purchase_at": iso(timer.anchor),
            "interval_days": interval,
            "interval_source": source,
            "lead_days": rule.lead_days,
            "expected_repurchase_at": iso(expected),
        },
        settle=lambda: state.reminded.__setitem__(category, timer.anchor),
    )


def _marketing(
    state: CustomerState,
    timer: Timer,
    at: int,
    policy: Policy,
    cause: Cause,
    kind: NotificationType,
    rule: str,
    promotion: Promotion,
    expires: int | None,
    scheduled: int,
    details: dict[str, Any],
    settle: Any,
) -> tuple[str, Notification | None]:
    """Send a marketing message at `at` (its due time, or later when it fires late: advance())
    unless the cap or quiet hours forbid it: deferred to the next allowed time (never
    dropped), cancelled once no longer relevant. The gates are asked at the due time first,
    so a message due in quiet hours is deferred to their end as it would have been on time
    (the wake-up and the lateness count from there); one that passed them then is asked
    again at `at`, when it really goes out."""
    if expires is not None and at >= expires:
        settle()
        state.deferred.pop(timer.key, None)
        return "cancelled", None
    asked = timer.due
    allowed, gate = next_allowed(state.marketing_sent, policy.marketing, asked)
    if allowed == asked and at > asked:
        asked = at
        allowed, gate = next_allowed(state.marketing_sent, policy.marketing, asked)
    if allowed > asked:
        state.deferred[timer.key] = [timer.anchor, allowed]
        return f"deferred_{gate}", None
    settle()
    # Deferred: a gate held it past its schedule (now or at an earlier firing). A message that
    # merely fires late (a poll a second after its due time, workers that were down) was not
    # deferred, nor one whose deferral a later due time (a new policy) overtook: sent_at
    # against scheduled_for shows lateness.
    held = state.deferred.pop(timer.key, None)
    deferred = held is not None and held[0] == timer.anchor and held[1] > scheduled
    state.marketing_sent = sorted([*state.marketing_sent, at])[-policy.marketing.max_messages :]
    valid_until = at + promotion.valid_days * DAY
    explanation: dict[str, Any] = {
        "rule": rule,
        **details,
        "scheduled_for": iso(scheduled),
        "sent_at": iso(at),
        "deferred": deferred,
        "promotion": {
            "description": promotion.description,
            "discount_percent": str(promotion.discount_percent),
            "applies_to": promotion.applies_to,
            "valid_until": iso(valid_until),
        },
        "policy_version": policy.version,
    }
    # Dates as the customer reads them: in the marketing time zone (quiet hours' zone). In UTC,
    # an offer running out at 18:00 in Los Angeles read as valid a day longer than it was.
    zone = policy.marketing.timezone
    summary = f"{promotion.description} (valid until {_date(valid_until, zone)})" + (
        f": {details['category']} is due again around "
        f"{_date(epoch(datetime.fromisoformat(details['expected_repurchase_at'])), zone)}"
        if "category" in details
        else ""
    )
    return "fired", Notification(
        notification_id=notification_id(state.customer_id, kind, rule, cause.id),
        type=kind,
        customer_id=state.customer_id,
        occurred_at=datetime.fromtimestamp(at, UTC),
        cause=cause,
        policy_version=policy.version,
        summary=summary,
        explanation=explanation,
    )


def _date(seconds: int, zone: str = "UTC") -> str:
    return datetime.fromtimestamp(seconds, ZoneInfo(zone)).date().isoformat()


def next_allowed(sent: list[int], marketing: Marketing, at: int) -> tuple[int, str]:
    """The first time >= `at` when a marketing message may go out, and the gate that held it
    ("cap" or "quiet_hours"; "" when none did)."""
    moment, gate = at, ""
    for _ in range(8):  # cap and quiet hours can push each other a few times at most
        recent = sorted(t for t in sent if t > moment - marketing.per_days * DAY)
        if len(recent) >= marketing.max_messages:
            moment = recent[-marketing.max_messages] + marketing.per_days * DAY
            gate = gate or "cap"
            continue
        end = _quiet_end(moment, marketing)
        if end is not None:
            moment = end
            gate = gate or "quiet_hours"
            continue
        return moment, gate
    return moment, gate  # pragma: no cover


def _quiet_end(moment: int, marketing: Marketing) -> int | None:
    """If `moment` falls in quiet hours (policy time zone), when they end; else None."""
    quiet = marketing.quiet_hours
    if quiet is None:
        return None
    zone = ZoneInfo(marketing.timezone)
    local = datetime.fromtimestamp(moment, zone)
    hour = local.hour
    start, end = quiet.start_hour, quiet.end_hour
    inside = start <= hour < end if start < end else (hour >= start or hour < end)
    if not inside:
        return None
    day = local.date() if hour < end else local.date() + timedelta(days=1)
    resume = datetime(day.year, day.month, day.day, end, tzinfo=zone)
    return int(resume.timestamp())


def describe_pending(
    state: CustomerState, policy: Policy, learned: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Pending timers for `memberflow customer`: what, when, why. A marketing message also says
    when it would go out through the cap and quiet hours as they stand (`sends_at`): one due
    in quiet hours waits for their end without a deferral recorded yet (wake_at), and would
    otherwise look overdue."""
    views = []
    for t in pending_timers(state, policy, learned):
        view: dict[str, Any] = {
            "kind": t.kind,
            "key": t.key,
            "due_at": iso(t.due),
            "why": t.reason,
            "deferred": t.key in state.deferred,
        }
        if _KIND_ORDER[t.kind] >= _MARKETING_ORDER:
            sends, _ = next_allowed(state.marketing_sent, policy.marketing, t.due)
            view["sends_at"] = iso(sends)
        views.append(view)
    return views


def learned_interval(histogram: dict[int, int], min_samples: int) -> int | None:
    """The median observed repurchase gap in days, once there are `min_samples` gaps."""
    total = sum(histogram.values())
    if total < min_samples or total == 0:
        return None
    seen = 0
    for days in sorted(histogram):
        seen += histogram[days]
        if seen * 2 >= total:
            return max(1, days)
    return None  # pragma: no cover
