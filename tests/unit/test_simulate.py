"""`memberflow rules simulate FILE`: the pure what-if core on CustomerState objects, and the
command over an in-memory store filled by the engine (the Redis read is a thin scan)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from memberflow import cli
from memberflow.engine import Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.population import publish
from memberflow.settings import default_rules_file
from memberflow.simulate import Simulation, judge, render, simulate
from rules.customer import DAY, CustomerState, epoch
from rules.policy import Policy, parse_policy
from rules.segments import Snapshot
from state.memory_store import MemoryStore
from streams.codec import encode_model
from streams.events import Purchase

DEFAULT_TEXT = default_rules_file().read_text(encoding="utf-8")
CURRENT = parse_policy(DEFAULT_TEXT)
NOW = epoch(datetime(2026, 6, 1, 12, 0, tzinfo=UTC))


def variant(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = yaml.safe_load(DEFAULT_TEXT)
    change(doc)
    doc["version"] = "2026.12-new"
    return doc


def as_policy(doc: dict[str, Any]) -> Policy:
    return parse_policy(yaml.safe_dump(doc, allow_unicode=True))


def cheaper_gold(doc: dict[str, Any]) -> None:
    """gold from 500 EUR and 3 orders (was 1000 and 4); platinum from 4000 (was 3000)."""
    doc["tiers"][2].update(min_window_spend="500", min_window_orders=3)
    doc["tiers"][3]["min_window_spend"] = "4000"


NEW = as_policy(variant(cheaper_gold))


def customer(cid: str, orders: int, spend_eur: int, last_days_ago: int = 1, tier: str = "") -> Any:
    last = NOW - last_days_ago * DAY
    return CustomerState(
        customer_id=cid,
        first_purchase_at=last - DAY,
        last_purchase_at=last,
        latest_event_at=last,
        lifetime_orders=orders,
        lifetime_spend=spend_eur * 100,
        buckets={last // DAY: [orders, spend_eur * 100]},
        tier=tier or "member",
    )


SNAPSHOT = Snapshot(
    version=5,
    published_at=NOW,
    customers=4,
    means={"r": float(NOW - 10 * DAY), "f": 3.5, "m": 100_000.0},
    cuts={
        "r": (NOW - 30 * DAY, NOW - 20 * DAY, NOW - 10 * DAY, NOW - 5 * DAY),
        "f": (1, 2, 4, 6),
        "m": (20_000, 50_000, 100_000, 200_000),
    },
    mean_scores={"r": 3.0, "f": 3.0, "m": 3.0},
)


def test_judge_uses_each_policys_tiers_method_and_grades() -> None:
    state = customer("a", orders=3, spend_eur=600)
    assert judge(state, CURRENT, SNAPSHOT, NOW).tier == "silver"
    assert judge(state, NEW, SNAPSHOT, NOW).tier == "gold"
    # r recent (high), f 3 < 3.5 (low), m 60_000 < 100_000 (low)
    assert judge(state, CURRENT, SNAPSHOT, NOW).segment == "general_development"
    assert judge(state, CURRENT, SNAPSHOT, NOW).grade == "B"
    score_mean = as_policy(
        variant(
            lambda d: (
                d["segments"].__setitem__("method", "score_mean"),
                d["segments"]["grades"].__setitem__("important_development", "B"),
            )
        )
    )
    # scores: r 5 (> every cut), f 3, m 3 -> against mean scores 3.0: R high only ...
    assert judge(state, score_mean, SNAPSHOT, NOW).segment == "general_development"
    rich = customer("b", orders=3, spend_eur=1_500)  # m score 4 > 3: important_development
    verdict = judge(rich, score_mean, SNAPSHOT, NOW)
    assert (verdict.segment, verdict.grade) == ("important_development", "B")
    assert judge(rich, CURRENT, SNAPSHOT, NOW).grade == "A"


def test_judge_without_snapshot_or_purchase_has_no_segment() -> None:
    verdict = judge(customer("a", 1, 10), CURRENT, None, NOW)
    assert (verdict.tier, verdict.segment, verdict.grade) == ("member", None, None)
    nobody = CustomerState(customer_id="z", tier="member")
    assert judge(nobody, CURRENT, SNAPSHOT, NOW).segment is None


def test_judge_reads_the_window_at_now() -> None:
    state = customer("a", orders=4, spend_eur=1_200, last_days_ago=400)  # left the window
    verdict = judge(state, CURRENT, SNAPSHOT, NOW)
    assert verdict.tier == "member"
    assert verdict.segment == "general_win_back"  # old, and F = M = 0 in the window


def test_report_counts_moves_and_totals() -> None:
    states = [
        customer("a", 3, 600),  # silver -> gold (up)
        customer("b", 3, 600),  # silver -> gold (up)
        customer("c", 9, 3_500, tier="platinum"),  # platinum -> gold (down)
        customer("d", 1, 50),  # member -> member
        customer("e", 2, 350, tier="gold"),  # silver -> silver; holds gold (grace period)
    ]
    report = simulate(states, CURRENT, NEW, SNAPSHOT, NOW)
    assert report["customers"] == 5
    assert report["current_policy"] == CURRENT.version
    assert report["new_policy"] == "2026.12-new"
    assert report["snapshot_version"] == 5
    assert report["as_of"] == "2026-06-01T12:00:00Z"
    moves = {
        (m["from"], m["to"]): (m["customers"], m["direction"]) for m in report["tiers"]["moves"]
    }
    assert moves == {
        ("member", "member"): (1, "same"),
        ("silver", "silver"): (1, "same"),
        ("silver", "gold"): (2, "up"),
        ("platinum", "gold"): (1, "down"),
    }
    # ordered by the current tier ladder, then the new one
    assert [(m["from"], m["to"]) for m in report["tiers"]["moves"]] == [
        ("member", "member"),
        ("silver", "silver"),
        ("silver", "gold"),
        ("platinum", "gold"),
    ]
    assert report["tiers"]["current"] == {"member": 1, "platinum": 1, "silver": 3}
    assert report["tiers"]["new"] == {"gold": 3, "member": 1, "silver": 1}
    totals = report["totals"]
    assert totals == {
        "customers": 5,
        "changed": 3,
        "unchanged": 2,
        "tier_changed": 3,
        "tier_up": 2,
        "tier_down": 1,
        "segment_changed": 0,  # same method, grades and snapshot
        "grade_changed": 0,
        "held_above_qualifying": 1,
        "holding_a_tier_the_new_policy_lacks": 0,
    }
    assert sum(m["customers"] for m in report["segments"]["moves"]) == 5
    assert report["segments"]["current"] == report["segments"]["new"]
    json.dumps(report, ensure_ascii=False)  # --json output


def test_grade_and_segment_moves() -> None:
    regraded = as_policy(
        variant(
            lambda d: d["segments"]["grades"].update(general_development="C", general_value="A")
        )
    )
    states = [
        customer("a", 3, 600),  # general_development: B -> C
        customer("b", 4, 600),  # f 4 > 3.5: general_value: B -> A
        customer("c", 4, 1_500),  # important_value: A -> A
    ]
    report = simulate(states, CURRENT, regraded, SNAPSHOT, NOW)
    grades = {
        (m["from"], m["to"]): (m["customers"], m["direction"]) for m in report["grades"]["moves"]
    }
    assert grades == {("A", "A"): (1, "same"), ("B", "A"): (1, "up"), ("B", "C"): (1, "down")}
    assert report["totals"]["grade_changed"] == 2
    assert report["totals"]["segment_changed"] == 0
    assert report["grades"]["new"] == {"A": 2, "C": 1}


def test_a_renamed_tier_is_a_change_and_is_reported() -> None:
    renamed = as_policy(variant(lambda d: d["tiers"][1].__setitem__("name", "bronze")))
    states = [customer("a", 2, 400, tier="silver"), customer("b", 1, 10)]
    report = simulate(states, CURRENT, renamed, SNAPSHOT, NOW)
    moves = {(m["from"], m["to"]): m["direction"] for m in report["tiers"]["moves"]}
    assert moves == {("silver", "bronze"): "changed", ("member", "member"): "same"}
    assert report["totals"]["holding_a_tier_the_new_policy_lacks"] == 1
    assert any("does not have" in note for note in report["notes"])


def test_a_tier_renamed_with_formerly_is_the_same_tier() -> None:
    renamed = as_policy(variant(lambda d: d["tiers"][1].update(name="bronze", formerly=["silver"])))
    states = [customer("a", 2, 400, tier="silver"), customer("b", 1, 10)]
    report = simulate(states, CURRENT, renamed, SNAPSHOT, NOW)
    moves = {(m["from"], m["to"]): m["direction"] for m in report["tiers"]["moves"]}
    assert moves == {("silver", "bronze"): "same", ("member", "member"): "same"}
    assert report["totals"]["tier_changed"] == 0
    assert report["totals"]["holding_a_tier_the_new_policy_lacks"] == 0
    assert not any("does not have" in note for note in report["notes"])


def test_notes_name_what_the_simulation_cannot_see() -> None:
    longer = as_policy(
        variant(
            lambda d: (
                d.__setitem__("window_days", 500),
                d["segments"].__setitem__("method", "score_mean"),
                d["currencies"].__setitem__("USD", "0.95"),
            )
        )
    )
    report = simulate([customer("a", 1, 10)], CURRENT, longer, None, NOW)
    notes = " ".join(report["notes"])
    assert "No population snapshot" in notes
    assert "longer than the current one" in notes
    assert "mean_split to score_mean" in notes
    assert "new events only" in notes
    assert report["segments"]["moves"] == [{"from": None, "to": None, "customers": 1}]
    assert report["segments"]["current"] == {}


def test_a_changed_file_with_the_current_version_is_flagged() -> None:
    same_version = as_policy({**variant(cheaper_gold), "version": CURRENT.version})
    report = simulate([customer("a", 1, 10)], CURRENT, same_version, SNAPSHOT, NOW)
    assert any("same version" in note for note in report["notes"])
    unchanged = simulate([customer("a", 1, 10)], CURRENT, CURRENT, SNAPSHOT, NOW)
    assert not any("same version" in note for note in unchanged["notes"])
    assert unchanged["totals"]["changed"] == 0


def test_simulation_of_nobody() -> None:
    report = Simulation(CURRENT, NEW, None, NOW).report()
    assert report["customers"] == 0 and report["tiers"]["moves"] == []
    assert "0 customers" in render(report, "current.yaml", "new.yaml")


def test_render_is_a_readable_table() -> None:
    states = [customer("a", 3, 600), customer("c", 9, 3_500, tier="platinum")]
    text = render(simulate(states, CURRENT, NEW, SNAPSHOT, NOW), "cur.yaml", "new.yaml")
    assert "what-if: policy 2026.11-1 (current, cur.yaml) -> 2026.12-new (new, new.yaml)" in text
    assert "2 customers; population snapshot v5" in text
    lines = text.splitlines()
    assert any(line.split()[:3] == ["silver", "->", "gold"] and "up" in line for line in lines)
    assert any(line.split()[:3] == ["platinum", "->", "gold"] and "down" in line for line in lines)
    assert "general_development (一般发展客户)" in text
    assert "totals: 2 customers, 2 would change" in text
    assert text.endswith("to apply: restart the workers with MEMBERFLOW_RULES_FILE=new.yaml")


# -- the command ----------------------------------------------------------------------------


def test_help_documents_how_a_policy_is_applied(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["rules", "simulate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "restart the workers with MEMBERFLOW_RULES_FILE pointing to FILE" in text
    assert "--json" in text and "--as-of" in text


def test_an_invalid_file_is_refused_before_reading_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_redis(*_: Any) -> Any:
        raise AssertionError("Redis was read before FILE was validated")

    monkeypatch.setattr(cli, "_with_store", no_redis)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(variant(lambda d: d["tiers"][2].update(min_window_orders=1))))
    assert cli.main(["rules", "simulate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memberflow: ") and str(bad) in err
    assert "must not have lower thresholds" in err
    assert cli.main(["rules", "simulate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read policy file" in capsys.readouterr().err


def test_an_invalid_current_policy_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "current.yaml"
    broken.write_text("version: 1\n")
    monkeypatch.setenv("MEMBERFLOW_RULES_FILE", str(broken))
    new = tmp_path / "new.yaml"
    new.write_text(DEFAULT_TEXT)
    assert cli.main(["rules", "simulate", str(new)]) == 2
    assert "invalid policy" in capsys.readouterr().err


def _filled_store() -> MemoryStore:
    """Customers written by the engine (event clock), and a published snapshot."""
    store = MemoryStore()
    engine = Engine(store, CURRENT, clock_mode="event", metrics=Metrics(), wall_clock=lambda: NOW)
    spends = {"a": ["300", "300", "300"], "b": ["100", "150"], "c": ["2000"] * 9, "d": ["20"]}
    messages = []
    for cid, amounts in spends.items():
        for i, amount in enumerate(amounts):
            event = Purchase(
                event_id=f"{cid}-{i}",
                customer_id=cid,
                occurred_at=datetime.fromtimestamp(NOW - (10 - i) * DAY, UTC),
                amount=Decimal(amount),
                currency="EUR",
            )
            messages.append(RawMessage("purchases", 0, len(messages), None, encode_model(event)))

    async def fill() -> None:
        outcome = await engine.process(messages)
        await engine.confirm(outcome)
        assert await publish(store, CURRENT, NOW) is not None

    asyncio.run(fill())
    return store


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    filled = _filled_store()

    async def with_store(settings: Any, work: Any) -> Any:
        return await work(filled)

    monkeypatch.setattr(cli, "_with_store", with_store)
    monkeypatch.setenv("MEMBERFLOW_CLOCK", "event")
    monkeypatch.delenv("MEMBERFLOW_RULES_FILE", raising=False)
    return filled


def test_the_command_reads_every_customer_and_prints_json(
    store: MemoryStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(variant(cheaper_gold), allow_unicode=True))
    assert cli.main(["rules", "simulate", str(new), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["customers"] == 4
    assert report["snapshot_version"] == 1
    # as of the engine clock (event mode): the last purchase applied
    assert report["as_of"] == "2026-05-30T12:00:00Z"
    moves = {(m["from"], m["to"]): m["customers"] for m in report["tiers"]["moves"]}
    # a: 3 x 300 silver -> gold; b: 250 EUR member; c: 18000 in 9 orders platinum; d member
    assert moves == {("member", "member"): 2, ("silver", "gold"): 1, ("platinum", "platinum"): 1}
    assert report["totals"]["tier_up"] == 1 and report["totals"]["changed"] == 1


def test_the_command_prints_a_table(
    store: MemoryStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(variant(cheaper_gold), allow_unicode=True))
    assert cli.main(["rules", "simulate", str(new), "--as-of", "2026-06-01T12:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "as of 2026-06-01T12:00:00Z: 4 customers; population snapshot v1" in out
    assert f"to apply: restart the workers with MEMBERFLOW_RULES_FILE={new}" in out
    assert cli.main(["rules", "simulate", str(new), "--as-of", "yesterday"]) == 2
    assert "not an ISO 8601 time" in capsys.readouterr().err
