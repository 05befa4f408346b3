"""The worker's HTTP API in a real worker process, on a real broker and redis-server.

A few purchases are replayed; then the views answer from the state the worker wrote: the
customer document (the same as `memberflow customer` prints), 404/400 errors, the segment
distribution, readiness, the customers gauge; and with MEMBERFLOW_WEB_TOKEN set, nothing but
/health answers without the token. A worker exposed beyond loopback without a token refuses to
start.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis
from tests.integration.conftest import run_cli, worker_env

pytestmark = pytest.mark.integration

TOKEN = "integration-test-token-0123456789"


def http(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(port: int, path: str, token: str | None = None) -> tuple[int, Any]:
    status, _, body = http(port, path, token)
    return status, json.loads(body)


def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"not reached within {timeout:.0f}s: {what} (last: {last!r})")


def replay(env: dict[str, str], tmp_path: Path) -> int:
    """alice: 4 orders of 400 EUR (gold); bob: 2 of 200 (silver); carol: one of 20 (member)."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    orders = [("alice", "400.00")] * 4 + [("bob", "200.00")] * 2 + [("carol", "20.00")]
    lines = [
        {
            "event_id": f"{customer}-{i}",
            "customer_id": customer,
            "occurred_at": now,
            "amount": amount,
            "currency": "EUR",
            "items": [{"sku": "f-1", "category": "infant_formula", "quantity": 1}],
        }
        for i, (customer, amount) in enumerate(orders)
    ]
    path = tmp_path / "purchases.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    replayed = run_cli(env, "replay", "--quiet", str(path))
    assert replayed.returncode == 0, replayed.stderr
    return len(lines)


@pytest.mark.timeout(240)
def test_customer_segments_ready_and_metrics_views(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    env = worker_env(broker, redis_server)
    worker = make_worker(env)
    worker.start()
    worker.wait_for_events(replay(env, tmp_path))
    port = worker.web_port

    assert get_json(port, "/health") == (200, {"status": "ok"})
    status, ready = get_json(port, "/ready")
    assert status == 200, ready
    assert ready["ready"] is True and ready["redis"] == "ok" and ready["partitions"] == [0, 1, 2, 3]

    status, alice = get_json(port, "/customers/alice")
    assert status == 200, alice
    assert (alice["tier"], alice["lifecycle"], alice["frequency"]) == ("gold", "active", 4)
    assert alice["monetary"] == "1600.00"
    assert alice["explanation"]["tier"]["qualifies_for"] == "gold"
    kinds = {timer["kind"] for timer in alice["pending_timers"]}
    assert {"window_expiry", "repurchase_reminder"} <= kinds, alice["pending_timers"]
    assert all(timer["due_at"] and timer["why"] for timer in alice["pending_timers"])

    # The CLI prints the same document: both come from memberflow.views.customer_view.
    as_of = alice["as_of"]
    status, at_time = get_json(port, f"/customers/alice?as_of={as_of}")
    shown = run_cli(env, "customer", "alice", "--as-of", as_of)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == at_time

    status, missing = get_json(port, "/customers/nobody")
    assert (status, missing["error"]) == (404, "unknown_customer")
    assert missing["detail"] == "no such customer: nobody"
    status, invalid = get_json(port, "/customers/no%20spaces%7Ballowed%7D")
    assert (status, invalid["error"]) == (400, "invalid_customer_id")
    assert "invalid customer id 'no spaces{allowed}'" in invalid["detail"]
    status, bad_time = get_json(port, "/customers/alice?as_of=yesterday")
    assert (status, bad_time["error"]) == (400, "invalid_as_of")
    status, unknown_path = get_json(port, "/no/such/view")
    assert (status, unknown_path["error"]) == (404, "not_found")
    # Faust's own views (cluster topology, table data) are not served
    assert http(port, "/router/")[0] == 404 and http(port, "/table/")[0] == 404

    status, segments = get_json(port, "/segments")
    assert status == 200, segments
    assert segments["customers"] == 3
    assert segments["distribution"]["tier"] == {"gold": 1, "silver": 1, "member": 1}
    assert sum(segments["distribution"]["stage"].values()) == 3

    def gauge() -> dict[str, float]:
        return {k: v for k, v in worker.metrics().items() if k.startswith("memberflow_customers{")}

    # refreshed from the population counters every few seconds
    gauges = wait_until(lambda: len(gauge()) >= 3 and gauge(), timeout=30, what="customers gauge")
    assert gauges['memberflow_customers{dimension="tier",label="gold"}'] == 1
    assert gauges['memberflow_customers{dimension="tier",label="silver"}'] == 1

    status, page_status = get_json(port, "/api/status")
    assert status == 200
    assert page_status["throughput"]["events_total"]["applied"] == 7
    assert {n["type"] for n in page_status["notifications"]} >= {"tier_upgraded"}
    status, headers, page = http(port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="lookup-id"' in page and "script-src 'sha256-" in headers["Content-Security-Policy"]


@pytest.mark.timeout(240)
def test_a_token_closes_every_view_but_health(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    # Bound to every interface: allowed only because a token is set.
    env = worker_env(
        broker, redis_server, MEMBERFLOW_WEB_HOST="0.0.0.0", MEMBERFLOW_WEB_TOKEN=TOKEN
    )
    worker = make_worker(env)
    worker.start()
    replay(env, tmp_path)
    port = worker.web_port

    wait_until(lambda: get_json(port, "/customers/alice", TOKEN)[0] == 200, what="alice is stored")
    for path in ("/customers/alice", "/segments", "/ready", "/metrics", "/api/status", "/"):
        status, headers, body = http(port, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == 'Bearer realm="memberflow"'
        assert json.loads(body)["error"] == "unauthorized"
        assert http(port, path, "wrong-token")[0] == 401, path
        assert http(port, path, TOKEN)[0] == 200, path
    assert get_json(port, "/health") == (200, {"status": "ok"})
    # the page takes the token in its URL (a browser navigation cannot send the header) ...
    assert http(port, f"/?token={TOKEN}")[0] == 200
    # ... the API does not
    assert http(port, f"/customers/alice?token={TOKEN}")[0] == 401
    status, alice = get_json(port, "/customers/alice", TOKEN)
    assert alice["tier"] == "gold"


@pytest.mark.timeout(120)
def test_an_exposed_worker_without_a_token_refuses_to_start(
    broker: LocalBroker, redis_server: LocalRedis
) -> None:
    env = worker_env(broker, redis_server, MEMBERFLOW_WEB_HOST="0.0.0.0")
    started = run_cli(env, "worker", timeout=90)
    assert started.returncode != 0
    assert "'0.0.0.0' is not a loopback address" in started.stderr
    assert "MEMBERFLOW_WEB_TOKEN is not set" in started.stderr
