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
from tieredcache.keys import CacheKey, Tag
from tieredcache.layers.redis._sync.store import NODE_CALL_WORK

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
    """20 tenants x 16 buckets = 320 slots go out as one script call per node (each
    carrying all of that node's slots), pipelined: no COMMAND GETKEYS round trip
    (redis-py's cluster pipeline asks the server for the keys of an EVALSHA unless
    told its node), and every tenant's tagged entries are gone."""
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
        # Before: one script call per slot (320); now one per node and NODE_CALL_WORK
        # tag-slots (640 here: 2 tags x 320 slots).
        calls = _command_calls(cluster_clients, "evalsha")
        assert calls <= len(cluster_clients) + 640 // NODE_CALL_WORK
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
        calls = _command_calls(cluster_clients, "evalsha")
        assert calls <= len(cluster_clients) + 320 // NODE_CALL_WORK
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


def _move_slot(clients: list[Any], slot: int, source: Any, target: Any) -> None:
    """Move ``slot`` (with its keys) from ``source`` to ``target``, as a resharding does."""
    source_id = source.execute_command("CLUSTER", "MYID")
    target_id = target.execute_command("CLUSTER", "MYID")
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    host, port = (
        target.connection_pool.connection_kwargs["host"],
        target.connection_pool.connection_kwargs["port"],
    )
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
    for client in clients:
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_slot_moved_under_the_batch_is_invalidated_on_its_new_node(
    redis_cluster_nodes: list[tuple[str, int]], cluster_clients: list[Any]
) -> None:
    """A tenant slot moved to another node after the worker learned the slot map: the
    node's call is refused (the server serves no name of a slot it lost), every slot is
    sent again alone, redis-py follows the MOVED, and the moved slot's entries and
    generations are invalidated on their new node like every other slot's."""
    app = TieredCache("bm", [MemoryLayer(), RedisLayer(cluster_nodes=redis_cluster_nodes)])
    layer = RedisLayer(cluster_nodes=redis_cluster_nodes)
    worker = TieredCache("bm", [layer], broadcast="publish")
    loads: list[str] = []
    store = layer.sync_store()
    keyspace = layer.keyspace
    moved: tuple[int, Any, Any] | None = None
    try:
        item = _fill(app, loads)
        assert worker.invalidate_many([Invalidation("other", tags=("x",))]).ok  # map learned
        # One of t3's 16 slots moves (the bucket of the key body "x").
        prefix = keyspace.slot_of(CacheKey("bm", "t3", "x"))
        slot = dict(keyspace.tenant_slots_of("bm", "t3"))[prefix]
        # A fill of that slot in flight: its lease created the generation of group:1.
        gens, _ = layer.lease(CacheKey("bm", "t3", "x"), [Tag("bm", "t3", "group:1")])
        leased = gens[1]
        assert leased is not None
        owners = {c.execute_command("CLUSTER", "MYID"): c for c in cluster_clients}
        ranges = cluster_clients[0].execute_command("CLUSTER", "SLOTS")
        source = owners[next(r[2][2] for r in ranges if r[0] <= slot <= r[1])]
        target = next(c for c in cluster_clients if c is not source)
        _move_slot(cluster_clients, slot, source, target)
        moved = (slot, target, source)
        before = store.tags_by_node_refused
        result = worker.invalidate_many([Invalidation(t, tags=("group:1",)) for t in TENANTS])
        assert result.ok, result.failures
        assert store.tags_by_node_refused == before + 1
        # The generation of group:1 in the moved slot was bumped on the new node.
        assert target.get(f"{prefix}:gt:group:1") not in (None, leased)
        assert source.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        app.layers[0].clear()  # type: ignore[union-attr]
        for tenant in TENANTS:
            with tenant_scope(tenant):
                for n in range(5):
                    item(n)
        # group:1 is item 1 and item 4 of every tenant, in whatever slot they live.
        assert len(loads) == 100 + 2 * len(TENANTS)
        # The map is learned again: the next batch goes per node once more.
        assert worker.invalidate_many([Invalidation("t3", tags=("group:2",))]).ok
        assert store.tags_by_node_refused == before + 1
    finally:
        if moved is not None:
            slot, now_owner, old_owner = moved
            _move_slot(cluster_clients, slot, now_owner, old_owner)
        app.close()
        worker.close()


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_without_script_flags_every_slot_is_sent_alone(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The per-slot path (a server that cannot load a script with flags, Redis < 7.0,
    or a refused node call) invalidates the same entries as the per-node path."""
    if where == "standalone":
        url = request.getfixturevalue("redis_url")
        layer = RedisLayer(url=url)
        app = TieredCache("bs", [MemoryLayer(), RedisLayer(url=url)])
    else:
        nodes = request.getfixturevalue("redis_cluster_nodes")
        layer = RedisLayer(cluster_nodes=nodes)
        app = TieredCache("bs", [MemoryLayer(), RedisLayer(cluster_nodes=nodes)])
    worker = TieredCache("bs", [layer], broadcast="publish")
    loads: list[str] = []
    try:
        item = _fill(app, loads)
        layer.sync_store().tags_by_node = False
        result = worker.invalidate_many([Invalidation(t, tags=("item:2",)) for t in TENANTS])
        assert result.ok, result.failures
        app.layers[0].clear()  # type: ignore[union-attr]
        for tenant in TENANTS:
            with tenant_scope(tenant):
                for n in range(5):
                    item(n)
        assert len(loads) == 100 + len(TENANTS)
    finally:
        app.close()
        worker.close()


def test_hash_slots_are_the_clusters() -> None:
    """The keyspace's hash slot (used to place a tenant's slots on nodes) is Redis's."""
    from redis.crc import key_slot

    from tieredcache.layers.redis.keyspace import RedisKeyspace, hash_slot

    keyspace = RedisKeyspace("tc", 16)
    for tenant in ("t0", "acme", "T-9.x"):
        for prefix, slot in keyspace.tenant_slots_of("ns", tenant):
            assert slot == key_slot(prefix.encode()) == hash_slot(f"{prefix}:gt:a")
    for name in ("plain", "{}x", "a{b}c", "{a}{b}", "x{"):
        assert hash_slot(name) == key_slot(name.encode())


def test_a_server_that_cannot_load_the_node_script_is_sent_each_slot_alone(
    redis_url: str,
) -> None:
    """A server that refuses the per-node script's shebang (Redis < 7.0 compiles none; a
    server without the flag names it) answers the batch per slot, and from then on the
    layer asks it no more."""
    app = TieredCache("bc", [MemoryLayer(), RedisLayer(url=redis_url)])
    layer = RedisLayer(url=redis_url)
    worker = TieredCache("bc", [layer], broadcast="publish")
    loads: list[str] = []
    try:
        item = _fill(app, loads)
        store = layer.sync_store()
        store._tags_node.script = "#!lua flags=no-such-flag\nreturn 0"  # a flag it lacks
        store._tags_node.sha = "0" * 40  # NOSCRIPT, then a load that fails
        result = worker.invalidate_many([Invalidation(t, tags=("item:3",)) for t in TENANTS])
        assert result.ok, result.failures
        assert not store.tags_by_node and store.tags_by_node_refused == 1
        assert worker.invalidate_many([Invalidation("t1", tags=("item:0",))]).ok
        assert store.tags_by_node_refused == 1  # not tried again
        app.layers[0].clear()  # type: ignore[union-attr]
        for tenant in TENANTS:
            with tenant_scope(tenant):
                item(3)
        assert len(loads) == 100 + len(TENANTS)
    finally:
        app.close()
        worker.close()
