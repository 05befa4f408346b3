"""ops/wake_bench.py's own parts: the step measurement and the synthetic shop."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.unit.ops_scripts import load_ops_script

wake_bench = load_ops_script("wake_bench.py", "ops_wake_bench")


def test_measure_reports_a_step_that_holds_the_event_loop() -> None:
    async def blocking_step() -> None:
        await asyncio.sleep(0.01)  # the loop probe is running by now
        time.sleep(0.05)  # noqa: ASYNC251 - holding the loop is what is measured

    figures = asyncio.run(wake_bench.measure(blocking_step()))
    assert figures["seconds"] >= 0.05
    assert figures["longest_loop_hold_ms"] >= 45
    assert figures["rss_growth_mib"] >= 0


def test_the_synthetic_shop_is_reproducible_and_spread_over_partitions() -> None:
    shop = wake_bench.contributions(1_000, seed=3)
    assert shop == wake_bench.contributions(1_000, seed=3)
    assert len({c.customer_id for c in shop}) == 1_000
    assert {c.partition for c in shop} == {0, 1, 2, 3}
    assert all(c.version == 1 and not c.segment for c in shop)  # unclassified, like a new shop


def test_a_shop_needs_customers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        wake_bench.main(["--customers", "0"])
    assert "--customers must be at least 1" in capsys.readouterr().err
