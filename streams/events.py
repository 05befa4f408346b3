"""Wire contracts (pydantic v2, frozen, versioned) for what enters and leaves memberflow."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

SCHEMA_VERSION = 1

# Ids end up inside Redis keys ("mf:{c:<id>}"): braces would break the Cluster hash tag, and
# whitespace or control characters make ids unreadable in logs, so the alphabet is closed.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+$")
]
CurrencyCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]
# Finite, non-negative money with at most 1e12 and sub-cent precision tolerated (rounded later).
Money = Annotated[Decimal, Field(ge=0, le=Decimal("1e12"), allow_inf_nan=False)]

_RFC3339_START = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _date_time_text(value: Any) -> Any:
    """The contract says RFC 3339 text with a zone. pydantic's datetime also reads numbers and
    numeric strings as Unix time (1780000000000 silently as milliseconds): refused, so a
    producer sending epochs learns it from the dead letter instead of from wrong dates."""
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_START.match(value)):
        return value
    raise ValueError("expected an RFC 3339 date-time with a zone, e.g. 2026-06-01T10:00:00Z")


# Event time on the wire; datetimes built in code pass as they are.
EventTime = Annotated[AwareDatetime, BeforeValidator(_date_time_text)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Item(_Frozen):
    sku: Label
    category: Label
    quantity: int = Field(1, ge=1, le=1_000_000)
    unit_price: Money | None = None


class _Event(_Frozen):
    """What every input event has; the derived values are computed once per event (the fold
    asks for them several times)."""

    if TYPE_CHECKING:  # declared by each event (pydantic keeps a model's own field order)
        event_id: str
        occurred_at: datetime

    @cached_property
    def at(self) -> int:
        """`occurred_at` in epoch seconds."""
        return int(self.occurred_at.timestamp())

    @cached_property
    def cause(self) -> Cause:
        """What a notification caused by this event names as its cause (the id was validated
        with the event: nothing to check again)."""
        return Cause.model_construct(kind="event", id=self.event_id)


class Purchase(_Event):
    """A completed order. `event_id` is the idempotency key across redelivery and replays."""

    type: Literal["purchase"] = "purchase"
    schema_version: Literal[1] = 1
    event_id: Identifier
    customer_id: Identifier
    occurred_at: EventTime  # event time, with a zone
    amount: Money
    currency: CurrencyCode
    items: tuple[Item, ...] = ()
    channel: Label | None = None

    @cached_property
    def categories(self) -> tuple[str, ...]:
        return tuple(sorted({item.category for item in self.items}))


class Refund(_Event):
    """A refund or return of (part of) an earlier purchase, named by its event id."""

    type: Literal["refund"] = "refund"
    schema_version: Literal[1] = 1
    event_id: Identifier
    customer_id: Identifier
    refund_of: Identifier
    occurred_at: EventTime
    amount: Money
    currency: CurrencyCode


class Tick(_Frozen):
    """A watermark: no customer, only "event time has reached `occurred_at` on this partition".
    Published by `memberflow tick` to every partition so that, in `event` clock mode, timers
    fire at the end of a replay even though no later purchases arrive."""

    type: Literal["tick"] = "tick"
    schema_version: Literal[1] = 1
    occurred_at: EventTime


InputEvent = Purchase | Refund


class RejectReason(StrEnum):
    """Why an input went to the dead-letter topic. A closed set: it is a metric label."""

    EMPTY = "empty_message"
    OVERSIZED = "oversized_message"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_event_type"
    SCHEMA = "schema_violation"
    INVALID_AMOUNT = "invalid_amount"
    UNKNOWN_CURRENCY = "unknown_currency"
    FUTURE_TIMESTAMP = "future_timestamp"
    TOO_OLD = "too_old"
    UNKNOWN_PURCHASE = "unknown_purchase"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    REFUND_EXCEEDS_PURCHASE = "refund_exceeds_purchase"


class Rejection(_Frozen):
    reason: RejectReason
    detail: str


class DeadLetter(_Frozen):
    """Dead-letter envelope: the raw bytes (base64) with the reason and where they came from."""

    schema_version: Literal[1] = 1
    reason: RejectReason
    detail: str
    # At most the first MAX_MESSAGE_BYTES of the message (streams.codec): a larger one is
    # refused as oversized anyway, and copied whole (a third larger in base64) a message near
    # the producer's 1 MB limit made a dead letter the producer refused, which stopped the
    # worker on that message after every restart.
    raw_b64: str
    raw_bytes: int = 0  # the message's own size
    raw_truncated: bool = False
    source_topic: str
    source_partition: int
    source_offset: int
    rejected_at: datetime


class NotificationType(StrEnum):
    TIER_UPGRADED = "tier_upgraded"
    TIER_DOWNGRADED = "tier_downgraded"
    TIER_DOWNGRADE_WARNING = "tier_downgrade_warning"
    SEGMENT_CHANGED = "segment_changed"
    LIFECYCLE_CHANGED = "lifecycle_changed"
    REPURCHASE_REMINDER = "repurchase_reminder"
    WIN_BACK_OFFER = "win_back_offer"


class Cause(_Frozen):
    kind: Literal["event", "timer", "snapshot"]
    id: str  # the event_id, the timer id, or "<snapshot version>/<policy version>"


class Notification(_Frozen):
    """An outgoing notification. `notification_id` is deterministic: consumers drop repeats."""

    schema_version: Literal[1] = 1
    notification_id: str
    type: NotificationType
    customer_id: str
    occurred_at: datetime  # engine time of the decision (event time in `event` clock mode)
    cause: Cause
    policy_version: str
    summary: str  # one human sentence
    explanation: dict[str, Any]  # inputs, thresholds, rule, previous label
