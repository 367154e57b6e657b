"""Automatic pipelining of the async Redis client, against real Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.autopipeline import AutoPipeline

pytestmark = pytest.mark.redis


def _pipeline_of(layer: RedisLayer) -> AutoPipeline:
    client = layer.async_store().client
    assert isinstance(client, AutoPipeline)
    return client


async def test_concurrent_misses_share_round_trips(redis_url: str) -> None:
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
        assert await item(-1) == {"n": -1}  # alone: sent at once, nothing batched
        pipeline = _pipeline_of(layer)
        assert pipeline.batches == 0
        results = await asyncio.gather(*(item(n) for n in range(300)))
        assert results == [{"n": n} for n in range(300)]
        assert sorted(loads) == [-1, *range(300)]
        # 300 misses are 900 commands (GET, lock, fill); they left in far fewer writes
        assert pipeline.batched >= 800
        assert pipeline.batches * 8 <= pipeline.batched
        memory.clear()
        again = await asyncio.gather(*(item(n) for n in range(300)))
        assert again == results
        assert len(loads) == 301  # every value came back from Redis, none reloaded
    await cache.aclose()


async def test_an_error_reply_fails_only_its_own_command(redis_url: str) -> None:
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url))
    await pipeline.client.set("ap:a", b"1")
    await pipeline.client.set("ap:b", b"2")
    first, bad, second = await asyncio.gather(
        pipeline.get("ap:a"),
        pipeline.evalsha("0" * 40, 0),
        pipeline.get("ap:b"),
        return_exceptions=True,
    )
    assert (first, second) == (b"1", b"2")
    assert isinstance(bad, redis.exceptions.NoScriptError)
    assert pipeline.batches == 1  # the first went alone, the other two together
    await pipeline.aclose()


async def test_flushed_scripts_are_loaded_once_for_a_whole_batch(redis_url: str) -> None:
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url))
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
    assert loads == 1
    await pipeline.aclose()


async def test_a_cancelled_caller_does_not_disturb_the_others(redis_url: str) -> None:
    pipeline = AutoPipeline(redis.asyncio.Redis.from_url(redis_url))
    await pipeline.client.mset({f"ap:c{n}": n for n in range(5)})
    tasks = [asyncio.create_task(pipeline.get(f"ap:c{n}")) for n in range(5)]
    await asyncio.sleep(0)  # the first is on its way, the others queued
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [done[n] for n in (0, 1, 3, 4)] == [b"0", b"1", b"3", b"4"]
    assert pipeline._busy == 0 and not pipeline._queue
    await pipeline.aclose()


async def test_a_dead_server_fails_every_queued_caller_and_leaks_nothing(
    unused_tcp_port: int,
) -> None:
    client = redis.asyncio.Redis(port=unused_tcp_port, socket_connect_timeout=0.2)
    pipeline = AutoPipeline(client)
    results = await asyncio.gather(
        *(pipeline.get(f"k{n}") for n in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
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
    assert pipeline.batches > 0
    memory.clear()
    assert await calls() == first
    stats = cache.stats().layers["redis"]
    assert stats.errors == 0 and stats.hits == len(first)
    await cache.aclose()
