"""Bytes in, a model or a Rejection out. Structural checks only: policy checks live in rules/."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from pydantic import TypeAdapter, ValidationError

from streams.events import (
    InputEvent,
    Notification,
    Purchase,
    Refund,
    Rejection,
    RejectReason,
    Tick,
)

MAX_MESSAGE_BYTES = 64 * 1024  # a purchase with hundreds of items fits; anything bigger is abuse

_EVENT_TYPES: dict[str, type[Purchase] | type[Refund] | type[Tick]] = {
    "purchase": Purchase,
    "refund": Refund,
    "tick": Tick,
}
_ADAPTERS = {name: TypeAdapter(model) for name, model in _EVENT_TYPES.items()}
_AMOUNT_ERRORS = {"greater_than_equal", "less_than_equal", "finite_number", "decimal_parsing"}


def _non_finite(name: str) -> Any:
    # json.loads accepts NaN/Infinity (not JSON); as Decimals they fail the model's finiteness
    # check, so a NaN amount is reported as an invalid amount rather than as broken JSON.
    return Decimal(name)


# One decoder for every message: json.loads with these options builds a new one per call.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_non_finite)


def decode_event(raw: bytes | None) -> InputEvent | Tick | Rejection:
    """Parse one input message. Never raises: every failure is a Rejection with a reason."""
    if not raw:
        return Rejection(reason=RejectReason.EMPTY, detail="empty message")
    if len(raw) > MAX_MESSAGE_BYTES:
        return Rejection(
            reason=RejectReason.OVERSIZED, detail=f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}"
        )
    try:
        # Decimal keeps "19.99" exact; floats would make sums depend on order.
        # What json.loads does with bytes: any UTF of JSON, lone surrogates kept for the schema
        # check to refuse.
        obj = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejection(reason=RejectReason.MALFORMED_JSON, detail=str(exc)[:200])
    except RecursionError:
        # Nesting deeper than the interpreter's recursion limit fits well inside 64 KiB.
        return Rejection(reason=RejectReason.MALFORMED_JSON, detail="nested too deeply")
    if not isinstance(obj, dict):
        return Rejection(reason=RejectReason.NOT_AN_OBJECT, detail=type(obj).__name__)
    event_type = obj.get("type", "purchase")
    adapter = _ADAPTERS.get(event_type) if isinstance(event_type, str) else None
    if adapter is None:
        return Rejection(reason=RejectReason.UNKNOWN_TYPE, detail=repr(event_type)[:100])
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        return _classify(exc)


def _classify(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    detail = f"{where}: {first['msg']}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
    if first["loc"] and first["loc"][0] == "amount" and first["type"] in _AMOUNT_ERRORS:
        return Rejection(reason=RejectReason.INVALID_AMOUNT, detail=detail[:300])
    return Rejection(reason=RejectReason.SCHEMA, detail=detail[:300])


def encode_model(model: Notification | Purchase | Refund) -> bytes:
    return model.model_dump_json().encode()
