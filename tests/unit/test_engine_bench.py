"""Pure helpers of ops/engine_bench.py's A/B mode (--against): medians and the ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

OPS = Path(__file__).resolve().parents[2] / "ops"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ops_engine_bench", OPS / "engine_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


engine_bench = _load()


def test_median_of_odd_and_even_counts() -> None:
    assert engine_bench.median([3.0, 1.0, 2.0]) == 2.0
    assert engine_bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert engine_bench.median([7.0]) == 7.0


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
