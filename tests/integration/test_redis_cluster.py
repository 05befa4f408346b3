"""The same history against a real three-node Redis Cluster gives the export a batch
computation gives (and so the same as against one Redis, which test_end_to_end checks): no
script crosses a hash slot, and scripts are pipelined per node."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from memberflow.engine import Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.services import LocalBroker, LocalRedisCluster
from memberflow.settings import default_rules_file
from memberflow.synthetic import add_noise, generate_history, write_csv
from rules.customer import CustomerState
from rules.policy import parse_policy
from state import keys
from state.redis_store import PackingConnection, RedisStore, connect
from state.store import TimerEntry, Write
from streams.codec import encode_model
from streams.events import Cause, Notification, NotificationType, Purchase
from tests.integration.conftest import run_cli, worker_env
from tests.oracle import batch_export, valid_rows

pytestmark = pytest.mark.integration

FIELDS = (
    "customer_id",
    "first_purchase_at",
    "last_purchase_at",
    "recency_days",
    "frequency",
    "monetary",
    "lifetime_orders",
    "lifetime_spend",
    "tier",
)


@pytest.mark.timeout(300)
def test_cluster_export_equals_batch_computation(
    tmp_path: Path, broker: LocalBroker, make_worker: Any
) -> None:
    rows = generate_history(customers=150, start=datetime(2025, 6, 1, tzinfo=UTC), days=400)
    noisy = [
        e
        for e in add_noise(rows, seed=5, duplicates=40, bad=0, shuffle_window=10)
        if isinstance(e, dict)
    ]
    write_csv(noisy, tmp_path / "history.csv")
    with LocalRedisCluster(workdir=tmp_path / "cluster") as cluster:
        env = worker_env(broker, cluster, MEMBERFLOW_CLOCK="event", MEMBERFLOW_REDIS_CLUSTER="true")
        worker = make_worker(env)
        worker.start()
        assert run_cli(env, "replay", "--quiet", str(tmp_path / "history.csv")).returncode == 0
        worker.wait_for_events(len(noisy))
        published = run_cli(env, "segments", "--publish", "--json")
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["snapshot"]["customers"] == 150
        exported = run_cli(env, "export")
        assert exported.returncode == 0, exported.stderr
        docs = [json.loads(line) for line in exported.stdout.splitlines()]

    accepted = valid_rows(noisy, datetime.now(UTC))
    as_of = max(datetime.fromisoformat(r["occurred_at"].replace("Z", "+00:00")) for r in accepted)
    expected = batch_export(accepted, as_of=as_of)
    actual = {d["customer_id"]: {f: d[f] for f in FIELDS} for d in docs}
    assert actual == expected


def test_node_clients_pack_with_hiredis(tmp_path: Path) -> None:
    """The per-node clients the batch scripts go through use the same packer as one Redis."""

    async def node_connection_classes(url: str) -> set[type]:
        store = RedisStore(connect(url, cluster=True))
        classes = set()
        for customer in ("alice", "bob", "carol", "dave", "erin", "frank"):
            node = await store._node_client(f"mf:{{c:{customer}}}")
            classes.add(node.connection_pool.connection_class)
            assert await node.ping()
        await store.close()
        return classes

    with LocalRedisCluster(workdir=tmp_path / "cluster") as cluster:
        assert asyncio.run(node_connection_classes(cluster.url)) == {PackingConnection}


def test_timer_index_on_a_cluster(tmp_path: Path) -> None:
    """A batch's timer index entries: written before the states (only ever earlier), then set
    exactly by confirm, each in its partition's index, for customers spread over the nodes."""
    customers = [f"cust-{n}" for n in range(12)]  # hash slots on all three nodes

    def write(cid: str, version: int, shard: int, due: int | None) -> Write:
        return Write(cid, version, CustomerState(customer_id=cid), timer=TimerEntry(shard, due))

    async def scenario(url: str) -> None:
        store = RedisStore(connect(url, cluster=True))
        shard_of = {cid: n % 3 for n, cid in enumerate(customers)}
        saved = await store.save(
            [write(c, 0, shard_of[c], 1_000 + n) for n, c in enumerate(customers)]
        )
        assert all(v == 1 for v in saved.values())
        for shard in range(3):  # indexed before confirm, each in its own partition's index
            assert await store.due(shard, 10_000, 100) == [
                c for c in customers if shard_of[c] == shard
            ]
        # A later due time at save does not move an entry (LT); an earlier one does.
        late, early = customers[0], customers[1]
        await store.save(
            [write(late, 1, shard_of[late], 5_000), write(early, 1, shard_of[early], 10)]
        )
        assert await store.due(shard_of[late], 1_000, 100) == [late]
        assert await store.due(shard_of[early], 10, 100) == [early]
        # confirm sets the exact time, later or not; no due time leaves the entry alone.
        await store.confirm(
            {},
            {
                late: TimerEntry(shard_of[late], 5_000),
                customers[2]: TimerEntry(shard_of[customers[2]], None),
            },
        )
        assert late not in await store.due(shard_of[late], 4_999, 100)
        assert late in await store.due(shard_of[late], 5_000, 100)
        assert customers[2] in await store.due(shard_of[customers[2]], 1_002, 100)
        # A confirm computed from an older version than the customer's (a partition's old
        # owner, late) leaves the entry no later than it was: here woken (0), as the index and
        # the hash are on different slots; one at the current version sets it exactly.
        shard = shard_of[late]
        await store.confirm({}, {late: TimerEntry(shard, 9_000, 1)})
        assert late in await store.due(shard, 5_000, 100)
        await store.confirm({}, {late: TimerEntry(shard, 7_000, 2)})
        assert late not in await store.due(shard, 6_999, 100)
        # Unindexing likewise: only at the version found with nothing left to fire.
        await store.unindex(shard, {late: 1})
        assert late in await store.due(shard, 7_000, 100)
        await store.unindex(shard, {late: 2})
        assert late not in await store.due(shard, 10**10, 100)
        await store.close()

    with LocalRedisCluster(workdir=tmp_path / "cluster") as cluster:
        asyncio.run(scenario(cluster.url))


def move_slot(cluster: LocalRedisCluster, key: str) -> int:
    """Reshard: move `key`'s slot, with its keys, to another node, as `redis-cli --cluster
    reshard` does (IMPORTING, MIGRATING, MIGRATE, then NODE everywhere). Returns the port of
    the new owner."""
    slot = key_slot(key.encode())
    nodes = {port: redis.Redis(port=port) for port in cluster.ports}
    ids = {port: node.execute_command("CLUSTER MYID").decode() for port, node in nodes.items()}
    first = next(iter(nodes.values()))
    source = next(
        owners[0][1]
        for start, end, *owners in first.execute_command("CLUSTER SLOTS")
        if start <= slot <= end
    )
    target = next(port for port in nodes if port != source)
    nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    nodes[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    names = nodes[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
    nodes[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *names)
    for node in nodes.values():
        node.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        node.close()
    return target


NOTE = Notification(
    notification_id="n-1",
    type=NotificationType.TIER_UPGRADED,
    customer_id="cust-1",
    occurred_at=datetime(2026, 6, 1, tzinfo=UTC),
    cause=Cause(kind="event", id="e-1"),
    policy_version="v1",
    summary="up",
    explanation={},
)


def test_scripts_follow_a_slot_moved_to_another_node(tmp_path: Path) -> None:
    """Resharding under a running worker: the batch scripts (load, save, confirm's outbox
    clear) go to the node the store last knew, which answers MOVED; the store re-reads the
    slot map and redoes just those calls instead of failing the batch (which stopped the
    worker)."""
    cid = "cust-1"

    async def scenario(cluster: LocalRedisCluster) -> None:
        store = RedisStore(connect(cluster.url, cluster=True))
        first = Write(cid, 0, CustomerState(customer_id=cid, lifetime_orders=1))
        assert await store.save([first]) == {cid: 1}
        move_slot(cluster, keys.customer(cid))
        # Nothing has read the new slot map yet: each call goes to the old node first.
        assert (await store.load([cid]))[cid].version == 1
        move_slot(cluster, keys.customer(cid))
        second = Write(cid, 1, CustomerState(customer_id=cid, lifetime_orders=2), (NOTE,))
        assert await store.save([second]) == {cid: 2}  # applied once: version 1 -> 2
        assert (await store.load([cid]))[cid].outbox == (NOTE,)
        target = move_slot(cluster, keys.customer(cid))
        await store.confirm({cid: 2}, {})
        on_target = redis.Redis(port=target)
        assert on_target.hget(keys.customer(cid), "v") == b"2"
        on_target.close()
        stored = (await store.load([cid]))[cid]
        assert (stored.version, stored.state and stored.state.lifetime_orders) == (2, 2)
        assert stored.outbox == ()
        await store.close()

    with LocalRedisCluster(workdir=tmp_path / "cluster") as cluster:
        asyncio.run(scenario(cluster))


def _master_of(cluster: LocalRedisCluster, key: str) -> int:
    """The port of the master serving `key`'s slot, as the live nodes see it."""
    slot = key_slot(key.encode())
    for node in cluster.nodes:
        if not node.running:
            continue
        with redis.Redis(port=node.port) as client:
            if client.info("replication")["role"] != "master":
                continue
            for start, end, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(owner[1])
    raise AssertionError(f"no master serves {key}")


def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.timeout(180)
def test_a_running_worker_follows_a_failed_over_master(tmp_path: Path) -> None:
    """A customer's master dies and its replica takes over. The batch scripts go to the node
    the store last knew; a dead node answers no MOVED, so the slot map was never read again
    and the worker retried the dead node forever (nothing else it sent touched that node).
    Now a connection error re-reads the map, and the engine's retry reaches the new master."""
    global_keys = [
        keys.snapshot_version(),
        keys.snapshot(),
        keys.policy_version(),
        keys.event_clock(),
        keys.snapshot_lock(),
    ]

    async def scenario(cluster: LocalRedisCluster) -> None:
        # A customer whose master holds none of the keys the engine reads through the cluster
        # client itself (which refreshes its map on its own errors).
        cid, victim = next(
            (cid, port)
            for cid in (f"cust-{n}" for n in range(200))
            if (port := _master_of(cluster, keys.customer(cid)))
            not in {_master_of(cluster, key) for key in global_keys}
        )
        survivor = next(node.url for node in cluster.nodes if node.port != victim)
        store = RedisStore(connect(survivor, cluster=True))
        engine = Engine(store, POLICY, metrics=Metrics(), max_backoff_s=0.5)
        first = await engine.process([_bought(0, "o-0", cid)])
        await engine.confirm(first)
        assert first.applied == 1

        next(node for node in cluster.nodes if node.port == victim).kill()
        _wait_until(
            lambda: _master_of(cluster, keys.customer(cid)) != victim, 60, "a replica promoted"
        )
        second = await asyncio.wait_for(engine.process([_bought(1, "o-1", cid)]), 60)
        await engine.confirm(second)
        assert second.applied == 1
        stored = (await store.load([cid]))[cid]
        assert stored.state is not None and stored.state.lifetime_orders == 2
        await store.close()

    cluster = LocalRedisCluster(
        workdir=tmp_path / "cluster", replicas=1, node_timeout_ms=1000, ready_timeout=60
    )
    with cluster:
        # Every replica in sync before a master is killed (else nothing can take over).
        def synced() -> bool:
            for node in cluster.nodes:
                with redis.Redis(port=node.port) as client:
                    info = client.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
            return True

        _wait_until(synced, 30, "replicas in sync")
        asyncio.run(scenario(cluster))


POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))


def _bought(offset: int, event_id: str, customer: str) -> RawMessage:
    event = Purchase(
        event_id=event_id,
        customer_id=customer,
        occurred_at=datetime.now(UTC),
        amount=Decimal("10"),
        currency="EUR",
    )
    return RawMessage("purchases", 0, offset, customer.encode(), encode_model(event))
