"""A shop's bulk wake-ups, in-process against a real redis-server: what a new policy version and
a first snapshot cost the worker that runs them, as the shop grows.

Both wake every customer (memberflow.population: adopt_policy, publish). They run in a worker's
event loop beside its event batches, so what matters besides their duration is the longest
time they hold that loop (every event queued meanwhile waits that long) and the memory they
take while running:

    python ops/wake_bench.py                          # 100,000 customers
    python ops/wake_bench.py --customers 1000000      # about 2 minutes here
    python ops/wake_bench.py --against HEAD~3         # a commit's code first, then this tree

The population statistics are filled directly (one contribution per customer, random R/F/M),
not through events: this measures the bulk paths, not the fold. The loop hold is measured by a
coroutine that asks for a 1 ms sleep over and over; the memory is the process's RSS, sampled
every 50 ms, above what it was before the step.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memberflow import population
from memberflow.policy_file import load_policy
from memberflow.services import LocalRedis
from memberflow.settings import default_rules_file
from state.redis_store import RedisStore, connect
from state.store import Contribution

FILL_BATCH = 5_000


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def measure(step: Awaitable[Any]) -> dict[str, float]:
    """Run `step`; its seconds, the longest hold of the event loop, and the RSS growth."""
    gc.collect()
    stop = asyncio.Event()
    hold = 0.0
    before = peak = rss_mib()

    async def probe_loop() -> None:
        nonlocal hold
        while not stop.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            hold = max(hold, time.perf_counter() - asked - 0.001)

    async def sample_rss() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mib())
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(probe_loop()), asyncio.create_task(sample_rss())]
    started = time.perf_counter()
    await step
    seconds = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    return {
        "seconds": round(seconds, 2),
        "longest_loop_hold_ms": round(hold * 1000, 1),
        "rss_growth_mib": round(max(0.0, peak - before), 1),
    }


def contributions(customers: int, seed: int) -> Sequence[Contribution]:
    rng = random.Random(seed)
    return [
        Contribution(
            customer_id=f"cust-{i:08d}",
            version=1,
            partition=i % 4,
            r=1_760_000_000 + rng.randrange(30_000_000),
            f=rng.randrange(1, 30),
            m=rng.randrange(100, 500_000),
            tier="member",
            segment="",
            grade="",
            stage="new",
        )
        for i in range(customers)
    ]


async def run(customers: int, seed: int) -> dict[str, Any]:
    policy = load_policy(default_rules_file())
    with LocalRedis() as redis:
        store = RedisStore(connect(redis.url))
        try:
            rows = contributions(customers, seed)
            for start in range(0, len(rows), FILL_BATCH):
                await store.contribute(rows[start : start + FILL_BATCH])
            del rows
            gc.collect()
            gc.freeze()  # as a worker does after starting: the fill is not what is measured
            adopt = await measure(population.adopt_policy(store, policy))
            first = await measure(population.publish(store, policy, int(time.time())))
        finally:
            await store.close()
    return {"customers": customers, "new_policy": adopt, "first_snapshot": first}


def report(label: str, result: dict[str, Any]) -> None:
    for step in ("new_policy", "first_snapshot"):
        figures = result[step]
        print(
            f"{label}{step.replace('_', ' ')}, {result['customers']:,} customers: "
            f"{figures['seconds']} s, event loop held at most "
            f"{figures['longest_loop_hold_ms']} ms, RSS +{figures['rss_growth_mib']} MiB",
            flush=True,
        )


def against(ref: str, argv: Sequence[str]) -> list[dict[str, Any]]:
    """`ref`'s code (a temporary git worktree, with this script copied in), then this tree's."""
    # Imported here: the copy run in `ref`'s tree must not need this tree's engine_bench.
    from ops.engine_bench import baseline_tree

    here = Path(__file__).resolve().parents[1]
    results = []
    with baseline_tree(ref, "wake-bench-") as (tree, scratch):
        shutil.copy(Path(__file__), tree / "ops" / "wake_bench.py")
        for label, code in ((ref, tree), ("this tree", here)):
            out = scratch / "figures.json"
            command = [sys.executable, str(code / "ops" / "wake_bench.py"), *argv]
            subprocess.run(
                [*command, f"--json={out}"], cwd=code, check=True, stdout=subprocess.DEVNULL
            )
            results.append({"code": label, **json.loads(out.read_text())})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000, help="shop size [100,000]")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random R/F/M [7]")
    parser.add_argument(
        "--against", metavar="REF", help="run a commit's code first, then this tree"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.customers < 1:
        parser.error("--customers must be at least 1")
    if args.against:
        passed = ["--customers", str(args.customers), "--seed", str(args.seed)]
        results = against(args.against, passed)
        for result in results:
            report(f"[{result['code']}] ", result)
    else:
        results = [asyncio.run(run(args.customers, args.seed))]
        report("", results[0])
    if args.json:
        args.json.write_text(json.dumps(results[0] if not args.against else results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
