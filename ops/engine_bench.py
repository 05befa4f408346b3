"""The engine alone, in-process, against a real redis-server: CPU per event of the domain work.

ops/benchmark.py measures whole worker processes behind a broker; this isolates what the
engine costs (decode, fold, timers, relabelling, notifications, state encoding, the batch's
Redis scripts, confirm) so a change to the hot path can be measured in seconds, and profiled:

    python ops/engine_bench.py                      # 60,000 events of 3,000 customers
    python ops/engine_bench.py --profile 25         # plus the 25 costliest functions (cProfile)
    python ops/engine_bench.py --against HEAD~3     # this tree against a commit, alternating

This machine kind's speed drifts by up to 25 % between identical runs, so a change is judged
against a baseline measured in the same session: --against REF checks REF out in a temporary
git worktree and alternates runs of it and of this tree (--repeat each), then prints every
run and the ratio of the medians.

The events are ops/benchmark.py's own (history_payloads), in batches of --batch, each batch
followed by a firing of the timers due at its time, as a worker does. Prints events/s, CPU
microseconds per event and per notification; --json writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memberflow.engine import Engine, RawMessage
from memberflow.policy_file import load_policy
from memberflow.services import LocalRedis
from memberflow.settings import default_rules_file
from ops.benchmark import history_payloads
from rules.customer import DAY
from state.redis_store import RedisStore, connect

PARTITIONS = 4


async def drive(
    engine: Engine,
    payloads: Sequence[tuple[bytes, bytes]],
    batch: int,
) -> dict[str, int]:
    counts = {"applied": 0, "notifications": 0, "timers_fired": 0}
    offsets = [0] * PARTITIONS
    for start in range(0, len(payloads), batch):
        messages = []
        for key, value in payloads[start : start + batch]:
            partition = hash(key) % PARTITIONS
            messages.append(RawMessage("bench", partition, offsets[partition], key, value))
            offsets[partition] += 1
        outcome = await engine.process(messages)
        await engine.confirm(outcome)
        counts["applied"] += outcome.applied
        counts["notifications"] += len(outcome.notifications)
        for shard in range(PARTITIONS):
            more = True
            while more:
                due = await engine.process_due(shard, limit=100)
                await engine.confirm(due)
                counts["timers_fired"] += due.timers_fired
                counts["notifications"] += len(due.notifications)
                more = due.more_due
    return counts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payloads = history_payloads(args.events, args.customers, seed=7, end=time.time() - DAY)
    with LocalRedis() as redis:
        client = connect(redis.url)
        store = RedisStore(client)
        # Event time, as ops/benchmark.py runs workers: the history's timers fall due as
        # the events move each shard's clock.
        engine = Engine(store, load_policy(default_rules_file()), clock_mode="event")
        profiler = cProfile.Profile() if args.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        counts = await drive(engine, payloads, args.batch)
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if profiler:
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.profile)
        await store.close()
    result = {
        "events": len(payloads),
        "customers": args.customers,
        "batch": args.batch,
        **counts,
        "events_per_s": round(len(payloads) / wall),
        "cpu_us_per_event": round(cpu * 1e6 / len(payloads), 1),
        "notifications_per_event": round(counts["notifications"] / len(payloads), 3),
    }
    return result


def compare(baseline: Sequence[float], change: Sequence[float]) -> dict[str, Any]:
    """CPU microseconds per event of alternating runs: the medians and change / baseline."""
    base, new = statistics.median(baseline), statistics.median(change)
    return {
        "baseline_us": list(baseline),
        "change_us": list(change),
        "baseline_median_us": round(base, 1),
        "change_median_us": round(new, 1),
        "ratio": round(new / base, 3),
    }


def _one_run(tree: Path, args: argparse.Namespace, out: Path) -> float:
    command = [
        sys.executable,
        str(tree / "ops" / "engine_bench.py"),
        f"--events={args.events}",
        f"--customers={args.customers}",
        f"--batch={args.batch}",
        f"--json={out}",
    ]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["cpu_us_per_event"])


@contextlib.contextmanager
def baseline_tree(ref: str, prefix: str) -> Iterator[tuple[Path, Path]]:
    """(a temporary git worktree of `ref`, a scratch directory beside it), removed after."""
    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        tree = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), ref], cwd=here, check=True
        )
        try:
            yield tree, Path(scratch)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=here, check=False
            )


def against(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate runs of `args.against` (a git worktree) and of this tree."""
    here = Path(__file__).resolve().parents[1]
    with baseline_tree(args.against, "engine-bench-") as (tree, scratch):
        baseline, change = [], []
        for round_no in range(1, args.repeat + 1):
            baseline.append(_one_run(tree, args, scratch / "baseline.json"))
            change.append(_one_run(here, args, scratch / "change.json"))
            print(
                f"round {round_no}/{args.repeat}: {args.against} {baseline[-1]} us/event, "
                f"this tree {change[-1]} us/event",
                flush=True,
            )
    return {
        "against": args.against,
        "events": args.events,
        "customers": args.customers,
        **compare(baseline, change),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000, help="purchases (default 60,000)")
    parser.add_argument("--customers", type=int, default=3_000, help="customers (default 3,000)")
    parser.add_argument("--batch", type=int, default=500, help="events per batch (default 500)")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the N costliest functions"
    )
    parser.add_argument(
        "--sort", default="tottime", help="profile order: tottime (default) or cumulative"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--against",
        metavar="REF",
        help="a git commit to compare with: alternating runs of it and of this tree",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each side with --against (default 3)"
    )
    args = parser.parse_args(argv)
    if args.against and args.profile:
        parser.error("--against measures whole runs; profile one side at a time")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    result = against(args) if args.against else asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
