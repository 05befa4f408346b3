"""Reading the policy file (I/O stays out of rules/)."""

from __future__ import annotations

from pathlib import Path

from rules.policy import Policy, PolicyError, parse_policy


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    return parse_policy(text, str(path))
