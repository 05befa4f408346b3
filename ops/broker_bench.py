"""The embedded broker alone: produce -> fetched latency of a bare aiokafka producer and
consumer at a fixed rate, round after round, with no memberflow process running.

Tansu (the embedded broker of the demo, the tests and ops/benchmark.py) keeps partitions in
memory and gets dearer with every record batch a partition holds. This shows by how much on
this machine, so that a latency measured on it can be read: each round offers `--rate`
events/s for `--seconds` to one of two topics (alternating) and prints the broker's CPU and
the p50 / p99 produce -> fetched latency in each sixth of the round.

    python ops/broker_bench.py                          # 4 rounds of 30 s at 1,500 events/s
    python ops/broker_bench.py --fill 200000            # topic "b" pre-filled in large batches

The producer lingers 5 ms (Kafka 4.0's default), as the shop's producer of ops/benchmark.py's
latency phase does: at 1,500 events/s that is about 200 small record batches a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memberflow.services import LocalBroker
from ops.benchmark import by_part, cpu_seconds, percentile, read_from_end

SIXTHS = 6
PARTITIONS = 4


async def fill(bootstrap: str, topic: str, count: int) -> None:
    """`count` messages in large record batches (as ops/benchmark.py pre-loads purchases)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        pending = []
        for index in range(count):
            pending.append(await producer.send(topic, b"f" * 200, key=str(index % 10_000).encode()))
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def one_round(broker: LocalBroker, topic: str, rate: float, seconds: float) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=10,  # memberflow's worker setting
    )
    pid = broker.pid
    assert pid is not None, "the broker is not running"
    await producer.start()
    await consumer.start()
    samples: list[tuple[float, float]] = []
    stopping = asyncio.Event()
    try:
        await read_from_end(consumer, topic)
        started_at = time.time()

        async def consume() -> None:
            while not stopping.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                now = time.time()
                for records in batches.values():
                    for record in records:
                        if record.value and record.value[:1] == b"t":  # not a fill message
                            sent = float(record.value[1:].split(b"|")[0])
                            samples.append((sent - started_at, (now - sent) * 1000))

        task = asyncio.create_task(consume())
        cpu_before, sent, began = cpu_seconds(pid) or 0.0, 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            while sent < int(rate * elapsed):
                value = b"t%r|" % time.time() + b"x" * 180
                await producer.send(topic, value, key=str(sent % 1000).encode())
                sent += 1
            await asyncio.sleep(0.002)
        await producer.flush()
        await asyncio.sleep(1.0)
        stopping.set()
        await task
        cores = ((cpu_seconds(pid) or 0.0) - cpu_before) / (time.perf_counter() - began)
    finally:
        await producer.stop()
        await consumer.stop()
    latencies = [ms for _, ms in samples]
    return {
        "topic": topic,
        "sent": sent,
        "received": len(samples),
        "broker_cores": round(cores, 2),
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "by_sixth": by_part(samples, seconds, SIXTHS),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with LocalBroker() as broker:
        broker.create_topics({"a": PARTITIONS, "b": PARTITIONS})
        if args.fill:
            await fill(broker.bootstrap, "b", args.fill)
        for index in range(args.rounds):
            result = await one_round(broker, "ab"[index % 2], args.rate, args.seconds)
            print(
                f"round {index + 1}, topic {result['topic']}: broker {result['broker_cores']} "
                "cores; p50 / p99 ms by sixth: "
                + ", ".join(f"{p50} / {p99}" for p50, p99 in result["by_sixth"]),
                flush=True,
            )
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="events/s [1500]")
    parser.add_argument("--seconds", type=float, default=30.0, help="per round [30]")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, topics a, b, a, ... [4]")
    parser.add_argument("--fill", type=int, default=0, help="messages pre-loaded into b [0]")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
