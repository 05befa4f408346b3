"""The policy model: tiers, window, currencies and input bounds, loaded from YAML and validated."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Thresholds in the base currency: whole cents (the fold compares integer minor units, so
# 300.001 and 300.004 would be two tiers with one bar) and at most what one event may carry
# (streams.events.Money): a larger bar is never met, and 1e30 overflowed the cent rounding.
PositiveMoney = Annotated[
    Decimal, Field(ge=0, le=Decimal("1e12"), decimal_places=2, allow_inf_nan=False)
]
# Units of the base currency per unit of a currency. Bounded so that the largest event amount
# (1e12) converts to cents within Decimal's default 28 digits.
Rate = Annotated[Decimal, Field(gt=0, le=Decimal("1e6"), allow_inf_nan=False)]
# Day counts: at most a century, so every date they lead to stays printable ("never" as
# 999999999 days crashed the customer view and, as a grace period, every timer poll).
Days = Annotated[int, Field(ge=0, le=36_500)]
PositiveDays = Annotated[int, Field(ge=1, le=36_500)]
# Keys an event can carry (streams.events): a policy key no event can match is a mistake.
CurrencyCode = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Category = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


TierName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_-]*$")]


class TierRule(_Strict):
    """Entry rule of a tier: both thresholds must be met on the rolling window."""

    name: TierName
    min_window_spend: PositiveMoney = Decimal(0)
    min_window_orders: int = Field(0, ge=0)
    # Names this tier had in earlier policy versions: a customer holding one of them holds this
    # tier (renamed on its next evaluation, keeping tier_since, with no notification). Without
    # it a renamed tier's holders would count as the entry tier and be "upgraded" back.
    formerly: tuple[TierName, ...] = ()


class InputBounds(_Strict):
    max_event_age_days: PositiveDays = 730
    max_future_skew_minutes: int = Field(10, ge=0, le=525_600)  # at most a year


class TierChanges(_Strict):
    """Hysteresis: upgrades at once, downgrades only after a grace period below the tier's
    entry rule and a minimum time in the tier, announced `warning_days` before."""

    grace_days: Days = 30
    min_days_in_tier: Days = 90
    warning_days: Days = 14
    downgrade_to: Literal["one_step", "qualifying"] = "one_step"


Grade = Literal["A", "B", "C"]
DEFAULT_GRADES: dict[str, Grade] = {
    "important_value": "A",
    "important_development": "A",
    "important_retention": "A",
    "important_win_back": "B",
    "general_value": "B",
    "general_development": "B",
    "general_retention": "C",
    "general_win_back": "C",
}


class Segments(_Strict):
    """How customers are judged against the population (domain.md section 3)."""

    method: Literal["mean_split", "score_mean"] = "mean_split"
    snapshot_interval_minutes: int = Field(60, ge=1, le=525_600)  # at most a year
    grades: dict[str, Grade] = Field(default_factory=lambda: dict(DEFAULT_GRADES))

    @model_validator(mode="after")
    def _all_types(self) -> Segments:
        if set(self.grades) != set(DEFAULT_GRADES):
            missing = sorted(set(DEFAULT_GRADES) - set(self.grades))
            unknown = sorted(set(self.grades) - set(DEFAULT_GRADES))
            raise ValueError(
                f"grades must map the 8 RFM types (missing {missing}, unknown {unknown})"
            )
        return self


class Lifecycle(_Strict):
    """Days without a purchase after which a customer is at risk, then churned."""

    at_risk_after_days: PositiveDays = 60
    churned_after_days: PositiveDays = 180

    @model_validator(mode="after")
    def _ordered(self) -> Lifecycle:
        if self.churned_after_days <= self.at_risk_after_days:
            raise ValueError("churned_after_days must be greater than at_risk_after_days")
        return self


class Promotion(_Strict):
    """What a marketing message offers, e.g. 20 % off every category but the one reminded."""

    description: str = Field(min_length=1, max_length=200)
    discount_percent: Annotated[Decimal, Field(gt=0, le=100)]
    applies_to: Literal["all", "other_categories", "same_category"] = "all"
    valid_days: int = Field(7, ge=1, le=365)


class RepurchaseRule(_Strict):
    """A category's repurchase cycle: remind `lead_days` before the expected repurchase."""

    interval_days: int = Field(ge=1, le=3650)
    lead_days: int = Field(7, ge=0)
    learn: bool = False  # use the learned median gap once there are min_samples gaps
    promotion: Promotion

    @model_validator(mode="after")
    def _lead(self) -> RepurchaseRule:
        if self.lead_days >= self.interval_days:
            raise ValueError("lead_days must be smaller than interval_days")
        return self


class Repurchase(_Strict):
    min_samples: int = Field(30, ge=1)  # gaps needed before a learned interval is trusted
    categories: dict[Category, RepurchaseRule] = Field(default_factory=dict)


class WinBack(_Strict):
    after_days: PositiveDays
    promotion: Promotion


class QuietHours(_Strict):
    start_hour: int = Field(ge=0, le=23)
    end_hour: int = Field(ge=0, le=23)

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start_hour == self.end_hour:
            raise ValueError("quiet hours need start_hour != end_hour")
        return self


class Marketing(_Strict):
    """Gates on marketing messages (reminders, win-back offers). A gated message is deferred
    to the next allowed time, never dropped."""

    timezone: str = "UTC"
    max_messages: int = Field(2, ge=1)  # frequency cap: at most this many ...
    per_days: PositiveDays = 7  # ... in any window of this many days
    quiet_hours: QuietHours | None = None

    @model_validator(mode="after")
    def _zone(self) -> Marketing:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.timezone!r}") from exc
        return self


class Policy(_Strict):
    version: str = Field(min_length=1, max_length=64)
    base_currency: str = Field(pattern=r"^[A-Z]{3}$")
    currencies: dict[CurrencyCode, Rate]
    window_days: int = Field(365, ge=1, le=3650)
    input: InputBounds = Field(default_factory=lambda: InputBounds.model_validate({}))
    tiers: tuple[TierRule, ...] = Field(min_length=1)
    segments: Segments = Field(default_factory=lambda: Segments.model_validate({}))
    tier_changes: TierChanges = Field(default_factory=lambda: TierChanges.model_validate({}))
    lifecycle: Lifecycle = Field(default_factory=lambda: Lifecycle.model_validate({}))
    repurchase: Repurchase = Field(default_factory=lambda: Repurchase.model_validate({}))
    win_back: WinBack | None = None
    marketing: Marketing = Field(default_factory=lambda: Marketing.model_validate({}))

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        if self.currencies.get(self.base_currency) != Decimal(1):
            raise ValueError(f"currencies must map the base currency {self.base_currency} to 1")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        former = [old for tier in self.tiers for old in tier.formerly]
        if len(set(former)) != len(former):
            raise ValueError(f"a former tier name may map to one tier only, got {former}")
        if clash := sorted(set(former) & set(names)):
            raise ValueError(f"{clash} cannot be both a tier and a former name of another tier")
        first = self.tiers[0]
        if first.min_window_spend or first.min_window_orders:
            raise ValueError(f"the first tier ({first.name}) is the entry tier: no thresholds")
        for lower, upper in zip(self.tiers, self.tiers[1:], strict=False):
            # Monotone thresholds make "the highest qualifying tier" well defined.
            if (
                upper.min_window_spend < lower.min_window_spend
                or upper.min_window_orders < lower.min_window_orders
            ):
                raise ValueError(
                    f"tier {upper.name} must not have lower thresholds than {lower.name}"
                )
            if (upper.min_window_spend, upper.min_window_orders) == (
                lower.min_window_spend,
                lower.min_window_orders,
            ):
                raise ValueError(f"tiers {lower.name} and {upper.name} have the same thresholds")
        if self.input.max_event_age_days < self.window_days:
            raise ValueError("input.max_event_age_days must be >= window_days")
        return self

    def find_tier(self, name: str) -> int | None:
        """The rank of the tier a stored tier name means (its name or a former one), or None
        for a name this policy does not know."""
        for rank, tier in enumerate(self.tiers):
            if tier.name == name:
                return rank
        for rank, tier in enumerate(self.tiers):
            if name in tier.formerly:
                return rank
        return None

    def tier_rank(self, name: str) -> int:
        rank = self.find_tier(name)
        return 0 if rank is None else rank  # a tier removed from the policy: the entry tier


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: YAML keeps the last
    silently, so `window_days: 365` followed further down by `window_days: 30` would run a
    30-day window from a file that reads as 365."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class PolicyError(ValueError):
    """A policy file that cannot be used; the message says which file and what is wrong."""


def parse_policy(text: str, source: str = "<string>") -> Policy:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: expected a mapping at the top level")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  - {'.'.join(str(p) for p in err['loc']) or '<policy>'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        raise PolicyError(f"{source}: invalid policy:\n" + "\n".join(lines)) from exc
