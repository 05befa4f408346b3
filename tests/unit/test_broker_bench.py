"""ops/broker_bench.py's helpers (the script itself needs a broker: run it by hand)."""

from __future__ import annotations

import os

from tests.unit.ops_scripts import load_ops_script

broker_bench = load_ops_script("broker_bench.py", "ops_broker_bench")


def test_by_sixth_groups_latencies_by_when_they_were_sent() -> None:
    samples = [(0.0, 10.0), (4.9, 30.0), (5.0, 100.0), (29.99, 7.0), (31.0, 9.0)]
    sixths = broker_bench.by_sixth(samples, seconds=30.0)
    assert sixths[0] == [20.0, 29.8]
    assert sixths[1] == [100.0, 100.0]
    assert sixths[5] == [8.0, 9.0]  # the last instant and a straggler past it
    assert sixths[2:5] == [[], [], []]


def test_cpu_seconds_of_this_process_grows_with_work() -> None:
    before = broker_bench.cpu_seconds(os.getpid())
    total = 0
    while broker_bench.cpu_seconds(os.getpid()) - before < 0.05:
        total += sum(range(10_000))
    assert total > 0
    assert broker_bench.cpu_seconds(os.getpid()) >= before + 0.05
