"""The one-Redis batch scripts (SAVE_MANY_LUA, CONFIRM_MANY_LUA) against a real redis-server.

They take each row's fields as flat script arguments, by position: these tests hold every
position (version check, state, outbox, gap samples, id, due) with values that JSON would have
had to escape, and a chunk boundary (MANY_CHUNK writes per script call)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import cast

import pytest
from redis.exceptions import ResponseError

from memberflow.services import LocalRedis
from rules.customer import CustomerState
from state import keys
from state.redis_store import MANY_CHUNK, RedisStore, connect
from state.store import GapSample, TimerEntry, Write
from streams.events import Cause, Notification, NotificationType

pytestmark = pytest.mark.integration

ODD = 'baby "food" \\ bébé | 粉;:,{}[]'  # quotes, a backslash, non-ASCII, the text's separators


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(workdir=tmp_path_factory.mktemp("scripts-redis")) as running:
        yield running


def state_of(customer_id: str) -> CustomerState:
    return CustomerState(
        customer_id=customer_id,
        last_purchase_at=1_780_000_000,
        lifetime_orders=1,
        lifetime_spend=1234,
        categories={ODD: [1_780_000_000, 1]},
        tier="bronze",
    )


def note(customer_id: str) -> Notification:
    return Notification(
        notification_id=f"n-{customer_id}",
        type=NotificationType.LIFECYCLE_CHANGED,
        customer_id=customer_id,
        occurred_at=datetime(2026, 6, 1, tzinfo=UTC),
        cause=Cause(kind="event", id="e1"),
        policy_version="v1",
        summary=ODD,
        explanation={"why": ODD},
    )


def test_save_and_confirm_keep_every_field_of_every_row(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        store = RedisStore(connect(redis_server.url))
        await store.client.flushdb()
        count = MANY_CHUNK + 3  # two script calls
        ids = [f"c{i}" for i in range(count)]
        writes = [
            Write(
                customer_id=cid,
                expected_version=0,
                state=state_of(cid),
                outbox=(note(cid),) if i % 2 == 0 else (),
                timer=TimerEntry(i % 4, 1_790_000_000 + i) if i % 3 else TimerEntry(i % 4, None),
                gaps=(GapSample(ODD, 21, 1),) if i % 5 == 0 else (),
            )
            for i, cid in enumerate(ids)
        ]
        assert await store.save(writes) == dict.fromkeys(ids, 1)

        loaded = await store.load(ids)
        for i, cid in enumerate(ids):
            stored = loaded[cid]
            assert stored.version == 1
            assert stored.state == state_of(cid)
            assert stored.outbox == ((note(cid),) if i % 2 == 0 else ())
            assert stored.gaps == ((GapSample(ODD, 21, 1),) if i % 5 == 0 else ())
        # The index holds each customer with a due time on its shard, and no one else.
        for shard in range(4):
            indexed = cast(
                list[tuple[bytes, float]],
                await store.client.zrange(keys.timer_index(shard), 0, -1, withscores=True),
            )
            expected = {
                f"c{i}": 1_790_000_000 + i for i in range(count) if i % 4 == shard and i % 3
            }
            assert {m.decode(): int(s) for m, s in indexed} == expected

        # A stale expected version loses, a current one wins; the index only moves earlier.
        again = [
            Write(ids[1], 0, state_of(ids[1]), timer=TimerEntry(1, 1)),
            Write(ids[2], 1, state_of(ids[2]), (note(ids[2]),), TimerEntry(2, 1_900_000_000)),
        ]
        assert await store.save(again) == {ids[1]: None, ids[2]: 2}
        assert await store.client.zscore(keys.timer_index(1), ids[1]) == 1  # moved earlier
        assert await store.client.zscore(keys.timer_index(2), ids[2]) == 1_790_000_002

        # Confirm: an outbox is cleared only at the version it was produced for; exact times.
        await store.confirm(
            {ids[0]: 1, ids[2]: 1},  # c2 is at version 2 now: its record stays
            {ids[0]: TimerEntry(0, 1_800_000_000), ids[2]: TimerEntry(2, 1_900_000_000)},
        )
        after = await store.load([ids[0], ids[2]])
        assert after[ids[0]].outbox == () and after[ids[0]].gaps == ()
        assert after[ids[2]].outbox == (note(ids[2]),)
        assert await store.client.zscore(keys.timer_index(0), ids[0]) == 1_800_000_000
        assert await store.client.zscore(keys.timer_index(2), ids[2]) == 1_900_000_000
        await store.client.aclose()

    asyncio.run(scenario())


def test_scripts_are_loaded_again_where_redis_forgot_them(redis_server: LocalRedis) -> None:
    """A restarted Redis has no scripts: each batch step loads its script there and redoes
    the calls refused with NOSCRIPT, once; an error reply of another kind is still raised."""

    async def scenario() -> None:
        store = RedisStore(connect(redis_server.url))
        await store.client.flushdb()
        ids = [f"c{i}" for i in range(MANY_CHUNK + 3)]  # two script calls per step
        writes = [Write(cid, 0, state_of(cid), timer=TimerEntry(0, 5)) for cid in ids]
        assert await store.save(writes) == dict.fromkeys(ids, 1)
        await store.client.script_flush()
        again = [Write(cid, 1, state_of(cid), timer=TimerEntry(0, 5)) for cid in ids]
        assert await store.save(again) == dict.fromkeys(ids, 2)  # applied once each
        await store.client.script_flush()
        loaded = await store.load(ids)
        assert {cid: s.version for cid, s in loaded.items()} == dict.fromkeys(ids, 2)
        await store.client.set(keys.customer(ids[0]), "not a hash")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await store.load(ids)
        await store.client.aclose()

    asyncio.run(scenario())
