"""Command-line mistakes are one clear line and exit 2, before anything starts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from memberflow import cli, demo
from memberflow.engine import Engine, RawMessage
from memberflow.metrics import Metrics
from memberflow.settings import default_rules_file
from rules.customer import epoch
from rules.policy import parse_policy
from state.memory_store import MemoryStore
from streams.codec import encode_model
from streams.events import Purchase


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--customers", "0"], "argument --customers: must be at least 1, got 0"),
        (["--days", "-3"], "argument --days: must be at least 1, got -3"),
        (["--rate", "-1"], "argument --rate: must be 0 or more, got -1"),
        (["--rate", "0"], "argument --rate: must be more than 0"),
        (["--duration", "x"], "argument --duration: expected a number, got 'x'"),
        (["--hold", "inf"], "argument --hold: must be 0 or more, got inf"),
        (["--workdir", "/proc/nope/demo"], "cannot use --workdir /proc/nope/demo"),
    ],
)
def test_demo_refuses_bad_arguments_before_starting_anything(
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def started(*_: Any) -> int:
        raise AssertionError("the demo must not start")

    monkeypatch.setattr(demo, "run_demo", started)
    try:
        code = cli.main(["demo", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


# -- times and the export file ---------------------------------------------------------------

NOW = epoch(datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC))
POLICY = parse_policy(default_rules_file().read_text(encoding="utf-8"))


def _one_customer() -> MemoryStore:
    store = MemoryStore()
    engine = Engine(store, POLICY, metrics=Metrics(), wall_clock=lambda: NOW)
    event = Purchase(
        event_id="a-1",
        customer_id="a",
        occurred_at=datetime.fromtimestamp(NOW - 3600, UTC),
        amount=Decimal("40"),
        currency="EUR",
    )

    async def fill() -> None:
        outcome = await engine.process([RawMessage("purchases", 0, 0, b"a", encode_model(event))])
        await engine.confirm(outcome)

    asyncio.run(fill())
    return store


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    """The commands read this in-memory store instead of Redis."""
    filled = _one_customer()

    async def with_store(settings: Any, work: Any) -> Any:
        return await work(filled)

    monkeypatch.setattr(cli, "_with_store", with_store)
    monkeypatch.delenv("MEMBERFLOW_RULES_FILE", raising=False)
    monkeypatch.setenv("MEMBERFLOW_CLOCK", "wall")
    return filled


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line message of a command that must fail with exit 2 and no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memberflow: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


OUT_OF_RANGE = [
    "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
    "0001-01-01T00:00:00+14:00",  # year 0 in UTC
    "1900-01-01",  # before the Unix epoch: negative recency
    "1969-12-31T23:59:59Z",
    "9999-01-01",
]


@pytest.mark.parametrize("when", OUT_OF_RANGE)
@pytest.mark.parametrize("command", [["customer", "a", "--as-of"], ["export", "--as-of"], ["tick"]])
def test_times_out_of_range_are_one_line_errors(
    command: list[str], when: str, store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error([*command, when], capsys)
    assert f"{when!r} is outside" in err
    assert "1970-01-01T00:00:00Z" in err and "9998-12-31T23:59:59Z" in err


def test_the_bounds_themselves_are_accepted(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    when = "9998-12-31T23:59:59Z"
    assert cli.main(["customer", "a", "--as-of", when]) == 0
    assert json.loads(capsys.readouterr().out)["as_of"] == when
    assert cli.main(["export", "--as-of", when]) == 0
    assert json.loads(capsys.readouterr().out)["as_of"] == when


def test_an_as_of_before_the_last_purchase_is_refused_for_one_customer(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state cannot be looked back at: 1970 (the lower bound, which parses) gave a recency
    of -20,000 days beside the customer's current tier and lifetime orders."""
    err = _usage_error(["customer", "a", "--as-of", "1970-01-01T00:00:00Z"], capsys)
    assert "as of 1970-01-01T00:00:00Z is before a's last purchase (2026-06-01T11:00:00Z)" in err


def test_export_evaluates_who_bought_after_the_as_of_at_their_last_purchase(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A past --as-of on a live shop: each such customer at its last purchase, said so."""
    assert cli.main(["export", "--as-of", "2026-01-01T00:00:00Z"]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out)
    assert (line["as_of"], line["recency_days"]) == ("2026-06-01T11:00:00Z", 0)
    assert "1 of them bought after --as-of: evaluated at their last purchase" in captured.err


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_replaces_the_output_file_only_when_it_succeeds(
    store: MemoryStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export.jsonl"
    out.write_text('{"keep":1}\n')
    out.chmod(0o640)
    assert cli.main(["export", "-o", str(out)]) == 0
    assert "exported 1 customers" in capsys.readouterr().err
    assert [json.loads(line)["customer_id"] for line in out.read_text().splitlines()] == ["a"]
    assert _files(tmp_path) == ["export.jsonl"]  # no temporary file left behind
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its permissions


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--as-of", "bogus"], "not an ISO 8601 time: 'bogus'"),
        (["--as-of", "9999-12-31T23:59:59-14:00"], "is outside"),
    ],
)
def test_a_failed_export_leaves_the_previous_file(
    argv: list[str],
    message: str,
    store: MemoryStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "export.jsonl"
    out.write_text('{"keep":1}\n')
    assert message in _usage_error(["export", *argv, "-o", str(out)], capsys)
    assert out.read_text() == '{"keep":1}\n'
    assert _files(tmp_path) == ["export.jsonl"]


def test_an_unreachable_redis_leaves_the_previous_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def unreachable(settings: Any) -> None:
        raise cli.CliError("cannot reach Redis at redis://nowhere:6379")

    monkeypatch.setattr(cli, "_check_redis", unreachable)
    monkeypatch.delenv("MEMBERFLOW_RULES_FILE", raising=False)
    out = tmp_path / "export.jsonl"
    out.write_text('{"keep":1}\n')
    assert "cannot reach Redis" in _usage_error(["export", "-o", str(out)], capsys)
    assert out.read_text() == '{"keep":1}\n'
    assert _files(tmp_path) == ["export.jsonl"]


def test_an_export_failing_halfway_leaves_the_previous_file(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def broken_scan() -> Any:
        for stored in [s async for s in MemoryStore.scan(store)]:
            yield stored
        raise RedisConnectionError("connection lost")

    monkeypatch.setattr(store, "scan", broken_scan)
    out = tmp_path / "export.jsonl"
    out.write_text('{"keep":1}\n')
    with pytest.raises(RedisConnectionError):
        cli.main(["export", "-o", str(out)])
    assert out.read_text() == '{"keep":1}\n'
    assert _files(tmp_path) == ["export.jsonl"]


def test_an_unusable_output_path_is_a_one_line_error_before_redis_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_redis(*_: Any) -> Any:
        raise AssertionError("Redis was read before the output path was checked")

    monkeypatch.setattr(cli, "_with_store", no_redis)
    monkeypatch.delenv("MEMBERFLOW_RULES_FILE", raising=False)
    missing = tmp_path / "nonexistent" / "dir" / "x"
    err = _usage_error(["export", "-o", str(missing)], capsys)
    assert f"cannot write {missing}" in err and "No such file or directory" in err
    err = _usage_error(["export", "-o", str(tmp_path)], capsys)
    assert f"cannot write {tmp_path}" in err and "directory" in err
    assert _files(tmp_path) == []


def test_export_writes_through_a_symlink_and_into_a_fifo(
    store: MemoryStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text('{"keep":1}\n')
    link = tmp_path / "latest.jsonl"
    link.symlink_to(real)
    assert cli.main(["export", "-o", str(link)]) == 0
    assert link.is_symlink() and json.loads(real.read_text())["customer_id"] == "a"
    assert _files(tmp_path) == ["latest.jsonl", "real.jsonl"]
    # Not a regular file (a FIFO, /dev/null, /dev/stdout): written as it is, never replaced.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
    reader.start()
    assert cli.main(["export", "-o", str(fifo)]) == 0
    reader.join(10)
    assert json.loads(read[0])["customer_id"] == "a"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert "exported 1 customers" in capsys.readouterr().err


def test_export_to_dev_stdout_writes_the_pipe(tmp_path: Path) -> None:
    """`-o /dev/stdout` into a pipe: written through, not refused or replaced."""
    env = {**os.environ, "MEMBERFLOW_REDIS_URL": "redis://127.0.0.1:1"}
    env.pop("MEMBERFLOW_RULES_FILE", None)
    script = (
        "import asyncio, sys\n"
        "from memberflow import cli\n"
        "from tests.unit.test_cli import _one_customer\n"
        "store = _one_customer()\n"
        "async def with_store(settings, work):\n"
        "    return await work(store)\n"
        "cli._with_store = with_store\n"
        "sys.exit(cli.main(['export', '--as-of', '2026-06-02', '-o', '/dev/stdout']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["customer_id"] == "a"
    assert "exported 1 customers" in done.stderr


def test_a_write_error_during_export_is_one_line(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (here /dev/full) was an OSError traceback."""
    err = _usage_error(["export", "-o", "/dev/full"], capsys)
    assert "cannot write /dev/full: No space left on device" in err


def test_export_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`memberflow export | head -1` was a BrokenPipeError traceback: now exit 141 (as a tool
    killed by SIGPIPE), nothing on stderr. A subprocess: the pipe must really close."""
    script = (
        "import sys\n"
        "from memberflow import cli\n"
        "def work(settings, job):\n"
        "    for n in range(100000):\n"
        "        print('{\"n\": %d}' % n)\n"
        "    return 0\n"
        "cli.cmd_export = lambda args: work(None, None)\n"
        "sys.exit(cli.main(['export']))\n"
    )
    with subprocess.Popen(
        ["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    ) as reader:
        writer = subprocess.run(
            [sys.executable, "-c", script],
            stdout=reader.stdin,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert reader.returncode == 0
    assert writer.returncode == 141, writer.stderr
    assert writer.stderr == ""


def test_the_demo_without_redis_server_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service that cannot start (here: no redis-server on PATH) was a traceback."""
    monkeypatch.setattr("shutil.which", lambda name, *_, **__: None)
    err = _usage_error(["demo", "--customers", "5", "--days", "10"], capsys)
    assert "the demo could not start its services: redis-server not found on PATH" in err


def test_a_worker_whose_web_port_is_taken_says_so_before_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several workers on one host with the same port: Faust's traceback after the worker had
    joined the group; now one line before anything starts."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv("MEMBERFLOW_WEB_PORT", str(port))

        async def redis_must_not_be_asked(settings: Any) -> None:
            raise AssertionError("checked after the web address")

        monkeypatch.setattr(cli, "_check_redis", redis_must_not_be_asked)
        err = _usage_error(["worker"], capsys)
    assert f"cannot serve HTTP on 127.0.0.1:{port} (Address already in use" in err


def test_segments_publish_with_nothing_to_publish_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On an empty store `segments --publish` answered "memberflow segments --publish makes
    one", the command just run."""
    empty = MemoryStore()

    async def with_store(settings: Any, work: Any) -> Any:
        return await work(empty)

    monkeypatch.setattr(cli, "_with_store", with_store)
    monkeypatch.delenv("MEMBERFLOW_RULES_FILE", raising=False)
    assert cli.main(["segments", "--publish"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing published: no customers to compute a snapshot from yet"), out
    assert "--publish makes one" not in out


def test_segments_publish_publishes_a_first_snapshot(
    store: MemoryStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["segments", "--publish"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"snapshot v1: 1 customers, published \d+s ago \(just now\)\n", out), out


def test_replay_names_a_missing_file_and_a_directory_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dir.csv").mkdir()
    assert "not a file: " in _usage_error(["replay", str(tmp_path / "dir.csv")], capsys)
    assert "no such file: " in _usage_error(["replay", str(tmp_path / "none.csv")], capsys)
