"""docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead:
the services the stack promises, pinned images, and that every MEMBERFLOW_* variable it sets
is a real setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from memberflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET_MOUNT = "/run/secrets/web_token"  # where compose mounts the web_token secret


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_stack_has_the_promised_services_with_pinned_images() -> None:
    services = _compose()["services"]
    assert {"kafka", "redis", "worker-1", "worker-2", "shop", "prometheus"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--save") + 1] == ""  # no RDB: a failed save refuses writes
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    for name, service in services.items():
        if service["image"].startswith("memberflow:"):
            continue  # built from this repository
        repository, _, tag = service["image"].rpartition(":")
        assert repository and tag not in ("", "latest"), f"{name} must pin its image tag"


def test_every_memberflow_variable_is_a_setting(tmp_path: Path) -> None:
    fields = {f"MEMBERFLOW_{name.upper()}" for name in Settings.model_fields}
    used = set()
    for service in _compose()["services"].values():
        used |= {key for key in (service.get("environment") or {}) if key.startswith("MEMBERFLOW_")}
    assert used, "the workers must be configured through MEMBERFLOW_* variables"
    assert used <= fields, used - fields
    # and the values parse as settings (the token file is compose's secret: a stand-in here)
    env = dict(_compose()["services"]["worker-1"]["environment"])
    assert env["MEMBERFLOW_WEB_TOKEN_FILE"] == SECRET_MOUNT
    token = tmp_path / "web_token"
    token.write_text("a-token\n")
    env["MEMBERFLOW_WEB_TOKEN_FILE"] = str(token)
    settings = Settings(**{k.removeprefix("MEMBERFLOW_").lower(): v for k, v in env.items()})
    assert settings.web_host == "0.0.0.0"
    assert settings.web_token is not None and settings.web_token.get_secret_value() == "a-token"


def test_the_web_token_is_one_secret_outside_git_and_the_image() -> None:
    """Workers, the demo shop (it builds the same settings) and Prometheus share compose's
    web_token secret; its file is ignored by git and by the image's build context."""
    compose = _compose()
    assert compose["secrets"]["web_token"] == {"file": "./secrets/web_token"}
    for name in ("worker-1", "worker-2", "shop", "prometheus"):
        assert compose["services"][name]["secrets"] == ["web_token"], name
    assert compose["services"]["shop"]["environment"]["MEMBERFLOW_WEB_TOKEN_FILE"] == SECRET_MOUNT
    scrape = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"] == {"type": "Bearer", "credentials_file": SECRET_MOUNT}
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()
    for text in (ROOT / "docker-compose.yml", ROOT / "ops" / "prometheus.yml"):
        assert "MEMBERFLOW_WEB_TOKEN:" not in text.read_text()
        assert "credentials:" not in text.read_text()


def test_prometheus_scrapes_both_workers() -> None:
    config = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["worker-1:6066", "worker-2:6066"]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"MEMBERFLOW_{name.upper()}"
        for name in Settings.model_fields
        if f"`MEMBERFLOW_{name.upper()}`" not in readme
    ]
    assert missing == []
