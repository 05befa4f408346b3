"""The one settings object: every URL, topic, and knob, read from MEMBERFLOW_* variables.

Built once at start-up and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What Kubernetes (service links, on by default) and `docker --link` put in a container's
# environment for a service or container named `memberflow`: not settings, and not refused,
# or a Service of that name would keep every worker from starting.
_SERVICE_LINK = re.compile(r"MEMBERFLOW_(PORT|SERVICE_\w+|PORT_\d+_(TCP|UDP|SCTP)\w*|NAME|ENV_\w+)")


def default_rules_file() -> Path:
    return Path(str(resources.files("rules").joinpath("default_policy.yaml")))


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read it: {error}") from None


class Settings(BaseSettings):
    """Operational settings. Domain thresholds live in the rules file, not here."""

    model_config = SettingsConfigDict(env_prefix="MEMBERFLOW_", frozen=True, extra="ignore")

    app_id: str = Field("memberflow", description="Kafka consumer group and Faust app id.")
    broker_url: str = Field(
        "kafka://127.0.0.1:9092", description="Kafka bootstrap servers, kafka://host:port[;...]."
    )
    broker_username: str | None = Field(None, description="SASL PLAIN user (None: no auth).")
    broker_password: SecretStr | None = Field(None, description="SASL PLAIN password.")
    broker_tls: bool = Field(
        False,
        description="Talk TLS to the broker (SASL_SSL with a user, else SSL); every client: "
        "workers, replay, tick, topic creation.",
    )
    broker_ca_file: Path | None = Field(
        None, description="CA bundle for the broker's TLS certificate (None: the system's)."
    )

    @field_validator("broker_ca_file")
    @classmethod
    def _readable_ca(cls, path: Path | None) -> Path | None:
        # Else the TLS setup failed later with a message blaming the broker's URL.
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (rediss:// = TLS).")
    redis_cluster: bool = Field(False, description="Talk to redis_url as a Redis Cluster.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        # Checked here so a typo is a settings error naming the variable, not a traceback from
        # redis-py at the first command.
        if url.split("://", 1)[0] not in ("redis", "rediss", "unix") or "://" not in url:
            raise ValueError(f"expected redis://, rediss:// or unix://, got {url!r}")
        try:
            urlsplit(url).port  # noqa: B018 - parsing it is the check
        except ValueError as exc:
            raise ValueError(f"{exc} in {url!r}") from None
        return url

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, url: str) -> str:
        for part in url.replace(";", ",").split(","):
            scheme = part.strip().split("://", 1)[0] if "://" in part else "kafka"
            if scheme != "kafka":
                raise ValueError(f"expected kafka://host:port[;...], got {url!r}")
        return url

    redis_password: SecretStr | None = Field(None, description="Redis password (AUTH).")
    web_host: str = Field("127.0.0.1", description="Bind address of the worker's HTTP views.")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the worker's HTTP views.")

    @field_validator("web_host")
    @classmethod
    def _ipv4_or_name(cls, host: str) -> str:
        # Faust's web server builds its URL from host:port and fails on an IPv6 literal with a
        # traceback about the port.
        if ":" in host:
            raise ValueError(f"an IPv4 address or a host name, not {host!r} (IPv6 literals fail)")
        return host

    web_token: SecretStr | None = Field(
        None,
        description="Bearer token required by every HTTP view except /health (the status page "
        "also takes ?token=). Required when web_host is not a loopback address.",
    )
    web_token_file: Path | None = Field(
        None,
        description="A file holding the web token (a Docker secret: compose mounts it at "
        "/run/secrets/web_token), read at start instead of MEMBERFLOW_WEB_TOKEN.",
    )

    @field_validator("web_token_file")
    @classmethod
    def _readable_token(cls, path: Path | None) -> Path | None:
        # Checked here, so that the error names this variable.
        if path is not None and not _read_token(path):
            raise ValueError(f"{path} is empty")
        return path

    @model_validator(mode="after")
    def _token_from_file(self) -> Settings:
        if self.web_token_file is None:
            return self
        if self.web_token is not None:
            raise ValueError("set MEMBERFLOW_WEB_TOKEN or MEMBERFLOW_WEB_TOKEN_FILE, not both")
        # Frozen model: set once here, at construction, like any other field.
        object.__setattr__(self, "web_token", SecretStr(_read_token(self.web_token_file)))
        return self

    purchases_topic: str = Field("purchases", description="Input topic, keyed by customer_id.")
    notifications_topic: str = Field("notifications", description="Output notifications topic.")
    dead_letter_topic: str = Field("purchases.dlq", description="Bad input, with the reason.")
    partitions: int = Field(6, ge=1, description="Partitions of the topics memberflow creates.")
    replication_factor: int = Field(
        1,
        ge=1,
        description="Replication of created topics (3 or more: min.insync.replicas 2 as well).",
    )
    rules_file: Path = Field(default_factory=default_rules_file, description="Policy YAML file.")
    clock: Literal["wall", "event"] = Field(
        "wall", description="wall: live time; event: time follows the largest event time seen."
    )
    batch_max: int = Field(2000, ge=1, description="Max events per processing batch.")
    batch_within_s: float = Field(
        0.0,
        ge=0,
        description="0: a batch is every event queued once the previous batch is done (under "
        "load they queue while it is processed); > 0: Faust's take, which waits this long for "
        "each batch to fill. Measured: 0 against 0.01 s, p50 produce->applied 3-12 ms lower, "
        "throughput no lower.",
    )
    broker_session_timeout_s: float = Field(10.0, gt=0, description="Consumer session timeout.")
    broker_rebalance_timeout_s: float = Field(10.0, gt=0, description="Group rebalance timeout.")
    broker_heartbeat_interval_s: float = Field(1.0, gt=0, description="Heartbeat interval.")
    broker_fetch_max_wait_ms: int = Field(
        10,
        ge=1,
        le=30000,
        description="Longest a fetch waits for data (Faust hard-codes 1500 ms; brokers that "
        "answer only when it runs out, like the embedded one, then add that to every event).",
    )
    redis_retry_max_backoff_s: float = Field(
        5.0, gt=0, description="Cap of the backoff while Redis is unreachable (retries forever)."
    )
    timer_poll_s: float = Field(1.0, gt=0, description="How often a worker looks for due timers.")
    timer_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of a worker's time that timer batches may take while events are "
        "flowing (a snapshot can wake every customer at once; events must not queue behind).",
    )
    timer_lateness_s: int = Field(
        3600,
        ge=0,
        description="event mode: timers fire once a partition's event time is this far past "
        "them, so late (out-of-order) purchases can still cancel them.",
    )
    learn_refresh_s: float = Field(
        60.0, gt=0, description="How often learned repurchase intervals are re-read."
    )
    snapshot_check_s: float = Field(
        30.0,
        gt=0,
        description="How often a worker checks whether a new snapshot is due (policy "
        "segments.snapshot_interval_minutes); one worker publishes it.",
    )
    stats_shards: int = Field(
        16,
        ge=1,
        le=1024,
        description="Shards of the population statistics in Redis (spreads the hot keys). "
        "Fixed for the life of the data.",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="Worker log level."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, level: object) -> object:
        return level.lower() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # A mistyped variable was silently ignored: MEMBERFLOW_WEB_TOKN=... served the HTTP
        # views without a token, and the worker said nothing.
        known = {f"MEMBERFLOW_{name.upper()}" for name in type(self).model_fields}
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith("MEMBERFLOW_")
            and name.upper() not in known
            and not _SERVICE_LINK.fullmatch(name.upper())
        )
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name.upper(), known, n=1)
                hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            raise ValueError(f"unknown setting {', '.join(hints)}: see the README, Configuration")
        return self
