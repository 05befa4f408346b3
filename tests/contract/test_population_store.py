"""One contract for the population statistics (and the timer index) of a store, run against
MemoryStore and against RedisStore on a real redis-server (several stats shards, so sums and
rank searches cross shards).

The engine and the snapshot computation (memberflow.population) only rely on what is checked
here; the property at the end checks the whole path: contributions with re-deliveries and
versions out of order -> compute_snapshot == a batch computation over the latest contribution
of each customer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memberflow.population import PolicySuperseded, adopt_policy, compute_snapshot
from memberflow.services import LocalRedis
from memberflow.settings import default_rules_file
from rules.policy import Policy, parse_policy
from rules.segments import Values, batch_snapshot
from state import redis_store
from state.memory_store import MemoryStore
from state.redis_store import RedisStore, connect, stats_shard
from state.store import Contribution, GapSample, Store, TimerEntry, Write

SHARDS = 5
POLICY_TEXT = default_rules_file().read_text(encoding="utf-8")
StoreFactory = Callable[[], Store]
Body = Callable[[Store], Awaitable[None]]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    workdir: Path = tmp_path_factory.mktemp("contract-redis")
    with LocalRedis(workdir=workdir) as running:
        yield running


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.integration),
    ]
)
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """A factory of empty stores, to be called inside the test's event loop."""
    if request.param == "memory":
        return MemoryStore
    server: LocalRedis = request.getfixturevalue("redis_server")
    return lambda: RedisStore(connect(server.url), stats_shards=SHARDS)


def run(make: StoreFactory, body: Body) -> None:
    """Run `body` against a fresh, empty store in its own event loop."""

    async def main() -> None:
        store = make()
        if isinstance(store, RedisStore):
            await store.client.flushdb()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def collect(pages: AsyncIterator[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """Every (customer, partition) of a paged answer, sorted."""
    return sorted([entry async for page in pages for entry in page])


def contribution(
    customer_id: str,
    version: int,
    r: int = 1_700_000_000,
    f: int = 1,
    m: int = 1_000,
    partition: int = 0,
    tier: str = "member",
    segment: str = "",
    grade: str = "",
    stage: str = "new",
) -> Contribution:
    return Contribution(customer_id, version, partition, r, f, m, tier, segment, grade, stage)


# -- contribute: idempotent by version ------------------------------------------------------


def test_contribute_is_idempotent_by_version(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        first = contribution(
            "a", 2, r=100, f=3, m=500, tier="silver", segment="general_value", grade="B"
        )
        await store.contribute([first])
        await store.contribute([contribution("b", 1, r=50, f=1, m=100)])
        state = (await store.population(), await store.distribution())
        assert state == (
            (2, {"r": 150, "f": 4, "m": 600}),
            {
                "grade:B": 1,
                "segment:general_value": 1,
                "stage:new": 2,
                "tier:member": 1,
                "tier:silver": 1,
            },
        )
        # The same version again (a redelivery) and an older one change nothing.
        await store.contribute([first])
        await store.contribute([contribution("a", 2, r=999, f=99, m=9_999, tier="gold")])
        await store.contribute([contribution("a", 1, r=1, f=1, m=1, tier="platinum")])
        assert (await store.population(), await store.distribution()) == state
        assert await store.count_at_most("f", [3, 99]) == [2, 2]
        assert await collect(store.unclassified()) == [("b", 0)]
        # A newer version replaces sums, ranks and every label; no label is left at zero.
        await store.contribute(
            [contribution("a", 5, r=70, f=0, m=0, partition=3, tier="member", stage="active")]
        )
        assert await store.population() == (2, {"r": 120, "f": 1, "m": 100})
        assert await store.distribution() == {"stage:active": 1, "stage:new": 1, "tier:member": 2}
        assert await store.count_at_most("r", [49, 50, 69, 70]) == [0, 1, 1, 2]
        assert await collect(store.unclassified()) == [("a", 3), ("b", 0)]

    run(make_store, body)


def test_several_versions_of_a_customer_in_one_batch(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        await store.contribute(
            [
                contribution("a", 3, f=3, m=300, tier="gold"),
                contribution("a", 1, f=1, m=100, tier="member"),
                contribution("a", 4, f=4, m=400, tier="platinum"),
                contribution("a", 2, f=2, m=200, tier="silver"),
                contribution("a", 4, f=9, m=900, tier="member"),
            ]
        )
        assert await store.population() == (1, {"r": 1_700_000_000, "f": 4, "m": 400})
        assert await store.distribution() == {"stage:new": 1, "tier:platinum": 1}

    run(make_store, body)


def test_population_sums_over_every_customer(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.population() == (0, {"r": 0, "f": 0, "m": 0})
        batch = [
            contribution(f"c{i}", 1, r=1_700_000_000 + i, f=i % 7, m=i * 1_001) for i in range(40)
        ]
        # Spread over more than one stats shard in the Redis store.
        assert len({stats_shard(c.customer_id, SHARDS) for c in batch}) > 1
        await store.contribute(batch[:25])
        await store.contribute(batch[25:])
        assert await store.population() == (
            40,
            {
                "r": sum(c.r for c in batch),
                "f": sum(c.f for c in batch),
                "m": sum(c.m for c in batch),
            },
        )

    run(make_store, body)


def test_count_at_most(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.count_at_most("m", [0, 10**12]) == [0, 0]
        await store.contribute(
            [contribution(f"c{i}", 1, f=f, m=f * 100) for i, f in enumerate([0, 1, 1, 2, 5, 5, 5])]
        )
        assert await store.count_at_most("f", [-1, 0, 1, 2, 3, 4, 5, 6]) == [0, 1, 3, 4, 4, 4, 7, 7]
        assert await store.count_at_most("m", [99, 100, 2**62]) == [1, 3, 7]
        assert await store.count_at_most("r", [1_699_999_999, 1_700_000_000]) == [0, 7]
        assert await store.count_at_most("f", []) == []

    run(make_store, body)


def test_customers_between_is_low_exclusive_high_inclusive(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        await store.contribute([contribution(f"c{f}", 1, f=f, partition=f % 3) for f in range(10)])

        async def between(low: float, high: float) -> list[tuple[str, int]]:
            return await collect(store.customers_between("f", low, high))

        assert await between(2, 5) == [("c3", 0), ("c4", 1), ("c5", 2)]
        assert await between(2.5, 4.5) == [("c3", 0), ("c4", 1)]
        assert await between(4, 4) == []
        assert await between(3.999, 4) == [("c4", 1)]
        assert await between(float("-inf"), 1) == [("c0", 0), ("c1", 1)]
        assert await between(8, float("inf")) == [("c9", 0)]
        assert await between(100, 200) == []
        everyone = await between(float("-inf"), float("inf"))
        assert everyone == sorted((f"c{f}", f % 3) for f in range(10))
        # A newer contribution moves the customer (and its partition) for every dimension.
        await store.contribute([contribution("c3", 2, f=7, partition=2)])
        assert await between(2, 5) == [("c4", 1), ("c5", 2)]
        assert await between(6, 7) == [("c3", 2), ("c7", 1)]

    run(make_store, body)


def test_unclassified_tracks_customers_without_a_segment(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await collect(store.unclassified()) == []
        await store.contribute(
            [
                contribution("a", 1, partition=1),
                contribution("b", 1, partition=2),
                contribution("c", 1, partition=0, segment="general_value", grade="B"),
            ]
        )
        assert await collect(store.unclassified()) == [("a", 1), ("b", 2)]
        await store.contribute([contribution("a", 2, partition=1, segment="important_value")])
        assert await collect(store.unclassified()) == [("b", 2)]
        await store.contribute([contribution("a", 1, partition=1)])  # stale: ignored
        assert await collect(store.unclassified()) == [("b", 2)]
        await store.contribute([contribution("c", 2, partition=0)])  # segment cleared
        assert await collect(store.unclassified()) == [("b", 2), ("c", 0)]

    run(make_store, body)


def test_distribution_counts_labels(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.distribution() == {}
        await store.contribute(
            [
                contribution("a", 1, tier="gold", segment="important_value", grade="A"),
                contribution("b", 1, tier="gold", segment="general_value", grade="B"),
                contribution("c", 1, tier="member", stage="churned"),
            ]
        )
        assert await store.distribution() == {
            "grade:A": 1,
            "grade:B": 1,
            "segment:general_value": 1,
            "segment:important_value": 1,
            "stage:churned": 1,
            "stage:new": 2,
            "tier:gold": 2,
            "tier:member": 1,
        }

    run(make_store, body)


# -- snapshots and wake-ups -----------------------------------------------------------------


def document(version: int) -> str:
    return json.dumps({"version": version, "published_at": 0, "customers": version})


def test_publish_snapshot_only_moves_forward(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.snapshot() is None
        assert await store.snapshot_version() == 0
        assert await store.publish_snapshot(1, document(1)) is True
        assert (await store.snapshot(), await store.snapshot_version()) == (document(1), 1)
        assert await store.publish_snapshot(1, document(1)) is False
        assert await store.publish_snapshot(3, document(3)) is True
        assert await store.publish_snapshot(2, document(2)) is False
        assert (await store.snapshot(), await store.snapshot_version()) == (document(3), 3)
        assert await store.publish_snapshot(4, document(4)) is True
        assert await store.snapshot_version() == 4

    run(make_store, body)


def test_the_snapshot_whose_wake_ups_finished_is_recorded(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.snapshot_woken() is None
        await store.set_snapshot_woken(3)
        assert await store.snapshot_woken() == 3

    run(make_store, body)


def test_a_policy_version_replaced_is_superseded_and_never_adopted_back(
    make_store: StoreFactory,
) -> None:
    """A rolling restart: old workers (v1) and new ones (v2) check the stored version in
    turns. v2 adopted, v1 is superseded: an old worker neither adopts it back nor wakes the
    shop again (they used to take turns, every check)."""

    def policy(version: str) -> Policy:
        return parse_policy(POLICY_TEXT.replace('version: "2026.11-1"', f'version: "{version}"'))

    async def body(store: Store) -> None:
        await store.contribute([contribution("a", 1), contribution("b", 1, partition=1)])
        assert await adopt_policy(store, policy("v1")) == 2
        assert await store.policy_superseded("v1") is False
        assert await adopt_policy(store, policy("v1")) is None
        settled = {"a": TimerEntry(0, 5_000), "b": TimerEntry(1, 9_000)}
        await store.confirm({}, settled)  # the wake-ups handled: exact entries again
        assert await adopt_policy(store, policy("v2")) == 2
        assert await store.policy_version() == "v2"
        assert await store.policy_superseded("v1") is True
        assert await store.policy_superseded("v2") is False
        await store.confirm({}, settled)
        with pytest.raises(PolicySuperseded, match="'v1' was superseded by 'v2'"):
            await adopt_policy(store, policy("v1"))
        assert await store.policy_version() == "v2"
        assert [await store.due(shard, 0, 10) for shard in (0, 1)] == [[], []]  # no wake
        assert await adopt_policy(store, policy("v2")) is None
        assert await adopt_policy(store, policy("v3")) == 2
        assert [await store.policy_superseded(v) for v in ("v1", "v2", "v3")] == [1, 1, 0]

    run(make_store, body)


@pytest.mark.integration
def test_a_lock_is_released_only_by_its_holder(redis_server: LocalRedis) -> None:
    """A holder whose work outlived the lock's TTL must not, when it finishes, delete the lock
    another worker took since (it used to DEL whatever was there). Redis only: a MemoryStore
    serves one process and excludes nothing."""

    async def body(store: Store) -> None:
        assert isinstance(store, RedisStore)
        other = RedisStore(store.client, stats_shards=SHARDS)
        assert await store.try_lock(1)
        assert not await other.try_lock(30)
        await asyncio.sleep(1.2)  # the TTL runs out while the first holder still works
        assert await other.try_lock(30)
        await store.unlock()  # late: not its lock any more
        assert not await store.try_lock(30)
        await other.unlock()
        assert await store.try_lock(30)
        await store.unlock()

    run(lambda: RedisStore(connect(redis_server.url), stats_shards=SHARDS), body)


def test_wake_indexes_customers_at_zero(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        await store.wake([])
        await store.confirm({}, {"a": TimerEntry(1, 5_000), "b": TimerEntry(1, 9_000)})
        await store.wake([("a", 1), ("c", 1), ("d", 2)])
        assert await store.due(1, 0, 10) == ["a", "c"]
        assert await store.due(1, 10_000, 10) == ["a", "c", "b"]
        assert await store.due(2, 0, 10) == ["d"]
        assert await store.next_due_in(1) == 0
        assert await store.next_due_in(2) == 0
        assert await store.due(0, 10_000, 10) == []
        # The oldest real due time skips the wake-ups ("a" now waits at 0, "b" at 9,000).
        assert await store.oldest_due([0, 1, 2]) == {0: None, 1: 9_000, 2: None}

    run(make_store, body)


def test_index_writes_follow_only_the_version_they_were_computed_from(
    make_store: StoreFactory,
) -> None:
    """Two workers on one partition for a while (a rebalance whose old owner's broker acks
    stalled): the old owner's late confirm, and its unindex of a customer it found with no
    timer left, must not undo what the new owner indexed for a newer state of that customer
    (a reminder would fire late, or never)."""
    from rules.customer import CustomerState

    def write(version: int, due: int) -> Write:
        return Write("x", version, CustomerState(customer_id="x"), timer=TimerEntry(1, due))

    async def body(store: Store) -> None:
        assert await store.save([write(0, 60_000)]) == {"x": 1}  # old owner: not confirmed yet
        assert await store.save([write(1, 15_000)]) == {"x": 2}  # new owner
        await store.confirm({}, {"x": TimerEntry(1, 15_000, 2)})
        await store.confirm({"x": 1}, {"x": TimerEntry(1, 60_000, 1)})  # the old owner, late
        assert await store.next_due_in(1) == 15_000
        await store.confirm({}, {"x": TimerEntry(1, 20_000, 2)})  # at its version: exact
        assert await store.next_due_in(1) == 20_000
        await store.unindex(1, {"x": 1})  # found with nothing to fire at an older version
        assert await store.next_due_in(1) == 20_000
        await store.unindex(1, {"x": 2})
        assert await store.next_due_in(1) is None
        await store.wake([("y", 1)])  # no record: version 0
        await store.unindex(1, {"y": 0})
        assert await store.next_due_in(1) is None

    run(make_store, body)


@pytest.mark.integration
def test_bulk_answers_come_in_slices(
    redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first snapshot or a new policy names every customer. RedisStore answers in pages of
    BULK_SLICE, one command per slice, each awaited on its own, so neither side holds the whole
    shop and the event loop the worker's batches run in gets a turn between slices (one
    pipeline of a command per customer held it for 42 ms at 4,000 customers). Checked with
    3-member slices on 2 shards: page sizes, Redis's own command counts, and turns of a
    coroutine that only counts while the bulk work runs."""
    monkeypatch.setattr(redis_store, "BULK_SLICE", 3)
    everyone = [(f"c{i:02}", i % 2) for i in range(20)]

    async def main() -> None:
        store = RedisStore(connect(redis_server.url), stats_shards=2)
        await store.client.flushdb()
        try:
            await store.contribute(
                [contribution(c, 1, f=i, partition=p) for i, (c, p) in enumerate(everyone)]
            )
            turns = 0
            done = asyncio.Event()

            async def count_turns() -> None:
                nonlocal turns
                while not done.is_set():
                    turns += 1
                    await asyncio.sleep(0)

            counter = asyncio.create_task(count_turns())
            await store.client.config_resetstat()
            pages: dict[str, list[list[tuple[str, int]]]] = {
                "all": [page async for page in store.all_customers()],
                "between": [page async for page in store.customers_between("f", -1, 100)],
                "unclassified": [page async for page in store.unclassified()],
            }
            for page in pages["all"]:
                await store.wake(page)
            done.set()
            await counter
            for name, found in pages.items():
                assert sorted(e for page in found for e in page) == everyone, name
                assert all(1 <= len(page) <= 3 for page in found), name
            assert await store.due(0, 0, 100) == [c for c, p in everyone if p == 0]
            assert await store.due(1, 0, 100) == [c for c, p in everyone if p == 1]
            stats = await store.client.info("commandstats")
            # One HMGET per page that needs partitions looked up, one ZADD per partition of a
            # page woken, no command per customer.
            assert stats["cmdstat_hmget"]["calls"] == len(pages["between"]) + len(
                pages["unclassified"]
            )
            assert stats["cmdstat_zadd"]["calls"] == sum(
                len({p for _, p in page}) for page in pages["all"]
            )
            assert "cmdstat_hget" not in stats
            assert turns >= sum(len(found) for found in pages.values())
        finally:
            await store.close()

    asyncio.run(main())


# -- the property: incremental statistics == a batch computation ----------------------------

CUSTOMERS = [f"cust-{i}" for i in range(12)]


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[list[Contribution]], list[Values]]:
    """Versions 1..k of some customers' contributions, delivered in random order, some more
    than once, in random batches; and the values of each customer's latest version."""
    customers = draw(st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=12, unique=True))
    r_values = st.integers(1_600_000_000, 1_800_000_000) | st.sampled_from(
        [1_700_000_000, 1_700_000_001]
    )
    f_values = st.integers(0, 30) | st.sampled_from([0, 1, 2])
    m_values = st.integers(0, 10**10) | st.sampled_from([0, 99_999])
    all_versions: list[Contribution] = []
    latest: list[Values] = []
    for cid in customers:
        count = draw(st.integers(1, 4))
        versions = [
            contribution(
                cid,
                v,
                r=draw(r_values),
                f=draw(f_values),
                m=draw(m_values),
                partition=draw(st.integers(0, 5)),
                tier=draw(st.sampled_from(["member", "silver", "gold"])),
                segment=draw(st.sampled_from(["", "important_value", "general_win_back"])),
            )
            for v in range(1, count + 1)
        ]
        all_versions.extend(versions)
        latest.append(Values(r=versions[-1].r, f=versions[-1].f, m=versions[-1].m))
    redelivered = draw(st.lists(st.sampled_from(all_versions), max_size=10))
    order = draw(st.permutations(all_versions + redelivered))
    cuts = sorted(draw(st.lists(st.integers(0, len(order)), max_size=4)))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    return [b for b in batches if b], latest


def check_snapshot_equals_batch(
    make: StoreFactory, case: tuple[list[list[Contribution]], list[Values]]
) -> None:
    batches, latest = case

    async def body(store: Store) -> None:
        for batch in batches:
            await store.contribute(batch)
        incremental = await compute_snapshot(store, version=9, published_at=123)
        assert incremental is not None
        reference = batch_snapshot(latest, version=9, published_at=123)
        assert incremental.customers == reference.customers == len(latest)
        assert incremental.cuts == reference.cuts
        for d in "rfm":
            assert incremental.means[d] == pytest.approx(reference.means[d], rel=1e-9, abs=0)
            assert incremental.mean_scores[d] == pytest.approx(
                reference.mean_scores[d], rel=1e-9, abs=0
            )

    run(make, body)


@settings(
    max_examples=60,
    deadline=None,
    # make_store only hands out a factory: every example builds (and empties) its own store.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=deliveries())
def test_compute_snapshot_equals_a_batch_snapshot_of_the_latest_contributions(
    make_store: StoreFactory, case: tuple[list[list[Contribution]], list[Values]]
) -> None:
    check_snapshot_equals_batch(make_store, case)


def test_compute_snapshot_of_an_empty_store(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await compute_snapshot(store, version=1, published_at=0) is None

    run(make_store, body)


def test_gap_samples_wait_in_the_record_and_are_counted_once(make_store: StoreFactory) -> None:
    """Gap samples are written with the state (so a crash before they are counted loses none),
    counted by the customer's contribution (samples newer than its previous contribution), once
    however often a contribution repeats, and cleared by confirm."""
    from dataclasses import replace

    from rules.customer import CustomerState

    state = CustomerState(customer_id="c1", tier="member")

    async def body(store: Store) -> None:
        first = (GapSample("formula", 14, 1), GapSample("formula", 20, 1))
        assert await store.save([Write("c1", 0, state, gaps=first)]) == {"c1": 1}
        assert (await store.load(["c1"]))["c1"].gaps == first
        assert await store.gap_histograms(["formula"]) == {"formula": {}}

        one = replace(contribution("c1", 1), gaps=first)
        await store.contribute([one])
        await store.contribute([one])  # repeated (a crash before confirm): nothing twice
        assert await store.gap_histograms(["formula"]) == {"formula": {14: 1, 20: 1}}

        # Version 2 written while version 1's samples were still pending (the crash came after
        # contributing, before confirm cleared them): the record carries both; only version
        # 2's samples are new to the histogram.
        both = (*first, GapSample("formula", 14, 2), GapSample("toys", 30, 2))
        assert await store.save([Write("c1", 1, state, gaps=both)]) == {"c1": 2}
        await store.contribute([replace(contribution("c1", 2), gaps=both)])
        await store.confirm({"c1": 2}, {})
        assert await store.gap_histograms(["formula", "toys", "books"]) == {
            "formula": {14: 2, 20: 1},
            "toys": {30: 1},
            "books": {},
        }
        assert (await store.load(["c1"]))["c1"].gaps == ()

    run(make_store, body)
