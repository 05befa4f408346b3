"""Redis-backed store: one hash per customer, written by a compare-and-set Lua script.

Each batch costs one pipelined round trip to load and one to save (per node on a Cluster),
whatever its size. The version check inside the script makes a write from a worker that lost
its partitions (a zombie after a rebalance) fail instead of overwriting newer state.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import hiredis
from pydantic import TypeAdapter
from pydantic_core import to_json
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rules.customer import CustomerState
from state import keys
from state.aio import together
from state.store import Contribution, GapSample, Stored, TimerEntry, Write
from streams.events import Notification

# Bulk paths (a snapshot's wake-ups, a new policy's, which can name every customer) go to Redis
# in slices of this many members, one command per slice, each awaited on its own, and reach the
# caller as pages of that size: they run in the worker's event loop beside the event batches,
# and one pipeline of a command per customer held that loop for 42 ms at 4,000 customers and
# 178 ms at 40,000 (a latency spike for every event queued meanwhile), growing with the shop,
# as did the lists of every customer they built.
BULK_SLICE = 500

# KEYS[1] customer hash; ARGV[1] expected version; ARGV[2] state JSON; ARGV[3] outbox JSON or '';
# ARGV[4] pending gap samples JSON or ''.
# The snapshot/policy lock is deleted only by its holder (KEYS[1] lock, ARGV[1] its token).
UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SAVE_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then return -1 end
local nextv = current + 1
redis.call('HSET', KEYS[1], 'v', nextv, 's', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'o')
else
  redis.call('HSET', KEYS[1], 'o', ARGV[3])
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'g')
else
  redis.call('HSET', KEYS[1], 'g', ARGV[4])
end
return nextv
"""

# KEYS[1] customer hash; ARGV[1] version whose outbox was produced and gap samples counted, or
# ''. Drops them if the customer is still at that version; returns its version (a Cluster's
# confirm checks its index entries against it: RedisStore.confirm).
CONFIRM_ONE_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if ARGV[1] ~= '' and current == tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], 'o', 'g') end
return current
"""

# One Redis (not a Cluster): the same steps for a whole batch in one script call, because
# redis-py's cost per command (packing, parsing, awaiting) was the largest part of a worker's
# CPU with one script per customer (ops/benchmark.py profile). A Cluster cannot run a script
# whose keys span slots, so it keeps the one-customer scripts above, pipelined per node.

# KEYS: customer hashes. Returns {v, s, o, g} per customer.
LOAD_MANY_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HMGET', KEYS[i], 'v', 's', 'o', 'g') end
return out
"""

# KEYS: per write its customer hash and its partition's timer index. ARGV: six per write,
# [expected version, state, outbox, gap samples, customer id, earlier due or ''], flat: hiredis
# packs the arguments in C, and a state travels as itself, not escaped inside a JSON document
# that Python encodes and cjson decodes. Returns the new version per write, -1 on a version
# conflict (the index entry only ever moves earlier).
SAVE_MANY_LUA = """
local out = {}
for i = 1, #KEYS / 2 do
  local customer, index, a = KEYS[2 * i - 1], KEYS[2 * i], 6 * (i - 1)
  if ARGV[a + 6] ~= '' then redis.call('ZADD', index, 'LT', ARGV[a + 6], ARGV[a + 5]) end
  local current = tonumber(redis.call('HGET', customer, 'v') or '0')
  if current ~= tonumber(ARGV[a + 1]) then
    out[i] = -1
  else
    out[i] = current + 1
    redis.call('HSET', customer, 'v', current + 1, 's', ARGV[a + 2])
    if ARGV[a + 3] == '' then redis.call('HDEL', customer, 'o')
    else redis.call('HSET', customer, 'o', ARGV[a + 3]) end
    if ARGV[a + 4] == '' then redis.call('HDEL', customer, 'g')
    else redis.call('HSET', customer, 'g', ARGV[a + 4]) end
  end
end
return out
"""

# KEYS: per customer its hash and its partition's timer index. ARGV: four per customer,
# [id, the version whose outbox was produced and gap samples counted or '', its exact next due
# time or '', the version that due time was computed from or '' (unconditional)], flat (as
# SAVE_MANY_LUA). CONFIRM_ONE_LUA, and an exact ZADD while the customer is still at that
# version: a later writer (a partition's new owner) sets the entry for its newer state, and a
# late confirm of an older one must not move it.
CONFIRM_MANY_LUA = """
for i = 1, #KEYS / 2 do
  local customer, index, a = KEYS[2 * i - 1], KEYS[2 * i], 4 * (i - 1)
  local clear, due, seen = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local current = 0
  if clear ~= '' or seen ~= '' then current = tonumber(redis.call('HGET', customer, 'v') or '0') end
  if clear ~= '' and current == tonumber(clear) then redis.call('HDEL', customer, 'o', 'g') end
  if due ~= '' and (seen == '' or current == tonumber(seen)) then
    redis.call('ZADD', index, due, ARGV[a + 1])
  end
end
return 0
"""

# KEYS[1] a partition's timer index, then customer hashes; ARGV: per customer [id, version]:
# ZREM each customer still at the version that was found to have no timer left.
UNINDEX_MANY_LUA = """
local removed = 0
for i = 2, #KEYS do
  local a = 2 * (i - 2)
  if tonumber(redis.call('HGET', KEYS[i], 'v') or '0') == tonumber(ARGV[a + 2]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[a + 1])
  end
end
return removed
"""

MANY_CHUNK = 500  # customers per script call: keeps each call's time in Redis short

# KEYS[1] clock key; ARGV[1] candidate. Monotone max, so workers never move it backwards.
ADVANCE_CLOCK_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local candidate = tonumber(ARGV[1])
if candidate > current then redis.call('SET', KEYS[1], ARGV[1]) return candidate end
return current
"""

# KEYS: r, f, m (zsets), meta, sum, dist (hashes), unclassified (set), gaps (hash) of one stats
# shard. ARGV[1]: a JSON list of [customer, version, partition, r, f, m, tier, segment, grade,
# stage, [[category, days, sample version], ...]]. Gap samples newer than the customer's
# previous contribution are counted: together with the version check that makes a repeated
# contribution change nothing, each sample is counted exactly once.
CONTRIBUTE_LUA = """
local function bump(labels, delta)
  for _, label in ipairs(labels) do
    if label ~= '' then redis.call('HINCRBY', KEYS[6], label, delta) end
  end
end
local applied = 0
for _, row in ipairs(cjson.decode(ARGV[1])) do
  local cid = row[1]
  local version = tonumber(row[2])
  local old = redis.call('HGET', KEYS[4], cid)
  local stale = false
  local counted = 0
  if old then
    local oldv, _, ot, os, og, ost =
      string.match(old, '^(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    counted = tonumber(oldv)
    if counted >= version then
      stale = true
    else
      redis.call('HINCRBY', KEYS[5], 'n', -1)
      for i, dim in ipairs({'r', 'f', 'm'}) do
        local score = redis.call('ZSCORE', KEYS[i], cid)
        -- 0 - x, not -x: Lua's -0 becomes the string "-0", which HINCRBY refuses
        if score then redis.call('HINCRBY', KEYS[5], dim, 0 - tonumber(score)) end
      end
      bump({'tier:' .. ot, os ~= '' and ('segment:' .. os) or '',
            og ~= '' and ('grade:' .. og) or '', 'stage:' .. ost}, -1)
    end
  end
  if not stale then
    redis.call('HINCRBY', KEYS[5], 'n', 1)
    for i, dim in ipairs({'r', 'f', 'm'}) do
      local value = row[3 + i]
      redis.call('ZADD', KEYS[i], value, cid)
      redis.call('HINCRBY', KEYS[5], dim, value)
    end
    local tier, seg, grade, stage = row[7], row[8], row[9], row[10]
    redis.call('HSET', KEYS[4], cid, row[2] .. '|' .. row[3] .. '|' .. tier .. '|'
      .. seg .. '|' .. grade .. '|' .. stage)
    bump({'tier:' .. tier, seg ~= '' and ('segment:' .. seg) or '',
          grade ~= '' and ('grade:' .. grade) or '', 'stage:' .. stage}, 1)
    if seg == '' then redis.call('SADD', KEYS[7], cid) else redis.call('SREM', KEYS[7], cid) end
    for _, gap in ipairs(row[11]) do
      if tonumber(gap[3]) > counted then
        redis.call('HINCRBY', KEYS[8], gap[2] .. '|' .. gap[1], 1)
      end
    end
    applied = applied + 1
  end
end
return applied
"""

# KEYS[1] snapshot key, KEYS[2] its version key; ARGV[1] version; ARGV[2] document.
# Only ever moves forward.
PUBLISH_SNAPSHOT_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '"version":%s*(%d+)'))
  if version and version >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

AnyRedis = Redis | RedisCluster
T = TypeVar("T")

# Rounds of re-reading the slot map when a Cluster node refuses calls (MOVED or ASK).
_MOVED_ROUNDS = 3


def _raised(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class PackingConnection(Connection):
    """A plain TCP connection whose commands are packed by hiredis (C) instead of redis-py's
    Python packer, which encoded each of a batch script's hundreds of keys one by one (5 % of
    the engine's CPU, ops/engine_bench.py --profile). Anything but str, bytes and int (floats:
    formatting could differ) goes through redis-py's packer, so the bytes sent are the same."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if not all(type(arg) in _HIREDIS_TYPES for arg in args):
            return cast(list[bytes], super().pack_command(*args))
        first = args[0]
        if " " in first if isinstance(first, str) else b" " in first:
            # "SCRIPT LOAD": the words of a command name go as separate arguments.
            words = first.split()
            args = (*words, *args[1:])
        return [hiredis.pack_command(args)]


_HIREDIS_TYPES = frozenset({str, bytes, int})


def connect(url: str, cluster: bool = False, password: str | None = None) -> AnyRedis:
    options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}
    if password is not None:
        options["password"] = password
    if cluster:
        return RedisCluster.from_url(url, **options)
    return _packing(Redis.from_url(url, **options))


def _packing(client: Redis) -> Redis:
    """`client` with PackingConnection where it would use a plain TCP Connection (TLS and
    unix sockets keep the connection class they chose)."""
    if client.connection_pool.connection_class is Connection:
        client.connection_pool.connection_class = PackingConnection
    return client


_OUTBOX = TypeAdapter(list[Notification])


def _outbox_json(outbox: Sequence[Notification]) -> str:
    if not outbox:
        return ""
    return "[" + ",".join(n.model_dump_json() for n in outbox) + "]"


def _outbox_from(raw: bytes | None) -> tuple[Notification, ...]:
    if not raw:
        return ()
    return tuple(_OUTBOX.validate_json(raw))


_REDIS_OPTIONS = frozenset(inspect.signature(Redis.__init__).parameters) - {"self"}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gaps_json(gaps: Sequence[GapSample]) -> str:
    if not gaps:
        return ""
    return json.dumps([[g.category, g.days, g.version] for g in gaps], separators=(",", ":"))


def _gaps_from(raw: bytes | None) -> tuple[GapSample, ...]:
    if not raw:
        return ()
    return tuple(GapSample(str(c), int(d), int(v)) for c, d, v in json.loads(raw))


def _stored(customer_id: str, fields: Sequence[bytes | None]) -> Stored:
    version, state, outbox, gaps = fields
    return Stored(
        customer_id=customer_id,
        version=int(version or 0),
        state=CustomerState.from_json(state) if state else None,
        outbox=_outbox_from(outbox),
        gaps=_gaps_from(gaps),
    )


def _json_arg(rows: Sequence[Sequence[Any]]) -> str:
    # Numbers as strings: cjson reads numbers as doubles, and Lua prints large ones with
    # exponents; strings reach redis.call exactly as Python wrote them.
    return to_json(
        [[v if isinstance(v, str | list) else str(v) for v in row] for row in rows]
    ).decode()


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stats_shard(customer_id: str, shards: int) -> int:
    return zlib.crc32(customer_id.encode()) % shards


class RedisStore:
    def __init__(self, client: AnyRedis, stats_shards: int = 16) -> None:
        self.client = client
        self.stats_shards = stats_shards
        self._shas: dict[str, str] = {}
        # Redis Cluster: redis-py refuses EVALSHA in a cluster pipeline, so scripts go through
        # one plain pipeline per node (keys grouped by the node owning their slot).
        self.cluster = isinstance(client, RedisCluster)
        self._nodes: dict[str, Redis] = {}
        self._lock_token: str | None = None

    async def _script_sha(self, body: str) -> str:
        sha = self._shas.get(body)
        if sha is None:
            sha = hashlib.sha1(body.encode()).hexdigest()
            self._shas[body] = sha
        return sha

    async def _node_client(self, key: str) -> Redis:
        cluster = cast(RedisCluster, self.client)
        if not cluster.get_nodes():
            await cluster.initialize()
        node = cluster.get_node_from_key(key)
        if node is None:
            raise ClusterDownError(f"no node serves the slot of {key}")
        client = self._nodes.get(node.name)
        if client is None:
            # The node's own connection settings: password, TLS and timeouts included (minus
            # the cluster client's private options, which a plain client does not take).
            options = {k: v for k, v in node.connection_kwargs.items() if k in _REDIS_OPTIONS}
            client = _packing(Redis(**options))
            self._nodes[node.name] = client
        return client

    async def _forget_nodes(self) -> None:
        """Re-read the slot map and drop the per-node clients (a failed node's included)."""
        nodes, self._nodes = list(self._nodes.values()), {}
        for client in nodes:
            with contextlib.suppress(Exception):
                await client.aclose()
        with contextlib.suppress(Exception):  # the cluster may still be electing: next retry
            await cast(RedisCluster, self.client).nodes_manager.initialize()

    async def _eval_group(
        self,
        client: AnyRedis,
        sha: str,
        body: str,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
    ) -> list[Any]:
        """EVALSHA each call in one pipeline. An error reply comes back in its place (a
        Cluster's MOVED is the caller's to handle), except a missing script: Redis forgets
        scripts when it restarts, so it is loaded there and the calls it refused are redone."""
        results: list[Any] = [None] * len(calls)
        pending: Sequence[int] = range(len(calls))
        for _ in (1, 2):
            pipe = client.pipeline(transaction=False)
            for index in pending:
                call_keys, args = calls[index]
                pipe.evalsha(sha, len(call_keys), *call_keys, *args)
            missing = []
            for index, reply in zip(pending, await pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(index)
                else:
                    results[index] = reply
            if not missing:
                return results
            await client.script_load(body)
            pending = missing
        raise NoScriptError(f"script {sha} still missing after loading it")

    async def _eval_many(
        self, body: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """EVALSHA each (keys, args): one pipeline, or one per node on a Cluster (the keys of
        one call always share a slot). Results come back in the order of `calls`; the first
        error reply is raised, as a pipeline does."""
        if not calls:
            return []
        sha = await self._script_sha(body)
        if not self.cluster:
            return _raised(await self._eval_group(self.client, sha, body, calls))
        results: list[Any] = [None] * len(calls)
        pending: Sequence[int] = range(len(calls))
        for _ in range(_MOVED_ROUNDS):
            groups: dict[str, tuple[Redis, list[int]]] = {}
            for index in pending:
                client = await self._node_client(calls[index][0][0])
                groups.setdefault(str(id(client)), (client, []))[1].append(index)
            try:
                replies = await together(
                    *(
                        self._eval_group(client, sha, body, [calls[i] for i in indexes])
                        for client, indexes in groups.values()
                    )
                )
            except (RedisConnectionError, RedisTimeoutError, OSError):
                # A node that failed: its replica takes its slots, which only a new slot map
                # names (a dead node answers no MOVED). Without this a running worker retried
                # the dead node forever, unless some other command of the cluster client
                # happened to refresh the map. The engine retries with backoff.
                await self._forget_nodes()
                raise
            moved = []
            for (_, indexes), reply in zip(groups.values(), replies, strict=True):
                for index, value in zip(indexes, reply, strict=True):
                    if isinstance(value, MovedError | AskError):
                        moved.append(index)
                    else:
                        results[index] = value
            if not moved:
                return _raised(results)
            # Slots moved to another node (the Cluster is being resharded). A refused call ran
            # nothing, so only those are redone, on the slot map read anew.
            await cast(RedisCluster, self.client).nodes_manager.initialize()
            pending = moved
        # Still moving (a slot mid-migration answers ASK until it is done): transient, so the
        # engine retries with backoff instead of stopping the worker.
        raise TryAgainError(f"{len(pending)} script calls refused: their slots are moving")

    async def _run_scripts(
        self, body: str, calls: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[Any]:
        """EVALSHA a one-key script for each (key, args)."""
        return await self._eval_many(body, [([key], args) for key, args in calls])

    async def load(self, customer_ids: Sequence[str]) -> dict[str, Stored]:
        # On a Cluster one customer per call (a script never crosses a slot), through the
        # per-node pipelines: 34-36 us of the worker's CPU per customer where an HMGET in
        # redis-py's cluster pipeline took 42-44 (500 customers), and a moved slot is followed.
        size = 1 if self.cluster else MANY_CHUNK
        calls = [
            ([keys.customer(cid) for cid in chunk], ()) for chunk in _chunks(customer_ids, size)
        ]
        replies = await self._eval_many(LOAD_MANY_LUA, calls)
        rows = [row for reply in replies for row in reply]
        return {cid: _stored(cid, row) for cid, row in zip(customer_ids, rows, strict=True)}

    async def save(self, writes: Sequence[Write]) -> dict[str, int | None]:
        if not writes:
            return {}
        calls = [
            (
                [keys.customer(w.customer_id)],
                (
                    w.expected_version,
                    w.state.to_json(),
                    _outbox_json(w.outbox),
                    _gaps_json(w.gaps),
                ),
            )
            for w in writes
        ]
        if self.cluster:
            # The index lives on other slots: a round trip of its own, before the states.
            # LT: only ever earlier here; confirm() sets the exact time afterwards.
            await self._index(
                {w.customer_id: w.timer for w in writes if w.timer is not None}, lt=True
            )
            results = await self._eval_many(SAVE_LUA, calls)
        else:
            results = await self._save_single(writes, calls)
        return {
            w.customer_id: (v if (v := int(r)) >= 0 else None)
            for w, r in zip(writes, results, strict=True)
        }

    async def _index(self, timers: dict[str, TimerEntry], lt: bool = False) -> None:
        """Cluster: set the customers' timer index entries (those with a due time), one ZADD
        per partition's index, not one per customer: a batch touches a few indexes, and each
        command in redis-py's cluster pipeline costs about 20-40 us of the worker's CPU."""
        by_index: dict[str, dict[str, int]] = {}
        for customer_id, entry in timers.items():
            if entry.due is not None:
                by_index.setdefault(keys.timer_index(entry.shard), {})[customer_id] = entry.due
        if not by_index:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, members in by_index.items():
            pipe.zadd(key, members, lt=lt)
        await pipe.execute()

    async def _save_single(
        self, writes: Sequence[Write], calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """One round trip: SAVE_MANY_LUA per chunk of writes (each customer's index entry, then
        its state, inside one script call)."""
        many: list[tuple[list[str], list[Any]]] = []
        for chunk in _chunks(list(zip(writes, calls, strict=True)), MANY_CHUNK):
            chunk_keys: list[str] = []
            flat: list[str | int] = []
            for w, (call_keys, args) in chunk:
                due = w.timer.due if w.timer is not None else None
                shard = w.timer.shard if w.timer is not None else 0
                chunk_keys += [call_keys[0], keys.timer_index(shard)]
                flat += [*args, w.customer_id, "" if due is None else due]
            many.append((chunk_keys, flat))
        replies = await self._eval_many(SAVE_MANY_LUA, many)
        return [result for reply in replies for result in reply]

    async def confirm(
        self,
        versions: dict[str, int],
        timers: dict[str, TimerEntry],
    ) -> None:
        if not self.cluster:
            await self._confirm_single(versions, timers)
            return
        # A customer's index is on another slot than its hash: no script can check its version
        # and write its entry at once. So the exact entries go first, then each customer's
        # version is read (with its outbox cleared), and a customer that has moved on since
        # its entry was computed is woken (score 0, LT): whichever order the new owner's save,
        # its confirm and this run in, the entry ends exact for the newest state or early,
        # never late (an early wake only re-indexes the customer).
        await self._index(timers)
        ids = [*versions, *(cid for cid in timers if cid not in versions)]
        current = await self._run_scripts(
            CONFIRM_ONE_LUA,
            [(keys.customer(cid), ("" if (v := versions.get(cid)) is None else v,)) for cid in ids],
        )
        moved = [
            (cid, entry.shard)
            for cid, now in zip(ids, current, strict=True)
            if (entry := timers.get(cid)) is not None
            and entry.due is not None
            and entry.version is not None
            and int(now) != entry.version
        ]
        if moved:
            await self.wake(moved)

    async def _confirm_single(self, clear: dict[str, int], timers: dict[str, TimerEntry]) -> None:
        rows = [
            (cid, clear.get(cid), timers.get(cid))
            for cid in [*clear, *(cid for cid in timers if cid not in clear)]
        ]
        rows = [r for r in rows if r[1] is not None or (r[2] is not None and r[2].due is not None)]
        calls: list[tuple[list[str], list[Any]]] = []
        for chunk in _chunks(rows, MANY_CHUNK):
            chunk_keys: list[str] = []
            flat: list[str | int] = []
            for cid, version, entry in chunk:
                due = entry.due if entry is not None else None
                seen = entry.version if entry is not None else None
                chunk_keys += [keys.customer(cid), keys.timer_index(entry.shard if entry else 0)]
                flat += [
                    cid,
                    "" if version is None else version,
                    "" if due is None else due,
                    "" if seen is None else seen,
                ]
            calls.append((chunk_keys, flat))
        await self._eval_many(CONFIRM_MANY_LUA, calls)

    async def advance_clock(self, seconds: int, shard: int | None = None) -> int:
        key = keys.event_clock() if shard is None else keys.shard_clock(shard)
        (result,) = await self._run_scripts(ADVANCE_CLOCK_LUA, [(key, (seconds,))])
        return int(result)

    async def advance_clocks(self, shards: dict[int, int]) -> int:
        """Raise each shard's clock and the global one (to the newest) in one round trip."""
        calls = [([keys.shard_clock(shard)], (seconds,)) for shard, seconds in shards.items()]
        calls.append(([keys.event_clock()], (max(shards.values()),)))
        return int((await self._eval_many(ADVANCE_CLOCK_LUA, calls))[-1])

    async def clock(self, shard: int | None = None) -> int | None:
        key = keys.event_clock() if shard is None else keys.shard_clock(shard)
        raw = await self.client.get(key)
        return int(raw) if raw is not None else None

    async def due(self, shard: int, until: int, limit: int) -> list[str]:
        members = await self.client.zrangebyscore(
            keys.timer_index(shard), "-inf", until, start=0, num=limit
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    async def unindex(self, shard: int, versions: Mapping[str, int]) -> None:
        if not versions:
            return
        index = keys.timer_index(shard)
        if not self.cluster:
            calls: list[tuple[list[str], list[Any]]] = []
            for chunk in _chunks(list(versions.items()), MANY_CHUNK):
                calls.append(
                    (
                        [index, *(keys.customer(cid) for cid, _ in chunk)],
                        [field for row in chunk for field in row],
                    )
                )
            await self._eval_many(UNINDEX_MANY_LUA, calls)
            return
        # The index and the hashes are on different slots (see confirm): remove, then read the
        # versions, and wake a customer written since it was found with no timer left.
        ids = list(versions)
        await self.client.zrem(index, *ids)
        current = await self._run_scripts(
            CONFIRM_ONE_LUA, [(keys.customer(cid), ("",)) for cid in ids]
        )
        moved = [
            (cid, shard) for cid, now in zip(ids, current, strict=True) if int(now) != versions[cid]
        ]
        if moved:
            await self.wake(moved)

    async def oldest_due(self, shards: Sequence[int]) -> dict[int, int | None]:
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            pipe.zrangebyscore(keys.timer_index(shard), 1, "+inf", start=0, num=1, withscores=True)
        replies = await pipe.execute()
        return {
            shard: int(reply[0][1]) if reply else None
            for shard, reply in zip(shards, replies, strict=True)
        }

    async def timer_heads(self, shards: Sequence[int]) -> dict[int, tuple[int | None, int | None]]:
        pipe = self.client.pipeline(transaction=False)
        for shard in shards:
            pipe.get(keys.shard_clock(shard))
            pipe.zrange(keys.timer_index(shard), 0, 0, withscores=True)
        replies = await pipe.execute()
        heads: dict[int, tuple[int | None, int | None]] = {}
        for index, shard in enumerate(shards):
            clock, first = replies[2 * index], replies[2 * index + 1]
            heads[shard] = (
                int(clock) if clock is not None else None,
                int(first[0][1]) if first else None,
            )
        return heads

    async def next_due_in(self, shard: int) -> int | None:
        first = await self.client.zrange(keys.timer_index(shard), 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def gap_histograms(self, categories: Sequence[str]) -> dict[str, dict[int, int]]:
        """Summed over the stats shards (read every `learn_refresh_s`, not per batch)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.stats_shards):
            pipe.hgetall(keys.stats(shard, "gaps"))
        histograms: dict[str, dict[int, int]] = {category: {} for category in categories}
        for row in await pipe.execute():
            for field, count in row.items():
                days, _, category = _text(field).partition("|")
                if category in histograms:
                    histogram = histograms[category]
                    histogram[int(days)] = histogram.get(int(days), 0) + int(count)
        return histograms

    async def contribute(self, contributions: Sequence[Contribution]) -> None:
        by_shard: dict[int, list[Any]] = {}
        for c in contributions:
            by_shard.setdefault(stats_shard(c.customer_id, self.stats_shards), []).append(
                (
                    c.customer_id,
                    c.version,
                    c.partition,
                    c.r,
                    c.f,
                    c.m,
                    c.tier,
                    c.segment,
                    c.grade,
                    c.stage,
                    [[g.category, str(g.days), str(g.version)] for g in c.gaps],
                )
            )
        await self._eval_many(
            CONTRIBUTE_LUA,
            [
                ([keys.stats(shard, part) for part in keys.STATS_PARTS], [_json_arg(rows)])
                for shard, rows in sorted(by_shard.items())
            ],
        )

    async def population(self) -> tuple[int, dict[str, int]]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.stats_shards):
            pipe.hgetall(keys.stats(shard, "sum"))
        total = 0
        sums = {"r": 0, "f": 0, "m": 0}
        for row in await pipe.execute():
            decoded = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in row.items()}
            total += decoded.get("n", 0)
            for dim in sums:
                sums[dim] += decoded.get(dim, 0)
        return total, sums

    async def count_at_most(self, dimension: str, values: Sequence[int]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for value in values:
            for shard in range(self.stats_shards):
                pipe.zcount(keys.stats(shard, dimension), "-inf", value)
        counts = await pipe.execute()
        n = self.stats_shards
        return [sum(counts[i * n : (i + 1) * n]) for i in range(len(values))]

    async def customers_between(
        self, dimension: str, low: float, high: float
    ) -> AsyncIterator[list[tuple[str, int]]]:
        for shard in range(self.stats_shards):  # a shard at a time, then in slices
            members = cast(
                list[bytes],
                await self.client.zrangebyscore(keys.stats(shard, dimension), f"({low}", high),
            )
            for start in range(0, len(members), BULK_SLICE):
                part = [_text(m) for m in members[start : start + BULK_SLICE]]
                yield await self._partitions_of(shard, part)

    async def distribution(self) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for shard in range(self.stats_shards):
            pipe.hgetall(keys.stats(shard, "dist"))
        totals: dict[str, int] = {}
        for row in await pipe.execute():
            for label, count in row.items():
                name = label.decode() if isinstance(label, bytes) else label
                totals[name] = totals.get(name, 0) + int(count)
        return {label: count for label, count in sorted(totals.items()) if count}

    async def snapshot(self) -> str | None:
        raw = await self.client.get(keys.snapshot())
        return raw.decode() if isinstance(raw, bytes) else raw

    async def publish_snapshot(self, version: int, document: str) -> bool:
        (stored,) = await self._eval_many(
            PUBLISH_SNAPSHOT_LUA,
            [([keys.snapshot(), keys.snapshot_version()], (version, document))],
        )
        return bool(stored)

    async def snapshot_version(self) -> int:
        raw = await self.client.get(keys.snapshot_version())
        return int(raw) if raw is not None else 0

    async def snapshot_woken(self) -> int | None:
        raw = await self.client.get(keys.snapshot_woken())
        return int(raw) if raw is not None else None

    async def set_snapshot_woken(self, version: int) -> None:
        await self.client.set(keys.snapshot_woken(), version)

    async def unclassified(self) -> AsyncIterator[list[tuple[str, int]]]:
        for shard in range(self.stats_shards):
            page: list[str] = []
            async for member in self.client.sscan_iter(
                keys.stats(shard, "unclassified"), count=BULK_SLICE
            ):
                page.append(_text(member))
                if len(page) == BULK_SLICE:
                    yield await self._partitions_of(shard, page)
                    page = []
            if page:
                yield await self._partitions_of(shard, page)

    async def _partitions_of(self, shard: int, ids: list[str]) -> list[tuple[str, int]]:
        """(customer, partition) of a slice of one stats shard's customers."""
        metas = await self.client.hmget(keys.stats(shard, "meta"), ids)
        # meta: "version|partition|..."; a customer removed meanwhile has none.
        return [
            (cid, int(_text(meta).split("|")[1]))
            for cid, meta in zip(ids, metas, strict=True)
            if meta
        ]

    async def try_lock(self, ttl_s: int) -> bool:
        # A token of this holder: work that outlives the TTL must not, at its end, delete the
        # lock another worker has taken since (unlock compares it).
        token = uuid.uuid4().hex
        if await self.client.set(keys.snapshot_lock(), token, nx=True, ex=ttl_s):
            self._lock_token = token
            return True
        return False

    async def policy_version(self) -> str | None:
        raw = await self.client.get(keys.policy_version())
        return raw.decode() if isinstance(raw, bytes) else raw

    async def set_policy_version(self, version: str) -> None:
        # Superseded first: a crash before the SET leaves the old version stored and already
        # superseded, and the next adoption (of this same version) completes it.
        previous = await self.policy_version()
        if previous is not None and previous != version:
            await self.client.sadd(keys.policy_superseded(), previous)
        await self.client.srem(keys.policy_superseded(), version)
        await self.client.set(keys.policy_version(), version)

    async def policy_superseded(self, version: str) -> bool:
        return bool(await self.client.sismember(keys.policy_superseded(), version))

    async def all_customers(self) -> AsyncIterator[list[tuple[str, int]]]:
        for shard in range(self.stats_shards):
            page: list[tuple[str, int]] = []
            async for cid, meta in self.client.hscan_iter(
                keys.stats(shard, "meta"), count=BULK_SLICE
            ):
                page.append((_text(cid), int(_text(meta).split("|")[1])))
                if len(page) == BULK_SLICE:
                    yield page
                    page = []
            if page:
                yield page

    async def unlock(self) -> None:
        token, self._lock_token = self._lock_token, None
        if token is not None:
            await self.client.eval(UNLOCK_LUA, 1, keys.snapshot_lock(), token)

    async def wake(self, entries: Sequence[tuple[str, int]]) -> None:
        """Put customers at the front of their partition's timer index (score 0), so the
        owning worker reclassifies them against a new snapshot."""
        by_partition: dict[int, list[str]] = {}
        for customer_id, partition in entries:
            by_partition.setdefault(partition, []).append(customer_id)
        for partition, ids in by_partition.items():
            for start in range(0, len(ids), BULK_SLICE):
                members = dict.fromkeys(ids[start : start + BULK_SLICE], 0)
                await self.client.zadd(keys.timer_index(partition), members, lt=True)

    async def scan(self) -> AsyncIterator[Stored]:
        batch: list[str] = []
        async for raw_key in self.client.scan_iter(match=keys.CUSTOMER_PATTERN, count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            batch.append(keys.customer_id_of(key))
            if len(batch) >= 500:
                for stored in (await self.load(batch)).values():
                    yield stored
                batch = []
        if batch:
            for stored in (await self.load(batch)).values():
                yield stored

    async def close(self) -> None:
        for client in self._nodes.values():
            await client.aclose()
        await self.client.aclose()
