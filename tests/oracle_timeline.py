"""An independent batch computation of the time-driven notifications, for tests to compare with.

What every customer should receive when a history is replayed in `event` clock mode: lifecycle
transitions (event- and timer-caused), repurchase reminders and win-back offers, with the
marketing gates (frequency cap, quiet hours) applied. Written from the documented semantics
(shared/domain.md sections 5 and 6, rules/default_policy.yaml), not from the engine: it imports
nothing from rules/, state/, streams/ or memberflow/. Each customer is simulated on its own, as a
plain list of purchases and a set of pending messages, slowly and simply.

Semantics, per customer, over its purchases (first copy of an event id wins) in time order:
- a purchase first fires everything due at or before its time, then counts;
- lifecycle: the first purchase -> new; a repeat while new -> active; a newer purchase while
  at_risk -> active, while churned -> reactivated, while reactivated -> active (these at the
  purchase time). From new/active/reactivated, at last purchase + at_risk_after_days -> at_risk;
  from at_risk, at last purchase + churned_after_days -> churned (at that due time);
- repurchase reminder per configured category: due at P + (interval - lead) days, P = the
  latest purchase time in the category; a newer purchase in it replaces the pending reminder;
- win-back: due at last purchase + after_days, once per last purchase;
- marketing gates at a message's due time t (reminders and win-backs share them): if
  max_messages were sent in (t - per_days, t], wait until the oldest of the last max_messages
  is per_days old; if t is in quiet hours (policy time zone), wait until they end; check again
  after each wait. A reminder still unsent at P + interval + max(1, lead) days is dropped (too
  late to help); a win-back is never dropped. A sent message's time is its (deferred) send time;
- timers due at the same second fire lifecycle first, then win-back, then reminders by category.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests.oracle import epoch_seconds, iso, parse_time

DAY = 86_400

LIFECYCLE = "lifecycle_changed"
REMINDER = "repurchase_reminder"
WIN_BACK = "win_back_offer"

# Same-second order of the timers (window expiry would come first; it sends nothing).
_RANK_LIFECYCLE, _RANK_WIN_BACK, _RANK_REMINDER = 1, 2, 3

Expected = tuple[str, str, str, str]  # (customer_id, type, new stage | category | "", time)


@dataclass(frozen=True)
class TimelinePolicy:
    at_risk_days: int
    churned_days: int
    reminders: dict[str, tuple[int, int]]  # category -> (interval_days, lead_days)
    win_back_days: int | None
    zone: ZoneInfo
    cap_messages: int
    cap_days: int
    quiet: tuple[int, int] | None  # (start_hour, end_hour), local time


def timeline_policy(document: Mapping[str, Any]) -> TimelinePolicy:
    """The parts of a policy document (the YAML as a dict) that drive the timeline. Defaults
    as the policy model's. A learned interval depends on the whole population's gaps, which
    is no batch fact about one customer: a category with `learn: true` is refused."""
    lifecycle = document.get("lifecycle") or {}
    reminders: dict[str, tuple[int, int]] = {}
    for category, rule in ((document.get("repurchase") or {}).get("categories") or {}).items():
        if rule.get("learn", False):
            raise ValueError(f"category {category} learns its interval: set learn: false")
        reminders[category] = (int(rule["interval_days"]), int(rule.get("lead_days", 7)))
    win_back = document.get("win_back")
    marketing = document.get("marketing") or {}
    quiet = marketing.get("quiet_hours")
    return TimelinePolicy(
        at_risk_days=int(lifecycle.get("at_risk_after_days", 60)),
        churned_days=int(lifecycle.get("churned_after_days", 180)),
        reminders=reminders,
        win_back_days=None if win_back is None else int(win_back["after_days"]),
        zone=ZoneInfo(marketing.get("timezone", "UTC")),
        cap_messages=int(marketing.get("max_messages", 2)),
        cap_days=int(marketing.get("per_days", 7)),
        quiet=None if quiet is None else (int(quiet["start_hour"]), int(quiet["end_hour"])),
    )


def row_categories(row: Mapping[str, Any]) -> set[str]:
    """The categories of a purchase: its order lines (wire form) or its category column."""
    items = row.get("items")
    if isinstance(items, list):
        return {str(item["category"]) for item in items}
    category = row.get("category")
    return {category.strip()} if isinstance(category, str) and category.strip() else set()


def quiet_hours_end(moment: int, policy: TimelinePolicy) -> int | None:
    """When the quiet hours around `moment` end, or None if `moment` is not in them."""
    if policy.quiet is None:
        return None
    start, end = policy.quiet
    local = datetime.fromtimestamp(moment, policy.zone)
    hour = local.hour
    if start < end:
        inside, same_day = start <= hour < end, True
    else:  # spans midnight: the evening belongs to the next morning's end
        inside, same_day = hour >= start or hour < end, hour < end
    if not inside:
        return None
    day = local.date() if same_day else local.date() + timedelta(days=1)
    return epoch_seconds(datetime.combine(day, time(end), tzinfo=policy.zone))


def send_time(sent: list[int], at: int, policy: TimelinePolicy) -> int:
    """The first moment >= `at` at which a marketing message may go out."""
    moment = at
    while True:
        recent = sorted(s for s in sent if moment - policy.cap_days * DAY < s <= moment)
        if len(recent) >= policy.cap_messages:
            moment = recent[-policy.cap_messages] + policy.cap_days * DAY
            continue
        resume = quiet_hours_end(moment, policy)
        if resume is None:
            return moment
        moment = resume


@dataclass
class _Customer:
    customer_id: str
    policy: TimelinePolicy
    stage: str = "potential"
    orders: int = 0
    last: int | None = None
    category_last: dict[str, int] = field(default_factory=dict)
    # message key ("win_back" | "reminder:<category>") -> [due time, purchase time it follows]
    pending: dict[str, list[int]] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)
    out: list[tuple[int, str, str]] = field(default_factory=list)  # (time, type, detail)

    def _next_timer(self) -> tuple[int, int, str] | None:
        """(due, rank, key) of the earliest pending timer."""
        candidates: list[tuple[int, int, str]] = []
        if self.last is not None:
            if self.stage in ("new", "active", "reactivated"):
                due = self.last + self.policy.at_risk_days * DAY
                candidates.append((due, _RANK_LIFECYCLE, "at_risk"))
            elif self.stage == "at_risk":
                due = self.last + self.policy.churned_days * DAY
                candidates.append((due, _RANK_LIFECYCLE, "churned"))
        for key, (due, _anchor) in self.pending.items():
            rank = _RANK_WIN_BACK if key == "win_back" else _RANK_REMINDER
            candidates.append((due, rank, key))
        return min(candidates, default=None)

    def run_timers(self, until: int) -> None:
        while (timer := self._next_timer()) is not None and timer[0] <= until:
            due, rank, key = timer
            if rank == _RANK_LIFECYCLE:
                self.stage = key
                self.out.append((due, LIFECYCLE, key))
                continue
            anchor = self.pending[key][1]
            if key != "win_back":
                interval, lead = self.policy.reminders[key.split(":", 1)[1]]
                if due >= anchor + (interval + max(1, lead)) * DAY:
                    del self.pending[key]  # too late to remind: dropped unsent
                    continue
            allowed = send_time(self.sent, due, self.policy)
            if allowed > due:
                self.pending[key] = [allowed, anchor]
                continue
            del self.pending[key]
            self.sent.append(due)
            self.out.append(
                (due, WIN_BACK, "") if key == "win_back" else (due, REMINDER, key.split(":", 1)[1])
            )

    def purchase(self, at: int, categories: set[str]) -> None:
        self.run_timers(at)
        newer = self.last is None or at > self.last
        self.orders += 1
        if newer:
            self.last = at
            if self.policy.win_back_days is not None:
                self.pending["win_back"] = [at + self.policy.win_back_days * DAY, at]
        for category in sorted(categories & set(self.policy.reminders)):
            previous = self.category_last.get(category)
            if previous is None or at > previous:
                self.category_last[category] = at
                interval, lead = self.policy.reminders[category]
                self.pending[f"reminder:{category}"] = [at + max(1, interval - lead) * DAY, at]
        stage = self.stage
        if stage == "potential":
            stage = "new"
        elif (stage == "new" and self.orders >= 2) or (
            newer and stage in ("at_risk", "reactivated")
        ):
            stage = "active"
        elif newer and stage == "churned":
            stage = "reactivated"
        if stage != self.stage:
            self.stage = stage
            self.out.append((at, LIFECYCLE, stage))


def customer_timelines(
    rows: Iterable[Mapping[str, Any]], until: datetime, policy_doc: Mapping[str, Any]
) -> dict[str, list[tuple[str, str, str]]]:
    """customer_id -> [(occurred_at, type, stage | category | ""), ...] in the order sent."""
    policy = timeline_policy(policy_doc)
    limit = epoch_seconds(until if until.tzinfo else until.replace(tzinfo=UTC))
    seen: set[str] = set()
    purchases: dict[str, list[tuple[int, set[str]]]] = {}
    for row in rows:
        event_id = str(row["event_id"]).strip()
        if event_id in seen:
            continue
        seen.add(event_id)
        moment = parse_time(str(row["occurred_at"]).strip())
        if moment is None:
            raise ValueError(f"not a valid purchase row (filter with valid_rows): {row!r}")
        customer_id = str(row["customer_id"]).strip()
        purchases.setdefault(customer_id, []).append((epoch_seconds(moment), row_categories(row)))
    timelines: dict[str, list[tuple[str, str, str]]] = {}
    for customer_id, bought in sorted(purchases.items()):
        customer = _Customer(customer_id, policy)
        for at, categories in sorted(bought, key=lambda purchase: purchase[0]):  # stable
            customer.purchase(at, categories)
        customer.run_timers(limit)
        timelines[customer_id] = [(iso(at), kind, detail) for at, kind, detail in customer.out]
    return timelines


def expected_timeline(
    rows: Iterable[Mapping[str, Any]], until: datetime, policy_doc: Mapping[str, Any]
) -> set[Expected]:
    """(customer_id, type, new stage | category | "", occurred_at as YYYY-MM-DDTHH:MM:SSZ) of
    every lifecycle_changed, repurchase_reminder and win_back_offer notification.

    `rows`: valid purchases (filter a noisy stream with tests.oracle.valid_rows), any order;
    an event id counts once. Every purchase is applied; timers fire when due at or before
    `until`, or before a later purchase of their customer."""
    return {
        (customer_id, kind, detail, at)
        for customer_id, timeline in customer_timelines(rows, until, policy_doc).items()
        for at, kind, detail in timeline
    }
