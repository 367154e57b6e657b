"""Batched Redis I/O of the async layer, against real Redis and Redis Cluster.

Two paths: the multiplexed connection (standalone Redis over TCP or a Unix
socket) and redis-py pipelines gathered per loop turn (Redis Cluster, TLS, or
``multiplex=False``).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.redis.wire.autopipeline import AutoPipeline
from tieredcache.layers.redis.wire.multiplex import MultiplexedConnection

pytestmark = pytest.mark.redis


def _pipeline_of(layer: RedisLayer) -> AutoPipeline:
    client = layer.async_store().client
    assert isinstance(client, AutoPipeline)
    return client


@pytest.fixture(params=["multiplexed", "pipelined"])
async def pipeline(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[AutoPipeline]:
    multiplex = request.param == "multiplexed"
    wrapped = AutoPipeline(redis.asyncio.Redis.from_url(redis_url), multiplex=multiplex)
    assert (wrapped.multiplexed is not None) is multiplex
    yield wrapped
    await wrapped.aclose()


def _writes(pipeline: AutoPipeline) -> int:
    if pipeline.multiplexed is not None:
        return pipeline.multiplexed.writes
    return pipeline.batches


async def test_concurrent_misses_share_writes(redis_url: str) -> None:
    memory = MemoryLayer()
    layer = RedisLayer(url=redis_url, key_prefix="ap1")
    cache = TieredCache("ap", [memory, layer], broadcast=False)
    loads: list[int] = []

    @cache.cached(ttl=60)
    async def item(n: int) -> dict[str, int]:
        loads.append(n)
        await asyncio.sleep(0.01)
        return {"n": n}

    with tenant_scope("acme"):
        assert await item(-2) == {"n": -2}  # connects, loads the scripts
        connection = _pipeline_of(layer).multiplexed
        assert connection is not None
        commands, writes = connection.commands, connection.writes
        assert await item(-1) == {"n": -1}  # alone: each command written at once
        assert (connection.commands - commands, connection.writes - writes) == (2, 2)
        commands, writes = connection.commands, connection.writes
        results = await asyncio.gather(*(item(n) for n in range(300)))
        assert results == [{"n": n} for n in range(300)]
        assert sorted(loads) == [-2, -1, *range(300)]
        # 300 misses are 600 commands (read-or-lock, fill); they left in a few writes
        # (how few depends on how the loads' wake-ups fall into loop turns)
        assert connection.commands - commands == 600
        assert connection.writes - writes <= 60
        memory.clear()
        again = await asyncio.gather(*(item(n) for n in range(300)))
        assert again == results
        assert len(loads) == 302  # every value came back from Redis, none reloaded
    await cache.aclose()


async def test_an_error_reply_fails_only_its_own_command(pipeline: AutoPipeline) -> None:
    await pipeline.client.set("ap:a", b"1")
    await pipeline.client.set("ap:b", b"2")
    await pipeline.get("ap:a")  # connected
    before = _writes(pipeline)
    first, bad, second = await asyncio.gather(
        pipeline.get("ap:a"),
        pipeline.evalsha("0" * 40, 0),
        pipeline.get("ap:b"),
        return_exceptions=True,
    )
    assert (first, second) == (b"1", b"2")
    assert isinstance(bad, redis.exceptions.NoScriptError)
    assert _writes(pipeline) - before == (2 if pipeline.multiplexed else 1)  # last two together


async def test_flushed_scripts_are_loaded_once_for_a_whole_batch(pipeline: AutoPipeline) -> None:
    script = pipeline.register_script("return tonumber(ARGV[1]) * 2")
    loads = 0
    original = pipeline.client.script_load

    async def counting_load(text: Any) -> Any:
        nonlocal loads
        loads += 1
        return await original(text)

    pipeline.client.script_load = counting_load
    await pipeline.client.script_flush()
    results = await asyncio.gather(*(script(args=[n]) for n in range(50)))
    assert results == [2 * n for n in range(50)]
    # The multiplexed connection sends each refused EVALSHA again as EVAL (which
    # caches the script); the pipelines load it once for the batch.
    assert loads == (0 if pipeline.multiplexed else 1)
    assert await pipeline.client.script_exists(script.sha) == [True]


async def test_noscript_is_answered_on_the_multiplexed_connection(redis_url: str) -> None:
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url), multiplex=True)
    try:
        script = pipeline.register_script("return KEYS[1] .. ARGV[1]")
        assert await script(keys=["k"], args=["v"]) == b"kv"
        await pipeline.client.script_flush()
        # The reply is still the future itself (no coroutine per call), resolved by EVAL.
        pending = script(keys=["k\r\n"], args=[b"\x00bin"])
        assert isinstance(pending, asyncio.Future)
        assert await pending == b"k\r\n\x00bin"
        assert pipeline.multiplexed is not None and pipeline.multiplexed.resent == 1
        # An EVALSHA of a script the connection does not know keeps its NOSCRIPT error,
        # and the connection stays in step for the next command.
        unknown = pipeline.evalsha("0" * 40, 0)
        with pytest.raises(redis.exceptions.NoScriptError):
            await unknown
        assert await script(keys=["a"], args=["b"]) == b"ab"
    finally:
        await pipeline.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(pipeline: AutoPipeline) -> None:
    await pipeline.client.mset({f"ap:c{n}": n for n in range(5)})

    async def get(n: int) -> Any:
        return await pipeline.get(f"ap:c{n}")

    tasks = [asyncio.create_task(get(n)) for n in range(5)]
    await asyncio.sleep(0)  # the first is on its way, the others queued
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [done[n] for n in (0, 1, 3, 4)] == [b"0", b"1", b"3", b"4"]
    assert await pipeline.get("ap:c4") == b"4"  # the stream is still in step
    if pipeline.multiplexed is None:
        assert pipeline._busy == 0 and not pipeline._queue


async def test_a_dead_server_fails_every_caller_and_leaks_nothing(unused_tcp_port: int) -> None:
    for multiplex in (True, False):
        client = redis.asyncio.Redis(
            port=unused_tcp_port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
        )
        pipeline = AutoPipeline(client, multiplex=multiplex)
        results = await asyncio.gather(
            *(pipeline.get(f"k{n}") for n in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
        if pipeline.multiplexed is not None:
            assert not pipeline.multiplexed._buffer and not pipeline.multiplexed._connecting
        else:
            assert pipeline._busy == 0 and not pipeline._queue
        await pipeline.aclose()


async def test_a_redis_outage_under_load_is_served_by_the_loader(unused_tcp_port: int) -> None:
    layer = RedisLayer(url=f"redis://127.0.0.1:{unused_tcp_port}/0")
    cache = TieredCache("ap", [MemoryLayer(), layer], broadcast=False)

    @cache.cached(ttl=60)
    async def item(n: int) -> int:
        return n

    with tenant_scope("acme"):
        assert await asyncio.gather(*(item(n) for n in range(100))) == list(range(100))
    assert cache.stats().layers["redis"].errors > 0
    await cache.aclose()


async def test_the_multiplexed_connection_comes_back_after_a_restart(
    fresh_redis_server: Any,
) -> None:
    port = int(fresh_redis_server.url.rsplit(":", 1)[1].split("/")[0])
    connection = MultiplexedConnection(port=port)
    assert await connection.execute("SET", "k", "v") == b"OK"
    fresh_redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await connection.execute("GET", "k")
    fresh_redis_server.restart()
    assert await connection.execute("PING") == b"PONG"  # reconnected by itself
    await connection.aclose()
    with pytest.raises(redis.exceptions.ConnectionError):
        await connection.execute("PING")  # closed for good


async def test_a_silent_server_times_out_and_the_next_request_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []
    answer = False

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        while data := await reader.read(1024):
            if answer:
                writer.write(b"+PONG\r\n" * data.count(b"PING"))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = MultiplexedConnection(port=port, timeout=0.2)
    started = time.monotonic()
    results = await asyncio.gather(
        *(connection.execute("PING") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
    assert 0.15 < time.monotonic() - started < 1.0
    answer = True
    assert await connection.execute("PING") == b"PONG"
    assert len(accepted) == 2  # the timed-out connection was dropped, a new one made
    await connection.aclose()
    for writer in accepted:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_auth_and_db_selection(fresh_redis_server: Any) -> None:
    """The multiplexed connection sends AUTH and SELECT from the URL; a wrong password raises
    AuthenticationError and leaves no handshake reply unretrieved."""
    host_port = fresh_redis_server.url.split("//", 1)[1].split("/", 1)[0]
    setup = redis.asyncio.Redis.from_url(fresh_redis_server.url)
    await setup.config_set("requirepass", "s3cret")
    await setup.aclose()
    admin = redis.asyncio.Redis.from_url(f"redis://:s3cret@{host_port}/3")
    client = redis.asyncio.Redis.from_url(f"redis://:s3cret@{host_port}/3")
    pipeline = AutoPipeline(client)
    assert pipeline.multiplexed is not None
    await admin.set("in-db-3", b"yes")
    assert await pipeline.get("in-db-3") == b"yes"
    wrong = AutoPipeline(redis.asyncio.Redis.from_url(f"redis://:nope@{host_port}/3"))
    wrong.register_script("return 1")  # its SCRIPT LOAD is refused too, and retrieved
    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
    with pytest.raises(redis.exceptions.AuthenticationError):
        await wrong.get("in-db-3")
    await asyncio.sleep(0.05)  # a window for a stray "never retrieved" report (an absence)
    gc.collect()
    assert not unhandled, "a handshake reply was left unretrieved"
    await pipeline.aclose()
    await wrong.aclose()
    await admin.aclose()


@pytest.mark.cluster
async def test_batches_reach_every_node_of_a_cluster(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    memory = MemoryLayer()
    layer = RedisLayer(cluster_nodes=redis_cluster_nodes, key_prefix="ap2")
    cache = TieredCache("ap", [memory, layer], broadcast=False)

    @cache.cached(ttl=60)
    async def item(tenant: str, n: int) -> str:
        return f"{tenant}:{n}"

    tenants = [f"t{i}" for i in range(12)]  # spread over the cluster's slots

    async def calls() -> list[str]:
        out = []
        for tenant in tenants:
            with tenant_scope(tenant):
                out.extend(await asyncio.gather(*(item(tenant, n) for n in range(20))))
        return out

    first = await calls()
    assert first == [f"{t}:{n}" for t in tenants for n in range(20)]
    pipeline = _pipeline_of(layer)
    assert pipeline.multiplexed is None and pipeline.batches > 0
    memory.clear()
    assert await calls() == first
    stats = cache.stats().layers["redis"]
    assert stats.errors == 0 and stats.hits == len(first)
    await cache.aclose()


async def test_closing_while_connecting_keeps_no_connection(redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    connection = MultiplexedConnection(port=port)
    pending = connection.execute("PING")  # starts connecting
    await connection.aclose()
    with pytest.raises(redis.exceptions.ConnectionError):
        await pending
    await asyncio.sleep(0.05)  # the connect finishes after the close
    assert connection._protocol is None


async def test_scripts_are_loaded_when_the_multiplexed_connection_opens(redis_url: str) -> None:
    """A first EVALSHA on a new connection never meets NOSCRIPT: going again as EVAL
    would put it behind commands sent after it (a lock release behind a lock attempt)."""
    admin = redis.asyncio.Redis.from_url(redis_url)
    await admin.script_flush()
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url), multiplex=True)
    try:
        first = pipeline.register_script("return 'one'")
        second = pipeline.register_script("return 'two'")
        assert await first() == b"one"  # connects: both scripts loaded on the way
        assert await second() == b"two"
        assert pipeline.multiplexed is not None and pipeline.multiplexed.resent == 0
        assert await admin.script_exists(first.sha, second.sha) == [True, True]
    finally:
        await pipeline.aclose()
        await admin.aclose()


async def test_a_server_that_hangs_up_at_once_fails_the_caller_once() -> None:
    """Redis at maxclients answers an error and closes. With scripts to preload the
    caller still gets a ConnectionError at once, after one connection attempt."""

    async def full(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"-ERR max number of clients reached\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(full, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = MultiplexedConnection(host="127.0.0.1", port=port)
    connection.scripts["0" * 40] = b"return 1"
    attempts = 0
    open_connection = connection._open

    async def counted(loop: asyncio.AbstractEventLoop) -> Any:
        nonlocal attempts
        attempts += 1
        return await open_connection(loop)

    connection._open = counted  # type: ignore[method-assign]
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(connection.execute("GET", "k"), 1.0)
        assert attempts == 1
    finally:
        await connection.aclose()
        server.close()
        await server.wait_closed()


async def test_a_failing_noscript_resend_still_answers_its_caller(redis_url: str) -> None:
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url), multiplex=True)
    try:
        script = pipeline.register_script("return 7")
        assert await script() == 7
        assert pipeline.multiplexed is not None
        pipeline.multiplexed.scripts[script.sha] = "not bytes"  # type: ignore[assignment]
        await pipeline.client.script_flush()
        with pytest.raises(TypeError):
            await asyncio.wait_for(script(), 1.0)
        assert await pipeline.get("anything") is None  # the connection is in step
    finally:
        await pipeline.aclose()
