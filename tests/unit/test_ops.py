"""ops/ is checked, not just stored: promtool validates the Prometheus config and the alert rules
and runs their unit tests, every alert has a runbook section, and the Grafana dashboard only
queries metrics the workers expose (or that issue 5 adds under agreed names).

promtool comes from Debian's `prometheus` package (`make system-deps`); a missing promtool fails
these tests, it does not skip them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
GRAFANA = OPS / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "memberflow.json"

# Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = {"up"}

PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv",
    "floor", "group", "histogram_quantile", "increase", "irate", "label_replace",
    "last_over_time", "max", "max_over_time", "min", "min_over_time", "predict_linear",
    "quantile", "quantile_over_time", "rate", "resets", "round", "scalar", "sort",
    "sort_desc", "stddev", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
}  # fmt: skip
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}


def _series_names(name: str, kind: str) -> set[str]:
    """The sample names Prometheus stores for one metric family."""
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


@cache
def known_series() -> frozenset[str]:
    names = set(PROMETHEUS_SERIES)
    for family in Metrics().registry.collect():
        names |= _series_names(family.name, family.type)
    return frozenset(names)


_TOKEN = re.compile(r"(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; raises on an unknown function.

    Label matchers, ranges, grouping label lists and Grafana variables are removed first, so
    what is left is functions, keywords, numbers and metric names.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for number, word, call in _TOKEN.findall(text):
        if number or not word or word.lower() in PROMQL_KEYWORDS:
            continue
        if call:
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
            continue
        names.add(word)
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (`make system-deps`)")
    return path


def _run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [_promtool(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _panels() -> list[dict[str, Any]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    # rows may nest their panels
    return [p for panel in panels for p in [panel, *panel.get("panels", [])]]


def _panel_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# --- promtool -------------------------------------------------------------------------------


SECRET_MOUNT = "/run/secrets/web_token"  # where compose mounts the web_token secret


def test_prometheus_config_is_valid_as_mounted_in_compose(tmp_path: Path) -> None:
    # Compose mounts both files side by side in /etc/prometheus; check the same layout. The
    # token file is compose's secret, which promtool wants to exist: a stand-in at a temporary
    # path, the config's reference to it rewritten (and checked to be the secret first).
    compose = _compose()
    assert compose["services"]["prometheus"]["secrets"] == ["web_token"]
    mounts = compose["services"]["prometheus"]["volumes"]
    for mount in mounts:
        source, target, *_ = mount.split(":")
        if not source.startswith("./"):
            continue  # a named volume (its data), not a file of the repository
        assert target.startswith("/etc/prometheus/"), mount
        shutil.copy(ROOT / source, tmp_path / Path(target).name)
    config = tmp_path / "prometheus.yml"
    text = config.read_text()
    assert f"credentials_file: {SECRET_MOUNT}" in text
    (tmp_path / "web_token").write_text("a-token\n")
    config.write_text(text.replace(SECRET_MOUNT, str(tmp_path / "web_token")))
    result = _run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout


def test_prometheus_config_without_the_secret_is_refused(tmp_path: Path) -> None:
    """The repository's config names the secret's path, which does not exist here: promtool
    refuses it (Prometheus would too, so a stack started without the secret fails loudly)."""
    result = subprocess.run(
        [_promtool(), "check", "config", "ops/prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert SECRET_MOUNT in result.stdout + result.stderr


def test_alert_rules_are_valid() -> None:
    result = _run_promtool("check", "rules", "ops/alerts.yml")
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout, result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = _run_promtool("test", "rules", "ops/alerts_test.yml")
    assert "SUCCESS" in result.stdout, result.stdout


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no "parse this expression" command in 2.42; a recording rule per panel
    # query makes `check rules` parse them all.
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(_panel_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout


# --- alerts and runbook ---------------------------------------------------------------------


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = _alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: needs a for: duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"ops/RUNBOOK.md#{name.lower()}", name


def test_every_alert_has_a_runbook_section() -> None:
    anchors = _github_anchors((OPS / "RUNBOOK.md").read_text())
    missing = [
        rule["alert"]
        for rule in _alert_rules()
        if rule["annotations"]["runbook_url"].partition("#")[2] not in anchors
    ]
    assert missing == []


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - firing == set(), "never shown firing"
    assert names - quiet == set(), "never shown not firing"


def test_alerts_use_only_known_metrics() -> None:
    unknown = {
        rule["alert"]: metric_names(rule["expr"]) - known_series()
        for rule in _alert_rules()
        if metric_names(rule["expr"]) - known_series()
    }
    assert unknown == {}


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_parses_and_has_the_promised_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "memberflow"
    queried = set().union(*(metric_names(expr) for _, expr in _panel_exprs()))
    promised = {
        "memberflow_events_total",  # events/s by outcome
        "memberflow_dead_letters_total",  # dead letters by reason
        "memberflow_notifications_total",  # notifications by type
        "memberflow_batch_size_events_bucket",  # batch size
        "memberflow_batch_duration_seconds_bucket",  # batch duration p95
        "memberflow_consumer_lag_events",  # consumer lag
        "memberflow_processing_latency_seconds_bucket",  # latency p99
        "memberflow_redis_retries_total",  # Redis retries
        "memberflow_redis_errors_total",  # Redis errors
        "memberflow_customers",  # customers per tier
        "memberflow_event_clock_seconds",  # event clock
    }
    assert promised - queried == set()
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_queries_only_known_metrics() -> None:
    exprs = _panel_exprs()
    assert exprs
    unknown = {
        title: metric_names(expr) - known_series()
        for title, expr in exprs
        if metric_names(expr) - known_series()
    }
    assert unknown == {}


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert [(d["type"], d["url"]) for d in provisioned] == [
        ("prometheus", "http://prometheus:9090")
    ]
    uid = provisioned[0]["uid"]
    for panel in _panels():
        refs = [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]
        assert all(ref is None or ref["uid"] == uid for ref in refs), panel["title"]


def test_compose_mounts_grafana_provisioning_and_dashboards() -> None:
    grafana = _compose()["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:11\.\d+\.\d+", grafana["image"]), grafana["image"]
    mounts = dict(m.rsplit(":", 1)[0].split(":", 1) for m in grafana["volumes"])
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "memberflow.yml").read_text()
    )["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert mounts["./ops/grafana/dashboards"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


# --- the expression checker itself ----------------------------------------------------------


def test_metric_names_finds_selectors_and_ignores_the_rest() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(x_bucket{le="+Inf", a=~"b|c"}[5m])))'
        ' > 1e3 and on (job) max by (job) (up{job="m"}) == 1'
        " or sum(increase(y_total[$__rate_interval] offset 5m)) / vector(0)"
    )
    assert metric_names(expr) == {"x_bucket", "up", "y_total"}
    assert metric_names("rate(memberflow_event_total[5m])") - known_series() == {
        "memberflow_event_total"
    }
    with pytest.raises(ValueError, match="histogram_quantle"):
        metric_names("histogram_quantle(0.9, x)")
