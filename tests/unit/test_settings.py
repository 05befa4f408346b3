"""The one settings object (MEMBERFLOW_* environment variables): what it accepts, and that a
mistake is reported naming the variable, with no traceback."""

from __future__ import annotations

from pathlib import Path

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
        ("MEMBERFLOW_REDIS_URL", "redis://127.0.0.1:abc/0", "Port could not be cast"),
        ("MEMBERFLOW_REDIS_URL", "redis://127.0.0.1:99999/0", "Port out of range"),
        ("MEMBERFLOW_LOG_LEVEL", "verbose", "'debug', 'info', 'warning', 'error' or 'critical'"),
        ("MEMBERFLOW_WEB_HOST", "::1", "IPv6 literals fail"),
        ("MEMBERFLOW_WEB_PORT", "0", "greater than or equal to 1"),
        ("MEMBERFLOW_BROKER_CA_FILE", "/nonexistent/ca.pem", "is not a readable file"),
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


def test_a_mistyped_variable_is_refused_with_the_one_it_resembles(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MEMBERFLOW_WEB_TOKN=secret used to be ignored: the views were served without a token."""
    monkeypatch.setenv("MEMBERFLOW_WEB_TOKN", "secret")
    monkeypatch.setenv("MEMBERFLOW_LOG_LEVEL", "DEBUG")  # known, and any case
    assert cli.main(["customer", "c1"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting MEMBERFLOW_WEB_TOKN (did you mean MEMBERFLOW_WEB_TOKEN?)" in err, err


@pytest.mark.parametrize(
    "name",
    [
        "MEMBERFLOW_SERVICE_HOST",
        "MEMBERFLOW_SERVICE_PORT_WEB",
        "MEMBERFLOW_PORT",
        "MEMBERFLOW_PORT_6066_TCP",
        "MEMBERFLOW_PORT_6066_TCP_ADDR",
        "MEMBERFLOW_NAME",
        "MEMBERFLOW_ENV_FOO",
    ],
)
def test_what_kubernetes_or_docker_links_set_is_not_refused(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes Service named memberflow gives every pod MEMBERFLOW_SERVICE_HOST,
    MEMBERFLOW_PORT and the like (service links are on by default): refusing them kept every
    worker from starting."""
    monkeypatch.setenv(name, "tcp://10.0.0.5:6066")
    assert Settings().web_port == 6066


def test_the_web_token_can_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Docker secret: the file's one line, without its newline, is the token."""
    token = tmp_path / "web_token"
    token.write_text("s3cret-token\n")
    monkeypatch.setenv("MEMBERFLOW_WEB_TOKEN_FILE", str(token))
    settings = Settings()
    assert settings.web_token is not None
    assert settings.web_token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("content", "also_token", "message"),
    [
        (None, False, "  - MEMBERFLOW_WEB_TOKEN_FILE: cannot read it"),
        ("\n", False, "  - MEMBERFLOW_WEB_TOKEN_FILE: "),
        ("t\n", True, "  - set MEMBERFLOW_WEB_TOKEN or MEMBERFLOW_WEB_TOKEN_FILE, not both"),
    ],
    ids=["missing", "empty", "both"],
)
def test_a_bad_token_file_is_refused_naming_it(
    content: str | None,
    also_token: bool,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = tmp_path / "web_token"
    if content is not None:
        token.write_text(content)
    monkeypatch.setenv("MEMBERFLOW_WEB_TOKEN_FILE", str(token))
    if also_token:
        monkeypatch.setenv("MEMBERFLOW_WEB_TOKEN", "other")
    assert cli.main(["customer", "c1"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
