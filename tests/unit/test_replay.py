"""The replay's file reading and CSV mapping (no broker: publish() runs against a fake producer,
and against a closed port for the unreachable-broker message)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, ClassVar

import pytest

import memberflow.kafka
from memberflow import replay
from memberflow.kafka import BrokerUnreachable
from memberflow.replay import (
    ReplayRecord,
    count_lines,
    csv_row_to_event,
    iter_history,
    normalize_occurred_at,
    publish,
)
from streams.codec import decode_event
from streams.events import Purchase, Refund, Rejection, RejectReason

HEADER = "event_id,customer_id,occurred_at,amount,currency,category,sku,quantity"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def records_of(path: Path, currency: str = "EUR") -> list[ReplayRecord]:
    return list(iter_history(path, currency))


def values_of(path: Path, currency: str = "EUR") -> list[dict[str, Any]]:
    return [json.loads(record.value) for record in records_of(path, currency)]


# -- occurred_at -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "published"),
    [
        ("2024-03-01", "2024-03-01T00:00:00Z"),  # bare date: midnight UTC
        ("2024-03-01T10:15:00", "2024-03-01T10:15:00Z"),  # no zone: UTC
        ("2024-03-01 10:15:00.250000", "2024-03-01T10:15:00.250000Z"),
        ("2024-03-01T10:15:00+02:00", "2024-03-01T10:15:00+02:00"),  # zoned: unchanged
        ("2024-03-01T10:15:00Z", "2024-03-01T10:15:00Z"),
        ("2024-02-30", "2024-02-30"),  # not a date: unchanged, the worker rejects it
        ("yesterday", "yesterday"),
    ],
)
def test_occurred_at_normalisation(given: str, published: str) -> None:
    assert normalize_occurred_at(given) == published


# -- CSV mapping -----------------------------------------------------------------------------


def test_csv_rows_map_to_purchases_keyed_by_customer(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "history.csv",
        f"{HEADER}\n"
        "e1,cust-1,2024-03-01,30.00,USD,toys,toy-9,3\n"
        "e2,cust-2,2024-03-01T10:15:00,12.50,,,,\n",
    )
    records = records_of(path)
    assert [(r.line, r.key) for r in records] == [(2, b"cust-1"), (3, b"cust-2")]
    first, second = (json.loads(r.value) for r in records)
    assert first == {
        "event_id": "e1",
        "customer_id": "cust-1",
        "occurred_at": "2024-03-01T00:00:00Z",
        "amount": "30.00",  # kept as the original string
        "currency": "USD",
        "items": [{"sku": "toy-9", "category": "toys", "quantity": 3, "unit_price": "10.00"}],
    }
    assert second == {
        "event_id": "e2",
        "customer_id": "cust-2",
        "occurred_at": "2024-03-01T10:15:00Z",
        "amount": "12.50",
        "currency": "EUR",  # the default currency for an empty cell
    }
    for record in records:
        assert isinstance(decode_event(record.value), Purchase)


def test_default_currency_when_the_column_is_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "h.csv", "event_id,customer_id,occurred_at,amount\ne1,c1,2024-01-01,5\n")
    assert values_of(path, "GBP") == [
        {
            "event_id": "e1",
            "customer_id": "c1",
            "occurred_at": "2024-01-01T00:00:00Z",
            "amount": "5",
            "currency": "GBP",
        }
    ]


def test_item_defaults_sku_and_quantity_and_rounds_the_unit_price() -> None:
    row = {
        "event_id": "e",
        "customer_id": "c",
        "occurred_at": "2024-01-01",
        "amount": "10.00",
        "category": "baby_food",
        "sku": "",
        "quantity": "",
    }
    assert csv_row_to_event(row, "EUR")["items"] == [
        {"sku": "baby_food", "category": "baby_food", "quantity": 1, "unit_price": "10.00"}
    ]
    row.update(quantity="3")
    assert csv_row_to_event(row, "EUR")["items"][0]["unit_price"] == "3.33"


def test_refund_rows(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "h.csv",
        "type,event_id,customer_id,occurred_at,amount,currency,category,refund_of\n"
        "purchase,p1,c1,2024-01-01T09:00:00Z,40.00,EUR,toys,\n"
        "refund,r1,c1,2024-01-05T09:00:00Z,15.00,EUR,toys,p1\n",
    )
    purchase, refund = values_of(path)
    assert purchase["type"] == "purchase" and "refund_of" not in purchase
    assert refund == {
        "type": "refund",
        "event_id": "r1",
        "customer_id": "c1",
        "refund_of": "p1",
        "occurred_at": "2024-01-05T09:00:00Z",
        "amount": "15.00",
        "currency": "EUR",
    }  # no items on a refund, even with a category
    decoded = decode_event(json.dumps(refund).encode())
    assert isinstance(decoded, Refund) and decoded.refund_of == "p1"


@pytest.mark.parametrize(
    ("row", "reason", "published"),
    [
        (
            "e1,c1,2024-01-01,10.00,EUR,toys,t1,abc",
            RejectReason.SCHEMA,
            {"items": [{"sku": "t1", "category": "toys", "quantity": "abc"}]},
        ),
        (
            "e1,c1,2024-01-01,10.00,EUR,toys,t1,0",
            RejectReason.SCHEMA,
            {"items": [{"sku": "t1", "category": "toys", "quantity": 0}]},
        ),
        ("e1,c1,2024-01-01,-5,EUR,,,", RejectReason.INVALID_AMOUNT, {"amount": "-5"}),
        (
            "e1,c1,2024-01-01,NaN,EUR,toys,,",
            RejectReason.INVALID_AMOUNT,
            {"amount": "NaN", "items": [{"sku": "toys", "category": "toys", "quantity": 1}]},
        ),
        ("e1,c1,2024-01-01,12;50,EUR,,,", RejectReason.INVALID_AMOUNT, {"amount": "12;50"}),
        ("e1,c1,soon,1,EUR,,,", RejectReason.SCHEMA, {"occurred_at": "soon"}),
        ("e1,c1,2024-01-01,1,eur,,,", RejectReason.SCHEMA, {"currency": "eur"}),
        ("e 1,c1,2024-01-01,1,EUR,,,", RejectReason.SCHEMA, {"event_id": "e 1"}),
    ],
)
def test_bad_rows_are_published_for_the_worker_to_reject(
    tmp_path: Path, row: str, reason: RejectReason, published: dict[str, Any]
) -> None:
    path = write(tmp_path, "h.csv", f"{HEADER}\n{row}\n")
    (record,) = records_of(path)
    value = json.loads(record.value)
    for name, expected in published.items():
        assert value[name] == expected
    decoded = decode_event(record.value)
    assert isinstance(decoded, Rejection) and decoded.reason == reason


def test_missing_customer_id_is_published_unkeyed(tmp_path: Path) -> None:
    path = write(tmp_path, "h.csv", f"{HEADER}\ne1,,2024-01-01,1,EUR,,,\n")
    (record,) = records_of(path)
    assert record.key is None and "customer_id" not in json.loads(record.value)
    decoded = decode_event(record.value)
    assert isinstance(decoded, Rejection) and "customer_id" in decoded.detail


def test_a_shifted_row_is_marked_so_the_worker_rejects_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "h.csv",
        f"{HEADER}\ne1,c1,2024-01-01,1,234.00,EUR,toys,t1,1\ne2,c1,2024-01-01,1,EUR,,,,\n",
    )  # a trailing empty cell is harmless
    shifted, trailing = records_of(path)
    assert json.loads(shifted.value)["unexpected_fields"] == ["1"]
    assert isinstance(decode_event(shifted.value), Rejection)
    assert isinstance(decode_event(trailing.value), Purchase)


def test_blank_lines_are_skipped_and_counted_and_lines_numbered(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "h.csv",
        "\n"
        f"{HEADER}\n"
        "e1,c1,2024-01-01,1,EUR,,,\n"
        "\n"
        "   \n"
        'e2,c1,2024-01-01,1,EUR,"two\nline category",,\n'
        "e3,c1,2024-01-01,1,EUR,,,\n",
    )
    reader = iter_history(path, "EUR")
    assert [(r.line, json.loads(r.value)["event_id"]) for r in reader] == [
        (3, "e1"),
        (6, "e2"),
        (8, "e3"),
    ]
    assert reader.skipped_blank == 3
    assert count_lines(path) == 4  # an overestimate by the quoted line break, as documented


def test_header_without_required_columns_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "h.csv", "id,customer_id,when,amount\ne1,c1,2024-01-01,1\n")
    with pytest.raises(ValueError, match="event_id, occurred_at"):
        iter_history(path, "EUR")


def test_repeated_header_columns_and_empty_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeats amount"):
        iter_history(write(tmp_path, "a.csv", f"{HEADER},amount\n"), "EUR")
    with pytest.raises(ValueError, match="no header"):
        iter_history(write(tmp_path, "b.csv", "\n\n"), "EUR")


def test_header_names_are_stripped_and_a_bom_ignored(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_bytes(b"\xef\xbb\xbfevent_id, customer_id ,occurred_at,amount\ne1,c1,2024-01-01,1\n")
    assert values_of(path)[0]["customer_id"] == "c1"


def test_invalid_utf8_in_a_csv_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_bytes(f"{HEADER}\ne1,c1,2024-01-01,1,EUR,,,\n".encode() + b"e2,\xff,x,1\n")
    with pytest.raises(ValueError, match="line 3 is not UTF-8"):
        records_of(path)


def test_a_broken_line_anywhere_is_reported_before_anything_is_published(
    tmp_path: Path,
) -> None:
    """iter_history reads the whole CSV first: a bad byte on line 502 used to stop the replay
    after 500 events had gone out."""
    rows = "".join(f"e{i},c{i},2024-01-01,1,EUR,,,\n" for i in range(500))
    path = tmp_path / "late.csv"
    path.write_bytes(f"{HEADER}\n{rows}".encode() + b"e-bad,\xe9,2024-01-01,1\n")
    with pytest.raises(ValueError, match="line 502 is not UTF-8"):
        iter_history(path, "EUR")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # An unclosed quote swallowed every later row into one field, silently.
        (
            f'{HEADER}\ne1,c1,2024-01-01,1,EUR,toys,"Bear 30cm,1\ne2,c2,2024-01-01,2,EUR,,,\n',
            "record starting at line 2: unexpected end of data",
        ),
        (f'{HEADER}\ne1,c1,2024-01-01,1,EUR,toys,"Baby" shoes,1\n', "line 2: ',' expected"),
        (f"{HEADER}\re1,c1,2024-01-01,1,EUR,,,\r", "line 1: new-line character"),  # old Mac
        # Quotes inside an unquoted field were kept as text: 1"0 became a dead letter.
        (f'{HEADER}\ne3,c1,2024-11-01,1"0\n', "line 2: a quote inside an unquoted field"),
        (
            f'{HEADER}\ne1,c1,2024-01-01,1,EUR,toys,"two\nlines",1\ne2,c2,2024-01-01,2,EUR,'
            'toys,Baby "soft" shoes,1\n',
            "line 4: a quote inside an unquoted field",
        ),
    ],
    ids=[
        "unclosed-quote",
        "quote-inside-a-field",
        "cr-only-lines",
        "quote-in-unquoted-amount",
        "quote-in-unquoted-field-after-a-multiline-one",
    ],
)
def test_malformed_csv_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iter_history(write(tmp_path, "m.csv", text), "EUR")


def test_quotes_in_quoted_fields_are_read_as_rfc_4180_has_them(tmp_path: Path) -> None:
    text = (
        f'{HEADER}\ne1,c1,2024-01-01,1,EUR,toys,"Baby ""soft"" shoes, red",1\n'
        f'e2,c2,2024-01-01,2,EUR,toys,"two\nlines ""quoted""",1\n'
    )
    assert len(records_of(write(tmp_path, "q.csv", text))) == 2


@pytest.mark.parametrize("column", ["Currency", "qty", "kind", "notes"])
def test_an_unknown_column_is_an_error_not_ignored(tmp_path: Path, column: str) -> None:
    """`Currency` was ignored: amounts were read in the default currency, silently."""
    path = write(tmp_path, "u.csv", f"event_id,customer_id,occurred_at,amount,{column}\n")
    with pytest.raises(ValueError, match=f"unknown column\\(s\\) '{column}'"):
        iter_history(path, "EUR")
    # An empty column name (a trailing comma) is no column.
    assert records_of(write(tmp_path, "t.csv", f"{HEADER},\ne1,c1,2024-01-01,1,EUR,,,,\n"))


def test_bad_default_currency_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 upper-case"):
        iter_history(write(tmp_path, "h.csv", f"{HEADER}\n"), "eur")


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_lines_are_published_verbatim(tmp_path: Path) -> None:
    lines = [
        b'{"event_id":"e1","customer_id":"c1","occurred_at":"2024-01-01T00:00:00Z",'
        b'"amount":1,"currency":"EUR"}',
        b'{"event_id": "e2", "customer_id": "c2"',  # broken JSON
        b"[1, 2]",
        b'{"customer_id": 7}',
        b'  {"customer_id": "c3", "amount": NaN}  ',
        b"\xff\xfe not utf-8",
    ]
    path = tmp_path / "h.jsonl"
    path.write_bytes(
        lines[0] + b"\r\n" + b"\n".join(lines[1:3]) + b"\n\n  \n" + b"\n".join(lines[3:])
    )  # no newline at the end
    reader = iter_history(path, "EUR")
    records = list(reader)
    assert [r.value for r in records] == lines
    assert [r.line for r in records] == [1, 2, 3, 6, 7, 8]
    assert [r.key for r in records] == [b"c1", None, None, None, b"c3", None]
    assert reader.skipped_blank == 2
    assert count_lines(path) == 6


def test_ndjson_suffix_is_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "h.NDJSON", '{"customer_id":"c"}\n')
    assert records_of(path)[0].key == b"c"


@pytest.mark.parametrize("name", ["history.json", "history.txt", "history"])
def test_unknown_suffix_is_an_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "{}\n")
    with pytest.raises(ValueError, match=r"expected \.csv, \.jsonl or \.ndjson"):
        iter_history(path, "EUR")
    with pytest.raises(ValueError, match="unknown history format"):
        count_lines(path)


# -- publish (no broker) ---------------------------------------------------------------------


class _FakeFuture:
    def add_errback(self, callback: Any) -> None:
        del callback


class _FakeProducer:
    instances: ClassVar[list[_FakeProducer]] = []

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.flushed = self.closed = False
        _FakeProducer.instances.append(self)

    def send(self, topic: str, key: bytes | None, value: bytes) -> _FakeFuture:
        self.sent.append((topic, key, value))
        return _FakeFuture()

    def flush(self) -> None:
        self.flushed = True

    def close(self, timeout: float) -> None:
        self.closed = True


def test_publish_sends_in_file_order_and_reports_blank_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kafka

    monkeypatch.setattr(kafka, "KafkaProducer", _FakeProducer)
    monkeypatch.setattr(memberflow.kafka, "probe", lambda *args: None)
    path = write(tmp_path, "h.jsonl", '{"customer_id":"a"}\n\n{"customer_id":"b"}\nbroken\n')
    stats = publish(iter_history(path, "EUR"), "h1:9092, h2:9092", "purchases", progress=False)
    producer = _FakeProducer.instances[-1]
    assert producer.sent == [
        ("purchases", b"a", b'{"customer_id":"a"}'),
        ("purchases", b"b", b'{"customer_id":"b"}'),
        ("purchases", None, b"broken"),
    ]
    assert producer.flushed and producer.closed
    assert producer.config["acks"] == "all"
    assert producer.config["bootstrap_servers"] == ["h1:9092", "h2:9092"]
    assert (stats.published, stats.skipped_blank) == (3, 1)


def test_publish_names_an_unreachable_broker(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    records = [ReplayRecord(line=1, key=None, value=b"{}")]
    with pytest.raises(BrokerUnreachable, match=f"cannot reach the broker at 127.0.0.1:{port}"):
        publish(records, f"127.0.0.1:{port}", "purchases", progress=False, connect_timeout_s=1)


def test_publish_to_a_port_that_is_not_kafka_says_what_it_may_be(tmp_path: Path) -> None:
    """A listener that accepts and never answers (a TLS port, another service): the client
    waits out its timeout in silence, so the error must say what to look at."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        records = [ReplayRecord(line=1, key=None, value=b"{}")]
        with pytest.raises(BrokerUnreachable, match="a TLS listener \\(set MEMBERFLOW_BROKER_TLS"):
            publish(records, f"127.0.0.1:{port}", "purchases", progress=False, connect_timeout_s=1)


def test_module_has_no_broker_dependency_at_import() -> None:
    # Mapping and reading must work where kafka is not configured (the demo's synthetic shop).
    assert "kafka" not in vars(replay)


def test_tick_refuses_a_time_the_workers_would_dead_letter(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick more than input.max_future_skew_minutes ahead is refused before anything is
    sent: workers dead-letter it (future_timestamp), and the command used to report that
    event time had moved."""
    from memberflow import cli

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing may be sent")

    monkeypatch.setattr(memberflow.kafka, "ensure_topics", unreachable)
    assert cli.main(["tick", "2999-01-01T00:00:00Z"]) == 2
    err = capsys.readouterr().err
    assert "more than 10 minutes (input.max_future_skew_minutes) ahead" in err, err
    assert "future_timestamp" in err
