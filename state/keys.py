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


def timer_index(shard: int) -> str:
    """Sorted set customer_id -> next timer due time, one per input partition (the worker
    owning the partition fires its timers). An index only: timers themselves are derived from
    the customer state, so a stale entry costs a wasted wake-up, never a wrong action."""
    return f"{PREFIX}:{{t:{shard}}}:due"


def shard_clock(shard: int) -> str:
    """Event clock of one input partition (`event` mode): its timers fire as it passes them."""
    return f"{PREFIX}:{{t:{shard}}}:clock"


def stats(shard: int, part: str) -> str:
    """Population statistics of one stats shard (customers spread by crc32 of their id), so no
    single key sees every event: `r`, `f`, `m` sorted sets customer -> value, `meta` hash
    customer -> "version|partition|tier|segment|grade|stage", `sum` (n and sums), `dist`
    (customers per label), `gaps` (repurchase gaps "days|category" -> count, for learned
    intervals). All of a shard's keys share a slot: one script updates them."""
    return f"{PREFIX}:{{s:{shard}}}:{part}"


STATS_PARTS = ("r", "f", "m", "meta", "sum", "dist", "unclassified", "gaps")


def snapshot() -> str:
    """The current published population snapshot (JSON with its version)."""
    return f"{PREFIX}:{{snap}}:current"


def snapshot_version() -> str:
    """The current snapshot's version alone: read every batch, so workers switch at once."""
    return f"{PREFIX}:{{snap}}:version"


def snapshot_woken() -> str:
    """The snapshot version whose relabelling wake-ups all went out (absent: not recorded)."""
    return f"{PREFIX}:{{snap}}:woken"


def snapshot_lock() -> str:
    """Held by the worker publishing a snapshot, so that only one does per interval."""
    return f"{PREFIX}:{{snap}}:lock"


def policy_version() -> str:
    """The policy version the stored labels were computed with; a worker starting with another
    version wakes every customer to be re-evaluated under it."""
    return f"{PREFIX}:{{policy}}:version"


def policy_superseded() -> str:
    """Policy versions once adopted and then replaced: workers still running one of them are
    old ones, which neither adopt it again nor fire timers."""
    return f"{PREFIX}:{{policy}}:superseded"
