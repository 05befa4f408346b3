"""A deterministic synthetic baby shop: purchase history for the demo, replays and tests.

Everything is drawn from `random.Random` instances seeded from the arguments (one per customer,
so adding customers does not change the others' histories); there is no global random state, and
the same arguments always give the same rows, byte for byte.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from memberflow.replay import row_to_json

CATEGORIES = ("infant_formula", "diapers", "baby_food", "toys", "clothing", "household")
COLUMNS = (
    "event_id",
    "customer_id",
    "occurred_at",
    "amount",
    "currency",
    "category",
    "sku",
    "quantity",
)

BIG_SPENDER = "big_spender"
REGULAR = "regular"
ONE_TIMER = "one_timer"
LAPSED = "lapsed"
FORMULA_BUYER = "formula_buyer"
BEHAVIOURS = (BIG_SPENDER, REGULAR, FORMULA_BUYER, LAPSED, ONE_TIMER)

# The repurchase cycle of the domain's central example: a can lasts about three weeks.
FORMULA_CYCLE_DAYS = 21
FORMULA_JITTER_DAYS = 3

BAD_KINDS = (
    "broken_json",
    "negative_amount",
    "nan_amount",
    "missing_customer_id",
    "future_timestamp",
    "unknown_currency",
)
FAR_FUTURE = "2999-01-01T00:00:00Z"

_CENT = Decimal("0.01")
_OPEN_SECONDS = 8 * 3600  # the shop sells from 08:00 to 22:00 UTC
_CLOSE_SECONDS = 22 * 3600


@dataclass(frozen=True)
class _Shelf:
    low: Decimal  # unit price of the cheapest SKU
    high: Decimal  # unit price of the dearest SKU
    skus: int
    max_quantity: int  # per order line; jars of baby food come by the dozen, toys do not

    def price(self, index: int) -> Decimal:
        """Fixed per SKU, so a SKU always costs the same."""
        step = (self.high - self.low) / max(self.skus - 1, 1)
        return (self.low + step * index).quantize(_CENT, ROUND_HALF_EVEN)


_CATALOGUE = {
    "infant_formula": _Shelf(Decimal("24.90"), Decimal("39.90"), 4, 3),
    "diapers": _Shelf(Decimal("12.90"), Decimal("34.90"), 6, 3),
    "baby_food": _Shelf(Decimal("1.49"), Decimal("4.99"), 12, 12),
    "toys": _Shelf(Decimal("7.99"), Decimal("89.00"), 20, 2),
    "clothing": _Shelf(Decimal("9.99"), Decimal("59.00"), 15, 4),
    "household": _Shelf(Decimal("2.99"), Decimal("24.99"), 15, 4),
}
# Infant formula is left to the formula buyers, so that the category's repurchase interval
# learned from the data is the clean ~21-day signal the domain describes.
_EVERYDAY = ("diapers", "baby_food", "toys", "clothing", "household")
_EXPENSIVE = ("toys", "clothing", "diapers")


def customer_id(number: int) -> str:
    return f"cust-{number:05d}"


def customer_behaviours(customers: int, seed: int = 7) -> dict[str, str]:
    """Which behaviour each synthetic customer follows (the same assignment generate_history
    uses). Every behaviour is present once there are at least five customers."""
    if customers < 0:
        raise ValueError(f"customers must be >= 0, got {customers}")
    if customers < len(BEHAVIOURS):
        plan = list(BEHAVIOURS[:customers])
    else:
        quotas = {
            BIG_SPENDER: max(1, customers * 5 // 100),
            FORMULA_BUYER: max(1, customers * 15 // 100),
            LAPSED: max(1, customers * 15 // 100),
            ONE_TIMER: max(1, customers * 25 // 100),
        }
        quotas[REGULAR] = customers - sum(quotas.values())
        plan = [name for name in BEHAVIOURS for _ in range(quotas[name])]
    # Shuffled so that ids do not give the behaviour away.
    random.Random(f"{seed}:behaviours").shuffle(plan)
    return {customer_id(number): plan[number - 1] for number in range(1, customers + 1)}


def _order_line(rng: random.Random, category: str) -> tuple[str, int, Decimal]:
    shelf = _CATALOGUE[category]
    index = rng.randrange(shelf.skus)
    quantity = rng.randint(1, shelf.max_quantity)
    return f"{category}-{index + 1:03d}", quantity, shelf.price(index) * quantity


def _purchase_days(rng: random.Random, behaviour: str, days: int) -> list[tuple[float, str]]:
    """(day offset, category) of one customer's orders; offsets may run past `days` and are
    cut by the caller."""
    orders: list[tuple[float, str]] = []
    if behaviour == ONE_TIMER:
        orders.append((rng.uniform(0, days), rng.choice(_EVERYDAY)))
    elif behaviour == BIG_SPENDER:
        day = rng.uniform(0, min(days, 30))
        while day < days:
            orders.append((day, rng.choice(_EXPENSIVE)))
            day += rng.uniform(3, 9)
    elif behaviour == REGULAR:
        mean_gap = rng.uniform(15, 45)  # some regulars end up silver, the keener ones gold
        day = rng.uniform(0, min(days, 60))
        while day < days:
            orders.append((day, rng.choice(_EVERYDAY)))
            day += rng.uniform(0.5, 1.5) * mean_gap
    elif behaviour == LAPSED:
        day = rng.uniform(0, max(days * 0.2, 1))
        for _ in range(rng.randint(2, 6)):  # a few orders early on, then silence
            orders.append((day, rng.choice(_EVERYDAY)))
            day += rng.uniform(10, 30)
    elif behaviour == FORMULA_BUYER:
        day = float(rng.randint(0, FORMULA_CYCLE_DAYS - 1))
        while day < days:
            orders.append((day, "infant_formula"))
            if rng.random() < 0.3:  # now and then a separate order of nappies or jars
                orders.append((day + rng.uniform(2, 12), rng.choice(("diapers", "baby_food"))))
            # Whole days between cans, the time of day is drawn per order below.
            day += FORMULA_CYCLE_DAYS + rng.randint(-FORMULA_JITTER_DAYS, FORMULA_JITTER_DAYS)
    else:  # pragma: no cover - BEHAVIOURS is closed
        raise ValueError(behaviour)
    return orders


def generate_history(
    customers: int, start: datetime, days: int, seed: int = 7, currency: str = "EUR"
) -> list[dict[str, str]]:
    """Purchase rows for `customers` customers over `days` days from `start` (naive = UTC),
    sorted by occurred_at, with event ids f"{seed}-{n}" numbered in that order.

    Each row: event_id, customer_id, occurred_at (ISO 8601, "Z"), amount ("12.34"), currency,
    category, sku, quantity, all strings. With a year of history (and the default policy) the
    big spenders reach platinum, keen regulars and formula buyers gold, others silver."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    origin = (start if start.tzinfo else start.replace(tzinfo=UTC)).astimezone(UTC)
    drafts: list[tuple[datetime, str, int, dict[str, str]]] = []
    for cid, behaviour in customer_behaviours(customers, seed).items():
        rng = random.Random(f"{seed}:{cid}")
        for sequence, (offset, category) in enumerate(_purchase_days(rng, behaviour, days)):
            day = int(offset)
            if day >= days:
                continue
            moment = origin + timedelta(
                days=day, seconds=rng.randrange(_OPEN_SECONDS, _CLOSE_SECONDS)
            )
            sku, quantity, amount = _order_line(rng, category)
            row = {
                "customer_id": cid,
                "occurred_at": moment.isoformat().replace("+00:00", "Z"),
                "amount": str(amount),
                "currency": currency,
                "category": category,
                "sku": sku,
                "quantity": str(quantity),
            }
            drafts.append((moment, cid, sequence, row))
    drafts.sort(key=lambda draft: draft[:3])
    return [
        {"event_id": f"{seed}-{number}", **row}
        for number, (_, _, _, row) in enumerate(drafts, start=1)
    ]


def _bad_entry(kind: str, template: Mapping[str, str], event_id: str) -> bytes:
    row = dict(template, event_id=event_id)
    if kind == "negative_amount":
        row["amount"] = f"-{row['amount']}"
    elif kind == "nan_amount":
        # The bare NaN token (not JSON, but Python's json emits and reads it) rather than the
        # string "NaN": it exercises the decoder's non-finite path.
        return row_to_json(row, row["currency"]).replace(
            f'"amount":"{row["amount"]}"'.encode(), b'"amount":NaN'
        )
    elif kind == "missing_customer_id":
        del row["customer_id"]
    elif kind == "future_timestamp":
        row["occurred_at"] = FAR_FUTURE
    elif kind == "unknown_currency":
        row["currency"] = "XXX"
    raw = row_to_json(row, row["currency"])
    if kind == "broken_json":
        return raw[: len(raw) // 2]  # a message cut off in the middle
    return raw


def add_noise(
    rows: list[dict[str, str]], seed: int, duplicates: int, bad: int, shuffle_window: int
) -> list[dict[str, str] | bytes]:
    """A new stream with the faults a real feed has, deterministically:

    - the rows locally shuffled: each moves at most `shuffle_window` positions;
    - `duplicates` distinct rows delivered a second time (same event id and payload), later;
    - `bad` malformed messages (bytes, JSONL lines) cycling through BAD_KINDS, with event ids
      f"{seed}-bad-{k}" so that none collides with a real event.
    Rows are copied, the input is not modified."""
    if duplicates < 0 or bad < 0 or shuffle_window < 0:
        raise ValueError("duplicates, bad and shuffle_window must be >= 0")
    if duplicates > len(rows):
        raise ValueError(f"cannot duplicate {duplicates} of {len(rows)} rows")
    rng = random.Random(f"{seed}:noise")
    # Sorting by position + U(0, w) moves each element by fewer than w places.
    keyed = sorted((index + rng.uniform(0, shuffle_window), index) for index in range(len(rows)))
    shuffled = [dict(rows[index]) for _, index in keyed]

    size = len(shuffled)
    # (position key, tie-breaker, entry): originals sit at their index, copies strictly after.
    placed: list[tuple[float, int, dict[str, str] | bytes]] = [
        (float(index), index, row) for index, row in enumerate(shuffled)
    ]
    for number, index in enumerate(sorted(rng.sample(range(size), duplicates))):
        position = index + 0.5 + rng.random() * (size - index)
        placed.append((position, size + number, dict(shuffled[index])))
    template = (
        rows[0]
        if rows
        else {
            "event_id": "x",
            "customer_id": customer_id(1),
            "occurred_at": "2024-01-01T12:00:00Z",
            "amount": "10.00",
            "currency": "EUR",
            "category": "toys",
            "sku": "toys-001",
            "quantity": "1",
        }
    )
    for number in range(bad):
        source = rng.choice(rows) if rows else template
        entry = _bad_entry(BAD_KINDS[number % len(BAD_KINDS)], source, f"{seed}-bad-{number}")
        placed.append((rng.uniform(-0.5, size), 2 * size + number, entry))
    placed.sort(key=lambda item: (item[0], item[1]))
    return [entry for _, _, entry in placed]


def purchase_json(row: Mapping[str, str], default_currency: str = "EUR") -> bytes:
    """The message the replay would publish for this row (the same mapping, not a copy)."""
    return row_to_json(row, default_currency)


def write_csv(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Rows as CSV: the standard columns first, then any others in order of appearance."""
    materialized = list(rows)
    columns = list(COLUMNS)
    for row in materialized:
        if not isinstance(row, Mapping):
            raise TypeError(
                f"write_csv takes rows (mappings), got {type(row).__name__}: malformed bytes "
                "entries only fit a JSONL file"
            )
        columns.extend(name for name in row if name not in columns)
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(materialized)


def write_jsonl(entries: Iterable[Mapping[str, str] | bytes], path: Path) -> None:
    """One message per line: rows mapped by purchase_json, bytes written verbatim."""
    with Path(path).open("wb") as handle:
        for entry in entries:
            line = entry if isinstance(entry, bytes) else purchase_json(entry)
            if b"\n" in line:
                raise ValueError(f"a JSONL entry may not contain a newline: {line[:80]!r}")
            handle.write(line + b"\n")
