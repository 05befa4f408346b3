"""Population-relative segmentation, pure: scores, the 8 RFM types, grades, nearest-rank cut
points, batch snapshots and reclassification (rules/segments.py).

Expected values are written out by hand or computed here independently (nearest rank by its
definition, not by rules.segments.quantile_ranks)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from memberflow.settings import default_rules_file
from rules.customer import DAY, CustomerState, epoch, iso, notification_id
from rules.money import format_minor
from rules.policy import Policy, PolicyError, parse_policy
from rules.segments import (
    Snapshot,
    Values,
    batch_snapshot,
    classify,
    customer_values,
    grade_direction,
    quantile_ranks,
    reclassify,
    score,
)
from streams.events import Cause, NotificationType

DEFAULT_TEXT = default_rules_file().read_text(encoding="utf-8")
POLICY = parse_policy(DEFAULT_TEXT)
T0 = epoch(datetime(2026, 6, 1, 10, 0, tzinfo=UTC))
CUSTOMER = "cust-1"


def policy_with(change: Callable[[dict[str, Any]], None]) -> Policy:
    doc = yaml.safe_load(DEFAULT_TEXT)
    change(doc)
    return parse_policy(yaml.safe_dump(doc, allow_unicode=True))


SCORE_MEAN = policy_with(lambda d: d["segments"].__setitem__("method", "score_mean"))

# domain.md section 3, written out again here: (R high, F high, M high) -> type, then the
# default grade of README "Segments".
TABLE = {
    (True, True, True): ("important_value", "A", "重要价值客户", "important value"),
    (True, False, True): ("important_development", "A", "重要发展客户", "important development"),
    (False, True, True): ("important_retention", "A", "重要保持客户", "important retention"),
    (False, False, True): ("important_win_back", "B", "重要挽留客户", "important win-back"),
    (True, True, False): ("general_value", "B", "一般价值客户", "general value"),
    (True, False, False): ("general_development", "B", "一般发展客户", "general development"),
    (False, True, False): ("general_retention", "C", "一般保持客户", "general retention"),
    (False, False, False): ("general_win_back", "C", "一般挽留客户", "general win-back"),
}

# A hand-made population: means and cut points chosen so that the values below land where
# the tests say.
SNAPSHOT = Snapshot(
    version=3,
    published_at=T0,
    customers=100,
    means={"r": 1_000_000.0, "f": 5.0, "m": 50_000.0},
    cuts={
        "r": (900_000, 950_000, 1_000_000, 1_050_000),
        "f": (2, 4, 6, 8),
        "m": (20_000, 40_000, 60_000, 80_000),
    },
    mean_scores={"r": 3.0, "f": 3.0, "m": 3.0},
)
HIGH = {"r": 1_060_000, "f": 9, "m": 90_000}  # above the mean and every cut: score 5
LOW = {"r": 900_000, "f": 2, "m": 20_000}  # at the lowest cut point (a tie): score 1


def values_for(flags: tuple[bool, bool, bool]) -> Values:
    r, f, m = (HIGH[d] if high else LOW[d] for d, high in zip("rfm", flags, strict=True))
    return Values(r=r, f=f, m=m)


# -- score ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-5, 1),
        (0, 1),
        (10, 1),  # a tie at the 20 % cut takes the lower score
        (11, 2),
        (20, 2),
        (21, 3),
        (30, 3),
        (31, 4),
        (40, 4),  # tie at the 80 % cut
        (41, 5),
        (10**12, 5),
    ],
)
def test_score_boundaries(value: int, expected: int) -> None:
    assert score(value, (10, 20, 30, 40)) == expected


def test_score_ties_between_cut_points() -> None:
    # Equal cut points (a population with many equal values): nothing between 1 and 5.
    assert score(5, (5, 5, 5, 5)) == 1
    assert score(6, (5, 5, 5, 5)) == 5
    assert score(5, (3, 5, 5, 7)) == 2
    assert score(6, (3, 5, 5, 7)) == 4
    assert score(8, (3, 5, 5, 7)) == 5


@given(
    st.lists(st.integers(-1000, 1000), min_size=4, max_size=4).map(sorted),
    st.integers(-1100, 1100),
    st.integers(0, 50),
)
def test_score_is_one_plus_cuts_strictly_below_and_monotone(
    cuts: list[int], value: int, step: int
) -> None:
    c = (cuts[0], cuts[1], cuts[2], cuts[3])
    s = score(value, c)
    assert 1 <= s <= 5
    assert s == 1 + len([cut for cut in c if cut < value])
    assert score(value + step, c) >= s


# -- classify -------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", sorted(TABLE))
def test_mean_split_gives_each_of_the_8_types(flags: tuple[bool, bool, bool]) -> None:
    rfm_type, grade, _zh, _en = TABLE[flags]
    segment = classify(values_for(flags), SNAPSHOT, POLICY)
    assert segment.rfm_type == rfm_type
    assert segment.flags == flags
    assert segment.grade == grade
    assert segment.snapshot_version == 3
    assert segment.scores == tuple(5 if high else 1 for high in flags)
    assert segment.label == f"{rfm_type}/{grade}"


def test_mean_split_is_strict_a_value_at_the_mean_is_low() -> None:
    at_mean = Values(r=1_000_000, f=5, m=50_000)
    segment = classify(at_mean, SNAPSHOT, POLICY)
    assert segment.flags == (False, False, False)
    assert segment.rfm_type == "general_win_back"
    assert segment.scores == (3, 3, 3)  # 1_000_000 ties the 60 % cut: 3, not 4
    just_above = Values(r=1_000_001, f=6, m=50_001)
    assert classify(just_above, SNAPSHOT, POLICY).rfm_type == "important_value"


def test_r_high_means_a_later_last_purchase() -> None:
    # R is the last purchase time: later than the mean last purchase is "recent" (high).
    recent = Values(r=1_000_500, f=1, m=1)
    old = Values(r=999_500, f=1, m=1)
    assert classify(recent, SNAPSHOT, POLICY).rfm_type == "general_development"
    assert classify(old, SNAPSHOT, POLICY).rfm_type == "general_win_back"


# score_mean: each score against the population's mean score. Values chosen so that the
# scores are 4 (above a mean score of 3.5) or 3 (below it), and the raw values are on the
# other side of the raw means, so the two methods disagree on every dimension.
SCORE_SNAPSHOT = SNAPSHOT.model_copy(
    update={
        "means": {"r": 1_020_000.0, "f": 7.0, "m": 70_000.0},
        "mean_scores": {"r": 3.5, "f": 3.5, "m": 3.5},
    }
)
SCORE_HIGH = {"r": 1_010_000, "f": 7, "m": 70_000}  # score 4 each, not above the raw mean
SCORE_LOW = {"r": 990_000, "f": 5, "m": 50_000}  # score 3 each


@pytest.mark.parametrize("flags", sorted(TABLE))
def test_score_mean_gives_each_of_the_8_types(flags: tuple[bool, bool, bool]) -> None:
    rfm_type, grade, _zh, _en = TABLE[flags]
    r, f, m = (
        SCORE_HIGH[d] if high else SCORE_LOW[d] for d, high in zip("rfm", flags, strict=True)
    )
    values = Values(r=r, f=f, m=m)
    segment = classify(values, SCORE_SNAPSHOT, SCORE_MEAN)
    assert segment.rfm_type == rfm_type
    assert segment.grade == grade
    assert segment.scores == tuple(4 if high else 3 for high in flags)
    # The same values by the raw means: no dimension is above its mean.
    assert classify(values, SCORE_SNAPSHOT, POLICY).rfm_type == "general_win_back"


def test_score_mean_is_strict_a_score_equal_to_the_mean_score_is_low() -> None:
    snapshot = SNAPSHOT.model_copy(update={"mean_scores": {"r": 5.0, "f": 1.0, "m": 4.0}})
    # scores 5, 1, 4: equal to each mean score -> low, low, low
    values = Values(r=1_060_000, f=2, m=70_000)
    segment = classify(values, snapshot, SCORE_MEAN)
    assert segment.scores == (5, 1, 4)
    assert segment.rfm_type == "general_win_back"


# -- grades ---------------------------------------------------------------------------------


def test_default_grades_are_the_documented_mapping() -> None:
    assert dict(POLICY.segments.grades) == {code: grade for code, grade, _, _ in TABLE.values()}


def test_grades_come_from_the_policy() -> None:
    flipped = {"A": "C", "B": "B", "C": "A"}
    policy = policy_with(
        lambda d: d["segments"].__setitem__(
            "grades", {code: flipped[grade] for code, grade, _, _ in TABLE.values()}
        )
    )
    for flags, (code, grade, _, _) in TABLE.items():
        segment = classify(values_for(flags), SNAPSHOT, policy)
        assert (segment.rfm_type, segment.grade) == (code, flipped[grade])


@pytest.mark.parametrize(
    "grades",
    [
        {"important_value": "A"},  # missing types
        {**{code: "A" for code, _, _, _ in TABLE.values()}, "vip": "A"},  # unknown type
        {**{code: "A" for code, _, _, _ in TABLE.values()}, "important_value": "D"},
    ],
)
def test_a_grade_map_must_cover_the_8_types_with_a_b_c(grades: dict[str, str]) -> None:
    with pytest.raises(PolicyError, match="grades"):
        policy_with(lambda d: d["segments"].__setitem__("grades", grades))


# -- quantile ranks and batch snapshots -----------------------------------------------------

# Nearest rank, 0-based, worked out by hand: ceil(n * p / 100) - 1 for p = 20, 40, 60, 80.
RANKS = {
    1: (0, 0, 0, 0),
    2: (0, 0, 1, 1),
    3: (0, 1, 1, 2),
    4: (0, 1, 2, 3),
    5: (0, 1, 2, 3),
    6: (1, 2, 3, 4),
    7: (1, 2, 4, 5),
    8: (1, 3, 4, 6),
    9: (1, 3, 5, 7),
    10: (1, 3, 5, 7),
}


@pytest.mark.parametrize(("count", "ranks"), sorted(RANKS.items()))
def test_quantile_ranks_exact_for_small_populations(
    count: int, ranks: tuple[int, int, int, int]
) -> None:
    assert quantile_ranks(count) == ranks


def test_quantile_ranks_of_an_empty_population() -> None:
    assert quantile_ranks(0) == (0, 0, 0, 0)


def nearest_rank(column: list[int], percent: int) -> int:
    """The smallest value with at least `percent` % of the population at or below it."""
    n = len(column)
    return min(v for v in column if 100 * sum(1 for x in column if x <= v) >= percent * n)


values_lists = st.lists(
    st.builds(
        Values,
        r=st.integers(1_600_000_000, 1_800_000_000) | st.sampled_from([1_700_000_000]),
        f=st.integers(0, 40) | st.just(1),
        m=st.integers(0, 10**9) | st.sampled_from([0, 5_000]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(values_lists)
def test_batch_snapshot_equals_an_independent_nearest_rank_computation(
    values: list[Values],
) -> None:
    snapshot = batch_snapshot(values, version=7, published_at=T0)
    assert snapshot.version == 7
    assert snapshot.customers == len(values)
    for d in "rfm":
        column = [v.get(d) for v in values]
        cuts = tuple(nearest_rank(column, p) for p in (20, 40, 60, 80))
        assert snapshot.cuts[d] == cuts
        assert snapshot.means[d] == pytest.approx(sum(column) / len(column), rel=1e-12)
        scores = [1 + sum(1 for c in cuts if x > c) for x in column]
        assert snapshot.mean_scores[d] == pytest.approx(sum(scores) / len(scores), rel=1e-12)
        # Nearest rank: at least p % at or below the cut, fewer than p % strictly below it.
        for p, cut in zip((20, 40, 60, 80), cuts, strict=True):
            assert 100 * sum(x <= cut for x in column) >= p * len(column)
            assert 100 * sum(x < cut for x in column) < p * len(column)


def test_batch_snapshot_of_nobody() -> None:
    snapshot = batch_snapshot([], version=1, published_at=T0)
    assert snapshot.customers == 0
    assert snapshot.cuts == {d: (0, 0, 0, 0) for d in "rfm"}
    assert snapshot.means == {d: 0.0 for d in "rfm"}


def test_batch_snapshot_of_ten_customers_by_hand() -> None:
    values = [Values(r=1000 + i, f=i, m=100 * i) for i in (5, 3, 9, 1, 7, 2, 8, 4, 10, 6)]
    snapshot = batch_snapshot(values, version=1, published_at=T0)
    # sorted f: 1..10; ranks (1, 3, 5, 7) -> 2, 4, 6, 8
    assert snapshot.cuts["f"] == (2, 4, 6, 8)
    assert snapshot.cuts["r"] == (1002, 1004, 1006, 1008)
    assert snapshot.cuts["m"] == (200, 400, 600, 800)
    assert snapshot.means["f"] == 5.5
    # scores: 1,2 -> 1; 3,4 -> 2; 5,6 -> 3; 7,8 -> 4; 9,10 -> 5
    assert snapshot.mean_scores == {"r": 3.0, "f": 3.0, "m": 3.0}


# -- reclassify -----------------------------------------------------------------------------


def customer(last: int = T0, orders: int = 3, spend: int = 30_000) -> CustomerState:
    return CustomerState(
        customer_id=CUSTOMER,
        first_purchase_at=last - 30 * DAY,
        last_purchase_at=last,
        latest_event_at=last,
        lifetime_orders=orders,
        lifetime_spend=spend,
        buckets={last // DAY: [orders, spend]},
        tier="member",
    )


def population(
    version: int, mean_f: float = 5.0, cuts_f: tuple[int, ...] = (2, 4, 6, 8)
) -> Snapshot:
    return Snapshot(
        version=version,
        published_at=T0,
        customers=50,
        means={"r": float(T0 - 10 * DAY), "f": mean_f, "m": 50_000.0},
        cuts={
            "r": (T0 - 40 * DAY, T0 - 20 * DAY, T0 - 5 * DAY, T0 + 1),
            "f": (cuts_f[0], cuts_f[1], cuts_f[2], cuts_f[3]),
            "m": (10_000, 20_000, 40_000, 60_000),
        },
        mean_scores={"r": 3.0, "f": 3.0, "m": 3.0},
    )


EVENT = Cause(kind="event", id="evt-9")
SNAP_CAUSE = Cause(kind="snapshot", id="4")


def test_first_classification_records_and_notifies_nothing() -> None:
    state = customer()
    notes, changed = reclassify(state, POLICY, population(1), T0, EVENT)
    assert notes == ()
    assert changed is True
    # r later than the mean (high), f 3 < 5 (low), m 30_000 < 50_000 (low)
    # scores: r above 3 cuts -> 4, f 3 above one cut -> 2, m above 2 cuts -> 3
    assert state.segment == ["general_development", "423", "B", 1]


def test_no_purchase_or_no_snapshot_classifies_nothing() -> None:
    nobody = CustomerState(customer_id=CUSTOMER, tier="member")
    assert reclassify(nobody, POLICY, population(1), T0, EVENT) == ((), False)
    assert nobody.segment is None
    state = customer()
    assert reclassify(state, POLICY, None, T0, EVENT) == ((), False)
    assert state.segment is None


def test_a_type_change_emits_one_explained_segment_changed() -> None:
    state = customer()
    reclassify(state, POLICY, population(1), T0, EVENT)
    before = state.copy()
    snapshot = population(4, mean_f=2.5)  # f = 3 is now above the mean
    notes, changed = reclassify(state, POLICY, snapshot, T0, SNAP_CAUSE)
    assert changed is True
    assert len(notes) == 1
    note = notes[0]
    assert note.type is NotificationType.SEGMENT_CHANGED
    assert note.customer_id == CUSTOMER
    assert note.cause == SNAP_CAUSE
    assert note.policy_version == POLICY.version
    assert note.occurred_at == datetime.fromtimestamp(T0, UTC)
    assert state.segment == ["general_value", "423", "B", 4]
    x = note.explanation
    assert x["previous_segment"] == "general_development"
    assert x["new_segment"] == "general_value"
    assert x["names"] == {"zh": "一般价值客户", "en": "general value"}
    assert x["grade"] == "B"
    assert x["rule"] == "segments.mean_split"
    assert x["inputs"] == {
        "last_purchase_at": "2026-06-01T10:00:00Z",
        "window_orders": 3,
        "window_spend": "300.00",
    }
    assert x["flags"] == {"r_high": True, "f_high": True, "m_high": False}
    assert x["scores"] == {"r": 4, "f": 2, "m": 3}
    assert x["thresholds"]["snapshot_version"] == 4
    # In the inputs' units, not the snapshot's (epoch seconds, cents).
    assert x["thresholds"]["means"] == {
        "last_purchase_at": iso(round(snapshot.means["r"])),
        "window_orders": round(snapshot.means["f"], 2),
        "window_spend": format_minor(round(snapshot.means["m"])),
    }
    assert x["thresholds"]["cuts"]["window_orders"] == [2, 4, 6, 8]
    assert x["thresholds"]["cuts"]["window_spend"] == [format_minor(c) for c in snapshot.cuts["m"]]
    assert x["policy_version"] == POLICY.version
    assert "general_development" in note.summary and "general_value" in note.summary
    assert "一般价值客户" in note.summary
    # Deterministic id: the same decision for the same cause, whatever process makes it.
    expected_id = notification_id(
        CUSTOMER, NotificationType.SEGMENT_CHANGED, "segments.general_value", "snapshot:4"
    )
    assert note.notification_id == expected_id
    again = before.copy()
    assert reclassify(again, POLICY, snapshot, T0, SNAP_CAUSE)[0][0] == note
    other = before.copy()
    other_note = reclassify(other, POLICY, snapshot, T0, EVENT)[0][0]
    assert other_note.notification_id != note.notification_id


def test_a_grade_change_alone_emits_segment_changed() -> None:
    state = customer()
    reclassify(state, POLICY, population(1), T0, EVENT)
    regraded = policy_with(
        lambda d: d["segments"]["grades"].__setitem__("general_development", "A")
    )
    notes, changed = reclassify(state, regraded, population(2), T0, SNAP_CAUSE)
    assert changed is True
    assert [n.type for n in notes] == [NotificationType.SEGMENT_CHANGED]
    assert state.segment == ["general_development", "423", "A", 2]
    assert notes[0].explanation["previous_segment"] == "general_development"
    assert notes[0].explanation["grade"] == "A"
    assert "(B)" in notes[0].summary and "(A)" in notes[0].summary


def test_a_scores_only_change_is_a_write_without_a_notification() -> None:
    state = customer()
    reclassify(state, POLICY, population(1), T0, EVENT)
    # f = 3 is now above two cut points (score 3), the mean is unchanged: same type, grade.
    notes, changed = reclassify(state, POLICY, population(2, cuts_f=(1, 2, 6, 8)), T0, EVENT)
    assert notes == ()
    assert changed is True
    assert state.segment == ["general_development", "433", "B", 2]


def test_nothing_changed_is_not_worth_a_write() -> None:
    state = customer()
    reclassify(state, POLICY, population(1), T0, EVENT)
    notes, changed = reclassify(state, POLICY, population(2), T0, SNAP_CAUSE)
    assert (notes, changed) == ((), False)
    assert state.segment is not None and state.segment[:3] == ["general_development", "423", "B"]


def test_reclassify_reads_the_window_at_now() -> None:
    state = customer(orders=9, spend=90_000)
    values = customer_values(state, POLICY, T0)
    assert values == Values(r=T0, f=9, m=90_000)
    later = T0 + POLICY.window_days * DAY  # the bucket has left the window
    assert customer_values(state, POLICY, later) == Values(r=T0, f=0, m=0)
    reclassify(state, POLICY, population(1), T0, EVENT)
    assert state.segment is not None and state.segment[0] == "important_value"
    notes, _ = reclassify(state, POLICY, population(1), later, EVENT)
    assert state.segment[0] == "general_development"
    assert [n.type for n in notes] == [NotificationType.SEGMENT_CHANGED]


@pytest.mark.parametrize(
    ("old", "new", "direction"),
    [
        ("C", "B", "up"),
        ("B", "A", "up"),
        ("A", "C", "down"),
        ("B", "B", "same"),
        (None, "A", "changed"),
        ("A", None, "changed"),
        (None, None, "same"),
    ],
)
def test_grade_direction(old: str | None, new: str | None, direction: str) -> None:
    assert grade_direction(old, new) == direction
