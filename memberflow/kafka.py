"""Kafka plumbing shared by the CLI and the worker: bootstrap parsing and topic creation."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from memberflow.settings import Settings
from streams.topics import TopicSpec, declared_topics


class BrokerUnreachable(RuntimeError):
    """The broker did not answer; the message names the URL and what to check."""


def bootstrap_servers(broker_url: str) -> list[str]:
    """`kafka://h1:9092;kafka://h2:9092` or `kafka://h1:9092,h2:9092` -> ["h1:9092", ...]."""
    servers = []
    for part in broker_url.replace(";", ",").split(","):
        part = part.strip()
        if "://" in part:
            part = part.split("://", 1)[1]
        if part:
            servers.append(part)
    if not servers:
        raise ValueError(f"no bootstrap servers in broker URL {broker_url!r}")
    return servers


# Said when a server accepted the TCP connection (probe passed) but the Kafka client still
# failed: after its whole timeout, without a word meanwhile.
def not_kafka_hint(tls: bool) -> str:
    base = "a server accepted the connection but did not answer as a Kafka broker: a wrong port"
    if tls:
        return f"{base}, a certificate it does not trust, or SASL credentials it refuses"
    return f"{base}, or a TLS listener (set MEMBERFLOW_BROKER_TLS)"


def probe(servers: list[str], bootstrap: str, timeout_s: float) -> None:
    """Fail fast, with the OS's reason, when no bootstrap server accepts a TCP connection
    (otherwise the Kafka client retries until its bootstrap timeout)."""
    if not servers:
        raise ValueError(f"no bootstrap servers in {bootstrap!r}")
    errors = []
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            host, port = server, "9092"
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except OSError as exc:
            errors.append(f"{server}: {exc.strerror or exc}")
    raise BrokerUnreachable(f"cannot reach the broker at {bootstrap}: {'; '.join(errors)}")


def topic_specs(settings: Settings) -> tuple[TopicSpec, ...]:
    return declared_topics(
        settings.purchases_topic,
        settings.notifications_topic,
        settings.dead_letter_topic,
        settings.partitions,
    )


def broker_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS to the broker, verified against MEMBERFLOW_BROKER_CA_FILE or the system's CAs."""
    cafile = str(settings.broker_ca_file) if settings.broker_ca_file else None
    return ssl.create_default_context(cafile=cafile)


def client_security(settings: Settings) -> dict[str, Any]:
    """kafka-python keyword arguments for the broker's security, the same for every client the
    CLI makes (topic creation, replay, tick) as for the workers (memberflow.app): SASL PLAIN
    when a user is set, TLS when MEMBERFLOW_BROKER_TLS; none for a plain broker. The workers
    used credentials the CLI's clients lacked, so against a SASL broker a worker stopped at its
    topic check before Faust started."""
    options: dict[str, Any] = {}
    sasl = settings.broker_username is not None and settings.broker_password is not None
    if settings.broker_tls:
        options["security_protocol"] = "SASL_SSL" if sasl else "SSL"
        options["ssl_context"] = broker_ssl_context(settings)
    elif sasl:
        options["security_protocol"] = "SASL_PLAINTEXT"
    if sasl:
        assert settings.broker_password is not None
        options["sasl_mechanism"] = "PLAIN"
        options["sasl_plain_username"] = settings.broker_username
        options["sasl_plain_password"] = settings.broker_password.get_secret_value()
    return options


def admin_client(settings: Settings, timeout_s: float = 15.0) -> KafkaAdminClient:
    servers = bootstrap_servers(settings.broker_url)
    probe(servers, settings.broker_url, timeout_s)
    try:
        return KafkaAdminClient(
            bootstrap_servers=servers,
            client_id=f"{settings.app_id}-admin",
            request_timeout_ms=int(timeout_s * 1000),
            **client_security(settings),
        )
    except (KafkaError, OSError) as exc:
        raise BrokerUnreachable(
            f"cannot reach the Kafka broker at {settings.broker_url} ({exc}); "
            f"{not_kafka_hint(settings.broker_tls)}? check MEMBERFLOW_BROKER_URL and that the "
            "broker is running"
        ) from exc


def topic_configs(replication_factor: int) -> dict[str, str]:
    """Configs of the topics memberflow creates. With three or more replicas a write must be
    on two before the broker acks it (producers use acks=all): with Kafka's default of one, a
    write acked by the leader alone was lost if that broker died before a follower copied it."""
    return {"min.insync.replicas": "2"} if replication_factor >= 3 else {}


def ensure_topics(
    settings: Settings, specs: Sequence[TopicSpec] | None = None, wait_s: float = 30.0
) -> None:
    """Create the topics memberflow uses if they are missing, and wait until they are visible.

    Existing topics are left as they are (their partition count is the operator's choice)."""
    specs = list(specs if specs is not None else topic_specs(settings))
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
                admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            settings.replication_factor,
                            topic_configs=topic_configs(settings.replication_factor) or None,
                        )
                        for spec in missing
                    ]
                )
        deadline = time.monotonic() + wait_s
        wanted = {spec.name for spec in specs}
        while not wanted <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"topics {sorted(wanted)} did not appear in {wait_s}s")
            time.sleep(0.2)
    finally:
        admin.close()
