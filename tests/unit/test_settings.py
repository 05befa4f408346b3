"""The one settings object (MEMBERFLOW_* environment variables): what it accepts, and that a
mistake is reported naming the variable, with no traceback."""

from __future__ import annotations

import pytest

from memberflow import cli
from memberflow.settings import Settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEMBERFLOW_REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("MEMBERFLOW_REDIS_URL", "rediss://user:secret@redis.example:6380/2"),
        ("MEMBERFLOW_REDIS_URL", "unix:///run/redis.sock"),
        ("MEMBERFLOW_BROKER_URL", "kafka://a:9092;kafka://b:9092"),
        ("MEMBERFLOW_BROKER_URL", "a:9092,b:9092"),
    ],
)
def test_accepted_forms(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    settings = Settings()
    assert getattr(settings, name.removeprefix("MEMBERFLOW_").lower()) == value


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MEMBERFLOW_REDIS_URL", "notaurl", "expected redis://, rediss:// or unix://"),
        ("MEMBERFLOW_REDIS_URL", "http://redis:6379", "expected redis://, rediss:// or unix://"),
        ("MEMBERFLOW_BROKER_URL", "http://nope", "expected kafka://host:port"),
        ("MEMBERFLOW_BROKER_URL", "kafka://a:1;http://b:2", "expected kafka://host:port"),
        ("MEMBERFLOW_PARTITIONS", "abc", "Input should be a valid integer"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    name: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    assert cli.main(["customer", "c1"]) == 2
    err = capsys.readouterr().err
    assert f"  - {name}: " in err and message in err, err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err
