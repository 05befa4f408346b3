"""Benchmark baseline (a): a Faust agent that only consumes (the framework ceiling).

Started by ops/benchmark.py as its own process; not a product entry point. It reads the same
MEMBERFLOW_* settings as `memberflow worker` (broker, topic, group id = app id, partitions,
batch size and wait, session/rebalance/heartbeat timeouts) and builds its faust.App with the
same arguments as memberflow/app.py, so the only difference from the real worker is the agent
body. BENCH_MODE picks the agent:

* ``take``    - ``stream.noack_take(batch_max, within)`` then ack each event: memberflow's own
  batching and manual acks, with no work in between.
* ``default`` - ``async for value in stream``: Faust's default, one event at a time, auto ack.

BENCH_FAUST_PATH=stock builds the app with Faust's own consumer path (faust_app(fast_path=False):
every fetched message delivered through wait_first's four tasks, the full Monitor), to measure
what memberflow's fast path saves; the default (``fast``) is the worker's.

Progress goes to the JSON file named by BENCH_STATUS_FILE (rewritten every 0.1 s):
``count`` events done, ``first_t``/``first_count`` when and how many after the first unit of
work (event or batch) completed, ``last_t`` when the latest one completed (epoch seconds).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import faust

from memberflow.app import faust_app
from memberflow.faust_patches import take_batches
from memberflow.settings import Settings


class Progress:
    """Counts completed events and writes them to a status file the benchmark polls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.first_t: float | None = None
        self.first_count = 0
        self.last_t: float | None = None

    def add(self, events: int) -> None:
        now = time.time()
        self.count += events
        if self.first_t is None:
            self.first_t = now
            self.first_count = self.count
        self.last_t = now

    def write(self) -> None:
        doc = {
            "pid": os.getpid(),
            "count": self.count,
            "first_t": self.first_t,
            "first_count": self.first_count,
            "last_t": self.last_t,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)


def make_app(settings: Settings, name_suffix: str = "") -> faust.App:
    """A faust.App configured exactly like the memberflow worker's (memberflow.app.faust_app)."""
    path = os.environ.get("BENCH_FAUST_PATH", "fast")
    if path not in ("fast", "stock"):
        raise SystemExit(f"BENCH_FAUST_PATH must be fast or stock, not {path!r}")
    return faust_app(settings, settings.app_id + name_suffix, fast_path=path == "fast")


def purchases_topic(app: faust.App, settings: Settings) -> Any:
    return app.topic(
        settings.purchases_topic,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
    )


def install_progress(app: faust.App) -> Progress:
    progress = Progress(Path(os.environ["BENCH_STATUS_FILE"]))

    @app.timer(interval=0.1)
    async def report() -> None:
        progress.write()

    return progress


def build(settings: Settings, mode: str) -> faust.App:
    app = make_app(settings)
    topic = purchases_topic(app, settings)
    progress = install_progress(app)

    if mode == "take":

        @app.agent(topic, concurrency=1, name="bench.consume_take")
        async def consume_take(stream: faust.StreamT) -> None:
            batches = take_batches(stream, settings.batch_max, settings.batch_within_s)
            async for events in batches:
                for event in events:
                    await stream.ack(event)
                progress.add(len(events))

    elif mode == "default":

        @app.agent(topic, concurrency=1, name="bench.consume_default")
        async def consume_default(stream: faust.StreamT) -> None:
            async for _value in stream:
                progress.add(1)

    else:
        raise SystemExit(f"BENCH_MODE must be take or default, not {mode!r}")
    return app


def main() -> None:
    settings = Settings()
    app = build(settings, os.environ.get("BENCH_MODE", "take"))
    worker = faust.Worker(app, loglevel=settings.log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
