"""`memberflow rules simulate FILE`: what a new policy would change, before it is applied.

Every customer's state is read from Redis (a SCAN: an operator command may scan) and judged
twice at the same moment, under the current policy (MEMBERFLOW_RULES_FILE) and under FILE:
the qualifying tier on each policy's rolling window (rules.customer.qualifying_tier), and the
RFM type and grade against the current population snapshot (rules.segments.classify, each
policy's method and grade map). The result is a what-if table of moves (from -> to counts).

The core (`Simulation`, `simulate`, `render`) is pure and takes CustomerState objects; only
`collect` and the command read Redis.

Applying a new policy is a decision, not a command: restart the workers with
MEMBERFLOW_RULES_FILE pointing to the new file (each worker refuses to start with a bad one);
the first worker with a new policy version wakes every customer for re-evaluation
(memberflow.population.adopt_policy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memberflow.policy_file import load_policy
from memberflow.population import current_snapshot
from rules.customer import CustomerState, iso, qualifying_tier
from rules.names import TYPE_NAMES
from rules.policy import Policy, PolicyError
from rules.segments import Snapshot, classify, customer_values, grade_direction
from state.store import Store

EXIT_USAGE = 2

DESCRIPTION = """\
What-if for a policy change: read every customer's state from Redis (a SCAN of all customers)
and judge each one at the same moment (--as-of, default the engine clock in event mode, else
now) under the CURRENT policy (MEMBERFLOW_RULES_FILE) and under the NEW policy FILE: the
qualifying tier on each policy's rolling window, and the RFM type and A/B/C grade against the
current population snapshot (each policy's segments.method and grade map). Prints the moves
(from -> to, with counts), the distributions under both policies and totals; --json for
machines. FILE is validated first (exit 2 with the reasons when it is not a usable policy).
Read only: nothing is written.

Applying a new policy (the decision; there is no apply command): check it with
`memberflow rules check FILE`, give it a new `version:` (the re-evaluation below is keyed on
it), look at this what-if, then restart the workers with MEMBERFLOW_RULES_FILE pointing to
FILE (a worker refuses to start with a bad file). The first worker that starts with a policy
version other than the one recorded in Redis wakes every customer (the old version is then
superseded: workers still on it fire no timers and never adopt it back; roll back under a new
version), and each is re-evaluated under the new policy through the timer path: upgrades at
once, a raised bar starts the grace period (the downgrade follows after grace_days and
min_days_in_tier, with its warning), segments and grades relabelled. While old and new workers
run side by side, the partitions still on old workers are judged by the old policy."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One customer judged under one policy."""

    tier: str
    segment: str | None  # None: no purchase yet, or no snapshot to judge against
    grade: str | None


def judge(state: CustomerState, policy: Policy, snapshot: Snapshot | None, now: int) -> Verdict:
    orders, spend = state.window(now, policy.window_days)
    tier = qualifying_tier(policy, orders, spend).name
    values = customer_values(state, policy, now)
    if values is None or snapshot is None:
        return Verdict(tier, None, None)
    segment = classify(values, snapshot, policy)
    return Verdict(tier, segment.rfm_type, segment.grade)


@dataclass
class Simulation:
    """Accumulates the what-if over customers one at a time (constant memory per customer)."""

    current: Policy
    new: Policy
    snapshot: Snapshot | None
    now: int
    customers: int = 0
    changed: int = 0
    held: int = 0  # customers whose stored tier is above their current qualifying tier
    orphaned: int = 0  # customers holding a tier the new policy does not have
    tiers: Counter[tuple[str, str]] = field(default_factory=Counter)
    segments: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)
    grades: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)

    def add(self, state: CustomerState) -> None:
        before = judge(state, self.current, self.snapshot, self.now)
        after = judge(state, self.new, self.snapshot, self.now)
        self.customers += 1
        self.changed += before != after
        self.tiers[(before.tier, after.tier)] += 1
        self.segments[(before.segment, after.segment)] += 1
        self.grades[(before.grade, after.grade)] += 1
        stored = self.current.find_tier(state.tier)
        if stored is not None and stored > self.current.tier_rank(before.tier):
            self.held += 1
        if self.new.find_tier(state.tier) is None:
            self.orphaned += 1

    def _tier_direction(self, old: str, new: str) -> str:
        a, b = self.new.find_tier(old), self.new.find_tier(new)
        if old == new:
            return "same"
        if a is None or b is None:  # a tier the new policy removed (or renamed, no `formerly`)
            return "changed"
        if a == b:  # renamed, listed in the new tier's `formerly`
            return "same"
        return "up" if b > a else "down"

    def report(self) -> dict[str, Any]:
        def tier_key(pair: tuple[str, str]) -> tuple[int, int, str, str]:
            a = self.current.find_tier(pair[0])
            b = self.new.find_tier(pair[1])
            return (a if a is not None else 99, b if b is not None else 99, *pair)

        tier_moves = [
            {
                "from": old,
                "to": new,
                "customers": count,
                "direction": self._tier_direction(old, new),
            }
            for (old, new), count in sorted(self.tiers.items(), key=lambda kv: tier_key(kv[0]))
        ]
        segment_moves = [
            {"from": old, "to": new, "customers": count}
            for (old, new), count in sorted(
                self.segments.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
            )
        ]
        grade_moves = [
            {
                "from": old,
                "to": new,
                "customers": count,
                "direction": grade_direction(old, new),
            }
            for (old, new), count in sorted(
                self.grades.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
            )
        ]
        directions: Counter[str] = Counter()
        for (old, new), count in self.tiers.items():
            directions[self._tier_direction(old, new)] += count
        return {
            "as_of": iso(self.now),
            "current_policy": self.current.version,
            "new_policy": self.new.version,
            "snapshot_version": self.snapshot.version if self.snapshot else None,
            "customers": self.customers,
            "tiers": {
                "moves": tier_moves,
                "current": _totals(self.tiers, 0),
                "new": _totals(self.tiers, 1),
            },
            "segments": {
                "moves": segment_moves,
                "current": _totals(self.segments, 0),
                "new": _totals(self.segments, 1),
            },
            "grades": {
                "moves": grade_moves,
                "current": _totals(self.grades, 0),
                "new": _totals(self.grades, 1),
            },
            "totals": {
                "customers": self.customers,
                "changed": self.changed,
                "unchanged": self.customers - self.changed,
                "tier_changed": self.customers - directions["same"],
                "tier_up": directions["up"],
                "tier_down": directions["down"],
                "segment_changed": sum(n for (a, b), n in self.segments.items() if a != b),
                "grade_changed": sum(n for (a, b), n in self.grades.items() if a != b),
                "held_above_qualifying": self.held,
                "holding_a_tier_the_new_policy_lacks": self.orphaned,
            },
            "notes": self._notes(),
        }

    def _notes(self) -> list[str]:
        current, new = self.current, self.new
        notes = [
            "Tiers are the qualifying tiers on each policy's window. Once the workers run the "
            "new policy, upgrades happen at once; a downgrade only after its grace period "
            f"({new.tier_changes.grace_days} days below the rule, at least "
            f"{new.tier_changes.min_days_in_tier} days in the tier) and its warning."
        ]
        if new.version == current.version and new != current:
            notes.append(
                f"The new file has the same version as the current policy ({new.version}): "
                "workers re-evaluate every customer only when the version changes; give it a "
                "new version."
            )
        if self.snapshot is None:
            notes.append(
                "No population snapshot yet: segments and grades are not simulated "
                "(`memberflow segments --publish` makes one)."
            )
        if new.window_days > current.window_days:
            notes.append(
                f"The new window ({new.window_days} days) is longer than the current one "
                f"({current.window_days}): the state keeps only {current.window_days} days of "
                "purchases, so F and M under the new policy are counted low until that much "
                "history has built up."
            )
        if new.segments.method != current.segments.method:
            notes.append(
                f"The segment method changes from {current.segments.method} to "
                f"{new.segments.method}; the snapshot's thresholds stay those of v"
                f"{self.snapshot.version if self.snapshot else '-'}."
            )
        if new.currencies != current.currencies or new.base_currency != current.base_currency:
            notes.append(
                "Currencies or rates differ: they apply to new events only (stored amounts are "
                "already converted to the base currency)."
            )
        if self.orphaned:
            notes.append(
                f"{self.orphaned} customers hold a tier the new policy does not have; the "
                "engine treats such a tier as the entry tier until the customer qualifies "
                "for another. A renamed tier keeps its holders when the new tier lists the old "
                "name under `formerly`."
            )
        return notes


def _totals(moves: Counter[Any], side: int) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for pair, count in moves.items():
        if pair[side] is not None:
            totals[pair[side]] += count
    return dict(sorted(totals.items()))


def simulate(
    states: Iterable[CustomerState],
    current: Policy,
    new: Policy,
    snapshot: Snapshot | None,
    now: int,
) -> dict[str, Any]:
    """The what-if report for these customers (pure)."""
    simulation = Simulation(current, new, snapshot, now)
    for state in states:
        simulation.add(state)
    return simulation.report()


def _segment_label(code: str | None) -> str:
    if code is None:
        return "(none)"
    names = TYPE_NAMES.get(code)
    return f"{code} ({names[0]})" if names else code


def _pad(text: str, width: int) -> str:
    """Left-justify for a terminal: the Chinese type names take two columns a character."""
    columns = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(0, width - columns)


def render(report: dict[str, Any], current_file: str, new_file: str) -> str:
    """The report as the text table the command prints."""
    lines = [
        f"what-if: policy {report['current_policy']} (current, {current_file}) -> "
        f"{report['new_policy']} (new, {new_file})",
        f"as of {report['as_of']}: {report['customers']} customers; population snapshot "
        + (f"v{report['snapshot_version']}" if report["snapshot_version"] else "none"),
        "",
        "tiers (qualifying tier; from current -> new):",
    ]
    width = max([len(m["from"]) for m in report["tiers"]["moves"]] + [8])
    for move in report["tiers"]["moves"]:
        mark = "" if move["direction"] == "same" else f"  {move['direction']}"
        lines.append(
            f"  {move['from']:<{width}} -> {move['to']:<{width}} {move['customers']:>9}{mark}"
        )
    if report["snapshot_version"]:
        lines += ["", f"segments (RFM type against snapshot v{report['snapshot_version']}):"]
        for move in report["segments"]["moves"]:
            mark = "" if move["from"] == move["to"] else "  changed"
            lines.append(
                f"  {_pad(_segment_label(move['from']), 36)} -> "
                f"{_pad(_segment_label(move['to']), 36)} "
                f"{move['customers']:>9}{mark}"
            )
        lines += ["", "grades:"]
        for move in report["grades"]["moves"]:
            mark = "" if move["direction"] == "same" else f"  {move['direction']}"
            old = move["from"] or "-"
            new = move["to"] or "-"
            lines.append(f"  {old:<6} -> {new:<6} {move['customers']:>9}{mark}")
    t = report["totals"]
    lines += [
        "",
        f"totals: {t['customers']} customers, {t['changed']} would change, "
        f"{t['unchanged']} unchanged; tier {t['tier_changed']} ({t['tier_up']} up, "
        f"{t['tier_down']} down), segment {t['segment_changed']}, grade {t['grade_changed']}",
        f"        {t['held_above_qualifying']} customers hold a tier above their qualifying "
        "one now (grace period under the current policy)",
    ]
    if report["notes"]:
        lines += ["", "notes:"] + [f"  - {note}" for note in report["notes"]]
    lines += [
        "",
        f"to apply: restart the workers with MEMBERFLOW_RULES_FILE={new_file}",
    ]
    return "\n".join(lines)


async def collect(store: Store, current: Policy, new: Policy, now: int) -> dict[str, Any]:
    """Read every customer (scan) and the current snapshot, and simulate."""
    simulation = Simulation(current, new, await current_snapshot(store), now)
    async for stored in store.scan():
        if stored.state is not None:
            simulation.add(stored.state)
    return simulation.report()


def cmd_rules_simulate(args: argparse.Namespace) -> int:
    from memberflow import cli  # not at import time: cli builds its parser from this module

    try:
        new = load_policy(Path(args.file))
    except PolicyError as exc:
        print(f"memberflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = cli._settings()
        current = cli._policy(settings)

        async def work(store: Store) -> dict[str, Any]:
            now = await cli._as_of(store, settings, args.as_of)
            return await collect(store, current, new, now)

        report = asyncio.run(cli._with_store(settings, work))
    except cli.CliError as exc:  # also when run as `python -m memberflow.cli` (__main__)
        print(f"memberflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(render(report, str(settings.rules_file), args.file))
    return 0


def add_parser(rules: Any) -> None:
    """Register `rules simulate` on the `rules` subcommands of memberflow.cli."""
    p = rules.add_parser(
        "simulate",
        help="what-if: tier, segment and grade moves a new policy file would cause",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the new policy YAML file")
    p.add_argument(
        "--as-of",
        help="evaluation time (ISO 8601); default: the engine's clock (event clock in event "
        "mode, else now)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_rules_simulate)
