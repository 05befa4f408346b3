"""The bad-input matrix: every kind of bad input between good events gets its defined outcome
(dead-lettered with its reason, or applied by a documented rule), and every good event around
them is applied. Runs in `wall` clock mode on a real broker, Redis and worker process."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis
from streams.codec import MAX_MESSAGE_BYTES
from tests.integration.conftest import read_json_topic, run_cli, worker_env

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


def _purchase(event_id: str, customer: str = "good-1", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": event_id,
        "customer_id": customer,
        "occurred_at": NOW.isoformat(),
        "amount": "10.00",
        "currency": "EUR",
    }
    doc.update(changes)
    return doc


def _line(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _good(i: int) -> bytes:
    return _line(_purchase(f"g-{i}", occurred_at=(NOW - timedelta(minutes=i)).isoformat()))


# (raw message, expected dead-letter reason or None when the documented rule applies it)
MATRIX: list[tuple[str, bytes, str | None]] = [
    ("malformed JSON", b'{"event_id": "x1", "customer_id": ', "malformed_json"),
    ("not an object", b"[1, 2, 3]", "not_an_object"),
    ("unknown type", _line({**_purchase("x2"), "type": "coupon"}), "unknown_event_type"),
    ("wrong type", _line(_purchase("x3", amount=[10])), "schema_violation"),
    (
        "missing field",
        _line({k: v for k, v in _purchase("x4").items() if k != "currency"}),
        "schema_violation",
    ),
    ("extra field", _line({**_purchase("x5"), "coupon": "SPRING"}), "schema_violation"),
    ("negative amount", _line(_purchase("x6", amount="-1.00")), "invalid_amount"),
    (
        "NaN amount",
        b'{"event_id": "x7", "customer_id": "good-1", "occurred_at": "'
        + NOW.isoformat().encode()
        + b'", "amount": NaN, "currency": "EUR"}',
        "invalid_amount",
    ),
    ("huge amount", _line(_purchase("x8", amount="10000000000000")), "invalid_amount"),
    ("unknown currency", _line(_purchase("x9", currency="XXX")), "unknown_currency"),
    ("ancient timestamp", _line(_purchase("x10", occurred_at="1990-01-01T00:00:00Z")), "too_old"),
    (
        "far-future timestamp",
        _line(_purchase("x11", occurred_at="2999-01-01T00:00:00Z")),
        "future_timestamp",
    ),
    ("empty message", b"", "empty_message"),
    (
        "oversized message",
        # Near the producer's 1 MB limit: its dead letter, the whole message in base64, was
        # refused by the producer, and the worker stopped on it after every restart.
        _line({**_purchase("x12"), "channel": "w" * 800_000}),
        "oversized_message",
    ),
    (
        "refund of an unknown purchase",
        _line(
            {
                "type": "refund",
                "event_id": "r1",
                "customer_id": "good-1",
                "refund_of": "nope",
                "occurred_at": NOW.isoformat(),
                "amount": "1.00",
                "currency": "EUR",
            }
        ),
        "unknown_purchase",
    ),
    (
        "same event_id, other payload",
        _line(_purchase("g-1", amount="99.00")),
        "conflicting_duplicate",
    ),
    # Documented rule: a zero amount is a real order (a free sample) and counts towards F.
    ("zero amount", _line(_purchase("z-1", customer="zero-1", amount="0")), None),
    # Documented rule: the same event_id with the same payload is a duplicate, skipped.
    ("plain duplicate", _good(1), None),
]
MATRIX_BY_NAME = {name: raw for name, raw, _ in MATRIX}


@pytest.mark.timeout(240)
def test_every_bad_input_gets_its_outcome_and_good_events_flow(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    good = [
        _line(_purchase(f"g-{i}", occurred_at=(NOW - timedelta(minutes=i)).isoformat()))
        for i in range(1, len(MATRIX) + 2)
    ]
    lines: list[bytes] = []
    for i, (_, raw, _) in enumerate(MATRIX):
        lines += [good[i], raw]
    lines.append(good[-1])
    path = tmp_path / "matrix.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))

    env = worker_env(broker, redis_server)
    worker = make_worker(env)
    worker.start()
    result = run_cli(env, "replay", "--quiet", str(path))
    assert result.returncode == 0, result.stderr
    # the empty message is a blank line: replay skips and counts it, so publish it directly
    assert "1 blank lines skipped" in result.stderr
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send("purchases", key=b"good-1", value=b"")
    producer.flush()
    producer.close()
    worker.wait_for_events(len(lines))

    dead = {
        base64.b64decode(d["raw_b64"]): d
        for d in read_json_topic(broker.bootstrap, "purchases.dlq")
    }
    # A dead letter keeps at most the first MAX_MESSAGE_BYTES of the message.
    outcomes = {
        name: (dead[raw[:MAX_MESSAGE_BYTES]]["reason"] if raw[:MAX_MESSAGE_BYTES] in dead else None)
        for name, raw, _ in MATRIX
    }
    oversized = dead[MATRIX_BY_NAME["oversized message"][:MAX_MESSAGE_BYTES]]
    assert (oversized["raw_truncated"], oversized["raw_bytes"]) == (
        True,
        len(MATRIX_BY_NAME["oversized message"]),
    )
    assert outcomes == {name: reason for name, _, reason in MATRIX}
    assert all(d["detail"] for d in dead.values())

    shown = json.loads(run_cli(env, "customer", "good-1").stdout)
    assert shown["lifetime_orders"] == len(good)  # every good event applied, none twice
    assert shown["lifetime_spend"] == f"{10 * len(good)}.00"
    zero = json.loads(run_cli(env, "customer", "zero-1").stdout)
    assert (zero["frequency"], zero["monetary"]) == (1, "0.00")
