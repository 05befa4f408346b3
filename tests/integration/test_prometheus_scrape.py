"""A real Prometheus (Debian's package) scrapes a real worker and evaluates ops/alerts.yml.

Broker, redis-server and one worker come from the integration fixtures; Prometheus runs on a free
loopback port with a temp config that scrapes the worker every second. Its HTTP API must then
report the worker's counters as published, the target as up, and every alert rule as evaluating
without errors against the real series.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer

from memberflow.services import LocalBroker, LocalRedis, ManagedProcess, free_port
from tests.integration.conftest import ROOT, worker_env

pytestmark = pytest.mark.integration

N_GOOD = 5


def _publish(bootstrap: str) -> None:
    occurred_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    try:
        for i in range(N_GOOD):
            customer = f"scrape-{i}"
            purchase = {
                "event_id": f"scrape-order-{i}",
                "customer_id": customer,
                "occurred_at": occurred_at,
                "amount": "500",
                "currency": "EUR",
            }
            producer.send(
                "purchases", key=customer.encode(), value=json.dumps(purchase).encode()
            ).get(10)
        producer.send("purchases", key=b"scrape-bad", value=b"{not json").get(10)
        producer.flush(10)
    finally:
        producer.close(timeout=5)


def _get(port: int, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _instant(port: int, promql: str) -> dict[str, float]:
    """An instant query's result as {labels as JSON: value}."""
    data = _get(port, "/api/v1/query", query=promql)
    return {
        json.dumps(sample["metric"], sort_keys=True): float(sample["value"][1])
        for sample in data["result"]
    }


def _start_prometheus(workdir: Path, target: str) -> tuple[ManagedProcess, int]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (make system-deps)")
    workdir.mkdir(parents=True)
    shutil.copy(ROOT / "ops" / "alerts.yml", workdir / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "memberflow",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = ManagedProcess(
        name="prometheus",
        argv=[
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        workdir=workdir,
    )
    process.start()
    return process, port


def _wait_for(check: Any, process: ManagedProcess, timeout: float) -> Any:
    """Poll `check` until it returns a truthy value; the last error explains a timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not process.running:
            raise AssertionError(f"prometheus exited\n{process.log_tail()}")
        try:
            outcome = check()
            if outcome:
                return outcome
            last = outcome
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"not reached within {timeout:.0f}s: {last!r}\n{process.log_tail()}")


@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_worker_and_evaluates_the_alerts(
    tmp_path: Path, broker: LocalBroker, redis_server: LocalRedis, make_worker: Any
) -> None:
    worker = make_worker(worker_env(broker, redis_server))
    worker.start()
    _publish(broker.bootstrap)
    worker.wait_for_events(N_GOOD + 1, timeout=120)

    prometheus, port = _start_prometheus(tmp_path / "prometheus", f"127.0.0.1:{worker.web_port}")
    try:

        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        _wait_for(ready, prometheus, 60)

        def scraped() -> dict[str, dict[str, float]] | None:
            results = {
                "applied": _instant(port, 'memberflow_events_total{outcome="applied"}'),
                "dead": _instant(port, "sum(memberflow_dead_letters_total)"),
                "up": _instant(port, 'up{job="memberflow"}'),
                # Reported every 5 s for each partition the worker owns (from the broker and
                # the timer index), and once at start.
                "lag": _instant(port, "memberflow_consumer_lag_events"),
                "overdue": _instant(port, "memberflow_timers_overdue_seconds"),
                "started": _instant(port, "memberflow_process_start_time_seconds"),
            }
            return results if all(results.values()) else None

        results = _wait_for(scraped, prometheus, 60)
        assert list(results["applied"].values()) == [N_GOOD]
        assert list(results["dead"].values()) == [1]  # the one bad line
        assert list(results["up"].values()) == [1]
        partitions = sorted(json.loads(labels)["partition"] for labels in results["lag"])
        assert partitions == [str(p) for p in range(len(partitions))] and partitions
        assert sorted(json.loads(labels)["partition"] for labels in results["overdue"]) == (
            partitions
        )
        assert set(results["lag"].values()) == {0}  # every event applied
        (started,) = results["started"].values()
        assert 0 < time.time() - started < 600
        reasons = _instant(port, "memberflow_dead_letters_total")
        assert [json.loads(labels)["reason"] for labels in reasons] == ["malformed_json"]

        # Every alert rule evaluates against the real series: no PromQL or template errors,
        # and nothing fires for a healthy worker.
        def evaluated() -> list[dict[str, Any]] | None:
            groups = _get(port, "/api/v1/rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            # a rule not evaluated yet reports lastEvaluation 0001-01-01T00:00:00Z
            done = all(not rule["lastEvaluation"].startswith("0001") for rule in rules)
            return rules if rules and done else None

        rules = _wait_for(evaluated, prometheus, 30)
        alerts = yaml.safe_load((ROOT / "ops" / "alerts.yml").read_text())["groups"][0]["rules"]
        assert len(rules) == len(alerts)
        assert {rule["name"]: rule["health"] for rule in rules} == {
            rule["name"]: "ok" for rule in rules
        }
        assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []
    finally:
        prometheus.cleanup()
