"""The policy model: the shipped default parses, and every inconsistency is a clear PolicyError."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow.policy_file import load_policy
from memberflow.settings import default_rules_file
from rules.policy import Policy, PolicyError, parse_policy

BASE: dict[str, Any] = {
    "version": "test-1",
    "base_currency": "EUR",
    "currencies": {"EUR": "1", "USD": "0.92"},
    "window_days": 365,
    "input": {"max_event_age_days": 730, "max_future_skew_minutes": 10},
    "tiers": [
        {"name": "member"},
        {"name": "silver", "min_window_spend": "300", "min_window_orders": 2},
        {"name": "gold", "min_window_spend": "1000", "min_window_orders": 4},
    ],
}
PROMOTION = {"description": "20 % off", "discount_percent": "20"}


def policy_text(change: Callable[[dict[str, Any]], None] | None = None) -> str:
    doc = copy.deepcopy(BASE)
    if change is not None:
        change(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def test_default_policy_parses_with_documented_values() -> None:
    policy = parse_policy(default_rules_file().read_text(encoding="utf-8"))
    assert policy.version == "2026.11-1"
    assert policy.base_currency == "EUR"
    assert policy.currencies == {
        "EUR": Decimal("1"),
        "USD": Decimal("0.92"),
        "GBP": Decimal("1.17"),
        "CNY": Decimal("0.13"),
    }
    assert policy.window_days == 365
    assert policy.input.max_event_age_days == 730
    assert policy.input.max_future_skew_minutes == 10
    assert [
        (tier.name, tier.min_window_spend, tier.min_window_orders) for tier in policy.tiers
    ] == [
        ("member", Decimal(0), 0),
        ("silver", Decimal("300"), 2),
        ("gold", Decimal("1000"), 4),
        ("platinum", Decimal("3000"), 8),
    ]
    assert [policy.tier_rank(t) for t in ("member", "silver", "gold", "platinum")] == [0, 1, 2, 3]
    assert policy.tier_rank("diamond") == 0
    assert policy.find_tier("diamond") is None


def test_a_former_tier_name_means_the_tier_that_lists_it() -> None:
    def rename(d: dict[str, Any]) -> None:
        d["tiers"][2].update(name="premium", formerly=["gold", "vip"])

    policy = parse_policy(policy_text(rename))
    assert [policy.find_tier(t) for t in ("premium", "gold", "vip", "silver")] == [2, 2, 2, 1]
    assert policy.find_tier("diamond") is None and policy.tier_rank("diamond") == 0


def test_load_policy_reads_the_default_file() -> None:
    path = default_rules_file()
    assert load_policy(path) == parse_policy(path.read_text(encoding="utf-8"))


def test_base_policy_of_these_tests_is_valid() -> None:
    policy = parse_policy(policy_text())
    assert isinstance(policy, Policy)
    assert [tier.name for tier in policy.tiers] == ["member", "silver", "gold"]


def test_input_bounds_default_when_omitted() -> None:
    policy = parse_policy(policy_text(lambda d: d.pop("input")))
    assert policy.input.max_event_age_days == 730
    assert policy.input.max_future_skew_minutes == 10


def test_policy_is_frozen() -> None:
    policy = parse_policy(policy_text())
    with pytest.raises(ValueError):
        policy.window_days = 30  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: [unclosed", "not valid YAML"),
        ("tiers:\n  - name: a\n - name: b\n", "not valid YAML"),
        ("- version\n- tiers\n", "expected a mapping at the top level"),
        ("42\n", "expected a mapping at the top level"),
        ("just text\n", "expected a mapping at the top level"),
        ("", "expected a mapping at the top level"),
        ("version: a\nwindow_days: 365\nwindow_days: 30\n", "not valid YAML: duplicate key"),
        ("tiers:\n  - name: a\n    name: b\n", "not valid YAML: duplicate key 'name'"),
    ],
    ids=["unclosed", "bad-indent", "list", "number", "scalar", "empty", "dup-key", "dup-nested"],
)
def test_unusable_documents(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "rules.yaml")
    assert str(info.value).startswith(f"rules.yaml: {message}"), str(info.value)


def _dup_tier(d: dict[str, Any]) -> None:
    d["tiers"][2]["name"] = "silver"


def _first_tier_spend(d: dict[str, Any]) -> None:
    d["tiers"][0]["min_window_spend"] = "1"


def _first_tier_orders(d: dict[str, Any]) -> None:
    d["tiers"][0]["min_window_orders"] = 1


def _spend_down(d: dict[str, Any]) -> None:
    d["tiers"][2]["min_window_spend"] = "200"


def _orders_down(d: dict[str, Any]) -> None:
    d["tiers"][2]["min_window_orders"] = 1


def _same_thresholds(d: dict[str, Any]) -> None:
    d["tiers"][2].update(min_window_spend="300", min_window_orders=2)


def _base_missing(d: dict[str, Any]) -> None:
    d["currencies"] = {"USD": "0.92"}


def _base_rate(d: dict[str, Any]) -> None:
    d["currencies"]["EUR"] = "1.01"


def _extra_top(d: dict[str, Any]) -> None:
    d["windows_days"] = 30


def _extra_tier(d: dict[str, Any]) -> None:
    d["tiers"][1]["colour"] = "grey"


def _extra_input(d: dict[str, Any]) -> None:
    d["input"]["max_age"] = 3


def _age_below_window(d: dict[str, Any]) -> None:
    d["input"]["max_event_age_days"] = 364


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_dup_tier, "tier names must be unique, got ['member', 'silver', 'silver']"),
        (_first_tier_spend, "the first tier (member) is the entry tier: no thresholds"),
        (_first_tier_orders, "the first tier (member) is the entry tier: no thresholds"),
        (_spend_down, "tier gold must not have lower thresholds than silver"),
        (_orders_down, "tier gold must not have lower thresholds than silver"),
        (_same_thresholds, "tiers silver and gold have the same thresholds"),
        (_base_missing, "currencies must map the base currency EUR to 1"),
        (_base_rate, "currencies must map the base currency EUR to 1"),
        (_extra_top, "windows_days: Extra inputs are not permitted"),
        (_extra_tier, "tiers.1.colour: Extra inputs are not permitted"),
        (_extra_input, "input.max_age: Extra inputs are not permitted"),
        (_age_below_window, "input.max_event_age_days must be >= window_days"),
        (lambda d: d.pop("version"), "version: Field required"),
        (lambda d: d.update(tiers=[]), "tiers: "),
        (lambda d: d.update(window_days=0), "window_days: "),
        (lambda d: d["currencies"].update(USD="0"), "currencies.USD: "),
        (lambda d: d["currencies"].update(USD="-0.5"), "currencies.USD: "),
        (lambda d: d["currencies"].update(USD="NaN"), "currencies.USD: "),
        (lambda d: d["tiers"][1].update(min_window_spend="-1"), "tiers.1.min_window_spend: "),
        (lambda d: d["tiers"][1].update(name="Silver"), "tiers.1.name: "),
        (lambda d: d.update(base_currency="eur"), "base_currency: "),
        (
            lambda d: d["tiers"][2].update(min_window_spend="1e30"),
            "tiers.2.min_window_spend: Input should be less than or equal to 1E+12",
        ),
        (
            lambda d: d["tiers"][1].update(min_window_spend="300.001"),
            "tiers.1.min_window_spend: Decimal input should have no more than 2 decimal places",
        ),
        (lambda d: d["currencies"].update(USD="1e20"), "currencies.USD: "),
        (
            lambda d: (
                d["tiers"][1].update(formerly=["bronze"]),
                d["tiers"][2].update(formerly=["bronze"]),
            ),
            "a former tier name may map to one tier only, got ['bronze', 'bronze']",
        ),
        (
            lambda d: d["tiers"][2].update(formerly=["silver"]),
            "['silver'] cannot be both a tier and a former name of another tier",
        ),
        (lambda d: d["tiers"][2].update(formerly=["Gold"]), "tiers.2.formerly.0: "),
        (
            lambda d: d.update(win_back={"after_days": 999_999_999, "promotion": PROMOTION}),
            "win_back.after_days: ",
        ),
        (lambda d: d.update(tier_changes={"grace_days": 3_000_000}), "tier_changes.grace_days: "),
        (lambda d: d["currencies"].update(usd="0.92"), "currencies.usd.[key]: "),
        (
            lambda d: d.update(
                repurchase={"categories": {"": {"interval_days": 21, "promotion": PROMOTION}}}
            ),
            "repurchase.categories..[key]: String should have at least 1",
        ),
    ],
    ids=[
        "duplicate-tier",
        "first-tier-spend",
        "first-tier-orders",
        "spend-not-monotone",
        "orders-not-monotone",
        "equal-thresholds",
        "base-currency-missing",
        "base-rate-not-1",
        "unknown-key",
        "unknown-tier-key",
        "unknown-input-key",
        "max-age-below-window",
        "missing-version",
        "no-tiers",
        "window-zero",
        "zero-rate",
        "negative-rate",
        "nan-rate",
        "negative-threshold",
        "tier-name-case",
        "base-currency-case",
        "threshold-beyond-any-event",
        "threshold-below-a-cent",
        "rate-beyond-cent-rounding",
        "former-name-twice",
        "former-name-is-a-tier",
        "former-name-case",
        "days-beyond-a-century",
        "grace-beyond-a-century",
        "currency-code-case",
        "empty-category",
    ],
)
def test_invalid_policy_is_a_policy_error_naming_the_problem(
    change: Callable[[dict[str, Any]], Any], message: str
) -> None:
    text = policy_text(change)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "rules.yaml")
    error = str(info.value)
    assert error.startswith("rules.yaml: invalid policy:\n  - "), error
    assert message in error, error


def test_the_largest_threshold_and_rate_allowed_still_fold() -> None:
    """What the bounds let through must not break the fold: the 1e12 bar and an event at the
    largest amount in the currency with the largest rate (1e30 once raised InvalidOperation
    in the cent rounding on every purchase)."""
    from rules.customer import apply
    from streams.events import Purchase

    def change(d: dict[str, Any]) -> None:
        d["tiers"][2]["min_window_spend"] = "1e12"
        d["currencies"]["XAU"] = "1e6"

    policy = parse_policy(policy_text(change))
    state = None
    for n in range(4):
        event = Purchase.model_validate(
            {
                "event_id": f"p{n}",
                "customer_id": "c1",
                "occurred_at": "2026-06-01T10:00:00Z",
                "amount": "1e12" if n == 3 else "1",
                "currency": "XAU" if n == 3 else "EUR",
            }
        )
        decision = apply(state, event, policy, 1_780_308_000)
        assert decision.rejection is None
        state = decision.state
    assert state is not None and state.tier == "gold"


def test_max_event_age_equal_to_window_is_allowed() -> None:
    def change(d: dict[str, Any]) -> None:
        d["input"]["max_event_age_days"] = 365

    assert parse_policy(policy_text(change)).input.max_event_age_days == 365


def test_load_policy_on_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "rules.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: cannot read policy file: ")
    assert "No such file or directory" in str(info.value)


def test_load_policy_refuses_a_file_that_is_not_utf8_naming_the_line(tmp_path: Path) -> None:
    """A policy saved as Latin-1 by an editor was a UnicodeDecodeError traceback."""
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"version: x\nname: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 21, line 2); save it as UTF-8"


def test_load_policy_names_the_file_of_an_invalid_policy(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(policy_text(_age_below_window), encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: invalid policy:")


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


# -- time-driven sections: lifecycle, repurchase, win-back, marketing --------------------------


def test_default_policy_time_driven_sections() -> None:
    policy = parse_policy(default_rules_file().read_text(encoding="utf-8"))
    assert (policy.lifecycle.at_risk_after_days, policy.lifecycle.churned_after_days) == (60, 180)
    assert policy.repurchase.min_samples == 30
    assert sorted(policy.repurchase.categories) == ["diapers", "infant_formula"]
    formula = policy.repurchase.categories["infant_formula"]
    assert (formula.interval_days, formula.lead_days, formula.learn) == (21, 7, False)
    assert formula.promotion.model_dump() == {
        "description": "20 % off everything else this week",
        "discount_percent": Decimal("20"),
        "applies_to": "other_categories",
        "valid_days": 7,
    }
    diapers = policy.repurchase.categories["diapers"]
    assert (diapers.interval_days, diapers.lead_days, diapers.learn) == (30, 5, True)
    assert policy.win_back is not None
    assert policy.win_back.after_days == 120
    assert (policy.win_back.promotion.discount_percent, policy.win_back.promotion.valid_days) == (
        Decimal("15"),
        14,
    )
    marketing = policy.marketing
    assert (marketing.timezone, marketing.max_messages, marketing.per_days) == (
        "Europe/Berlin",
        2,
        7,
    )
    assert marketing.quiet_hours is not None
    assert (marketing.quiet_hours.start_hour, marketing.quiet_hours.end_hour) == (21, 8)


def test_time_driven_sections_default_when_omitted() -> None:
    policy = parse_policy(policy_text())
    assert (policy.lifecycle.at_risk_after_days, policy.lifecycle.churned_after_days) == (60, 180)
    assert (policy.repurchase.min_samples, policy.repurchase.categories) == (30, {})
    assert policy.win_back is None
    assert (policy.marketing.timezone, policy.marketing.quiet_hours) == ("UTC", None)
    assert (policy.marketing.max_messages, policy.marketing.per_days) == (2, 7)


PROMOTION = {"description": "20 % off", "discount_percent": "20"}


def _timed(d: dict[str, Any]) -> None:
    """A valid set of time-driven sections for the cases below to break."""
    d["lifecycle"] = {"at_risk_after_days": 60, "churned_after_days": 180}
    d["repurchase"] = {
        "min_samples": 5,
        "categories": {
            "formula": {"interval_days": 21, "lead_days": 7, "promotion": dict(PROMOTION)}
        },
    }
    d["win_back"] = {"after_days": 120, "promotion": dict(PROMOTION)}
    d["marketing"] = {
        "timezone": "Europe/Berlin",
        "max_messages": 2,
        "per_days": 7,
        "quiet_hours": {"start_hour": 21, "end_hour": 8},
    }


def timed_text(change: Callable[[dict[str, Any]], Any] | None = None) -> str:
    def both(d: dict[str, Any]) -> None:
        _timed(d)
        if change is not None:
            change(d)

    return policy_text(both)


def test_time_driven_sections_parse() -> None:
    policy = parse_policy(timed_text())
    assert policy.repurchase.categories["formula"].promotion.applies_to == "all"  # default
    assert policy.repurchase.categories["formula"].promotion.valid_days == 7  # default
    assert policy.repurchase.categories["formula"].learn is False


def _formula(d: dict[str, Any]) -> dict[str, Any]:
    return d["repurchase"]["categories"]["formula"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["lifecycle"].update(churned_after_days=60),
            "lifecycle: Value error, churned_after_days must be greater than at_risk_after_days",
        ),
        (
            lambda d: d["lifecycle"].update(churned_after_days=59),
            "lifecycle: Value error, churned_after_days must be greater than at_risk_after_days",
        ),
        (lambda d: d["lifecycle"].update(at_risk_after_days=0), "lifecycle.at_risk_after_days: "),
        (
            lambda d: _formula(d).update(lead_days=21),
            "repurchase.categories.formula: Value error, lead_days must be smaller than "
            "interval_days",
        ),
        (
            lambda d: _formula(d).update(lead_days=30),
            "repurchase.categories.formula: Value error, lead_days must be smaller than "
            "interval_days",
        ),
        (lambda d: _formula(d).update(lead_days=-1), "repurchase.categories.formula.lead_days: "),
        (lambda d: _formula(d).pop("promotion"), "repurchase.categories.formula.promotion: "),
        (
            lambda d: _formula(d)["promotion"].update(discount_percent="0"),
            "repurchase.categories.formula.promotion.discount_percent: ",
        ),
        (
            lambda d: _formula(d)["promotion"].update(discount_percent="100.5"),
            "repurchase.categories.formula.promotion.discount_percent: ",
        ),
        (
            lambda d: d["win_back"]["promotion"].update(applies_to="everyone"),
            "win_back.promotion.applies_to: ",
        ),
        (lambda d: d["repurchase"].update(min_samples=0), "repurchase.min_samples: "),
        (
            lambda d: d["marketing"].update(timezone="Mars/Olympus_Mons"),
            "marketing: Value error, unknown time zone 'Mars/Olympus_Mons'",
        ),
        (
            lambda d: d["marketing"].update(timezone="../../etc/passwd"),
            "marketing: Value error, unknown time zone '../../etc/passwd'",
        ),
        (
            lambda d: d["marketing"].update(timezone=""),
            "marketing: Value error, unknown time zone ''",
        ),
        (
            lambda d: d["marketing"]["quiet_hours"].update(end_hour=21),
            "marketing.quiet_hours: Value error, quiet hours need start_hour != end_hour",
        ),
        (
            lambda d: d["marketing"]["quiet_hours"].update(start_hour=0, end_hour=0),
            "marketing.quiet_hours: Value error, quiet hours need start_hour != end_hour",
        ),
        (
            lambda d: d["marketing"]["quiet_hours"].update(end_hour=24),
            "marketing.quiet_hours.end_hour: ",
        ),
        (lambda d: d["marketing"].update(max_messages=0), "marketing.max_messages: "),
        (lambda d: d["marketing"].update(per_days=0), "marketing.per_days: "),
        (lambda d: d["marketing"].update(quiet=True), "marketing.quiet: Extra inputs"),
    ],
    ids=[
        "churn-equal-to-at-risk",
        "churn-before-at-risk",
        "at-risk-zero",
        "lead-equal-to-interval",
        "lead-beyond-interval",
        "negative-lead",
        "reminder-without-promotion",
        "zero-discount",
        "discount-over-100",
        "unknown-applies-to",
        "min-samples-zero",
        "unknown-time-zone",
        "time-zone-path",
        "empty-time-zone",
        "equal-quiet-hours",
        "equal-quiet-hours-midnight",
        "quiet-hour-24",
        "cap-zero-messages",
        "cap-zero-days",
        "unknown-marketing-key",
    ],
)
def test_invalid_time_driven_policy_names_the_problem(
    change: Callable[[dict[str, Any]], Any], message: str
) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(timed_text(change), "rules.yaml")
    error = str(info.value)
    assert error.startswith("rules.yaml: invalid policy:\n  - "), error
    assert message in error, error


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["lifecycle"].update(churned_after_days=61),
        lambda d: _formula(d).update(lead_days=20),
        lambda d: _formula(d).update(lead_days=0),
        lambda d: d["marketing"].update(timezone="UTC"),
        lambda d: d["marketing"].update(timezone="America/Argentina/Buenos_Aires"),
        lambda d: d["marketing"]["quiet_hours"].update(start_hour=1, end_hour=5),
        lambda d: d["marketing"].pop("quiet_hours"),
        lambda d: d.pop("win_back"),
    ],
    ids=[
        "churn-one-day-after-at-risk",
        "lead-one-below-interval",
        "no-lead",
        "utc",
        "three-part-zone",
        "quiet-hours-not-wrapping",
        "no-quiet-hours",
        "no-win-back",
    ],
)
def test_time_driven_limits_that_are_allowed(change: Callable[[dict[str, Any]], Any]) -> None:
    assert isinstance(parse_policy(timed_text(change)), Policy)
