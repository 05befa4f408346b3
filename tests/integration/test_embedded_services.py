"""Integration tests for memberflow.services: real Tansu broker and real redis-server(s)."""

from __future__ import annotations

import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from memberflow.services import LocalBroker, LocalRedis, LocalRedisCluster

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_broker_topic_produce_consume() -> None:
    topic = "memberflow.test.events"
    with LocalBroker() as broker:
        assert broker.running
        assert broker.url == f"kafka://{broker.bootstrap}"
        broker.create_topics({topic: 4})
        broker.create_topics({topic: 4})  # idempotent: an existing topic is accepted

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
        try:
            for i in range(10):
                producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode()).get(10)
            producer.flush(10)
            assert producer.partitions_for(topic) == {0, 1, 2, 3}
        finally:
            producer.close(timeout=5)

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap,
            group_id="memberflow-test",
            auto_offset_reset="earliest",
            consumer_timeout_ms=15_000,
            # The group join on Tansu takes about session_timeout/2; kafka-python's
            # default (45 s) would make this test wait ~23 s for its assignment.
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
        )
        received: dict[bytes, int] = {}
        try:
            deadline = time.monotonic() + 30
            for msg in consumer:
                received[msg.value] = msg.partition
                if len(received) == 10 or time.monotonic() > deadline:
                    break
        finally:
            consumer.close()

        assert sorted(received) == sorted(f"v{i}".encode() for i in range(10))
        assert len(set(received.values())) > 1  # keyed messages spread over partitions
    assert not broker.running
    assert not broker.work_dir.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_redis_aof_survives_kill_9(appendfsync: str) -> None:
    with LocalRedis(appendonly=True, appendfsync=appendfsync) as server:
        port, first_pid = server.port, server.pid
        with server.client() as conn:
            conn.set("memberflow:test", "durable")
        if appendfsync == "everysec":
            time.sleep(1.2)  # let the background fsync run before the crash

        server.kill()
        assert not server.running
        no_retry = Retry(NoBackoff(), 0)  # redis-py would otherwise back off for ~4 s
        with pytest.raises(redis.ConnectionError), server.client(retry=no_retry) as conn:
            conn.ping()

        server.restart()
        assert server.running
        assert server.port == port and server.pid != first_pid
        with server.client(decode_responses=True) as conn:
            assert conn.get("memberflow:test") == "durable"
        server.stop()
        server.stop()  # stopping twice is harmless
    assert not server.running


@pytest.mark.timeout(120)
def test_redis_cluster_spreads_keys() -> None:
    with LocalRedisCluster() as cluster:
        assert len(cluster.urls) == 3
        assert cluster.url == cluster.urls[0]
        client = RedisCluster.from_url(cluster.url, decode_responses=True)
        try:
            for i in range(100):
                client.set(f"member:{i}", str(i))
            assert all(client.get(f"member:{i}") == str(i) for i in range(100))
        finally:
            client.close()

        per_node = []
        for node in cluster.nodes:
            with node.client() as conn:
                per_node.append(conn.dbsize())
        assert sum(per_node) == 100
        assert sum(1 for n in per_node if n > 0) > 1
    assert not cluster.running
