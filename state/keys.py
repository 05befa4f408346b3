"""Every Redis key memberflow writes, in one place.

A customer's keys carry the hash tag `{c:<id>}` so they share one Redis Cluster slot and a Lua
script never crosses slots. Customer ids are validated (streams.events.Identifier) to contain
no braces, so the tag cannot be broken by input.
"""

from __future__ import annotations

PREFIX = "mf"
CUSTOMER_PATTERN = f"{PREFIX}:{{c:*}}"


def customer(customer_id: str) -> str:
    """Hash with fields v (version), s (state JSON), o (outbox: unsent notifications JSON)."""
    return f"{PREFIX}:{{c:{customer_id}}}"


def customer_id_of(key: str) -> str:
    return key[len(PREFIX) + 4 : -1]


def event_clock() -> str:
    """The engine's event clock (max event time applied), used in `event` clock mode.
    One small key written once per batch, not per event."""
    return f"{PREFIX}:{{clock}}:event"
