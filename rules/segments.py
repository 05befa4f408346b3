"""Population-relative segmentation: the 8 RFM types, 1-5 scores and A/B/C grades.

Customers are judged against a *snapshot* of the population statistics (means and quintile
cut points of R, F and M), published on a policy interval, so that a label does not flicker
with every other customer's purchase. R is compared through the last purchase time: "fewer
days since the last purchase than the mean" is "last purchase later than the mean last
purchase", which does not change as the clock moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rules.customer import CustomerState, iso, notification_id
from rules.money import format_minor
from rules.names import RFM_TYPES, TYPE_NAMES
from rules.policy import Policy
from streams.events import Cause, Notification, NotificationType

DIMENSIONS = ("r", "f", "m")


class Snapshot(BaseModel):
    """Population thresholds at one moment. R values are last purchase times (epoch s),
    F window orders, M window spend in minor units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    published_at: int
    customers: int = Field(ge=0)
    means: dict[str, float]  # r, f, m
    cuts: dict[str, tuple[int, int, int, int]]  # 20/40/60/80 % cut points per dimension
    mean_scores: dict[str, float]  # population mean of the 1-5 score per dimension


@dataclass(frozen=True, slots=True)
class Values:
    r: int  # last purchase time
    f: int  # window orders
    m: int  # window spend, minor units

    def get(self, dimension: str) -> int:
        return int(getattr(self, dimension))


@dataclass(frozen=True, slots=True)
class Segment:
    rfm_type: str
    flags: tuple[bool, bool, bool]
    scores: tuple[int, int, int]
    grade: str
    snapshot_version: int

    @property
    def label(self) -> str:
        """What a segment_changed notification is about: the type and the grade."""
        return f"{self.rfm_type}/{self.grade}"


_GRADE_ORDER = {"A": 0, "B": 1, "C": 2}  # A is the best grade


def grade_direction(old: str | None, new: str | None) -> str:
    """How a customer's grade moved: C -> B is "up", A -> B "down", unchanged "same", and
    "changed" to or from no grade (first classification). The grade is the staff's summary of
    the 8 RFM types, so its direction is what dashboards and what-if tables count."""
    if old == new:
        return "same"
    if not old or not new:
        return "changed"
    return "up" if _GRADE_ORDER[new] < _GRADE_ORDER[old] else "down"


def customer_values(state: CustomerState, policy: Policy, now: int) -> Values | None:
    if state.last_purchase_at is None:
        return None
    orders, spend = state.window(now, policy.window_days)
    return Values(r=state.last_purchase_at, f=orders, m=spend)


def score(value: int, cuts: tuple[int, int, int, int]) -> int:
    """1-5: one more for every quintile cut point the value is above (higher is better; for R
    a later last purchase is higher). Ties at a cut point take the lower score."""
    return 1 + sum(value > cut for cut in cuts)


def classify(values: Values, snapshot: Snapshot, policy: Policy) -> Segment:
    scores = tuple(score(values.get(d), snapshot.cuts[d]) for d in DIMENSIONS)
    if policy.segments.method == "mean_split":
        flags = tuple(values.get(d) > snapshot.means[d] for d in DIMENSIONS)
    else:  # score_mean: each 1-5 score against the population's mean score
        flags = tuple(s > snapshot.mean_scores[d] for s, d in zip(scores, DIMENSIONS, strict=True))
    r_high, f_high, m_high = flags
    rfm_type = RFM_TYPES[(r_high, f_high, m_high)]
    return Segment(
        rfm_type=rfm_type,
        flags=(r_high, f_high, m_high),
        scores=(scores[0], scores[1], scores[2]),
        grade=policy.segments.grades[rfm_type],
        snapshot_version=snapshot.version,
    )


def explain(
    values: Values,
    segment: Segment,
    snapshot: Snapshot,
    policy: Policy,
    previous: str | None,
    previous_grade: str | None = None,
) -> dict[str, Any]:
    zh, en = TYPE_NAMES[segment.rfm_type]
    return {
        "rule": f"segments.{policy.segments.method}",
        "previous_segment": previous,
        "previous_grade": previous_grade,
        "new_segment": segment.rfm_type,
        "names": {"zh": zh, "en": en},
        "grade": segment.grade,
        "inputs": {
            "last_purchase_at": iso(values.r),
            "window_orders": values.f,
            "window_spend": format_minor(values.m),
        },
        "flags": dict(zip(("r_high", "f_high", "m_high"), segment.flags, strict=True)),
        "scores": dict(zip(DIMENSIONS, segment.scores, strict=True)),
        "thresholds": thresholds_view(snapshot),
        "policy_version": policy.version,
    }


def thresholds_view(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot's thresholds in the units of an explanation's inputs (times, orders, money
    as text), keyed like them: the snapshot itself keeps epoch seconds and minor units."""

    def shown(dimension: str, value: float) -> Any:
        if dimension == "r":
            return iso(round(value))
        if dimension == "m":
            return format_minor(round(value))
        return value if isinstance(value, int) else round(value, 2)

    names = {"r": "last_purchase_at", "f": "window_orders", "m": "window_spend"}
    return {
        "snapshot_version": snapshot.version,
        "means": {names[d]: shown(d, snapshot.means[d]) for d in DIMENSIONS},
        "cuts": {names[d]: [shown(d, v) for v in snapshot.cuts[d]] for d in DIMENSIONS},
        "mean_scores": {d: round(s, 3) for d, s in snapshot.mean_scores.items()},
    }


def quantile_ranks(count: int) -> tuple[int, int, int, int]:
    """0-based ranks of the 20/40/60/80 % cut points in a sorted population of `count`
    (nearest-rank method: the smallest value with at least p % of the population at or
    below it)."""
    return tuple(max(0, -(-count * p // 100) - 1) for p in (20, 40, 60, 80))  # type: ignore[return-value]


def batch_snapshot(values: list[Values], version: int, published_at: int) -> Snapshot:
    """The snapshot a batch computation gives for these customers: the reference that the
    incremental statistics must equal (and the way tests check them)."""
    count = len(values)
    means: dict[str, float] = {}
    cuts: dict[str, tuple[int, int, int, int]] = {}
    mean_scores: dict[str, float] = {}
    for dimension in DIMENSIONS:
        column = sorted(v.get(dimension) for v in values)
        means[dimension] = sum(column) / count if count else 0.0
        ranks = quantile_ranks(count)
        cut = tuple(column[r] for r in ranks) if count else (0, 0, 0, 0)
        cuts[dimension] = cut  # type: ignore[assignment]
        mean_scores[dimension] = (
            sum(score(x, cuts[dimension]) for x in column) / count if count else 0.0
        )
    return Snapshot(
        version=version,
        published_at=published_at,
        customers=count,
        means=means,
        cuts=cuts,
        mean_scores=mean_scores,
    )


def reclassify(
    state: CustomerState, policy: Policy, snapshot: Snapshot | None, now: int, cause: Cause
) -> tuple[tuple[Notification, ...], bool]:
    """Classify against `snapshot` and record it in `state` (mutated). Returns the
    segment_changed notification (only for a real change of type or grade, not for the first
    classification) and whether type, scores or grade changed (worth a write)."""
    values = customer_values(state, policy, now)
    if values is None or snapshot is None:
        return (), False
    segment = classify(values, snapshot, policy)
    new = [
        segment.rfm_type,
        "".join(str(s) for s in segment.scores),
        segment.grade,
        segment.snapshot_version,
    ]
    old = state.segment
    state.segment = new
    if old is None:
        return (), True
    changed = old[:3] != new[:3]
    if old[0] == new[0] and old[2] == new[2]:
        return (), changed
    zh, en = TYPE_NAMES[segment.rfm_type]
    rule = f"segments.{segment.rfm_type}"
    return (
        Notification(
            notification_id=notification_id(
                state.customer_id,
                NotificationType.SEGMENT_CHANGED,
                rule,
                f"{cause.kind}:{cause.id}",
            ),
            type=NotificationType.SEGMENT_CHANGED,
            customer_id=state.customer_id,
            occurred_at=datetime.fromtimestamp(now, UTC),
            cause=cause,
            policy_version=policy.version,
            summary=(
                f"Segment {old[0]} ({old[2]}) -> {segment.rfm_type} ({segment.grade}): "
                f"{en} / {zh}, scores R{segment.scores[0]} F{segment.scores[1]} "
                f"M{segment.scores[2]} against snapshot v{snapshot.version}."
            ),
            explanation=explain(
                values, segment, snapshot, policy, previous=str(old[0]), previous_grade=str(old[2])
            ),
        ),
    ), True
