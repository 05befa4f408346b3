"""The broker's security settings reach every Kafka client: the workers' Faust app and the
CLI's kafka-python clients (topic creation, replay, tick). No SASL or TLS broker runs here, so
what is checked is the configuration each client is built with."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from memberflow import kafka as mf_kafka
from memberflow.app import faust_app
from memberflow.settings import Settings

SASL = {"broker_username": "shop", "broker_password": "s3cret"}


@pytest.mark.parametrize(
    ("values", "protocol"),
    [
        ({}, None),
        (SASL, "SASL_PLAINTEXT"),
        ({"broker_tls": True}, "SSL"),
        ({**SASL, "broker_tls": True}, "SASL_SSL"),
    ],
    ids=["plain", "sasl", "tls", "sasl-over-tls"],
)
def test_client_security_per_setting(values: dict[str, Any], protocol: str | None) -> None:
    options = mf_kafka.client_security(Settings(**values))
    assert options.get("security_protocol") == protocol
    assert isinstance(options.get("ssl_context"), ssl.SSLContext) == ("SSL" in (protocol or ""))
    if "SASL" in (protocol or ""):
        assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("PLAIN", "shop")
        assert options["sasl_plain_password"] == "s3cret"
    else:
        assert not any(key.startswith("sasl") for key in options)


def test_kafka_python_clients_accept_the_options() -> None:
    """The keyword names are kafka-python's (a typo would only show against a real broker)."""
    options = mf_kafka.client_security(Settings(**SASL, broker_tls=True))
    for client in (KafkaProducer, KafkaAdminClient):
        assert set(options) <= set(client.DEFAULT_CONFIG), client


def test_the_ca_file_is_the_trust_root(tmp_path: Path) -> None:
    """Loaded into the context (a file with no certificate in it fails there); a missing one
    is a settings error naming the variable."""
    empty = tmp_path / "ca.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        mf_kafka.broker_ssl_context(Settings(broker_tls=True, broker_ca_file=empty))
    with pytest.raises(ValueError, match="is not a readable file"):
        Settings(broker_tls=True, broker_ca_file=tmp_path / "missing.pem")


def test_the_admin_client_is_built_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, Any] = {}

    class Recording:
        def __init__(self, **config: Any) -> None:
            built.update(config)

    monkeypatch.setattr(mf_kafka, "KafkaAdminClient", Recording)
    monkeypatch.setattr(mf_kafka, "probe", lambda *args: None)
    mf_kafka.admin_client(Settings(**SASL))
    assert (built["security_protocol"], built["sasl_plain_username"]) == ("SASL_PLAINTEXT", "shop")


@pytest.mark.parametrize(
    ("values", "kind", "protocol"),
    [
        (SASL, faust.SASLCredentials, "SASL_PLAINTEXT"),
        ({**SASL, "broker_tls": True}, faust.SASLCredentials, "SASL_SSL"),
        ({"broker_tls": True}, faust.SSLCredentials, "SSL"),
    ],
    ids=["sasl", "sasl-over-tls", "tls"],
)
def test_the_workers_faust_app_gets_the_same(
    values: dict[str, Any], kind: type, protocol: str
) -> None:
    app = faust_app(Settings(**values), "t-security")
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, kind)
    assert credentials.protocol.value == protocol


def test_replicated_topics_need_two_in_sync_replicas() -> None:
    assert mf_kafka.topic_configs(1) == {}
    assert mf_kafka.topic_configs(2) == {}
    assert mf_kafka.topic_configs(3) == {"min.insync.replicas": "2"}


def test_ensure_topics_creates_them_with_those_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[Any] = []

    class Admin:
        def list_topics(self) -> list[str]:
            return [topic.name for topic in created]

        def create_topics(self, topics: list[Any]) -> None:
            created.extend(topics)

        def close(self) -> None:
            pass

    monkeypatch.setattr(mf_kafka, "admin_client", lambda settings: Admin())
    mf_kafka.ensure_topics(Settings(replication_factor=3))
    assert len(created) == 3
    assert {topic.replication_factor for topic in created} == {3}
    assert all(topic.topic_configs == {"min.insync.replicas": "2"} for topic in created)


SASL_TLS_ENV = {
    "MEMBERFLOW_BROKER_USERNAME": "shop",
    "MEMBERFLOW_BROKER_PASSWORD": "s3cret",
    "MEMBERFLOW_BROKER_TLS": "true",
}


def _sasl_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SASL_TLS_ENV.items():
        monkeypatch.setenv(name, value)
    # No broker here: topic creation and the TCP probe are the admin client's (tested above).
    monkeypatch.setattr(mf_kafka, "ensure_topics", lambda settings: None)
    monkeypatch.setattr(mf_kafka, "probe", lambda *args: None)


def test_tick_sends_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """`memberflow tick` builds its own producer: without the options it talked plaintext to a
    SASL broker (and the password would have gone in clear)."""
    import kafka

    from memberflow import cli

    built: dict[str, Any] = {}

    class Producer:
        def __init__(self, **config: Any) -> None:
            built.update(config)

        def partitions_for(self, topic: str) -> set[int]:
            return {0, 1}

        def send(self, *args: Any, **kwargs: Any) -> None:
            pass

        def flush(self) -> None:
            pass

        def close(self, timeout: float) -> None:
            pass

    _sasl_tls_env(monkeypatch)
    monkeypatch.setattr(kafka, "KafkaProducer", Producer)
    assert cli.main(["tick"]) == 0
    assert built["security_protocol"] == "SASL_SSL"
    assert (built["sasl_plain_username"], built["sasl_plain_password"]) == ("shop", "s3cret")
    assert isinstance(built["ssl_context"], ssl.SSLContext)


def test_replay_publishes_with_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memberflow import cli, replay

    history = tmp_path / "shop.csv"
    history.write_text("event_id,customer_id,occurred_at,amount\no-1,c-1,2026-06-01T10:00:00Z,10\n")
    used: dict[str, Any] = {}

    def publish(records: Any, servers: str, topic: str, **kwargs: Any) -> replay.ReplayStats:
        used.update(kwargs["security"])
        return replay.ReplayStats(published=len(list(records)), skipped_blank=0, seconds=0.1)

    _sasl_tls_env(monkeypatch)
    monkeypatch.setattr(replay, "publish", publish)
    assert cli.main(["replay", "--quiet", str(history)]) == 0
    assert used["security_protocol"] == "SASL_SSL"
    assert (used["sasl_plain_username"], used["sasl_plain_password"]) == ("shop", "s3cret")
