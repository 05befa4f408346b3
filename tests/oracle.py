"""An independent batch computation of what the engine should export, for tests to compare with.

Written from the documented semantics (shared/domain.md, rules/default_policy.yaml), not from the
engine: it imports nothing from rules/ or state/, keeps every purchase in a plain list and
recomputes from scratch, so that a shared mistake is unlikely. Slow and simple on purpose.

Semantics, for a stream of purchase rows in arrival order:
- only valid purchases count (`is_valid_row`), and an event id counts once (first wins);
- an event older than `max_event_age_days` before the customer's latest purchase is refused;
- day index = epoch seconds // 86400 (UTC days); the window at time t holds the purchases whose
  day index is in [day(t) - window_days + 1, day(t)];
- money is converted per event to base-currency cents (amount * rate, half-even);
- tiers: after each purchase, evaluated at the latest occurred_at seen for that customer, the
  customer holds the highest tier whose spend and order thresholds the window meets, and never
  goes down here (downgrades are a separate, timer-driven policy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

DAY = 86_400
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("1e12")
MAX_FUTURE_SKEW = timedelta(minutes=10)

# Copied from rules/default_policy.yaml on purpose (a test checks they still agree).
DEFAULT_RATES: dict[str, Decimal] = {
    "EUR": Decimal("1"),
    "USD": Decimal("0.92"),
    "GBP": Decimal("1.17"),
    "CNY": Decimal("0.13"),
}
DEFAULT_TIERS: list[tuple[str, Decimal, int]] = [
    ("member", Decimal("0"), 0),
    ("silver", Decimal("300"), 2),
    ("gold", Decimal("1000"), 4),
    ("platinum", Decimal("3000"), 8),
]
DEFAULT_WINDOW_DAYS = 365
DEFAULT_MAX_EVENT_AGE_DAYS = 730

_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_BARE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ROW_FIELDS = ("event_id", "customer_id", "occurred_at", "amount", "currency")
# The wire fields and the CSV columns (which the replay maps to wire fields).
_KNOWN_FIELDS = frozenset(
    {
        "type",
        "schema_version",
        "event_id",
        "customer_id",
        "occurred_at",
        "amount",
        "currency",
        "items",
        "channel",
        "category",
        "sku",
        "quantity",
        "refund_of",
    }
)


# -- parsing ---------------------------------------------------------------------------------


def parse_time(value: object, *, csv_row: bool = True) -> datetime | None:
    """occurred_at as an aware UTC datetime, or None.

    A JSON line needs a zone (the wire model's rule). A CSV row goes through the replay first,
    which reads a bare date as midnight UTC and a time without a zone as UTC (`csv_row`)."""
    if not isinstance(value, str):
        return None
    if _BARE_DATE.fullmatch(value):
        if not csv_row:
            return None
        try:
            day = date.fromisoformat(value)
        except ValueError:
            return None
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        if not csv_row:
            return None
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_amount(value: object) -> Decimal | None:
    """A finite decimal in [0, 1e12], else None. Floats are refused (JSON numbers are read
    as Decimal by `load_entry`)."""
    if isinstance(value, bool | float):
        return None
    try:
        amount = Decimal(value) if isinstance(value, int | str | Decimal) else None
    except InvalidOperation:
        return None
    if amount is None or not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT:
        return None
    return amount


def load_entry(entry: Mapping[str, Any] | bytes) -> Mapping[str, Any] | None:
    """A row as given, or a JSON line parsed (numbers as Decimal); None if it is not an object."""
    if not isinstance(entry, bytes):
        return entry
    try:
        obj = json.loads(entry, parse_float=Decimal, parse_constant=Decimal)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def epoch_seconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(seconds=1)


def iso(seconds: int) -> str:
    return (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def cents(amount: Decimal, rate: Decimal) -> int:
    return int((amount * rate).quantize(CENT, rounding=ROUND_HALF_EVEN) * 100)


def format_cents(value: int) -> str:
    sign = "-" if value < 0 else ""
    return f"{sign}{abs(value) // 100}.{abs(value) % 100:02d}"


# -- validity --------------------------------------------------------------------------------


def _valid_label(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 64


def _valid_quantity(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return False
    return isinstance(value, int) and 1 <= value <= 1_000_000


def _valid_items(row: Mapping[str, Any]) -> bool:
    """The optional order lines: the wire form (`items`) or the CSV form (category/sku/
    quantity columns, which the replay maps to one item when category is non-empty)."""
    items = row.get("items")
    if items is not None:
        if not isinstance(items, list):
            return False
        for item in items:
            if not isinstance(item, dict) or set(item) - {
                "sku",
                "category",
                "quantity",
                "unit_price",
            }:
                return False
            if not (_valid_label(item.get("sku")) and _valid_label(item.get("category"))):
                return False
            if "quantity" in item and not _valid_quantity(item["quantity"]):
                return False
            if item.get("unit_price") is not None and parse_amount(item["unit_price"]) is None:
                return False
    category = row.get("category") or ""
    if category:
        sku = row.get("sku") or category
        quantity = row.get("quantity") or "1"
        if not (_valid_label(category) and _valid_label(sku) and _valid_quantity(quantity)):
            return False
    return True


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row as the replay reads it: text stripped."""
    return {name: value.strip() if isinstance(value, str) else value for name, value in row.items()}


def is_valid_row(
    entry: Mapping[str, Any] | bytes,
    wall_now: datetime,
    rates: Mapping[str, Decimal] = DEFAULT_RATES,
) -> bool:
    """Whether the engine should accept this as a purchase: a CSV-style row (a mapping, as
    the replay would publish it) or a JSON line (bytes, published verbatim).

    Mirrors the documented input rules: required fields present; ids 1-128 characters of
    [A-Za-z0-9._:@/+=-]; amount a finite decimal in [0, 1e12]; currency known to `rates`;
    occurred_at with a zone (in a CSV row also a bare date or a zone-less time, read as UTC)
    and not more than 10 minutes after `wall_now`; order lines well formed; no unknown fields.
    Refunds and other types are not purchases: False."""
    csv_row = not isinstance(entry, bytes)
    loaded = load_entry(entry)
    if loaded is None:
        return False
    row = _clean(loaded) if csv_row else loaded
    if set(row) - _KNOWN_FIELDS:
        return False
    if row.get("type", "purchase") != "purchase" or row.get("refund_of"):
        return False
    if row.get("schema_version", 1) != 1:
        return False
    if any(row.get(name) in (None, "") for name in _ROW_FIELDS):
        return False
    for name in ("event_id", "customer_id"):
        if not (isinstance(row[name], str) and _IDENTIFIER.fullmatch(row[name])):
            return False
    if parse_amount(row["amount"]) is None:
        return False
    currency = row["currency"]
    if not (isinstance(currency, str) and _CURRENCY.fullmatch(currency) and currency in rates):
        return False
    moment = parse_time(row["occurred_at"], csv_row=csv_row)
    if moment is None or moment > wall_now + MAX_FUTURE_SKEW:
        return False
    if row.get("channel") not in (None, "") and not _valid_label(row["channel"]):
        return False
    return _valid_items(row)


def valid_rows(
    entries: Iterable[Mapping[str, Any] | bytes],
    wall_now: datetime,
    rates: Mapping[str, Decimal] = DEFAULT_RATES,
) -> list[Mapping[str, Any]]:
    """The valid purchases of a noisy stream, parsed, in stream order (duplicates kept)."""
    kept = []
    for entry in entries:
        row = load_entry(entry)
        if row is not None and is_valid_row(entry, wall_now, rates):
            kept.append(row)
    return kept


# -- the batch fold --------------------------------------------------------------------------


@dataclass
class _Customer:
    customer_id: str
    purchases: list[tuple[int, int]] = field(default_factory=list)  # (epoch seconds, cents)
    latest: int | None = None  # max occurred_at seen: the customer's evaluation time
    tier: str = ""


def _window(purchases: list[tuple[int, int]], now: int, window_days: int) -> tuple[int, int]:
    today = now // DAY
    inside = [amount for at, amount in purchases if today - window_days + 1 <= at // DAY <= today]
    return len(inside), sum(inside)


def _qualifying(tiers: list[tuple[str, Decimal, int]], orders: int, spend_cents: int) -> int:
    best = 0
    for rank, (_, min_spend, min_orders) in enumerate(tiers):
        if orders >= min_orders and spend_cents >= min_spend * 100:
            best = rank
    return best


def _fold(
    rows: Iterable[Mapping[str, Any]],
    window_days: int,
    rates: Mapping[str, Decimal],
    tiers: list[tuple[str, Decimal, int]],
    max_event_age_days: int | None,
) -> tuple[dict[str, _Customer], set[tuple[str, str, str, str]]]:
    names = [name for name, _, _ in tiers]
    customers: dict[str, _Customer] = {}
    upgrades: set[tuple[str, str, str, str]] = set()
    seen: set[str] = set()
    for given in rows:
        row = _clean(given)  # as the replay strips CSV text; valid wire rows are unchanged
        event_id = str(row["event_id"])
        if event_id in seen:
            continue
        moment = parse_time(row["occurred_at"])
        amount = parse_amount(row["amount"])
        if moment is None or amount is None:
            raise ValueError(f"not a valid purchase row (filter with is_valid_row): {row!r}")
        at = epoch_seconds(moment)
        customer = customers.setdefault(
            str(row["customer_id"]), _Customer(str(row["customer_id"]), tier=names[0])
        )
        if (
            max_event_age_days is not None
            and customer.latest is not None
            and at < customer.latest - max_event_age_days * DAY
        ):
            continue  # refused as too old; a refused event is not remembered as seen either
        seen.add(event_id)
        customer.purchases.append((at, cents(amount, rates[str(row["currency"])])))
        customer.latest = at if customer.latest is None else max(customer.latest, at)
        orders, spend = _window(customer.purchases, customer.latest, window_days)
        rank = _qualifying(tiers, orders, spend)
        if rank > names.index(customer.tier):
            upgrades.add((customer.customer_id, customer.tier, names[rank], event_id))
            customer.tier = names[rank]
    return customers, upgrades


def batch_export(
    rows: Iterable[Mapping[str, Any]],
    as_of: datetime,
    window_days: int = DEFAULT_WINDOW_DAYS,
    rates: Mapping[str, Decimal] = DEFAULT_RATES,
    tiers: list[tuple[str, Decimal, int]] = DEFAULT_TIERS,
    max_event_age_days: int | None = DEFAULT_MAX_EVENT_AGE_DAYS,
) -> dict[str, dict[str, Any]]:
    """customer_id -> the export fields at `as_of`, over valid purchase rows in arrival order."""
    customers, _ = _fold(rows, window_days, rates, tiers, max_event_age_days)
    now = epoch_seconds(as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC))
    export: dict[str, dict[str, Any]] = {}
    for customer_id, customer in sorted(customers.items()):
        times = [at for at, _ in customer.purchases]
        orders, spend = _window(customer.purchases, now, window_days)
        export[customer_id] = {
            "customer_id": customer_id,
            "first_purchase_at": iso(min(times)),
            "last_purchase_at": iso(max(times)),
            "recency_days": (now - max(times)) // DAY,
            "frequency": orders,
            "monetary": format_cents(spend),
            "lifetime_orders": len(customer.purchases),
            "lifetime_spend": format_cents(sum(amount for _, amount in customer.purchases)),
            "tier": customer.tier,
        }
    return export


def expected_upgrades(
    rows: Iterable[Mapping[str, Any]],
    window_days: int = DEFAULT_WINDOW_DAYS,
    rates: Mapping[str, Decimal] = DEFAULT_RATES,
    tiers: list[tuple[str, Decimal, int]] = DEFAULT_TIERS,
    max_event_age_days: int | None = DEFAULT_MAX_EVENT_AGE_DAYS,
) -> set[tuple[str, str, str, str]]:
    """(customer_id, from_tier, to_tier, event_id) of every tier_upgraded notification."""
    _, upgrades = _fold(rows, window_days, rates, tiers, max_event_age_days)
    return upgrades
