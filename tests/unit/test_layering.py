"""The dependency direction of house-style.md: agents -> memberflow -> state, rules, streams.

rules/ is the pure domain: no I/O, no clock, no framework. A test instead of a linter plugin
because the contract is small and this fails with the offending import named."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "rules": {
        "faust",
        "redis",
        "prometheus_client",
        "os",
        "time",
        "aiokafka",
        "kafka",
        "state",
        "memberflow",
        "agents",
        "asyncio",
        "socket",
        "subprocess",
    },
    "streams": {
        "faust",
        "redis",
        "prometheus_client",
        "os",
        "time",
        "state",
        "memberflow",
        "agents",
        "rules",
    },
    "state": {"faust", "prometheus_client", "memberflow", "agents", "aiokafka", "kafka"},
    "memberflow": {"agents"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imports(path) & FORBIDDEN[package]
        if not (package == "memberflow" and path.name == "app.py" and name == "agents")
    }
    assert offenders == set()


def test_rules_never_read_the_clock() -> None:
    for path in (ROOT / "rules").rglob("*.py"):
        text = path.read_text()
        for call in ("datetime.now(", "time.time(", "date.today(", "utcnow("):
            assert call not in text, f"{path.name} reads the clock via {call}"
