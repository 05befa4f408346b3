"""Reading the policy file (I/O stays out of rules/)."""

from __future__ import annotations

from pathlib import Path

from rules.policy import Policy, PolicyError, parse_policy


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        # A file saved as UTF-16 or Latin-1 by an editor: say where, not a traceback.
        line = exc.object[: exc.start].count(b"\n") + 1
        raise PolicyError(
            f"{path}: not UTF-8 text (byte {exc.start + 1}, line {line}); save it as UTF-8"
        ) from exc
    return parse_policy(text, str(path))
