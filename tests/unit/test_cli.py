"""Command-line mistakes are one clear line and exit 2, before anything starts."""

from __future__ import annotations

from typing import Any

import pytest

from memberflow import cli, demo


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--customers", "0"], "argument --customers: must be at least 1, got 0"),
        (["--days", "-3"], "argument --days: must be at least 1, got -3"),
        (["--rate", "-1"], "argument --rate: must be 0 or more, got -1"),
        (["--rate", "0"], "argument --rate: must be more than 0"),
        (["--duration", "x"], "argument --duration: expected a number, got 'x'"),
        (["--hold", "inf"], "argument --hold: must be 0 or more, got inf"),
        (["--workdir", "/proc/nope/demo"], "cannot use --workdir /proc/nope/demo"),
    ],
)
def test_demo_refuses_bad_arguments_before_starting_anything(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def started(*_: Any) -> int:
        raise AssertionError("the demo must not start")

    monkeypatch.setattr(demo, "run_demo", started)
    try:
        code = cli.main(["demo", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
