"""The hiredis packer sends exactly the bytes redis-py's own packer would."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection

from state.redis_store import PackingConnection, connect

COMMANDS: list[tuple[Any, ...]] = [
    ("GET", "mf:{c:alice}"),
    ("EVALSHA", "0" * 40, 3, "mf:{c:a}", "mf:{c:b}", "mf:{t:0}", '[["1","{}","",""]]'),
    ("HSET", b"key", "field", "h\u00e9llo \u4e2d\u6587", 0, -17, 2**62),
    ("SCRIPT LOAD", "return 1"),
    (b"CONFIG GET", b"maxmemory"),
    ("ZADD", "mf:{t:1}", "LT", 1.5, "alice"),  # a float: redis-py's packer
    ("SET", "big", "x" * 100_000),  # beyond redis-py's buffer cutoff
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_packed_bytes_equal_redis_py(command: tuple[Any, ...]) -> None:
    ours = b"".join(PackingConnection().pack_command(*command))
    theirs = b"".join(Connection().pack_command(*command))
    assert ours == theirs


def test_only_plain_tcp_connections_are_replaced() -> None:
    plain = connect("redis://127.0.0.1:6379/0")
    assert plain.connection_pool.connection_class is PackingConnection
    tls = connect("rediss://127.0.0.1:6380/0")
    assert tls.connection_pool.connection_class is SSLConnection
