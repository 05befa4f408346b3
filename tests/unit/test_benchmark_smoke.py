"""Pure helpers of ops/benchmark.py: percentile math, rates, parsing, profile summary, targets.

No services, no wall-clock assertions: the benchmark itself is run by hand (see its --help).
"""

from __future__ import annotations

import random
import time

import pytest

from tests.unit.ops_scripts import load_ops_script

bench = load_ops_script("benchmark.py", "ops_benchmark")


def test_percentile_interpolates_between_ranks() -> None:
    assert bench.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench.percentile([1, 2, 3, 4], 0) == 1
    assert bench.percentile([1, 2, 3, 4], 100) == 4
    assert bench.percentile([7], 99) == 7
    assert bench.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_percentile_does_not_depend_on_order() -> None:
    values = [random.Random(3).uniform(0, 500) for _ in range(1000)]
    shuffled = random.Random(4).sample(values, len(values))
    for q in (50, 95, 99):
        assert bench.percentile(values, q) == bench.percentile(shuffled, q)
    assert bench.percentile(values, 50) <= bench.percentile(values, 95)
    assert bench.percentile(values, 95) <= bench.percentile(values, 99)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_latency_summary() -> None:
    summary = bench.latency_summary([10.0, 20.0, 30.0, 40.0])
    assert summary["count"] == 4
    assert summary["mean"] == 25.0
    assert summary["p50"] == 25.0
    assert summary["max"] == 40.0
    assert bench.latency_summary([])["p99"] is None


def test_the_median_latency_round_is_reported_with_every_rounds_p99() -> None:
    rounds = [
        {"applied": {"p99": p99}, "notified": {"p99": p99 + 20}, "round": i}
        for i, p99 in enumerate((180.0, 95.0, 120.0))
    ]
    chosen = bench.median_round(rounds)
    assert chosen["round"] == 2 and chosen["applied"]["p99"] == 120.0
    assert [r["applied_p99"] for r in chosen["rounds"]] == [180.0, 95.0, 120.0]
    assert bench.median_round(rounds[:2])["applied"]["p99"] == 95.0  # the lower middle
    assert bench.median_round(rounds[:1])["rounds"] == [
        {"applied_p99": 180.0, "notified_p99": 200.0, "cpu_cores": None}
    ]


def test_batch_figures_are_the_differences_of_two_scrapes() -> None:
    step = 'memberflow_redis_call_duration_seconds_{}{{operation="{}"}}'
    before = {
        "memberflow_batch_size_events_sum": 1_000.0,
        "memberflow_batch_size_events_count": 10.0,
        "memberflow_batch_duration_seconds_sum": 1.0,
        step.format("count", "load"): 10.0,
        step.format("sum", "load"): 0.5,
    }
    after = {
        "memberflow_batch_size_events_sum": 3_000.0,
        "memberflow_batch_size_events_count": 110.0,
        "memberflow_batch_duration_seconds_sum": 3.0,
        step.format("count", "load"): 110.0,
        step.format("sum", "load"): 0.7,
        step.format("count", "due"): 50.0,  # first seen after `before`
        step.format("sum", "due"): 0.1,
    }
    figures = bench.batch_figures(before, after, seconds=20.0)
    assert figures["batches_per_s"] == 5.0
    assert figures["events_per_batch"] == 20.0
    assert figures["ms_per_batch"] == 20.0
    assert figures["redis_steps"] == {"load": [1.0, 2.0], "due": [0.5, 2.0]}
    idle = bench.batch_figures(before, before, seconds=20.0)
    assert idle["events_per_batch"] is None and idle["redis_steps"] == {}


def test_bulk_work_logged_within_the_phase() -> None:
    """The snapshot and policy lines a worker logged while the load was offered, in seconds
    from the phase's start (log times are local, as logging writes them)."""
    start = time.mktime(time.strptime("2026-11-26 06:35:46", "%Y-%m-%d %H:%M:%S"))
    log = "\n".join(
        [
            "[2026-11-26 06:35:40,000] [7602] [INFO] published population snapshot v0 (1 "
            "customers)",
            "[2026-11-26 06:35:59,114] [7602] [INFO] policy 2026.11-1 adopted: woke 4000 customers "
            "for re-evaluation ",
            "[2026-11-26 06:35:59,500] [7602] [INFO] Timer Monitor.sampler woke up too late",
            "[2026-11-26 06:35:59,791] [7602] [INFO] published population snapshot v1 (4000 "
            "customers); 4000 wake-ups for reclassification",
            "[2026-11-26 06:36:07,000] [7602] [INFO] published population snapshot v2 (4000 "
            "customers); 9 wake-ups for reclassification",
        ]
    )
    assert bench.bulk_work_logged(log, start, 20.0) == [
        [13.11, "policy 2026.11-1 adopted: woke 4000 customers for re-evaluation"],
        [
            13.79,
            "published population snapshot v1 (4000 customers); 4000 wake-ups for reclassification",
        ],
    ]


def test_throughput_counts_after_the_first_observation() -> None:
    assert bench.throughput(2_000, 100.0, 202_000, 120.0) == 10_000
    assert bench.throughput(500, 100.0, 500, 100.0) is None  # all in one batch
    assert bench.throughput(0, 100.0, 10, 99.0) is None


def test_parse_sizes() -> None:
    assert bench.parse_sizes("10000,100000,1000000") == [10_000, 100_000, 1_000_000]
    assert bench.parse_sizes("10k, 100K,1M,1_000") == [10_000, 100_000, 1_000_000, 1_000]
    for bad in ("", "ten", "0", "-5"):
        with pytest.raises(ValueError):
            bench.parse_sizes(bad)


def test_parse_probe_id() -> None:
    assert bench.parse_probe_id("lat-20260101-p17-1767225600123456789") == pytest.approx(
        1767225600.123456789
    )
    assert bench.parse_probe_id("lat-20260101-42") is None  # background event, no probe
    assert bench.parse_probe_id("b7-12") is None
    # A probe customer's priming purchase is not a probe (its index is no send time).
    assert bench.parse_probe_id("lat-20260101r0-prime-17") is None
    assert bench.parse_probe_id("lat-20260101-px-1767225600123456789") is None


def test_slowest_text_shows_what_was_measured() -> None:
    assert bench.slowest_text([1.5, 210.0]) == "1.5: 210"  # results of older runs
    assert bench.slowest_text([1.5, 210.0, 12.5]) == "1.5: 210 (12.5)"
    assert bench.slowest_text([1.5, 210.0, 12.5, 180.0]) == "1.5: 210 (12.5) [180]"
    assert bench.slowest_text([1.5, 210.0, None, 180.0]) == "1.5: 210 [180]"


class _Counting:
    """A worker whose /metrics counters move for the first `busy` scrapes."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.scrapes = 0

    def metrics(self) -> dict[str, float]:
        self.scrapes += 1
        moved = min(self.scrapes, self.busy)
        return {
            'memberflow_events_total{outcome="applied"}': 100.0 * moved,
            'memberflow_notifications_total{type="tier_upgraded"}': 3.0 * moved,
            "memberflow_unrelated_gauge": float(self.scrapes),  # not a counter of work
        }


def test_wait_quiet_waits_until_the_counters_stop() -> None:
    import asyncio

    busy = _Counting(busy=4)
    waited = asyncio.run(bench.wait_quiet([busy], quiet_s=0.01, timeout_s=5))
    assert busy.scrapes == 5  # four moving readings, then one equal to the last
    assert waited < 5
    forever = _Counting(busy=10**6)
    waited = asyncio.run(bench.wait_quiet([forever], quiet_s=0.01, timeout_s=0.1))
    assert 0.1 <= waited < 1  # gives up at the timeout


def test_top_frames_from_collapsed_stacks() -> None:
    lines = [
        'process 1:"python";thread (0x1);run (asyncio/base_events.py);'
        "process (memberflow/engine.py);apply (rules/customer.py) 30",
        'process 1:"python";thread (0x1);run (asyncio/base_events.py);'
        "process (memberflow/engine.py);loads (json/__init__.py) 10",
        'process 1:"python";thread (0x1);select (selectors.py) 60',
        "garbage line",
    ]
    summary = bench.top_frames(lines, limit=5)
    assert summary["samples"] == 100
    assert summary["self"][0] == {"frame": "select (selectors.py)", "samples": 60, "share": 0.6}
    inclusive = {row["frame"]: row["samples"] for row in summary["inclusive"]}
    assert inclusive["process (memberflow/engine.py)"] == 40
    areas = {row["frame"]: row["share"] for row in summary["areas"]}
    assert areas["rules (pure fold)"] == 0.3
    assert areas["json"] == 0.1
    assert bench.top_frames([])["samples"] == 0


def test_check_targets() -> None:
    results = {
        "throughput": {
            "a_take": {"events_per_s": 10_000},
            "b_naive": {"events_per_s": 1_000},
            "c_memberflow": {"events_per_s": 9_500},
        },
        "latency": {"applied": {"p99": 120.0}},
        "memory": {"bytes_per_customer": 800.0},
        "sweep": [
            {"customers": 10_000, "events_per_s": 9_000},
            {"customers": 1_000_000, "events_per_s": 7_000},
        ],
    }
    verdicts = [check["pass"] for check in bench.check_targets(results)]
    assert verdicts == [True, True, False, True, False]
    assert [c["pass"] for c in bench.check_targets({})] == [None] * 5


def test_format_table_aligns_numbers_right() -> None:
    table = bench.format_table(["name", "rate"], [["a", "1,000"], ["bb", "20"]])
    lines = table.splitlines()
    assert lines[0].startswith("name")
    assert lines[2].endswith("1,000")
    assert lines[3].endswith("   20")


def test_by_part_puts_each_latency_in_the_part_it_was_sent() -> None:
    # (seconds into the phase it was sent, ms); the last one is the phase's last instant
    samples = [(0.0, 10.0), (0.5, 30.0), (19.9, 500.0), (20.0, 7.0)]
    tenths = bench.by_part(samples, seconds=20.0, parts=10)
    assert len(tenths) == 10
    assert tenths[0] == [20.0, 29.8]  # the first two
    assert tenths[9] == [253.5, 495.1]  # the last two
    assert tenths[1:9] == [[None, None]] * 8
    sixths = bench.by_part([(4.9, 30.0), (5.0, 100.0), (31.0, 9.0)], seconds=30.0, parts=6)
    assert sixths[0] == [30.0, 30.0]
    assert sixths[1] == [100.0, 100.0]
    assert sixths[5] == [9.0, 9.0]  # a straggler past the end counts in the last part


def test_cpu_seconds_grows_with_work_and_is_none_for_no_process() -> None:
    import os

    before = bench.cpu_seconds(os.getpid())
    assert before is not None
    total = 0
    while (bench.cpu_seconds(os.getpid()) or 0.0) - before < 0.05:
        total += sum(range(10_000))
    assert total > 0
    assert bench.cpu_seconds(None) is None
    assert bench.cpu_seconds(2**22 + 12345) is None  # above Linux's pid limit: no such process


def test_events_due_adds_a_burst_once_its_time_has_come() -> None:
    assert bench.events_due(1000, 2.5) == 2500
    assert bench.events_due(1000, 2.5, burst=3000, burst_at=5.0) == 2500
    assert bench.events_due(1000, 5.0, burst=3000, burst_at=5.0) == 8000
    assert bench.events_due(1000, 7.25, burst=3000, burst_at=5.0) == 10250
