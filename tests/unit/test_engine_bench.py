"""Pure helpers of ops/engine_bench.py's A/B mode (--against): the ratio of the medians."""

from __future__ import annotations

import pytest

from tests.unit.ops_scripts import load_ops_script

engine_bench = load_ops_script("engine_bench.py", "ops_engine_bench")


def test_medians_of_odd_and_even_counts() -> None:
    assert engine_bench.compare([3.0, 1.0, 2.0], [7.0])["baseline_median_us"] == 2.0
    assert engine_bench.compare([4.0, 1.0, 3.0, 2.0], [7.0])["baseline_median_us"] == 2.5
    assert engine_bench.compare([3.0, 1.0, 2.0], [7.0])["change_median_us"] == 7.0


def test_compare_takes_the_ratio_of_the_medians_not_of_the_means() -> None:
    # One slow baseline run (the machine's drift) must not make the change look better.
    result = engine_bench.compare([150.0, 151.0, 400.0], [120.0, 125.0, 121.0])
    assert result["baseline_median_us"] == 151.0
    assert result["change_median_us"] == 121.0
    assert result["ratio"] == pytest.approx(121.0 / 151.0, abs=1e-3)
    assert result["baseline_us"] == [150.0, 151.0, 400.0]


def test_against_and_profile_are_refused_together() -> None:
    with pytest.raises(SystemExit):
        engine_bench.main(["--against", "HEAD", "--profile", "5"])
    with pytest.raises(SystemExit):
        engine_bench.main(["--against", "HEAD", "--repeat", "0"])
