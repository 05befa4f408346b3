"""Replay of purchase history (CSV or JSONL) onto the purchases topic, keyed by customer_id.

This module maps and publishes; it does not judge. A row that cannot be mapped cleanly is still
published with its raw field values, so that the worker dead-letters it with a reason instead of
the replay losing it on the way. The only lines not published are blank ones, and those are
counted (`ReplayStats.skipped_blank`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

REQUIRED_COLUMNS = ("event_id", "customer_id", "occurred_at", "amount")
OPTIONAL_COLUMNS = ("currency", "category", "sku", "quantity", "channel", "type", "refund_of")
CSV_SUFFIXES = frozenset({".csv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})

_BARE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_CENT = Decimal("0.01")
_MAX_MONEY = Decimal("1e12")  # the wire model's upper bound; beyond it no unit price is derived


@dataclass(frozen=True)
class ReplayRecord:
    """One message to publish: `line` is the 1-based line in the source file, for messages."""

    line: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class ReplayStats:
    published: int
    skipped_blank: int
    seconds: float


# -- mapping ---------------------------------------------------------------------------------


def normalize_occurred_at(text: str) -> str:
    """A bare date is midnight UTC and a datetime without a zone is UTC; anything else
    (a zoned time, or text that is no time at all) is returned unchanged for the worker to
    accept or reject."""
    if _BARE_DATE.fullmatch(text):
        try:
            date.fromisoformat(text)
        except ValueError:
            return text  # "2024-02-30": the worker rejects it with the parser's message
        return f"{text}T00:00:00Z"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return text
    if parsed.tzinfo is not None:
        return text
    # Re-emitted in canonical form rather than appending "Z" to the input: Python accepts forms
    # ("20240101T1000") that the worker's parser may not read once a zone is glued on.
    return parsed.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _money(text: str) -> Decimal | None:
    """The amount as a finite decimal within the wire model's bounds, else None."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0 or value > _MAX_MONEY:
        return None
    return value


def csv_row_to_event(row: Mapping[str, str | None], default_currency: str) -> dict[str, Any]:
    """Map one CSV row (column -> text) to the wire object of a purchase or a refund.

    Values are stripped but otherwise passed through as text (the amount stays a string), so
    that a bad value reaches the worker and is dead-lettered there with a reason. Empty
    required fields are left out, which the worker reports as "Field required"."""

    def text(name: str) -> str:
        value = row.get(name)
        return value.strip() if isinstance(value, str) else ""

    event: dict[str, Any] = {}
    kind = text("type")
    if kind:
        event["type"] = kind
    for name in ("event_id", "customer_id", "refund_of"):
        # refund_of is kept on a purchase row too: the worker then rejects the row as
        # inconsistent instead of the replay silently publishing a purchase.
        if text(name):
            event[name] = text(name)
    if text("occurred_at"):
        event["occurred_at"] = normalize_occurred_at(text("occurred_at"))
    amount = text("amount")
    if amount:
        event["amount"] = amount
    event["currency"] = text("currency") or default_currency
    category = text("category")
    if category and kind != "refund":
        event["items"] = [_item(category, text("sku"), text("quantity"), amount)]
    if text("channel"):
        event["channel"] = text("channel")
    return event


def _item(category: str, sku: str, quantity_text: str, amount_text: str) -> dict[str, Any]:
    item: dict[str, Any] = {"sku": sku or category, "category": category}
    if not quantity_text:
        quantity: int | str = 1
    else:
        try:
            quantity = int(quantity_text)
        except ValueError:
            quantity = quantity_text  # "abc": passed through, the worker dead-letters the row
    item["quantity"] = quantity
    amount = _money(amount_text)
    if isinstance(quantity, int) and quantity >= 1 and amount is not None:
        # Beyond Decimal's context precision there is no unit price: leave it out.
        with contextlib.suppress(InvalidOperation):
            item["unit_price"] = str((amount / quantity).quantize(_CENT, ROUND_HALF_EVEN))
    return item


def encode_event(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def row_to_json(row: Mapping[str, str | None], default_currency: str) -> bytes:
    """The message value the replay publishes for one CSV row."""
    return encode_event(csv_row_to_event(row, default_currency))


def _customer_key(value: object) -> bytes | None:
    return value.encode("utf-8") if isinstance(value, str) and value else None


def key_of_json_line(line: bytes) -> bytes | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # broken JSON still goes out, unkeyed
        return None
    return _customer_key(obj.get("customer_id")) if isinstance(obj, dict) else None


# -- reading ---------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise ValueError(
        f"{path}: unknown history format {path.suffix or '(no suffix)'!r}; expected .csv, "
        ".jsonl or .ndjson"
    )


def _is_blank_row(fields: list[str]) -> bool:
    return all(not field.strip() for field in fields)


def _text_lines(path: Path, handle: Iterable[bytes]) -> Iterator[str]:
    """Decoded line by line (not in blocks), so an encoding error names its line."""
    for number, raw in enumerate(handle, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: Excel's BOM
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: line {number} is not UTF-8 text: {exc}") from exc
        yield line


def _quotes_checked(path: Path, lines: Iterable[str]) -> Iterator[str]:
    """The lines, passed through, with a quote inside an unquoted field (`1"0`, `Baby "soft"
    shoes`) refused naming its line: csv's strict mode catches only a quote opening a field,
    and it kept such quotes as text (a price of 1"0 became a dead letter, a name kept them)."""
    quoted = False  # inside a quoted field, which may span lines
    for number, line in enumerate(lines, start=1):
        if not quoted and '"' not in line:
            yield line  # most lines: nothing to look at, character by character
            continue
        start = True  # at the start of a field
        index, end = 0, len(line)
        while index < end:
            char = line[index]
            if quoted:
                if char == '"':
                    if line[index + 1 : index + 2] == '"':
                        index += 1  # a doubled quote inside the quoted field
                    else:
                        quoted = False  # what may follow is csv's strict mode's to judge
            elif char == '"':
                if not start:
                    raise ValueError(
                        f"{path}: line {number}: a quote inside an unquoted field; quote the "
                        'whole field and double the quotes in it ("Baby ""soft"" shoes")'
                    )
                quoted = True
            start = char == "," and not quoted
            index += 1
        yield line


def _csv_rows(path: Path, handle: Iterable[bytes]) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each CSV record, strictly: a quote left open (it swallowed the
    rest of the file as one field), a quote inside an unquoted field ("Baby" shoes: quotes are
    doubled inside a quoted field) or a bare CR is an error naming the line, not a guess."""
    reader = csv.reader(_quotes_checked(path, _text_lines(path, handle)), strict=True)
    last_line = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ValueError(
                f"{path}: unreadable CSV in the record starting at line {last_line + 1}: {exc}"
            ) from exc
        # A quoted field may span lines: the record starts after the previous one.
        yield last_line + 1, fields
        last_line = reader.line_num


def _csv_header(path: Path) -> list[str]:
    """The header row, checked: every required column present, every column known (a column
    misnamed, say `Currency` or `qty`, would be ignored: amounts in the default currency, one
    item each), no column named twice. Then every record is read once, so that a broken line
    anywhere (not UTF-8, a quote left open) is reported before anything is published."""
    with path.open("rb") as handle:
        rows = _csv_rows(path, handle)
        for _, fields in rows:
            if _is_blank_row(fields):
                continue
            header = [name.strip() for name in fields]
            missing = [name for name in REQUIRED_COLUMNS if name not in header]
            if missing:
                raise ValueError(
                    f"{path}: the CSV header lacks the column(s) {', '.join(missing)}; it "
                    f"needs {','.join(REQUIRED_COLUMNS)} (optional: {','.join(OPTIONAL_COLUMNS)})"
                )
            unknown = [n for n in header if n and n not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
            if unknown:
                raise ValueError(
                    f"{path}: the CSV header has unknown column(s) {', '.join(map(repr, unknown))}"
                    f"; the columns are {','.join(REQUIRED_COLUMNS)} and optionally "
                    f"{','.join(OPTIONAL_COLUMNS)} (names are case-sensitive; remove others)"
                )
            doubled = sorted({name for name in header if name and header.count(name) > 1})
            if doubled:
                raise ValueError(f"{path}: the CSV header repeats {', '.join(doubled)}")
            for _ in rows:  # the whole file, checked before anything is published
                pass
            return header
    raise ValueError(f"{path}: empty CSV file, no header row")


class HistoryReader(Iterator[ReplayRecord]):
    """The records of one history file, in file order. `skipped_blank` counts the blank lines
    passed so far, so `publish` can report them once the iterator is exhausted."""

    def __init__(self, path: Path, default_currency: str) -> None:
        if not _CURRENCY.fullmatch(default_currency):
            raise ValueError(f"default currency must be 3 upper-case letters: {default_currency!r}")
        self.path = path
        self.default_currency = default_currency
        self.skipped_blank = 0
        self.format = _format_of(path)
        # Header problems are reported now, before anything is published.
        header = _csv_header(path) if self.format == "csv" else None
        self._records = self._read_csv(header) if header is not None else self._read_jsonl()

    def __iter__(self) -> HistoryReader:
        return self

    def __next__(self) -> ReplayRecord:
        return next(self._records)

    def _read_jsonl(self) -> Iterator[ReplayRecord]:
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                line = raw.removesuffix(b"\n").removesuffix(b"\r")
                if not line.strip():
                    self.skipped_blank += 1
                    continue
                yield ReplayRecord(line=number, key=key_of_json_line(line), value=line)

    def _read_csv(self, header: list[str]) -> Iterator[ReplayRecord]:
        with self.path.open("rb") as handle:
            seen_header = False
            for number, fields in _csv_rows(self.path, handle):
                if _is_blank_row(fields):
                    self.skipped_blank += 1
                    continue
                if not seen_header:
                    seen_header = True  # checked in _csv_header already
                    continue
                yield self._csv_record(number, header, fields)

    def _csv_record(self, number: int, header: list[str], fields: list[str]) -> ReplayRecord:
        row = dict(zip(header, fields, strict=False))
        event = csv_row_to_event(row, self.default_currency)
        extra = fields[len(header) :]
        if any(value.strip() for value in extra):
            # More values than columns usually means an unquoted comma shifted the row; the
            # unknown field makes the worker reject it rather than store shifted values.
            event["unexpected_fields"] = extra
        return ReplayRecord(
            line=number, key=_customer_key(event.get("customer_id")), value=encode_event(event)
        )


def iter_history(path: Path, default_currency: str) -> HistoryReader:
    """The records to publish from a `.csv`, `.jsonl` or `.ndjson` file, in file order.

    CSV rows are mapped by `csv_row_to_event`; JSONL lines are published byte for byte. Raises
    ValueError for an unknown suffix or a CSV header without the required columns."""
    return HistoryReader(Path(path), default_currency)


def count_lines(path: Path) -> int:
    """The number of records the file should give (non-blank lines, minus a CSV header), for a
    progress bar. A quoted CSV field spanning lines makes it an overestimate."""
    path = Path(path)
    with path.open("rb") as handle:
        lines = sum(1 for raw in handle if raw.strip())
    if _format_of(path) == "csv":
        lines = max(lines - 1, 0)
    return lines


# -- publishing ------------------------------------------------------------------------------


def publish(
    records: Iterable[ReplayRecord],
    bootstrap: str,
    topic: str,
    *,
    total: int | None = None,
    progress: bool = True,
    linger_ms: int = 5,
    connect_timeout_s: float = 15.0,
    security: Mapping[str, Any] | None = None,
) -> ReplayStats:
    """Send every record to `topic` (acks=all), flush, and return what was sent.

    Raises `BrokerUnreachable` when the broker cannot be reached or does not acknowledge the
    messages, and ValueError (from the reader) for an unreadable file."""
    # Imported here so that mapping and reading work (and are testable) without Kafka wiring.
    from kafka import KafkaProducer
    from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
    from kafka.net.compat import KafkaNetClient
    from tqdm import tqdm

    from memberflow.kafka import BrokerUnreachable, not_kafka_hint, probe

    started = time.monotonic()
    servers = [server.strip() for server in bootstrap.split(",") if server.strip()]
    probe(servers, bootstrap, connect_timeout_s)
    clients: list[Any] = []

    def make_client(**config: Any) -> Any:
        # Kept so that it can be closed when the producer fails to start: kafka-python leaves
        # its sockets open then, which shows up as ResourceWarnings.
        clients.append(KafkaNetClient(**config))
        return clients[-1]

    try:
        producer = KafkaProducer(
            bootstrap_servers=servers,
            client_id="memberflow-replay",
            acks="all",
            linger_ms=linger_ms,
            # Without idempotence, one request in flight keeps each partition in file order
            # across retries, so a replay gives the same arrival order every time.
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            bootstrap_timeout_ms=int(connect_timeout_s * 1000),
            max_block_ms=int(connect_timeout_s * 1000),
            kafka_client=make_client,
            **(security or {}),  # memberflow.kafka.client_security
        )
    except (KafkaError, OSError) as exc:
        for client in clients:
            client.close()
        tls = str((security or {}).get("security_protocol", "")).endswith("SSL")
        raise BrokerUnreachable(
            f"cannot reach the broker at {bootstrap}: {exc} ({not_kafka_hint(tls)}?)"
        ) from exc

    failures: list[BaseException] = []
    published = 0
    # disable=None lets tqdm switch itself off when stderr is not a terminal.
    bar = tqdm(
        total=total, unit="event", desc=f"replay -> {topic}", disable=None if progress else True
    )
    try:
        for record in records:
            if failures:
                break  # the broker is refusing writes: stop early, reported below
            try:
                future = producer.send(topic, key=record.key, value=record.value)
            except MessageSizeTooLargeError as exc:
                raise ValueError(
                    f"line {record.line}: {len(record.value)} bytes is too large to publish: {exc}"
                ) from exc
            except KafkaTimeoutError as exc:
                raise BrokerUnreachable(
                    f"cannot reach the broker at {bootstrap}: no metadata for topic {topic} "
                    f"within {connect_timeout_s}s ({exc})"
                ) from exc
            future.add_errback(failures.append)
            published += 1
            bar.update(1)
        producer.flush()
    finally:
        bar.close()
        producer.close(timeout=5)
    if failures:
        raise BrokerUnreachable(
            f"the broker at {bootstrap} did not acknowledge {len(failures)} of {published} "
            f"events sent to {topic}: {failures[0]!r}"
        )
    skipped = records.skipped_blank if isinstance(records, HistoryReader) else 0
    return ReplayStats(
        published=published, skipped_blank=skipped, seconds=time.monotonic() - started
    )
