"""`memberflow demo`, the README's main command (what `make demo` runs), end to end: a small shop
on its embedded broker and Redis, to its summary; and stopped by SIGTERM, as `timeout` or a
service manager stops it, without leaving the broker, Redis or the worker behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration

SMALL = ("--customers", "100", "--days", "60", "--duration", "60")


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (from /proc: the parent is field 4 of stat)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name (field 2) is in parentheses and may hold spaces.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_demo_runs_to_its_summary() -> None:
    done = run_cli(dict(os.environ), "demo", *SMALL, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    counts = re.search(
        r"processed (\d+) of (\d+) events in \d+s: (\d+) applied, (\d+) duplicates skipped, "
        r"(\d+) dead-lettered",
        out,
    )
    assert counts is not None, out
    processed, sent, applied, duplicates, dead = (int(n) for n in counts.groups())
    shop = re.search(
        r"shop +(\d+) events \((\d+) purchases, (\d+) duplicates, (\d+) bad lines\)", out
    )
    assert shop is not None, out
    total, rows, repeated, bad = (int(n) for n in shop.groups())
    # Every event the shop sent was processed once: each repeat is skipped as a duplicate
    # (no more: nothing was applied twice), each bad line dead-lettered, and every row of the
    # history applied or dead-lettered.
    assert processed == sent == total > 0
    assert duplicates == repeated > 0
    assert bad > 0 and applied + dead == rows + bad
    for line in ("customers per tier:", "customers per RFM type:", "notifications:"):
        assert line in out, out


def test_sigterm_stops_the_demo_and_everything_it_started() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "memberflow.cli", "demo", *SMALL, "--hold", "300"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started: set[int] = set()
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:  # the summary is printed, then it holds
            seen.append(line)
            if "holding for" in line:
                break
        else:
            pytest.fail("the demo ended before holding:\n" + "".join(seen[-40:]))
        started = descendants(demo.pid)
        assert len(started) >= 3, started  # broker, redis-server, worker
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
        deadline = time.monotonic() + 15
        while (left := {p for p in started if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == set(), f"still running after SIGTERM: {sorted(left)}"
    finally:  # whatever happened, nothing of this test keeps running
        for pid in started | (descendants(demo.pid) if demo.poll() is None else set()):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()
