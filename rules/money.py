"""Money as integer minor units of the base currency, so that sums are exact in any order."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from rules.policy import Policy

_CENT = Decimal("0.01")


def to_minor(amount: Decimal, currency: str, policy: Policy) -> int | None:
    """Convert to base-currency cents; None when the currency is not in the policy."""
    rate = policy.currencies.get(currency)
    if rate is None:
        return None
    return int((amount * rate).quantize(_CENT, rounding=ROUND_HALF_EVEN) * 100)


def from_minor(cents: int) -> Decimal:
    return (Decimal(cents) / 100).quantize(_CENT)


def format_minor(cents: int) -> str:
    return str(from_minor(cents))


def minor(amount: Decimal) -> int:
    """Base-currency amount (e.g. a policy threshold) in minor units."""
    return int(amount.quantize(_CENT, rounding=ROUND_HALF_EVEN) * 100)
