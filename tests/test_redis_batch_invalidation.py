"""The Redis layer's batch invalidation (what the CDC worker sends per batch): every
slot's script in one pipeline, one round trip per node on Redis Cluster, and a
server that lost its scripts (SCRIPT FLUSH, a failover) served again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tieredcache import Invalidation, MemoryLayer, RedisLayer, TieredCache, tenant_scope

pytestmark = pytest.mark.redis

TENANTS = [f"t{i}" for i in range(20)]


def _command_calls(clients: list[Any], name: str) -> int:
    return sum(
        int(c.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)) for c in clients
    )


@pytest.fixture
def cluster_clients(redis_cluster_nodes: list[tuple[str, int]]) -> Iterator[list[Any]]:
    clients = [redis.Redis(host=h, port=p) for h, p in redis_cluster_nodes]
    yield clients
    for client in clients:
        client.close()


def _fill(app: TieredCache, loads: list[str]) -> Any:
    @app.cached(ttl=600, tags=lambda n: [f"item:{n}", f"group:{n % 3}"])
    def item(n: int) -> str:
        loads.append(f"{n}")
        return f"v{len(loads)}"

    for tenant in TENANTS:
        with tenant_scope(tenant):
            for n in range(5):
                item(n)
    return item


def test_a_batch_over_many_slots_on_a_cluster_is_pipelined_per_node(
    redis_cluster_nodes: list[tuple[str, int]],
    cluster_clients: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 tenants x 16 buckets = 320 slot scripts go out pipelined: no COMMAND GETKEYS
    round trip per script (redis-py's cluster pipeline asks the server for the keys
    of an EVALSHA unless told its node), and every tenant's tagged entries are gone."""
    app = TieredCache("bi", [MemoryLayer(), RedisLayer(cluster_nodes=redis_cluster_nodes)])
    worker = TieredCache("bi", [RedisLayer(cluster_nodes=redis_cluster_nodes)], broadcast="publish")
    loads: list[str] = []
    try:
        item = _fill(app, loads)
        assert len(loads) == 100
        assert worker.invalidate_many([Invalidation("other", tags=("x",))]).ok  # scripts loaded
        for client in cluster_clients:
            client.config_resetstat()
        # Before: each slot's script was its own call and round trip (~0.5 ms each,
        # ~800 per batch of the CDC benchmark).
        cluster = worker.layers[0].sync_store().client  # type: ignore[attr-defined]
        one_by_one: list[Any] = []
        execute = cluster.execute_command
        monkeypatch.setattr(
            cluster, "execute_command", lambda *a, **k: one_by_one.append(a[0]) or execute(*a, **k)
        )
        items = [Invalidation(t, tags=("item:1", "group:2")) for t in TENANTS]
        result = worker.invalidate_many(items)
        assert "EVALSHA" not in one_by_one
        assert result.ok and result.complete, result.failures
        assert _command_calls(cluster_clients, "command|getkeys") == 0
        assert _command_calls(cluster_clients, "evalsha") == len(TENANTS) * 16
        app.layers[0].clear()  # type: ignore[union-attr]  # read Redis again
        for tenant in TENANTS:
            with tenant_scope(tenant):
                for n in range(5):
                    item(n)
        # item:1 and group:2 (items 2) of every tenant were reloaded, nothing else.
        assert len(loads) == 100 + 2 * len(TENANTS)
    finally:
        app.close()
        worker.close()


def test_async_batch_invalidation_on_a_cluster_reaches_every_tenant(
    redis_cluster_nodes: list[tuple[str, int]], cluster_clients: list[Any]
) -> None:
    """The async twin (generated from the same source) routes each script to its node."""
    app = TieredCache("ba", [MemoryLayer(), RedisLayer(cluster_nodes=redis_cluster_nodes)])
    worker = TieredCache("ba", [RedisLayer(cluster_nodes=redis_cluster_nodes)], broadcast="publish")
    loads: list[str] = []
    try:
        item = _fill(app, loads)

        async def invalidate() -> Any:
            assert (await worker.ainvalidate_many([Invalidation("other", tags=("x",))])).ok
            for client in cluster_clients:
                client.config_resetstat()
            try:
                items = [Invalidation(t, tags=("item:3",)) for t in TENANTS]
                return await worker.ainvalidate_many(items)
            finally:
                await worker.layers[0].aclose()  # type: ignore[attr-defined]  # this loop's client

        result = asyncio.run(invalidate())
        assert result.ok, result.failures
        assert _command_calls(cluster_clients, "evalsha") == len(TENANTS) * 16
        app.layers[0].clear()  # type: ignore[union-attr]
        for tenant in TENANTS:
            with tenant_scope(tenant):
                item(3)
                item(4)
        assert len(loads) == 100 + len(TENANTS)
    finally:
        app.close()
        worker.close()


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_a_server_that_lost_its_scripts_is_invalidated_all_the_same(
    where: str, request: pytest.FixtureRequest
) -> None:
    """After SCRIPT FLUSH (as after a failover to a fresh replica) the batch's EVALSHAs
    answer NOSCRIPT: the script is loaded and the batch sent again, and it lands."""
    if where == "standalone":
        url = request.getfixturevalue("redis_url")
        layer = lambda: RedisLayer(url=url)  # noqa: E731
        clients: list[Any] = [redis.Redis.from_url(url)]
    else:
        nodes = request.getfixturevalue("redis_cluster_nodes")
        layer = lambda: RedisLayer(cluster_nodes=nodes)  # noqa: E731
        clients = [redis.Redis(host=h, port=p) for h, p in nodes]
    app = TieredCache("bf", [MemoryLayer(), layer()])
    worker = TieredCache("bf", [layer()], broadcast="publish")
    loads: list[str] = []
    try:
        item = _fill(app, loads)
        assert worker.invalidate_many([Invalidation("t0", tags=("item:0",))]).ok
        for client in clients:
            client.script_flush()
        result = worker.invalidate_many([Invalidation(t, tags=("item:4",)) for t in TENANTS])
        assert result.ok, result.failures
        app.layers[0].clear()  # type: ignore[union-attr]
        for tenant in TENANTS:
            with tenant_scope(tenant):
                item(4)
        assert len(loads) == 100 + 1 + len(TENANTS) - 1  # t0's item:0 was not read again
    finally:
        app.close()
        worker.close()
        for client in clients:
            client.close()
