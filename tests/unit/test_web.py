"""The worker's HTTP API without a server: exposure and token checks, id validation, and the
documents the views return, over the in-memory store (tests/integration/test_http_api.py runs
the same views in a real worker)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

from memberflow import web
from memberflow.app import Runtime, create_app
from memberflow.engine import Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.population import publish as publish_snapshot
from memberflow.settings import Settings, default_rules_file
from memberflow.views import (
    InvalidCustomerId,
    check_customer_id,
    customer_view,
    group_distribution,
)
from memberflow.web import (
    RateMeter,
    WebConfigError,
    WebState,
    WorkerFacts,
    authorized,
    check_exposure,
    customer_reply,
    is_loopback,
    readiness,
    segments_reply,
    status_reply,
)
from rules.customer import epoch
from rules.policy import parse_policy
from state.memory_store import MemoryStore
from streams.codec import encode_model
from streams.events import Cause, Notification, NotificationType, Purchase

POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))
WALL = epoch(datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC))
TOKEN = "s3cret-token-for-tests"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def bought(offset: int, customer: str, amount: str, when: int = WALL - 3600) -> RawMessage:
    event = Purchase(
        event_id=f"{customer}-{offset}",
        customer_id=customer,
        occurred_at=datetime.fromtimestamp(when, UTC),
        amount=Decimal(amount),
        currency="EUR",
    )
    return RawMessage("purchases", 0, offset, customer.encode(), encode_model(event))


async def populated(labelled: bool = False) -> MemoryStore:
    """gold-1: 4 orders of 400 (gold); silver-1: 2 of 200 (silver); member-1: one of 10.
    `labelled`: a snapshot is published and the customers reclassified against it."""
    store = MemoryStore()
    engine = Engine(store, POLICY, metrics=Metrics(), wall_clock=lambda: WALL)
    batch = [bought(i, "gold-1", "400") for i in range(4)]
    batch += [bought(4 + i, "silver-1", "200") for i in range(2)]
    batch += [bought(6, "member-1", "10")]
    outcome = await engine.process(batch)
    await engine.confirm(outcome)
    if labelled:
        assert await publish_snapshot(store, POLICY, WALL) is not None
        outcome = await engine.process_due(0)
        await engine.confirm(outcome)
    return store


def settings(**values: Any) -> Settings:
    return Settings(**values)


# -- exposure and tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("worker-1", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_loopback_needs_no_token() -> None:
    check_exposure(settings())
    check_exposure(settings(web_host="localhost"))


def test_an_exposed_worker_without_a_token_is_refused() -> None:
    with pytest.raises(WebConfigError, match="MEMBERFLOW_WEB_TOKEN is not set") as refused:
        check_exposure(settings(web_host="0.0.0.0"))
    assert "'0.0.0.0' is not a loopback address" in str(refused.value)
    check_exposure(settings(web_host="0.0.0.0", web_token=SecretStr(TOKEN)))


def test_a_blank_token_is_refused_even_on_loopback() -> None:
    with pytest.raises(WebConfigError, match="blank"):
        check_exposure(settings(web_token=SecretStr("  ")))


def test_the_token_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBERFLOW_WEB_TOKEN", TOKEN)
    loaded = Settings()
    assert loaded.web_token is not None and web.web_token(loaded) == TOKEN
    assert TOKEN not in repr(loaded)  # a secret: never printed with the settings


def test_create_app_refuses_an_exposed_worker_without_a_token() -> None:
    with pytest.raises(WebConfigError):
        create_app(Runtime(settings(web_host="0.0.0.0"), POLICY))


def test_create_app_registers_the_views_and_none_of_faust_s_own() -> None:
    app = create_app(Runtime(settings(), POLICY))
    assert set(app.web.views) == {
        "/",
        "/api/status",
        "/customers/{customer_id:.*}",
        "/health",
        "/metrics",
        "/ready",
        "/segments",
    }
    # /router and /table (cluster topology, table data) and Faust's index at "/" are off.
    assert app.web.blueprints._enabled == []


@pytest.mark.parametrize(
    ("path", "header", "query", "allowed"),
    [
        ("/health", None, None, True),  # liveness stays open
        ("/customers/a", None, None, False),
        ("/customers/a", f"Bearer {TOKEN}", None, True),
        ("/customers/a", f"bearer {TOKEN}", None, True),
        ("/customers/a", f"Bearer  {TOKEN} ", None, True),
        ("/customers/a", "Bearer wrong", None, False),
        ("/customers/a", f"Basic {TOKEN}", None, False),
        ("/customers/a", "Bearer ", None, False),
        ("/customers/a", None, TOKEN, False),  # ?token= is for the page only
        ("/metrics", None, None, False),
        ("/ready", None, None, False),
        ("/", None, None, False),
        ("/", None, TOKEN, True),
        ("/", None, "wrong", False),
        ("/", f"Bearer {TOKEN}", None, True),
        ("/nope", None, None, False),  # unknown paths do not tell they are unknown
    ],
)
def test_token_check(path: str, header: str | None, query: str | None, allowed: bool) -> None:
    assert authorized(path, header, query, TOKEN) is allowed


def test_without_a_token_everything_is_open() -> None:
    assert authorized("/customers/a", None, None, None)
    assert authorized("/", "Bearer whatever", None, None)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer s3cr\udcff\udcfet",  # how aiohttp decodes the bytes s3cr\xff\xfet
        f"Bearer {TOKEN}\udcff",
        "Bearer \ud800",
        "Bearer s3cr\u00e9t",  # valid UTF-8, not ASCII
    ],
)
def test_a_token_that_is_not_ascii_is_a_wrong_token(header: str) -> None:
    assert authorized("/metrics", header, None, TOKEN) is False
    assert authorized("/", None, header.removeprefix("Bearer "), TOKEN) is False


def test_a_non_ascii_configured_token_still_matches() -> None:
    assert authorized("/metrics", "Bearer s3cr\u00e9t", None, "s3cr\u00e9t") is True


def test_a_raw_authorization_header_that_is_not_utf8_gets_401() -> None:
    """Over a socket, as a client sends it: the middleware answers 401, not 500."""
    from aiohttp import web as aioweb
    from aiohttp.test_utils import TestServer

    async def metrics(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(text="memberflow_up 1\n")

    async def get(header: bytes) -> bytes:
        app = aioweb.Application(middlewares=[web.auth_middleware(TOKEN)])
        app.router.add_get("/metrics", metrics)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                + header
                + b"\r\n\r\n"
            )
            await writer.drain()
            response = await reader.read()
            writer.close()
            await writer.wait_closed()
            return response
        finally:
            await server.close()

    denied = run(get(b"Authorization: Bearer s3cr\xff\xfet"))
    assert denied.startswith(b"HTTP/1.1 401 "), denied[:200]
    assert b'"error": "unauthorized"' in denied
    allowed = run(get(b"Authorization: Bearer " + TOKEN.encode()))
    assert allowed.startswith(b"HTTP/1.1 200 ") and allowed.endswith(b"memberflow_up 1\n")


# -- customer ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["alice", "c-1", "a/b", "user@example.com", "x" * 128, "a+b=c:d"])
def test_valid_customer_ids(good: str) -> None:
    assert check_customer_id(good) == good


@pytest.mark.parametrize("bad", ["", "a b", "a{b}", "x" * 129, "é", "a\nb", "a%2Fb", "a;b"])
def test_invalid_customer_ids(bad: str) -> None:
    with pytest.raises(InvalidCustomerId, match="invalid customer id"):
        check_customer_id(bad)


# -- the customer document -------------------------------------------------------------------


def test_customer_view_has_state_labels_explanation_and_timers() -> None:
    store = run(populated(labelled=True))
    view = run(customer_view(store, POLICY, "gold-1", WALL))
    assert view is not None
    assert (view["tier"], view["frequency"], view["monetary"]) == ("gold", 4, "1600.00")
    assert view["lifecycle"] == "active"
    assert view["rfm_type"] is not None and view["grade"] in {"A", "B", "C"}
    tier = view["explanation"]["tier"]
    assert tier["qualifies_for"] == "gold"
    assert [t["met"] for t in tier["tiers"]] == [True, True, True, False]
    assert tier["inputs"]["window_orders"] == 4
    segment = view["explanation"]["segment"]
    assert segment["label"] == view["rfm_type"] == segment["at_as_of"]
    assert segment["thresholds"]["snapshot_version"] == 1
    kinds = {t["kind"] for t in view["pending_timers"]}
    assert "window_expiry" in kinds
    assert view["pending_notifications"] == []
    assert run(customer_view(store, POLICY, "nobody", WALL)) is None


def test_customer_view_without_a_snapshot_has_no_segment_explanation() -> None:
    store = run(populated())
    view = run(customer_view(store, POLICY, "silver-1", WALL))
    assert view is not None
    assert view["tier"] == "silver" and view["rfm_type"] is None
    assert view["explanation"]["segment"] is None


def test_customer_reply_statuses() -> None:
    store = run(populated())

    def reply(customer_id: str, as_of: str | None = None) -> web.Reply:
        return run(customer_reply(store, POLICY, "wall", customer_id, as_of, WALL))

    found = reply("gold-1")
    assert found.status == 200 and found.body["tier"] == "gold"
    assert found.body["as_of"] == "2026-06-01T12:00:00Z"
    missing = reply("nobody")
    assert missing.status == 404
    assert missing.body == {"error": "unknown_customer", "detail": "no such customer: nobody"}
    invalid = reply("not{valid}")
    assert invalid.status == 400 and invalid.body["error"] == "invalid_customer_id"
    assert reply("gold-1", "not a time").status == 400
    # a year later the purchases have left the 365-day window
    later = reply("gold-1", "2027-06-02")
    assert later.status == 200 and (later.body["frequency"], later.body["tier"]) == (0, "gold")
    assert later.body["explanation"]["tier"]["qualifies_for"] == "member"


@pytest.mark.parametrize(
    "as_of",
    [
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "0001-01-01T00:00:00+14:00",  # year 0 in UTC
        "1900-01-01",  # before the Unix epoch: negative recency
        "1969-12-31T23:59:59.5Z",
        "9999-01-01",
    ],
)
def test_customer_reply_refuses_times_out_of_range(as_of: str) -> None:
    store = run(populated())
    refused = run(customer_reply(store, POLICY, "wall", "gold-1", as_of, WALL))
    assert refused.status == 400
    assert refused.body == {
        "error": "invalid_as_of",
        "detail": f"as_of {as_of!r} is outside the supported range 1970-01-01T00:00:00Z to "
        "9998-12-31T23:59:59Z",
    }


@pytest.mark.parametrize("as_of", ["9998-12-31T23:59:59Z", "9998-12-31"])
def test_customer_reply_takes_the_bounds_themselves(as_of: str) -> None:
    store = run(populated())
    found = run(customer_reply(store, POLICY, "wall", "gold-1", as_of, WALL))
    assert found.status == 200, found.body


@pytest.mark.parametrize("as_of", ["1970-01-01T00:00:00Z", "1970-01-01"])
def test_customer_reply_refuses_a_time_before_the_last_purchase(as_of: str) -> None:
    """The lower bound parses, but the state cannot be looked back at: it gave a recency of
    -20,000 days beside the customer's current tier."""
    store = run(populated())
    early = run(customer_reply(store, POLICY, "wall", "gold-1", as_of, WALL))
    assert early.status == 400, early.body
    assert early.body["error"] == "invalid_as_of"
    assert "is before gold-1's last purchase" in early.body["detail"]


def test_customer_reply_keeps_the_detail_of_an_unparsable_time() -> None:
    store = run(populated())
    bad = run(customer_reply(store, POLICY, "wall", "gold-1", "yesterday", WALL))
    assert bad.status == 400
    assert bad.body == {
        "error": "invalid_as_of",
        "detail": "as_of is not an ISO 8601 time: 'yesterday'",
    }


def test_customer_reply_uses_the_event_clock_in_event_mode() -> None:
    store = run(populated())
    run(store.advance_clock(WALL - 7200))
    found = run(customer_reply(store, POLICY, "event", "gold-1", None, WALL + 10**6))
    assert found.body["as_of"] == "2026-06-01T10:00:00Z"


class DownStore(MemoryStore):
    """Every Redis call fails as when the server is unreachable."""

    async def load(self, customer_ids: Any) -> Any:
        raise RedisConnectionError("Connection refused")

    async def distribution(self) -> dict[str, int]:
        raise RedisConnectionError("Connection refused")

    async def snapshot_version(self) -> int:
        raise RedisConnectionError("Connection refused")


def test_views_answer_503_while_redis_is_down() -> None:
    store = DownStore()
    found = run(customer_reply(store, POLICY, "wall", "gold-1", None, WALL))
    assert found.status == 503 and found.body["error"] == "redis_unavailable"
    assert run(segments_reply(store, POLICY, WALL)).status == 503


def test_a_view_does_not_wait_for_a_hanging_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    class HangingStore(MemoryStore):
        async def load(self, customer_ids: Any) -> Any:
            await asyncio.sleep(60)

    monkeypatch.setattr(web, "REDIS_TIMEOUT_S", 0.05)
    found = run(customer_reply(HangingStore(), POLICY, "wall", "gold-1", None, WALL))
    assert found.status == 503


# -- segments, readiness, status ---------------------------------------------------------------


def test_segments_reply_groups_the_counters() -> None:
    store = run(populated(labelled=True))
    reply = run(segments_reply(store, POLICY, WALL + 30))
    assert reply.status == 200
    body = reply.body
    assert body["customers"] == 3
    assert body["distribution"]["tier"] == {"gold": 1, "member": 1, "silver": 1}
    assert sum(body["distribution"]["segment"].values()) == 3
    assert sum(body["distribution"]["grade"].values()) == 3
    assert body["snapshot"]["version"] == 1 and body["snapshot"]["age_s"] == 30
    assert body["labels"]["tier"] == ["member", "silver", "gold", "platinum"]
    assert body["segment_names"]["important_value"] == {
        "zh": "重要价值客户",
        "en": "important value",
    }


def test_group_distribution_ignores_unknown_dimensions() -> None:
    grouped = group_distribution({"tier:gold": 2, "stage:new": 1, "odd:x": 5, "tier:": 1})
    assert grouped == {"tier": {"gold": 2}, "segment": {}, "grade": {}, "stage": {"new": 1}}


def test_ready_needs_partitions_and_redis() -> None:
    store = MemoryStore()
    ok = run(readiness(WorkerFacts([0, 1], rebalancing=False), store))
    assert ok.status == 200 and ok.body["ready"] is True
    idle = run(readiness(WorkerFacts([], rebalancing=False), store))
    assert idle.status == 503 and idle.body["problems"] == ["no input partitions assigned yet"]
    moving = run(readiness(WorkerFacts([0], rebalancing=True), store))
    assert moving.status == 503
    down = run(readiness(WorkerFacts([0], rebalancing=False), DownStore()))
    assert down.status == 503 and down.body["redis"].startswith("unavailable")


def note(i: int) -> Notification:
    return Notification(
        notification_id=f"n-{i}",
        type=NotificationType.TIER_UPGRADED,
        customer_id=f"c-{i}",
        occurred_at=datetime.fromtimestamp(WALL + i, UTC),
        cause=Cause(kind="event", id=f"e-{i}"),
        policy_version=POLICY.version,
        summary=f"upgrade {i}",
        explanation={},
    )


def test_status_reply() -> None:
    store = run(populated(labelled=True))
    runtime = Runtime(settings(), POLICY)
    runtime.recent_notifications.extend(note(i) for i in range(25))
    runtime.metrics.events.labels("applied").inc(7)
    runtime.metrics.consumer_lag.labels("1").set(12)
    state = WebState(started_at=WALL - 100)
    facts = WorkerFacts([0, 1], rebalancing=False)
    body = run(status_reply(runtime, state, facts, store, WALL)).body
    assert body["worker"]["partitions"] == [0, 1] and body["worker"]["uptime_s"] == 100
    assert body["redis"] == "ok"
    assert body["throughput"]["events_total"]["applied"] == 7
    assert body["throughput"]["events_per_s"] is None  # one sample so far
    assert body["lag"] == {"total": 12, "partitions": {"0": None, "1": 12}}
    assert body["customers"] == 3 and body["distribution"]["tier"]["gold"] == 1
    assert body["snapshot"]["version"] == 1
    # the last 20, newest first
    assert [n["notification_id"] for n in body["notifications"]] == [
        f"n-{i}" for i in range(24, 4, -1)
    ]
    # the status read refreshed the gauge too
    sample = runtime.metrics.registry.get_sample_value(
        "memberflow_customers", {"dimension": "tier", "label": "gold"}
    )
    assert sample == 1


def test_status_reply_while_redis_is_down_keeps_the_last_distribution() -> None:
    runtime = Runtime(settings(), POLICY)
    state = WebState(last_distribution={"tier:gold": 4})
    body = run(status_reply(runtime, state, WorkerFacts([], False), DownStore(), WALL)).body
    assert body["redis"].startswith("unavailable")
    assert body["distribution_stale"] is True
    assert body["distribution"]["tier"] == {"gold": 4}


def test_rate_meter() -> None:
    meter = RateMeter(window_s=10)
    assert meter.rate() is None
    meter.observe(0, 0)
    meter.observe(1, 50)
    assert meter.rate() == 50
    for t in range(2, 31):
        meter.observe(t, 50 + (t - 1) * 10)  # 10/s from t=1 on
    assert meter.rate() == pytest.approx(10)
    assert 10 <= meter.span() < 12
    meter.observe(30, 10_000)  # not after the last sample: ignored
    assert meter.rate() == pytest.approx(10)


def test_customers_gauge_reports_vanished_labels_as_zero() -> None:
    metrics = Metrics()

    def value(dimension: str, label: str) -> float | None:
        labels = {"dimension": dimension, "label": label}
        return metrics.registry.get_sample_value("memberflow_customers", labels)

    metrics.set_customers({"tier:gold": 3, "stage:new": 2, "segment:important_value": 1})
    assert (value("tier", "gold"), value("stage", "new")) == (3, 2)
    metrics.set_customers({"tier:gold": 1, "grade:A": 1})
    assert (value("tier", "gold"), value("stage", "new"), value("grade", "A")) == (1, 0, 1)
    assert value("segment", "important_value") == 0


# -- the page ----------------------------------------------------------------------------------


def test_the_page_is_self_contained_and_its_csp_allows_exactly_its_own_code() -> None:
    page = web.STATUS_PAGE
    assert "http://" not in page and "https://" not in page and "src=" not in page
    csp = web.PAGE_HEADERS["Content-Security-Policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    for element in ("lookup-id", "lookup-form", "dist-tier", "dist-stage", "notifications"):
        assert f'id="{element}"' in page
    assert "innerHTML" not in page  # data is only ever set as text


def test_faust_environment_variables_do_not_override_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust reads unprefixed variables (WEB_BIND, PRODUCER_ACKS, ...) over its arguments; the
    token check trusts MEMBERFLOW_WEB_HOST, so the app must bind where the settings say."""
    from memberflow.app import faust_app

    monkeypatch.setenv("WEB_BIND", "0.0.0.0")
    monkeypatch.setenv("PRODUCER_ACKS", "1")
    monkeypatch.setenv("STREAM_BUFFER_MAXSIZE", "1000000")
    app = faust_app(settings())
    assert app.conf.web_bind == "127.0.0.1"
    assert app.conf.producer_acks == -1
    assert app.conf.stream_buffer_maxsize == 4096
