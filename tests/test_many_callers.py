"""10,000 concurrent asyncio callers with default settings (issue 9 #12).

The deadline of a Redis reply must measure Redis, not the caller's own event
loop: with thousands of tasks queued, one turn of the loop takes longer than
``socket_timeout`` (0.25 s), and replies that Redis sent in microseconds are
read after their deadline.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time

import pytest
import redis.asyncio

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.redis.wire.autopipeline import AutoPipeline
from tieredcache.layers.redis.wire.multiplex import MultiplexedConnection

pytestmark = pytest.mark.redis

CALLERS = 10_000
KEYS = 3_000
REQUESTS = 30_000


async def test_ten_thousand_callers_load_each_key_once_without_timeouts(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Default settings, 10,000 callers over 3,000 keys: loader calls == distinct keys,
    no timeout logged, the Redis breaker closed, every fill in Redis."""
    layer = RedisLayer(url=redis_url)
    cache = TieredCache("many", [MemoryLayer(), layer])
    calls = 0

    @cache.cached(ttl=60)
    async def load(item: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)  # the Zipf benchmark's loader
        return item * 2

    rng = random.Random(12)
    # Every key once, then skewed repeats: 30,000 requests in all.
    items = [*range(KEYS), *(int(KEYS * rng.random() ** 3) for _ in range(REQUESTS - KEYS))]
    rng.shuffle(items)
    stream = iter(items)
    wrong = 0

    async def caller() -> None:
        nonlocal wrong
        for item in stream:
            if await load(item) != item * 2:
                wrong += 1

    caplog.set_level(logging.WARNING, logger="tieredcache")
    try:
        with tenant_scope("acme"):
            await asyncio.gather(*(caller() for _ in range(CALLERS)))
        assert wrong == 0
        logged = collections.Counter(
            r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
        )
        assert not logged, logged.most_common(5)
        assert calls == KEYS
        stats = cache.stats()
        assert stats.breakers["redis"] == "closed"
        assert stats.layers["redis"].errors == 0
        assert stats.layers["redis"].sets == KEYS
        client = layer.async_store().client
        assert isinstance(client, AutoPipeline) and client.multiplexed is not None
        assert client.multiplexed.timeouts == 0
    finally:
        await cache.aclose()


async def test_a_reply_read_late_by_a_blocked_loop_is_not_a_timeout(redis_url: str) -> None:
    """A reply larger than one socket read, with the loop blocked past the deadline:
    the deadline check finds the server's bytes waiting unread and waits for them
    (counted in ``backlogged``) instead of failing the request."""
    raw = redis.asyncio.Redis.from_url(redis_url)
    big = b"x" * (4 << 20)  # many socket reads' worth
    await raw.set("big", big)
    await raw.aclose()
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    connection = MultiplexedConnection(host=host, port=int(port), timeout=0.1)
    assert await connection.execute("PING") == b"PONG"  # connected
    reply = connection.execute("GET", "big")
    await asyncio.sleep(0)  # the command leaves
    time.sleep(0.3)  # the loop is busy with something else past the deadline
    assert await reply == big
    assert connection.timeouts == 0
    assert connection.backlogged >= 1
    assert connection.lag_max > 0
    await connection.aclose()


async def test_a_silent_server_still_times_out_while_the_loop_is_busy() -> None:
    """The server accepts the connection and never answers: after ``timeout`` the
    request fails with a message that says how late the loop was."""
    accepted: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = MultiplexedConnection(port=port, timeout=0.1)
    reply = connection.execute("PING")
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # a busy loop: the deadline check runs late
    with pytest.raises(redis.exceptions.TimeoutError, match="late"):
        await reply
    assert connection.timeouts == 1
    await connection.aclose()
    for writer in accepted:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_the_lease_mget_takes_the_multiplexed_connection(redis_url: str) -> None:
    """MGET (a fill's lease) and PUBLISH go over the multiplexed connection, so
    redis-py's own timeout (which counts the loop's backlog) is not on the fill path."""
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url))
    assert pipeline.multiplexed is not None
    await pipeline.multiplexed.execute("SET", "a", "1")
    before = pipeline.multiplexed.commands
    assert await pipeline.mget(["a", "b"]) == [b"1", None]
    assert await pipeline.mget("a", "b") == [b"1", None]
    assert await pipeline.publish("nobody", b"x") == 0
    assert pipeline.multiplexed.commands == before + 3
    await pipeline.aclose()
