"""The worker's HTTP API and status page, served by Faust's web server (aiohttp) in the worker.

Views (JSON unless said otherwise):

* ``GET /health``           - the process answers (always open, for liveness probes)
* ``GET /ready``            - 200 once this worker has input partitions and Redis answers, else 503
* ``GET /metrics``          - Prometheus text format
* ``GET /customers/{id}``   - one customer: state, labels, explanation, pending timers
  (the document of ``memberflow customer``; ``?as_of=`` ISO 8601 to evaluate at another time)
* ``GET /segments``         - customers per tier, RFM segment, grade and stage; the snapshot
* ``GET /api/status``       - what the status page shows (throughput, lag, distribution, ...)
* ``GET /``                 - the status page (HTML; vanilla JS polling /api/status)

Errors are JSON ``{"error": code, "detail": text}``: 400 for an invalid customer id or time, 401
without a valid token, 404 for an unknown customer or path, 503 while Redis does not answer.

Security: the server binds ``MEMBERFLOW_WEB_HOST`` (loopback by default). A worker bound to any
other address refuses to start unless ``MEMBERFLOW_WEB_TOKEN`` is set; with a token, every view
but ``/health`` requires ``Authorization: Bearer <token>`` (checked in a middleware, so a view
added later is closed by default). The page also takes ``?token=`` and sends it on as that
header. Faust's own web views (``/router``, ``/table``, its index at ``/``) are turned off.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import faust
from aiohttp import web as aioweb
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from memberflow.population import current_snapshot
from memberflow.settings import Settings
from memberflow.views import (
    AsOfTooEarly,
    InvalidCustomerId,
    TimeOutOfRange,
    check_customer_id,
    customer_view,
    default_as_of,
    group_distribution,
    known_labels,
    parse_time,
    segment_names,
)
from rules.policy import Policy
from state.store import Store
from streams.events import Notification

if TYPE_CHECKING:
    from memberflow.app import Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[aioweb.Request], Awaitable[aioweb.StreamResponse]]

RECENT_NOTIFICATIONS = 20  # kept in memory per worker for the status page
REDIS_TIMEOUT_S = 3.0  # a view answers 503 rather than wait for a Redis that does not answer
RATE_WINDOW_S = 10.0  # events/s on the page: over about this many seconds
SAMPLE_INTERVAL_S = 1.0  # how often the event counters are sampled for that rate
CUSTOMERS_REFRESH_S = 5.0  # how often memberflow_customers is re-read from the counters
OPEN_PATHS = frozenset({"/health"})  # the only view served without the token
PAGE_TOKEN_PATHS = frozenset({"/"})  # views that also accept ?token= (a browser navigation)
# Faust's built-in web views: /router and /table expose cluster topology and table data, and
# the production index would take "/". None of them is used here.
_FAUST_BLUEPRINTS = "faust.web.apps."
TRANSIENT = (RedisError, OSError, asyncio.TimeoutError)


class WebConfigError(ValueError):
    """Settings under which the worker must not serve HTTP (its message says what to set)."""


# -- configuration checks ---------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and "localhost".
    Anything else - a wildcard like 0.0.0.0, an interface address, another host name - is
    taken as reachable from outside."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_token(settings: Settings) -> str | None:
    """The configured token, or None (a blank token counts as none)."""
    token = settings.web_token.get_secret_value().strip() if settings.web_token else ""
    return token or None


def check_exposure(settings: Settings) -> None:
    """Refuse to serve the API on a non-loopback address without a token."""
    if settings.web_token is not None and web_token(settings) is None:
        raise WebConfigError("MEMBERFLOW_WEB_TOKEN is set but blank: set a real token or unset it")
    if not is_loopback(settings.web_host) and web_token(settings) is None:
        raise WebConfigError(
            f"MEMBERFLOW_WEB_HOST={settings.web_host!r} is not a loopback address and "
            "MEMBERFLOW_WEB_TOKEN is not set: the worker's HTTP views (customer data, status "
            "page, metrics) would be open to the network. Set MEMBERFLOW_WEB_TOKEN or "
            "MEMBERFLOW_WEB_TOKEN_FILE (clients "
            "then send 'Authorization: Bearer <token>') or bind to 127.0.0.1."
        )


def authorized(
    path: str, authorization: str | None, query_token: str | None, token: str | None
) -> bool:
    """Whether a request may see `path`: always without a configured token; else with
    `Authorization: Bearer <token>`, or for the page with `?token=<token>`."""
    if token is None or path in OPEN_PATHS:
        return True
    presented = None
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            presented = credentials.strip()
    if presented is None and path in PAGE_TOKEN_PATHS:
        presented = query_token
    if not presented:
        return False
    # aiohttp decodes header bytes that are not UTF-8 to lone surrogates; "surrogatepass"
    # encodes any str (one to one), so such a header is a wrong token, not a UnicodeEncodeError.
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass")
    )


# -- per-process state --------------------------------------------------------------------------


@dataclass
class RateMeter:
    """Rate of a monotone counter over (about) the last `window_s` seconds, from samples."""

    window_s: float = RATE_WINDOW_S
    _samples: deque[tuple[float, float]] = field(default_factory=deque)

    def observe(self, at: float, total: float) -> None:
        if self._samples and at <= self._samples[-1][0]:
            return
        self._samples.append((at, total))
        # keep the newest sample that is at least window_s old, as the base of the rate
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return max(0.0, (v1 - v0) / (t1 - t0))

    def span(self) -> float:
        return self._samples[-1][0] - self._samples[0][0] if len(self._samples) > 1 else 0.0


def notification_ring() -> deque[Notification]:
    """The ring buffer Runtime keeps of the notifications this worker produced (newest last)."""
    return deque(maxlen=RECENT_NOTIFICATIONS)


@dataclass
class WebState:
    started_at: float = field(default_factory=time.time)
    events: RateMeter = field(default_factory=RateMeter)
    last_distribution: dict[str, int] | None = None


# -- documents (no HTTP here: unit-tested with a fake store) ----------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]


def error(status: int, code: str, detail: str) -> Reply:
    return Reply(status, {"error": code, "detail": detail})


async def _bounded(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, REDIS_TIMEOUT_S)


def _unavailable(exc: BaseException) -> Reply:
    detail = str(exc) or type(exc).__name__
    return error(503, "redis_unavailable", f"Redis did not answer: {detail}")


async def customer_reply(
    store: Store,
    policy: Policy,
    clock_mode: str,
    customer_id: str,
    as_of_text: str | None,
    wall_now: int,
) -> Reply:
    try:
        customer_id = check_customer_id(customer_id)
    except InvalidCustomerId as exc:
        return error(400, "invalid_customer_id", str(exc))
    as_of: int | None = None
    if as_of_text:
        try:
            as_of = parse_time(as_of_text)  # the CLI's parser: the same format and range
        except TimeOutOfRange as exc:
            return error(400, "invalid_as_of", f"as_of {exc}")
        except ValueError:
            return error(400, "invalid_as_of", f"as_of is not an ISO 8601 time: {as_of_text!r}")
    try:
        if as_of is None:
            as_of = await _bounded(default_as_of(store, clock_mode, wall_now))
        view = await _bounded(
            customer_view(store, policy, customer_id, as_of, asked_as_of=bool(as_of_text))
        )
    except TRANSIENT as exc:
        return _unavailable(exc)
    except AsOfTooEarly as exc:
        return error(400, "invalid_as_of", str(exc))
    if view is None:
        return error(404, "unknown_customer", f"no such customer: {customer_id}")
    return Reply(200, view)


def _snapshot_doc(snapshot: Any, wall_now: int) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {
        "version": snapshot.version,
        "published_at": datetime.fromtimestamp(snapshot.published_at, UTC).isoformat(),
        "age_s": max(0, wall_now - snapshot.published_at),
        "customers": snapshot.customers,
    }


async def segments_reply(store: Store, policy: Policy, wall_now: int) -> Reply:
    try:
        distribution = await _bounded(store.distribution())
        snapshot = await _bounded(current_snapshot(store))
    except TRANSIENT as exc:
        return _unavailable(exc)
    grouped = group_distribution(distribution)
    return Reply(
        200,
        {
            "customers": sum(grouped["tier"].values()),
            "distribution": grouped,
            "labels": known_labels(policy),
            "segment_names": segment_names(),
            "snapshot": _snapshot_doc(snapshot, wall_now),
            "thresholds": snapshot.model_dump() if snapshot else None,
        },
    )


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """What the web views read from the running Faust worker (a fake in unit tests)."""

    partitions: list[int]
    rebalancing: bool


async def readiness(facts: WorkerFacts, store: Store) -> Reply:
    problems = []
    if not facts.partitions:
        problems.append("no input partitions assigned yet")
    if facts.rebalancing:
        problems.append("consumer group is rebalancing")
    redis = "ok"
    try:
        await _bounded(store.snapshot_version())
    except TRANSIENT as exc:
        redis = f"unavailable: {exc or type(exc).__name__}"
        problems.append(f"Redis does not answer ({redis})")
    body = {
        "ready": not problems,
        "partitions": facts.partitions,
        "rebalancing": facts.rebalancing,
        "redis": redis,
        "problems": problems,
    }
    return Reply(200 if not problems else 503, body)


async def status_reply(
    runtime: Runtime, state: WebState, facts: WorkerFacts, store: Store, wall_now: float
) -> Reply:
    metrics = runtime.metrics
    events = metrics.events_total()
    state.events.observe(time.monotonic(), sum(events.values()))
    rate = state.events.rate()
    lag = metrics.consumer_lag_by_partition()
    redis = "ok"
    snapshot = None
    try:
        state.last_distribution = await _bounded(store.distribution())
        metrics.set_customers(state.last_distribution)
        snapshot = await _bounded(current_snapshot(store))
    except TRANSIENT as exc:
        redis = f"unavailable: {exc or type(exc).__name__}"
    grouped = group_distribution(state.last_distribution or {})
    notes = list(runtime.recent_notifications)[::-1]
    settings = runtime.settings
    return Reply(
        200,
        {
            "worker": {
                "app_id": settings.app_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "clock": settings.clock,
                "policy_version": runtime.policy.version,
                "started_at": datetime.fromtimestamp(state.started_at, UTC).isoformat(),
                "uptime_s": round(wall_now - state.started_at, 1),
                "partitions": facts.partitions,
                "rebalancing": facts.rebalancing,
            },
            "redis": redis,
            "throughput": {
                "events_per_s": None if rate is None else round(rate, 2),
                "window_s": round(state.events.span(), 1),
                "events_total": events,
                "notifications_total": metrics.notifications_total(),
            },
            "lag": {
                "total": sum(lag.values()),
                "partitions": {str(p): lag.get(p) for p in sorted({*lag, *facts.partitions})},
            },
            "customers": sum(grouped["tier"].values()),
            "distribution": grouped,
            "distribution_stale": redis != "ok",
            "labels": known_labels(runtime.policy),
            "segment_names": segment_names(),
            "snapshot": _snapshot_doc(snapshot, int(wall_now)),
            "notifications": [
                {
                    "notification_id": n.notification_id,
                    "type": n.type.value,
                    "customer_id": n.customer_id,
                    "occurred_at": n.occurred_at.isoformat(),
                    "summary": n.summary,
                }
                for n in notes
            ],
            "refreshed_at": datetime.fromtimestamp(wall_now, UTC).isoformat(),
        },
    )


# -- wiring ----------------------------------------------------------------------------------


def worker_facts(app: faust.App, topic: str) -> WorkerFacts:
    try:
        assigned = app.consumer.assignment()
    except Exception:  # the consumer is not started yet (the web server starts first)
        assigned = set()
    return WorkerFacts(
        partitions=sorted(tp.partition for tp in assigned if tp.topic == topic),
        rebalancing=bool(getattr(app, "rebalancing", False)),
    )


def _json_error(status: int, code: str, detail: str, **headers: str) -> aioweb.Response:
    return aioweb.json_response({"error": code, "detail": detail}, status=status, headers=headers)


def auth_middleware(token: str | None) -> Callable[..., Any]:
    @aioweb.middleware
    async def middleware(request: aioweb.Request, handler: Handler) -> aioweb.StreamResponse:
        if not authorized(
            request.path,
            request.headers.get("Authorization"),
            request.query.get("token"),
            token,
        ):
            return _json_error(
                401,
                "unauthorized",
                "this view needs 'Authorization: Bearer <MEMBERFLOW_WEB_TOKEN>'",
                **{"WWW-Authenticate": 'Bearer realm="memberflow"'},
            )
        try:
            return await handler(request)
        except aioweb.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
            return _json_error(exc.status, code, f"{exc.reason}: {request.method} {request.path}")

    return middleware


def _disable_faust_views(app: faust.App) -> None:
    # The settings take effect if app.web is not built yet; the production index (it would
    # take "/") has no setting, so Faust's blueprints are also dropped from the list, which
    # covers an app.web built earlier too. Applied when the web server starts.
    app.conf.web_router_enabled = False
    app.conf.web_tables_enabled = False
    blueprints = app.web.blueprints
    enabled = getattr(blueprints, "_enabled", None)
    if isinstance(enabled, list):
        enabled[:] = [(p, bp) for p, bp in enabled if not str(bp).startswith(_FAUST_BLUEPRINTS)]


def register_views(app: faust.App, runtime: Runtime) -> None:
    """Check the exposure settings and register every view and the status page on `app`."""
    settings = runtime.settings
    check_exposure(settings)
    _disable_faust_views(app)
    web_app = getattr(app.web, "web_app", None)
    if not isinstance(web_app, aioweb.Application):
        raise WebConfigError(f"unsupported Faust web driver {type(app.web)!r}: needs aiohttp")
    web_app.middlewares.append(auth_middleware(web_token(settings)))
    state = WebState()
    topic = settings.purchases_topic

    def store() -> Store:
        return runtime.engine().store

    def reply(view: faust.web.View, result: Reply) -> faust.web.Response:
        return view.json(result.body, status=result.status)

    @app.page("/health")
    async def health(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return view.json({"status": "ok"})

    @app.page("/ready")
    async def ready(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return reply(view, await readiness(worker_facts(app, topic), store()))

    @app.page("/metrics")
    async def metrics(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        body = generate_latest(runtime.metrics.registry)
        return view.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])

    # {id:.*}: ids may contain "/" (and an empty id is a 400, not a 404)
    @app.page("/customers/{customer_id:.*}")
    async def customer(
        view: faust.web.View, request: faust.web.Request, customer_id: str
    ) -> faust.web.Response:
        result = await customer_reply(
            store(),
            runtime.policy,
            settings.clock,
            customer_id,
            request.query.get("as_of"),
            int(time.time()),
        )
        return reply(view, result)

    @app.page("/segments")
    async def segments(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return reply(view, await segments_reply(store(), runtime.policy, int(time.time())))

    @app.page("/api/status")
    async def status(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        facts = worker_facts(app, topic)
        return reply(view, await status_reply(runtime, state, facts, store(), time.time()))

    @app.page("/")
    async def page(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return view.html(STATUS_PAGE, headers=dict(PAGE_HEADERS))

    @app.timer(interval=SAMPLE_INTERVAL_S)
    async def sample_counters() -> None:
        state.events.observe(time.monotonic(), sum(runtime.metrics.events_total().values()))

    @app.timer(interval=CUSTOMERS_REFRESH_S)
    async def refresh_customers() -> None:
        """memberflow_customers from the population counters (16 HGETALLs, not a scan)."""
        try:
            distribution = await _bounded(store().distribution())
        except TRANSIENT as exc:
            log.debug("customers gauge not refreshed: %s", exc)
            return
        state.last_distribution = distribution
        runtime.metrics.set_customers(distribution)


# -- the status page ----------------------------------------------------------------------------

_STYLE = """
:root { --fg:#1d2430; --muted:#667085; --line:#e4e7ec; --bg:#f6f7f9; --card:#fff;
        --accent:#2f6fed; --ok:#12805c; --bad:#c4320a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:16px; flex-wrap:wrap; padding:14px 24px;
         background:#101828; color:#fff; }
header h1 { margin:0; font-size:18px; letter-spacing:.02em; }
header .meta { color:#c7cdd8; font-size:13px; }
.badge { padding:2px 8px; border-radius:10px; font-size:12px; font-weight:600; }
.badge.ok { background:#d1fadf; color:var(--ok); }
.badge.bad { background:#fee4e2; color:var(--bad); }
main { padding:18px 24px; display:grid; gap:18px; max-width:1400px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:14px; }
.card, .panel { background:var(--card); border:1px solid var(--line); border-radius:8px;
                padding:14px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card .v { font-size:26px; font-weight:650; margin-top:2px; font-variant-numeric:tabular-nums; }
.card .s { color:var(--muted); font-size:12px; min-height:1.4em; }
h2 { font-size:14px; margin:0 0 10px; text-transform:uppercase; letter-spacing:.05em;
     color:#344054; }
.dist { display:grid; grid-template-columns:repeat(auto-fit,minmax(300px,1fr)); gap:14px; }
@media (min-width: 1200px) { .dist { grid-template-columns:1fr 1.7fr .9fr 1.1fr; } }
.panel { min-width:0; overflow-x:auto; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:4px 6px; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.bar { width:30%; min-width:60px; }
td.label, td.time { white-space:nowrap; }
.bar span { display:block; height:10px; border-radius:3px; background:var(--accent);
            min-width:1px; }
.zero { color:#98a2b3; }
form { display:flex; gap:8px; align-items:center; flex-wrap:wrap; }
input { font:inherit; padding:6px 10px; border:1px solid #d0d5dd; border-radius:6px; width:260px; }
button { font:inherit; padding:6px 14px; border:0; border-radius:6px; background:var(--accent);
         color:#fff; cursor:pointer; }
button.link { background:none; color:var(--accent); padding:0; text-decoration:underline; }
#lookup-result { margin-top:12px; }
#lookup-result dl { display:grid; grid-template-columns:max-content 1fr; gap:4px 14px; margin:0; }
#lookup-result dt { color:var(--muted); }
#lookup-result dd { margin:0; font-weight:600; }
.error { color:var(--bad); font-weight:600; }
.muted { color:var(--muted); }
"""

_SCRIPT = """
"use strict";
const REFRESH_MS = 2000;
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en");
let segmentNames = {};

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { status: response.status, body };
}

function ago(seconds) {
  if (seconds == null) return "";
  if (seconds < 120) return seconds + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function setConnection(ok, text) {
  const badge = $("connection");
  badge.className = "badge " + (ok ? "ok" : "bad");
  badge.textContent = text;
}

function labelText(dimension, label) {
  if (dimension === "segment" && segmentNames[label]) return segmentNames[label].en;
  return label.replace(/_/g, " ");
}

function renderDistribution(status) {
  for (const dimension of ["tier", "segment", "grade", "stage"]) {
    const counts = status.distribution[dimension] || {};
    const labels = [...status.labels[dimension]];
    for (const label of Object.keys(counts)) if (!labels.includes(label)) labels.push(label);
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const max = Math.max(1, ...Object.values(counts));
    const body = $("dist-" + dimension);
    body.replaceChildren();
    for (const label of labels) {
      const count = counts[label] || 0;
      const bar = el("span");
      bar.style.width = (100 * count / max).toFixed(1) + "%";
      const name = el("td", { class: "label" }, labelText(dimension, label));
      if (dimension === "segment" && segmentNames[label]) name.title = segmentNames[label].zh;
      body.append(el("tr", { class: count ? "" : "zero", data: { label } },
        name,
        el("td", { class: "num count" }, fmt.format(count)),
        el("td", { class: "num" }, total ? (100 * count / total).toFixed(1) + " %" : "–"),
        el("td", { class: "bar" }, bar)));
    }
  }
}

function renderNotifications(status) {
  const body = $("notifications");
  body.replaceChildren();
  if (!status.notifications.length) {
    const none = el("td", { colSpan: 4, class: "muted" }, "none produced by this worker yet");
    body.append(el("tr", {}, none));
  }
  for (const n of status.notifications) {
    const who = el("button", { class: "link", type: "button" }, n.customer_id);
    who.addEventListener("click", () => { $("lookup-id").value = n.customer_id; lookup(); });
    body.append(el("tr", {},
      el("td", { class: "time" }, n.occurred_at.replace("T", " ").replace("+00:00", "Z")),
      el("td", {}, n.type.replace(/_/g, " ")),
      el("td", {}, who),
      el("td", {}, n.summary)));
  }
}

function render(status) {
  segmentNames = status.segment_names;
  const w = status.worker;
  const parts = w.partitions.length ? w.partitions.join(", ") : "none";
  $("worker").textContent = `${w.app_id} on ${w.host} (pid ${w.pid}) · partitions ${parts}` +
    (w.rebalancing ? " · rebalancing" : "") + ` · policy ${w.policy_version} · ${w.clock} clock`;
  const t = status.throughput;
  $("events-rate").textContent = t.events_per_s == null ? "–" : fmt.format(t.events_per_s);
  const totals = t.events_total;
  $("events-total").textContent = `${fmt.format(totals.applied || 0)} applied · ` +
    `${fmt.format(totals.duplicate || 0)} duplicate · ` +
    `${fmt.format(totals.dead_lettered || 0)} dead-lettered`;
  $("lag-total").textContent = fmt.format(status.lag.total);
  $("lag-partitions").textContent = Object.entries(status.lag.partitions)
    .map(([p, v]) => `p${p}: ${v == null ? "–" : fmt.format(v)}`).join(" · ") || "no partitions";
  $("customers").textContent = fmt.format(status.customers);
  const s = status.snapshot;
  $("snapshot").textContent = s
    ? `snapshot v${s.version} of ${fmt.format(s.customers)} customers, ${ago(s.age_s)}`
    : "no population snapshot yet";
  const sent = Object.values(t.notifications_total).reduce((a, b) => a + b, 0);
  $("notifications-total").textContent = fmt.format(sent);
  renderDistribution(status);
  renderNotifications(status);
  $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  if (status.redis === "ok") setConnection(true, "live");
  else setConnection(false, "Redis " + status.redis);
}

async function refresh() {
  try {
    const { status, body } = await api("/api/status");
    if (status === 401) { setConnection(false, "401: open this page with ?token=…"); return; }
    if (status !== 200 || !body) { setConnection(false, "HTTP " + status); return; }
    render(body);
  } catch (e) {
    setConnection(false, "worker unreachable");
  }
}

function showLookupError(text) {
  $("lookup-result").replaceChildren(el("p", { class: "error", id: "lookup-error" }, text));
}

function fact(label, value, id) {
  return [el("dt", {}, label), el("dd", id ? { id } : {}, value ?? "–")];
}

async function lookup(event) {
  if (event) event.preventDefault();
  const id = $("lookup-id").value.trim();
  const out = $("lookup-result");
  if (!id) { out.replaceChildren(); return; }
  out.replaceChildren(el("span", { class: "muted" }, "looking up " + id + "…"));
  let reply;
  try { reply = await api("/customers/" + encodeURIComponent(id)); }
  catch (e) { showLookupError("worker unreachable"); return; }
  const c = reply.body;
  if (reply.status !== 200 || !c) {
    const detail = c && c.detail ? c.detail : "HTTP " + reply.status;
    showLookupError(`${reply.status}: ${detail}`);
    return;
  }
  const segment = c.rfm_type
    ? `${labelText("segment", c.rfm_type)} (${c.rfm_type_names.zh})` : null;
  const timers = c.pending_timers
    .map((t) => `${t.kind} ${t.key} at ${t.due_at}`
      + (t.sends_at && t.sends_at !== t.due_at ? ` (goes out ${t.sends_at})` : ""))
    .join("; ") || "none";
  const last = c.last_purchase_at ? `${c.last_purchase_at} (${c.recency_days} days ago)` : null;
  out.replaceChildren(el("dl", {},
    ...fact("customer", c.customer_id, "lookup-customer"),
    ...fact("tier", c.tier, "lookup-tier"),
    ...fact("tier since", c.tier_since),
    ...fact("lifecycle", c.lifecycle, "lookup-lifecycle"),
    ...fact("segment", segment, "lookup-segment"),
    ...fact("grade", c.grade, "lookup-grade"),
    ...fact("window", `${c.frequency} orders, ${c.monetary} ${c.currency}`),
    ...fact("last purchase", last),
    ...fact("lifetime", `${c.lifetime_orders} orders, ${c.lifetime_spend} ${c.currency}`),
    ...fact("pending timers", timers, "lookup-timers")));
}

$("lookup-form").addEventListener("submit", lookup);
refresh();
setInterval(refresh, REFRESH_MS);
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>memberflow status</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header>
  <h1>memberflow</h1>
  <span class="meta" id="worker">connecting…</span>
  <span class="badge" id="connection">…</span>
  <span class="meta" id="refreshed"></span>
</header>
<main>
  <section class="cards">
    <div class="card"><div class="k">Events / s</div><div class="v" id="events-rate">–</div>
      <div class="s" id="events-total"></div></div>
    <div class="card"><div class="k">Consumer lag</div><div class="v" id="lag-total">–</div>
      <div class="s" id="lag-partitions"></div></div>
    <div class="card"><div class="k">Customers</div><div class="v" id="customers">–</div>
      <div class="s" id="snapshot"></div></div>
    <div class="card"><div class="k">Notifications sent</div>
      <div class="v" id="notifications-total">–</div><div class="s">by this worker</div></div>
  </section>
  <section class="panel">
    <h2>Customer lookup</h2>
    <form id="lookup-form">
      <input id="lookup-id" name="customer" placeholder="customer id" autocomplete="off"
             spellcheck="false" aria-label="customer id">
      <button id="lookup-go" type="submit">Look up</button>
    </form>
    <div id="lookup-result"></div>
  </section>
  <section class="dist">
    {tables}
  </section>
  <section class="panel">
    <h2>Latest notifications</h2>
    <table><thead><tr><th>time</th><th>type</th><th>customer</th><th>summary</th></tr></thead>
      <tbody id="notifications"></tbody></table>
  </section>
</main>
<script>{script}</script>
</body>
</html>
"""

_TABLE = """<div class="panel"><h2>{title}</h2><table>
      <thead><tr><th>{dimension}</th><th class="num">customers</th><th class="num">share</th>
      <th></th></tr></thead><tbody id="dist-{dimension}"></tbody></table></div>"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


STATUS_PAGE = _PAGE.format(
    style=_STYLE,
    script=_SCRIPT,
    tables="\n    ".join(
        _TABLE.format(title=title, dimension=dimension)
        for dimension, title in (
            ("tier", "Tiers"),
            ("segment", "RFM segments"),
            ("grade", "Grades"),
            ("stage", "Lifecycle stages"),
        )
    ),
)
# No external resources, and only this page's own script and style may run.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
