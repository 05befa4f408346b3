"""Benchmark baseline (b): the design most people write first.

A Faust agent that takes one event at a time (``async for value in stream``, auto ack) and makes
four awaited Redis round trips per event: HGETALL the customer's hash, HINCRBY orders,
HINCRBYFLOAT spend, HSET last purchase time. No validation, no tiers, no idempotency: it is a
lower bar than memberflow in every respect except simplicity.

Started by ops/benchmark.py as its own process with the same MEMBERFLOW_* settings as the real
worker (same faust.App arguments, same Redis client options from state.redis_store.connect);
progress goes to BENCH_STATUS_FILE like ops/bench_consume_only.py.
"""

from __future__ import annotations

import json

import faust
from bench_consume_only import install_progress, make_app, purchases_topic

from memberflow.settings import Settings
from state.redis_store import connect


def build(settings: Settings) -> faust.App:
    app = make_app(settings)
    topic = purchases_topic(app, settings)
    progress = install_progress(app)

    @app.agent(topic, concurrency=1, name="bench.naive")
    async def naive(stream: faust.StreamT) -> None:
        password = settings.redis_password
        redis = connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            password=password.get_secret_value() if password else None,
        )
        async for value in stream:
            doc = json.loads(value)
            key = f"naive:{{c:{doc['customer_id']}}}"
            await redis.hgetall(key)
            await redis.hincrby(key, "orders", 1)
            await redis.hincrbyfloat(key, "spend", float(doc["amount"]))
            await redis.hset(key, "last", doc["occurred_at"])
            progress.add(1)

    return app


def main() -> None:
    settings = Settings()
    app = build(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
