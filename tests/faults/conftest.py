"""Services for the fault tests: a broker, a redis-server with AOF fsynced on every write, and
worker processes, all stopped when the test ends (killed ones are reaped)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memberflow.services import LocalBroker, LocalRedis, WorkerProcess
from tests.faults.harness import FAULT_SETTINGS, fault_policy
from tests.integration.conftest import worker_env


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(workdir=tmp_path / "broker") as running:
        yield running


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    # appendfsync always: a write Redis acknowledged survives its kill -9, so state after a
    # restart is exactly what the workers were told. (See test_redis_restart.py for everysec.)
    with LocalRedis(workdir=tmp_path / "redis", appendonly=True, appendfsync="always") as running:
        yield running


@pytest.fixture
def policy(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "fault-policy.yaml"
    return path, fault_policy(path)


@pytest.fixture
def make_env(
    broker: LocalBroker, aof_redis: LocalRedis, policy: tuple[Path, dict[str, Any]]
) -> Callable[..., dict[str, str]]:
    """A worker/CLI environment; each call gets its own web port."""

    def make(**overrides: str) -> dict[str, str]:
        settings = {**FAULT_SETTINGS, "MEMBERFLOW_RULES_FILE": str(policy[0]), **overrides}
        return worker_env(broker, aof_redis, **settings)

    return make


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    made: list[WorkerProcess] = []

    def make(env: dict[str, str], name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(env, workdir=tmp_path / name, name=name)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.kill()  # nothing to verify any more: no graceful shutdown to wait for
