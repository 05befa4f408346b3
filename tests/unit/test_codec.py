"""decode_event: bytes in, a model or a Rejection with the right reason out, never an exception."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.codec import MAX_MESSAGE_BYTES, decode_event, encode_model
from streams.events import Cause, Item, Purchase, Refund, Rejection, RejectReason

AT = "2026-03-04T05:06:07+01:00"


def purchase_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "purchase",
        "event_id": "ord-1",
        "customer_id": "cust-1",
        "occurred_at": AT,
        "amount": "19.99",
        "currency": "EUR",
    }
    doc.update(changes)
    return doc


def refund_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "refund",
        "event_id": "ref-1",
        "customer_id": "cust-1",
        "refund_of": "ord-1",
        "occurred_at": AT,
        "amount": "5.00",
        "currency": "EUR",
    }
    doc.update(changes)
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != key}


def rejected(result: object) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


# -- valid input -----------------------------------------------------------------------------


def test_purchase_round_trips_through_encode_and_decode() -> None:
    purchase = Purchase(
        event_id="ord-1",
        customer_id="cust-1",
        occurred_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=1))),
        amount=Decimal("19.99"),
        currency="USD",
        items=(
            Item(sku="sku-1", category="formula", quantity=2, unit_price=Decimal("9.995")),
            Item(sku="sku-2", category="diapers"),
        ),
        channel="web",
    )
    decoded = decode_event(encode_model(purchase))
    assert decoded == purchase
    assert isinstance(decoded, Purchase)
    assert decoded.categories == ("diapers", "formula")
    # Derived once per event, equal to what they derive from.
    assert decoded.at == int(purchase.occurred_at.timestamp())
    assert decoded.cause == Cause(kind="event", id=purchase.event_id)
    assert decoded.model_dump() == purchase.model_dump()  # nothing derived is serialised


def test_refund_round_trips_through_encode_and_decode() -> None:
    refund = Refund(
        event_id="ref-1",
        customer_id="cust-1",
        refund_of="ord-1",
        occurred_at=datetime(2026, 3, 5, tzinfo=UTC),
        amount=Decimal("5.50"),
        currency="GBP",
    )
    decoded = decode_event(encode_model(refund))
    assert decoded == refund
    assert isinstance(decoded, Refund)


def test_purchase_from_literal_json_has_exact_fields() -> None:
    decoded = decode_event(raw(purchase_doc()))
    assert isinstance(decoded, Purchase)
    assert decoded.event_id == "ord-1"
    assert decoded.customer_id == "cust-1"
    assert decoded.occurred_at == datetime(2026, 3, 4, 4, 6, 7, tzinfo=UTC)
    assert decoded.occurred_at.utcoffset() == timedelta(hours=1)
    assert decoded.amount == Decimal("19.99")
    assert decoded.currency == "EUR"
    assert decoded.items == ()
    assert decoded.channel is None


def test_refund_from_literal_json_has_exact_fields() -> None:
    decoded = decode_event(raw(refund_doc()))
    assert isinstance(decoded, Refund)
    assert (decoded.event_id, decoded.refund_of, decoded.customer_id) == (
        "ref-1",
        "ord-1",
        "cust-1",
    )
    assert decoded.amount == Decimal("5.00")


@pytest.mark.parametrize(
    "amount_json",
    [b'"19.99"', b"19.99", b"0.1", b'"0.30"'],
    ids=["string", "number", "tenth", "string-trailing-zero"],
)
def test_decimal_amounts_are_exact(amount_json: bytes) -> None:
    body = raw(purchase_doc(amount="__AMOUNT__")).replace(b'"__AMOUNT__"', amount_json)
    decoded = decode_event(body)
    assert isinstance(decoded, Purchase)
    expected = Decimal(amount_json.decode().strip('"'))
    assert decoded.amount == expected
    # Exact: the same digits, not a binary float approximation of them.
    assert str(decoded.amount) == str(expected)
    assert decoded.amount.as_tuple() == expected.as_tuple()


@pytest.mark.parametrize("amount", [0, "0", "0.00", 0.0])
def test_zero_amount_is_accepted(amount: object) -> None:
    decoded = decode_event(raw(purchase_doc(amount=amount)))
    assert isinstance(decoded, Purchase)
    assert decoded.amount == 0


def test_largest_amount_is_accepted() -> None:
    decoded = decode_event(raw(purchase_doc(amount="1000000000000")))
    assert isinstance(decoded, Purchase)
    assert decoded.amount == Decimal("1e12")


def test_message_of_exactly_the_size_limit_is_accepted() -> None:
    body = raw(purchase_doc())
    padded = body + b" " * (MAX_MESSAGE_BYTES - len(body))  # trailing JSON whitespace
    assert len(padded) == MAX_MESSAGE_BYTES
    assert isinstance(decode_event(padded), Purchase)


# -- bad input, one reason per class ---------------------------------------------------------


@pytest.mark.parametrize("value", [b"", None])
def test_empty_message(value: bytes | None) -> None:
    result = rejected(decode_event(value))
    assert result.reason is RejectReason.EMPTY


def test_oversized_message() -> None:
    body = raw(purchase_doc())
    padded = body + b" " * (MAX_MESSAGE_BYTES + 1 - len(body))
    assert len(padded) == MAX_MESSAGE_BYTES + 1
    result = rejected(decode_event(padded))
    assert result.reason is RejectReason.OVERSIZED
    assert result.detail == f"{MAX_MESSAGE_BYTES + 1} bytes > {MAX_MESSAGE_BYTES}"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{",
        b'{"type": "purchase",}',
        b"{'type': 'purchase'}",
        b'{"event_id": "\xff\xfe"}',  # invalid UTF-8
        b"\xc3\x28",  # invalid UTF-8 two-byte sequence
        b"\xff\xfe\x00",  # looks like UTF-16, truncated
        b"[" * 50_000,  # deeper than the parser's recursion limit, still < 64 KiB
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=[
        "text",
        "truncated",
        "trailing-comma",
        "single-quotes",
        "invalid-utf8",
        "invalid-utf8-pair",
        "truncated-utf16",
        "deep-array",
        "deep-object",
    ],
)
def test_malformed_json(body: bytes) -> None:
    assert len(body) <= MAX_MESSAGE_BYTES
    result = rejected(decode_event(body))
    assert result.reason is RejectReason.MALFORMED_JSON


@pytest.mark.parametrize(
    "body", [b"[]", b"[1, 2]", b"42", b"19.99", b'"purchase"', b"null", b"true"]
)
def test_not_an_object(body: bytes) -> None:
    result = rejected(decode_event(body))
    assert result.reason is RejectReason.NOT_AN_OBJECT


@pytest.mark.parametrize("event_type", ["order", "PURCHASE", "", 1, None, ["purchase"]])
def test_unknown_type(event_type: object) -> None:
    result = rejected(decode_event(raw(purchase_doc(type=event_type))))
    assert result.reason is RejectReason.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (without(purchase_doc(), "event_id"), "event_id"),
        (without(purchase_doc(), "customer_id"), "customer_id"),
        (without(purchase_doc(), "occurred_at"), "occurred_at"),
        (without(purchase_doc(), "amount"), "amount"),
        (without(purchase_doc(), "currency"), "currency"),
        (without(refund_doc(), "refund_of"), "refund_of"),
        (purchase_doc(event_id=17), "event_id"),
        (purchase_doc(customer_id=["cust-1"]), "customer_id"),
        (purchase_doc(occurred_at="yesterday"), "occurred_at"),
        (purchase_doc(amount=True), "amount"),
        (purchase_doc(amount=[1]), "amount"),
        (purchase_doc(items="formula"), "items"),
        (purchase_doc(items=[{"sku": "s"}]), "items"),
        (purchase_doc(schema_version=2), "schema_version"),
        (purchase_doc(discount="5"), "discount"),
        (refund_doc(items=[]), "items"),
        (purchase_doc(occurred_at="2026-03-04T05:06:07"), "occurred_at"),
        (purchase_doc(customer_id="cust{1}"), "customer_id"),
        (purchase_doc(customer_id="{c:1}"), "customer_id"),
        (purchase_doc(customer_id="cust 1"), "customer_id"),
        (purchase_doc(customer_id="cust-1\n"), "customer_id"),
        (purchase_doc(customer_id=""), "customer_id"),
        (purchase_doc(customer_id="c" * 129), "customer_id"),
        (purchase_doc(event_id="ord 1"), "event_id"),
        (purchase_doc(currency="eur"), "currency"),
        (purchase_doc(currency="EURO"), "currency"),
        (purchase_doc(currency=""), "currency"),
        (purchase_doc(occurred_at=1780000000), "occurred_at"),
        (purchase_doc(occurred_at="1780000000"), "occurred_at"),
        (purchase_doc(occurred_at=1780000000000), "occurred_at"),
        (purchase_doc(occurred_at="2026-03-04"), "occurred_at"),
        (refund_doc(occurred_at=1780000000.5), "occurred_at"),
    ],
    ids=[
        "missing-event_id",
        "missing-customer_id",
        "missing-occurred_at",
        "missing-amount",
        "missing-currency",
        "missing-refund_of",
        "event_id-int",
        "customer_id-list",
        "occurred_at-text",
        "amount-bool",
        "amount-list",
        "items-string",
        "item-missing-category",
        "schema_version-2",
        "extra-field",
        "extra-field-on-refund",
        "naive-timestamp",
        "customer_id-braces",
        "customer_id-hash-tag",
        "customer_id-space",
        "customer_id-newline",
        "customer_id-empty",
        "customer_id-too-long",
        "event_id-space",
        "currency-lower-case",
        "currency-four-letters",
        "currency-empty",
        "epoch-seconds",
        "epoch-text",
        "epoch-milliseconds",
        "date-only",
        "refund-epoch",
    ],
)
def test_schema_violation_names_the_field(doc: dict[str, Any], field: str) -> None:
    result = rejected(decode_event(raw(doc)))
    assert result.reason is RejectReason.SCHEMA
    assert result.detail.startswith(f"{field}"), result.detail


@pytest.mark.parametrize(
    "moment", ["2026-03-04T05:06:07Z", "2026-03-04 05:06:07+01:00", "2026-03-04t05:06:07.25-03:30"]
)
def test_rfc3339_forms_with_a_zone_are_accepted(moment: str) -> None:
    assert isinstance(decode_event(raw(purchase_doc(occurred_at=moment))), Purchase)


def test_customer_id_of_maximum_length_is_accepted() -> None:
    decoded = decode_event(raw(purchase_doc(customer_id="c" * 128)))
    assert isinstance(decoded, Purchase)


@pytest.mark.parametrize(
    "amount_json",
    [
        b"-1",
        b'"-0.01"',
        b"NaN",
        b'"NaN"',
        b'"sNaN"',
        b"Infinity",
        b"-Infinity",
        b'"Infinity"',
        b"1e13",
        b'"1e13"',
        b"1000000000000.01",
        b'"twelve"',
    ],
)
def test_invalid_amount(amount_json: bytes) -> None:
    body = raw(purchase_doc(amount="__AMOUNT__")).replace(b'"__AMOUNT__"', amount_json)
    result = rejected(decode_event(body))
    assert result.reason is RejectReason.INVALID_AMOUNT
    assert result.detail.startswith("amount: ")


def test_invalid_refund_amount() -> None:
    result = rejected(decode_event(raw(refund_doc(amount="-5"))))
    assert result.reason is RejectReason.INVALID_AMOUNT


# -- never raises ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(body: bytes) -> None:
    result = decode_event(body)
    assert isinstance(result, Purchase | Refund | Rejection)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["type", "event_id", "customer_id", "refund_of", "occurred_at", "amount", "currency", "items"]
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([purchase_doc(), refund_doc()]),
    changes=st.dictionaries(field_names, json_values, max_size=3),
)
def test_mutated_valid_events_never_raise(base: dict[str, Any], changes: dict[str, Any]) -> None:
    doc = {**base, **changes}
    result = decode_event(raw(doc))
    assert isinstance(result, Purchase | Refund | Rejection)
    if not changes:
        assert not isinstance(result, Rejection)
