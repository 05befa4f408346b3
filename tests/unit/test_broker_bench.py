"""ops/broker_bench.py needs a broker and runs by hand; its helpers live in ops/benchmark.py
(tested in test_benchmark_smoke.py). This only checks that it loads and explains itself."""

from __future__ import annotations

import pytest

from tests.unit.ops_scripts import load_ops_script

broker_bench = load_ops_script("broker_bench.py", "ops_broker_bench")


def test_help_explains_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        broker_bench.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--rate" in out and "--fill" in out and "embedded broker" in out
