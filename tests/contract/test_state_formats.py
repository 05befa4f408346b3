"""Customer states written by an earlier version (format 1: the dedup memory as a JSON object)
in a real redis-server: the engine reads them, still recognises every event they remember, and
rewrites them in the current format on the customer's next change."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from memberflow.engine import Engine
from memberflow.services import LocalRedis
from memberflow.settings import default_rules_file
from rules.customer import DAY, STATE_FORMAT, Seen, epoch, event_key
from rules.policy import parse_policy
from state import keys
from state.redis_store import RedisStore, connect
from tests.unit.test_engine import bought  # the engine tests' raw purchase message

pytestmark = pytest.mark.integration

POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))
WALL = epoch(datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(workdir=tmp_path_factory.mktemp("formats-redis")) as running:
        yield running


def test_format_1_states_are_read_deduplicated_and_rewritten(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        store = RedisStore(connect(redis_server.url))
        await store.client.flushdb()
        engine = Engine(store, POLICY, wall_clock=lambda: WALL)
        batch = [
            bought(0, "p1", "c1", WALL - 3 * DAY, "40"),
            bought(1, "p2", "c1", WALL - 2 * DAY, "60"),
            bought(2, "q1", "c2", WALL - DAY, "5"),
        ]
        await engine.confirm(await engine.process(batch))
        key = keys.customer("c1")
        written = json.loads(await store.client.hget(key, "s"))
        assert written["f"] == STATE_FORMAT and isinstance(written["s"], str)

        # What an earlier version wrote for the same history.
        legacy = {**written, "f": 1, "s": Seen(written["s"]).as_dict()}
        await store.client.hset(key, "s", json.dumps(legacy))
        version = int(await store.client.hget(key, "v"))

        again = await engine.process(batch)  # a redelivery: all of it remembered
        assert (again.applied, again.duplicates, again.notifications) == (0, 3, [])
        await engine.confirm(again)
        assert json.loads(await store.client.hget(key, "s"))["f"] == 1  # nothing written

        newer = await engine.process([bought(3, "p3", "c1", WALL, "10")])
        assert newer.applied == 1
        await engine.confirm(newer)
        assert int(await store.client.hget(key, "v")) == version + 1
        stored = json.loads(await store.client.hget(key, "s"))
        assert stored["f"] == STATE_FORMAT
        assert sorted(Seen(stored["s"]).as_dict()) == sorted(
            event_key(e) for e in ("p1", "p2", "p3")
        )
        assert stored["lo"] == 3 and stored["ls"] == 11000
        await store.close()

    asyncio.run(scenario())
