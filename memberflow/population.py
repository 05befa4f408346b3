"""Population snapshots: computed from the incremental statistics, published, and the customers
whose labels they change woken up for reclassification (no scan of all customers).

Statistics are exact: means from running sums, quintile cut points by a rank search over the
per-shard sorted sets (a ZCOUNT per shard and step, log2(value range) steps), so the error bound
is zero; the cost is O(3 dimensions x 64 steps) pipelined round trips per snapshot, not per
event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from rules.policy import Policy
from rules.segments import DIMENSIONS, Snapshot, quantile_ranks
from state.store import Store

log = logging.getLogger(__name__)

# Value ranges searched per dimension: R epoch seconds, F orders, M minor units.
_UPPER = {"r": 2**40, "f": 2**40, "m": 2**62}


async def _cut_points(store: Store, dimension: str, count: int) -> tuple[int, int, int, int]:
    """The smallest value with at least rank+1 customers at or below it, for each quintile
    rank, found by a simultaneous binary search (one pipelined round trip per step)."""
    ranks = quantile_ranks(count)
    low = [0] * 4
    high = [_UPPER[dimension]] * 4
    while any(lo < hi for lo, hi in zip(low, high, strict=True)):
        middle = [(lo + hi) // 2 for lo, hi in zip(low, high, strict=True)]
        counts = await store.count_at_most(dimension, middle)
        for i in range(4):
            if low[i] >= high[i]:
                continue
            if counts[i] >= ranks[i] + 1:
                high[i] = middle[i]
            else:
                low[i] = middle[i] + 1
    return (low[0], low[1], low[2], low[3])


async def compute_snapshot(store: Store, version: int, published_at: int) -> Snapshot | None:
    count, sums = await store.population()
    if count == 0:
        return None
    means = {d: sums[d] / count for d in DIMENSIONS}
    cuts = {d: await _cut_points(store, d, count) for d in DIMENSIONS}
    mean_scores = {}
    for dimension in DIMENSIONS:
        # The total in the same read as the counts below the cut points: other workers keep
        # contributing while a snapshot is computed, and counts of two moments mixed gave a
        # mean score of -13 (score_mean then flagged every customer's R high).
        *at_most, total = await store.count_at_most(
            dimension, [*cuts[dimension], _UPPER[dimension]]
        )
        if total == 0:
            mean_scores[dimension] = 1.0
            continue
        # customers with score k: above k-1 cut points and not above the k-th
        bounds = [0, *at_most, total]
        per_score = [bounds[k] - bounds[k - 1] for k in range(1, 6)]
        mean = sum((k + 1) * n for k, n in enumerate(per_score)) / total
        mean_scores[dimension] = min(5.0, max(1.0, mean))
    return Snapshot(
        version=version,
        published_at=published_at,
        customers=count,
        means=means,
        cuts=cuts,
        mean_scores=mean_scores,
    )


async def current_snapshot(store: Store) -> Snapshot | None:
    document = await store.snapshot()
    return Snapshot.model_validate_json(document) if document else None


async def publish(
    store: Store, policy: Policy, now: int, lock_ttl_s: int = 30, lock_wait_s: float = 0.0
) -> Snapshot | None:
    """Publish a new snapshot (if this worker wins the lock, waiting up to `lock_wait_s` for
    it) and wake the customers whose type, scores or grade it can change. Returns the
    published snapshot, or None."""
    deadline = time.monotonic() + lock_wait_s
    while not await store.try_lock(lock_ttl_s):
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)
    try:
        old = await current_snapshot(store)
        new = await compute_snapshot(store, (old.version if old else 0) + 1, now)
        if new is None or not await store.publish_snapshot(new.version, new.model_dump_json()):
            return None
        # The previous publish stored its snapshot but did not finish its wake-ups (an error,
        # a crash): the ranges it did not wake are unknown now (only the current snapshot is
        # kept), so everyone is woken, as for a first snapshot. Without this they were lost:
        # the next publish woke only what changed from the stored, half-woken snapshot.
        finished = await store.snapshot_woken()
        if old is not None and finished is not None and finished < old.version:
            log.warning("snapshot v%d's wake-ups did not finish: waking everyone", old.version)
            old = None
        woken = await _wake_changed(store, policy, old, new)
        await store.set_snapshot_woken(new.version)
    finally:
        await store.unlock()
    log.info(
        "published population snapshot v%d (%d customers); %d wake-ups for reclassification",
        new.version,
        new.customers,
        woken,
    )
    return new


async def _wake_changed(store: Store, policy: Policy, old: Snapshot | None, new: Snapshot) -> int:
    """A customer's flag `value > threshold` changes only if its value lies between the old
    and the new threshold; so only those customers are woken. Returns the wake-ups sent (a
    customer in two of the ranges is counted twice: counting distinct customers would mean
    holding every id of a shop at a first snapshot)."""
    if old is None or (
        policy.segments.method == "score_mean"
        and any(int(old.mean_scores[d]) != int(new.mean_scores[d]) for d in DIMENSIONS)
    ):
        return await _wake_all(store, store.all_customers())  # everyone (first snapshot)
    ranges: list[tuple[str, float, float]] = []
    for d in DIMENSIONS:
        thresholds = [(old.means[d], new.means[d])]
        thresholds += list(zip(old.cuts[d], new.cuts[d], strict=True))
        for before, after in thresholds:
            if before != after:
                ranges.append((d, min(before, after), max(before, after)))
    # Customers written before any snapshot existed (or while a worker still had none).
    woken = await _wake_all(store, store.unclassified())
    for dimension, low, high in ranges:
        woken += await _wake_all(store, store.customers_between(dimension, low, high))
    return woken


async def _wake_all(store: Store, pages: AsyncIterator[list[tuple[str, int]]]) -> int:
    """Wake every (customer, partition) of `pages`, a page at a time."""
    woken = 0
    async for page in pages:
        await store.wake(page)
        woken += len(page)
    return woken


class PolicySuperseded(Exception):
    """This worker's policy version was adopted once and then replaced by another."""


async def adopt_policy(store: Store, policy: Policy, lock_ttl_s: int = 30) -> int | None:
    """When workers start with a policy version other than the one the stored labels were
    computed with, wake every customer: each is re-evaluated under the new policy through the
    timer path (tiers, segments, grades), with notifications for real changes only. Returns how
    many were woken, or None when nothing had to be done (or another worker is doing it).

    Raises PolicySuperseded when this version was replaced by a newer adoption: during a
    rolling restart the old workers must not adopt their version back (every worker checks
    periodically: old and new ones woke the whole shop in turns, and a customer whose last
    wake an old worker handled stayed judged by the old policy)."""
    if await store.policy_version() == policy.version:
        return None
    if await store.policy_superseded(policy.version):
        raise PolicySuperseded(
            f"policy version {policy.version!r} was superseded by "
            f"{await store.policy_version()!r}; to roll back, give the old rules a new version"
        )
    if not await store.try_lock(lock_ttl_s):
        return None
    try:
        if await store.policy_version() == policy.version:
            return None
        woken = await _wake_all(store, store.all_customers())
        await store.set_policy_version(policy.version)
    finally:
        await store.unlock()
    log.info("policy %s adopted: woke %d customers for re-evaluation", policy.version, woken)
    return woken
