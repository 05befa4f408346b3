"""Every crash point of the batch protocol, deterministically, against a real redis-server.

The process tests kill workers at random moments; this one enumerates the moments. A stream is
run through the engine the way the purchases agent and the timer poller run it (process or
process_due -> produce -> confirm -> ack), with a simulated kill -9 at one point: before or
after any one Redis call the engine makes (load, save, clock, confirm, ...), before producing,
half-way through producing, after producing, or after confirm and before the ack. A new engine
(a fresh "process") then resumes from the last acknowledged message, as a restarted worker
would. Each run must end exactly where the run without a crash ends, and where the oracles say.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from memberflow.engine import BatchOutcome, Engine, RawMessage
from memberflow.policy_file import load_policy
from memberflow.services import LocalRedis
from rules.customer import summarize
from rules.policy import Policy
from state.redis_store import RedisStore, connect
from tests.faults.harness import (
    DAY,
    EXPORT_FIELDS,
    distinct_notifications,
    fault_policy,
    make_workload,
    upgrade_key,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BATCH = 40
LATENESS_S = 7 * DAY
SHARD = 0  # one partition: the order of everything is fixed
OUTPUT_POINTS = ("before_produce", "mid_produce", "after_produce", "after_confirm")


class Crash(Exception):
    """A simulated kill -9: nothing after it in this 'process' happens."""


@dataclass(frozen=True)
class CrashPoint:
    step: int  # which batch (input or timer) of the run
    where: str  # "call" (a store call) or one of OUTPUT_POINTS
    call: int = 0  # the store call's number within the step (1-based)
    after: bool = False  # crash after the call returned (its effect happened) or before it

    def __str__(self) -> str:
        if self.where == "call":
            return f"step {self.step}, {'after' if self.after else 'before'} store call {self.call}"
        return f"step {self.step}, {self.where}"


class CrashingStore:
    """The Redis store, with a crash before or after one chosen call; records the calls."""

    def __init__(self, inner: RedisStore, point: CrashPoint | None, run: Run) -> None:
        self.inner, self.point, self.run = inner, point, run

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            run = self.run
            run.calls_in_step += 1
            run.call_names.setdefault(run.step, []).append(name)
            here = self.point is not None and (self.point.step, self.point.call) == (
                run.step,
                run.calls_in_step,
            )
            if here and self.point is not None and not self.point.after and not run.crashed:
                run.crashed = f"before {name}"
                raise Crash(run.crashed)
            result = await attribute(*args, **kwargs)
            if here and self.point is not None and self.point.after and not run.crashed:
                run.crashed = f"after {name}"
                raise Crash(run.crashed)
            return result

        return call


@dataclass
class Run:
    """What one run produced: the topics, and the bookkeeping of the crash."""

    notifications: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    calls_in_step: int = 0
    call_names: dict[int, list[str]] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)  # step -> "events" | "timers"
    crashed: str = ""


async def run_stream(
    url: str, policy: Policy, messages: list[RawMessage], point: CrashPoint | None
) -> Run:
    run = Run()
    acked = 0  # messages acknowledged (committed)

    async def output(engine: Engine, outcome: BatchOutcome) -> None:
        def crash_at(where: str) -> None:
            if point == CrashPoint(run.step, where) and not run.crashed:
                run.crashed = where
                raise Crash(where)

        crash_at("before_produce")
        for number, note in enumerate(outcome.notifications):
            if number == len(outcome.notifications) // 2:
                crash_at("mid_produce")
            run.notifications.append(json.loads(note.model_dump_json()))
        run.dead_letters.extend(json.loads(d.model_dump_json()) for _, d in outcome.dead_letters)
        crash_at("after_produce")
        await engine.confirm(outcome)
        crash_at("after_confirm")

    async def step(engine: Engine, kind: str, work: Callable[[], Awaitable[BatchOutcome]]) -> bool:
        run.step += 1
        run.calls_in_step = 0
        run.kinds[run.step] = kind
        outcome = await work()
        await output(engine, outcome)
        return outcome.more_due

    while True:  # one iteration per "process"
        client = connect(url)
        engine = Engine(
            CrashingStore(RedisStore(client), point, run),  # type: ignore[arg-type]  # a proxy
            policy,
            clock_mode="event",
            timer_lateness_s=LATENESS_S,
        )
        try:
            while acked < len(messages):
                batch = messages[acked : acked + BATCH]
                await step(engine, "events", partial(engine.process, batch))
                acked += len(batch)
                while await step(engine, "timers", partial(engine.process_due, SHARD)):
                    pass
            return run
        except Crash:
            continue  # restart: redeliver from the last acknowledged message
        finally:
            await client.aclose()


async def final_state(url: str, policy: Policy) -> dict[str, Any]:
    client = connect(url)
    store = RedisStore(client)
    try:
        clock = await store.clock()
        shard_clock = await store.clock(SHARD)
        assert clock is not None
        export, outboxes = {}, []
        async for stored in store.scan():
            if stored.outbox:
                outboxes.append(stored.customer_id)
            if stored.state is not None:
                doc = summarize(stored.state, policy, clock)
                export[stored.customer_id] = {name: doc[name] for name in EXPORT_FIELDS}
        gaps = await store.gap_histograms(sorted(policy.repurchase.categories))
        return {
            "clock": clock,
            "shard_clock": shard_clock,
            "export": export,
            "outboxes": outboxes,
            "gaps": gaps,
        }
    finally:
        await client.aclose()


@dataclass
class Enumeration:
    points: int
    steps: int
    messages: int
    resent: int  # notifications produced again after a crash (same id, same payload)
    failures: list[str]  # crash points whose run ended elsewhere than the run without crash
    gap_losses: list[str]  # crash points whose run recorded other repurchase gap samples


def _flush(url: str) -> None:
    async def flush() -> None:
        client = connect(url)
        try:
            await client.flushall()
        finally:
            await client.aclose()

    asyncio.run(flush())


def _points(reference: Run) -> list[CrashPoint]:
    """Every point of a few steps: the last input batch (nothing after it moves the clock),
    the middle input batch, and the busiest timer batch."""
    events = [s for s, kind in reference.kinds.items() if kind == "events"]
    timers = [s for s, kind in reference.kinds.items() if kind == "timers"]
    busy_timer = max(timers, key=lambda s: len(reference.call_names.get(s, [])))
    steps = sorted({events[len(events) // 2], events[-1], busy_timer})
    points = []
    for step in steps:
        for call in range(1, len(reference.call_names.get(step, [])) + 1):
            points += [CrashPoint(step, "call", call, after) for after in (False, True)]
        points += [CrashPoint(step, where) for where in OUTPUT_POINTS]
    return points


@pytest.fixture(scope="module")
def enumeration(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enumeration]:
    """Run the stream once without a crash (checked against the oracles), then once per crash
    point; shared by the tests below (a minute of work, done once)."""
    tmp_path = tmp_path_factory.mktemp("crash-points")
    fault_policy(tmp_path / "policy.yaml")
    policy = load_policy(tmp_path / "policy.yaml")
    workload = make_workload(
        tmp_path, customers=25, days=200, seed=11, duplicates=15, bad=6, shuffle_window=0
    )
    messages = [
        RawMessage("purchases", SHARD, offset, record.key, record.value)
        for offset, record in enumerate(workload.records)
    ]
    with LocalRedis(workdir=tmp_path / "redis") as server:
        url = server.url
        reference = asyncio.run(run_stream(url, policy, messages, None))
        expected = asyncio.run(final_state(url, policy))
        expected_notes, duplicates = distinct_notifications(reference.notifications)
        assert not duplicates
        # The run without crash is itself right: the oracles agree with it.
        assert expected["clock"] == int(workload.last_event.timestamp()) == expected["shard_clock"]
        assert expected["export"] == workload.expected_export()
        upgrades = {upgrade_key(n) for n in expected_notes.values() if n["type"] == "tier_upgraded"}
        assert upgrades == workload.expected_upgrades()
        assert any(expected["gaps"].values()), (
            "no repurchase gaps recorded: the gap check would prove nothing"
        )
        reference_letters = {(d["source_offset"], d["reason"]) for d in reference.dead_letters}

        points = _points(reference)
        result = Enumeration(len(points), reference.step, len(messages), 0, [], [])
        for point in points:
            _flush(url)
            run = asyncio.run(run_stream(url, policy, messages, point))
            assert run.crashed, f"{point}: never reached"
            got = asyncio.run(final_state(url, policy))
            notes, duplicates = distinct_notifications(run.notifications)  # one payload per id
            result.resent += sum(duplicates.values()) - len(duplicates)
            letters = {(d["source_offset"], d["reason"]) for d in run.dead_letters}
            problems = [
                name
                for name, same in (
                    ("event clock", got["clock"] == expected["clock"]),
                    ("partition clock", got["shard_clock"] == expected["shard_clock"]),
                    ("export", got["export"] == expected["export"]),
                    ("outboxes left", not got["outboxes"]),
                    ("notifications", notes == expected_notes),
                    ("dead letters", letters == reference_letters),
                )
                if not same
            ]
            if problems:
                result.failures.append(f"{point} ({run.crashed}): {', '.join(problems)}")
            if got["gaps"] != expected["gaps"]:
                result.gap_losses.append(f"{point} ({run.crashed})")
    print(
        f"\n[crash-points] {result.points} crash points over {result.steps} steps, "
        f"{result.messages} messages; {result.resent} notifications re-sent after a crash; "
        f"{len(result.failures)} failed, {len(result.gap_losses)} with other gap samples"
    )
    yield result


def test_every_crash_point_ends_where_the_run_without_crash_ends(
    enumeration: Enumeration,
) -> None:
    """State, clocks, distinct notifications and dead letters; duplicates only as re-sends."""
    assert not enumeration.failures, "\n".join(enumeration.failures)
    assert enumeration.resent > 0, "no crash point re-sent an outbox: the protocol went untested"


def test_every_crash_point_records_the_same_repurchase_gaps(enumeration: Enumeration) -> None:
    assert not enumeration.gap_losses, "\n".join(enumeration.gap_losses)
