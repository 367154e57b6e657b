"""The storage-layer contract: the same tests against memory, Redis and Redis Cluster,
and a third-party layer written from the Protocols alone (tests/dict_layer.py).

One parametrized ``layer`` fixture yields a :class:`MemoryLayer` (with an
injected timer), a dict-backed shared layer that subclasses nothing of
tieredcache, a standalone :class:`RedisLayer` and a Redis Cluster
:class:`RedisLayer`; the ``ops`` adapter runs every test once through the sync
methods (``get``, ``set``, ...) and once through their async twins (``aget``,
``aset``, ...). Values cross the layer as the cache would hand them over: the
in-process layer keeps the :class:`Entry`, the Redis layers keep bytes made by
the cache codec.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import redis

from tests.dict_layer import DictSharedLayer
from tieredcache import CacheKey, Entry, MemoryLayer, MsgpackSerializer, RedisLayer, Tag
from tieredcache.layers.base import StorageLayer
from tieredcache.serde import EntryCodec
from tieredcache.testing import FakeClock, await_until

NS = "contract"
CODEC = EntryCodec(MsgpackSerializer())
DECODE = MsgpackSerializer().decoder(Any)


def key(body: str, tenant: str = "acme") -> CacheKey:
    return CacheKey(NS, tenant, body)


def tag(name: str, tenant: str = "acme") -> Tag:
    return Tag(NS, tenant, name)


@pytest.fixture(
    params=[
        "memory",
        "third-party",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.cluster),
    ]
)
def layer(request: pytest.FixtureRequest) -> Iterator[StorageLayer]:
    """The layer under contract: in-process, standalone Redis or Redis Cluster (emptied)."""
    made: MemoryLayer | RedisLayer | DictSharedLayer
    if request.param == "memory":
        made = MemoryLayer(maxsize=1_000, timer=FakeClock())
    elif request.param == "third-party":
        made = DictSharedLayer(timer=FakeClock())
    elif request.param == "redis":
        made = RedisLayer(url=request.getfixturevalue("redis_url"))
    else:
        made = RedisLayer(cluster_nodes=request.getfixturevalue("redis_cluster_nodes"))
    yield made
    made.close()


class Ops:
    """Calls the layer through its sync methods or its async twins; values are decoded."""

    def __init__(self, layer: StorageLayer, use_async: bool) -> None:
        self.layer = layer
        self.use_async = use_async

    # -- helpers ---------------------------------------------------------------
    def entry(self, value: Any, ttl: float = 60.0, stale: float = 0.0) -> Entry:
        now = self.layer.timer()  # type: ignore[attr-defined]
        return Entry(value, now, now + ttl, now + ttl + stale)

    def encode(self, k: CacheKey, entry: Entry) -> Any:
        return entry if self.layer.stores_objects else CODEC.encode(k.full, entry)

    def decode(self, k: CacheKey, stored: Any) -> Any:
        if stored is None:
            return None
        if self.layer.stores_objects:
            assert isinstance(stored, Entry)
            return stored.value
        assert isinstance(stored, bytes)
        return CODEC.decode(k.full, stored, DECODE).value

    async def expire(self, seconds: float) -> None:
        timer = self.layer.timer  # type: ignore[attr-defined]
        if isinstance(timer, FakeClock):
            timer.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    # -- the protocol --------------------------------------------------------------
    async def raw_get(self, k: CacheKey) -> Any:
        return await self.layer.aget(k) if self.use_async else self.layer.get(k)

    async def get(self, k: CacheKey) -> Any:
        return self.decode(k, await self.raw_get(k))

    async def get_many(self, keys: Sequence[CacheKey]) -> list[Any]:
        if self.use_async:
            stored = await self.layer.aget_many(keys)
        else:
            stored = self.layer.get_many(keys)
        return [self.decode(k, s) for k, s in zip(keys, stored, strict=True)]

    async def get_with_lease(self, k: CacheKey, tags: Sequence[Tag] = ()) -> tuple[Any, Any]:
        if self.use_async:
            stored, lease = await self.layer.aget_with_lease(k, tags)
        else:
            stored, lease = self.layer.get_with_lease(k, tags)
        return self.decode(k, stored), lease

    async def set(
        self,
        k: CacheKey,
        value: Any,
        *,
        ttl: float = 60.0,
        stale: float = 0.0,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool:
        entry = self.entry(value, ttl, stale)
        stored = self.encode(k, entry)
        if self.use_async:
            return await self.layer.aset(k, stored, entry, tags, lease, bump)
        return self.layer.set(k, stored, entry, tags, lease, bump)

    async def delete(self, keys: Sequence[CacheKey]) -> None:
        if self.use_async:
            await self.layer.adelete(keys)
        else:
            self.layer.delete(keys)

    async def delete_tags(self, tags: Sequence[Tag]) -> None:
        if self.use_async:
            await self.layer.adelete_tags(tags)
        else:
            self.layer.delete_tags(tags)


@pytest.fixture(params=["sync", "async"])
async def ops(request: pytest.FixtureRequest, layer: StorageLayer) -> AsyncIterator[Ops]:
    """The layer driven through its sync or its async methods."""
    adapter = Ops(layer, request.param == "async")
    yield adapter
    if adapter.use_async:
        await layer.aclose()  # this loop's async client goes with the loop


# -- storage ---------------------------------------------------------------------------


async def test_set_then_get_returns_the_value(ops: Ops) -> None:
    """A stored value is read back unchanged; an unknown key is None."""
    value = {"id": 1, "name": "widget", "tags": ["a", "b"], "price": 9.5}
    assert await ops.set(key("p:1"), value) is True
    assert await ops.get(key("p:1")) == value
    assert await ops.get(key("p:2")) is None


async def test_stored_form_is_entry_in_memory_and_codec_bytes_in_redis(ops: Ops) -> None:
    """The in-process layer returns the Entry object itself; Redis returns the exact bytes."""
    k = key("raw")
    entry = ops.entry("v")
    stored = ops.encode(k, entry)
    if ops.use_async:
        await ops.layer.aset(k, stored, entry)
    else:
        ops.layer.set(k, stored, entry)
    got = await ops.raw_get(k)
    if ops.layer.stores_objects:
        assert got is entry
    else:
        assert got == stored


async def test_entry_expires_at_stale_until(ops: Ops) -> None:
    """An entry is gone once its stale_until has passed (memory: timer; Redis: PX)."""
    await ops.set(key("short"), "v", ttl=0.2)
    await ops.set(key("long"), "w", ttl=60)
    assert await ops.get(key("short")) == "v"
    await ops.expire(0.4)
    assert await ops.get(key("short")) is None
    assert await ops.get(key("long")) == "w"


async def test_entry_is_kept_past_fresh_until_until_stale_until(ops: Ops) -> None:
    """Layers keep a stale entry (fresh_until passed) until stale_until, for stale serving."""
    await ops.set(key("stale"), "v", ttl=0.1, stale=2.0)
    await ops.expire(0.3)
    assert await ops.get(key("stale")) == "v"


async def test_get_many_keeps_order_and_reports_misses_as_none(ops: Ops) -> None:
    """get_many answers position by position, None for each miss, across tenants and buckets."""
    present = {f"item:{i}": i for i in range(0, 12, 2)}
    for body, value in present.items():
        await ops.set(key(body), value)
    await ops.set(key("item:1", tenant="globex"), "other-tenant")
    wanted = [key(f"item:{i}") for i in reversed(range(12))]
    expected = [present.get(k.body) for k in wanted]
    assert await ops.get_many(wanted) == expected
    assert await ops.get_many([]) == []


async def test_delete_removes_exactly_the_given_keys(ops: Ops) -> None:
    """delete([k1, k3]) drops those keys and nothing else."""
    for i in range(5):
        await ops.set(key(f"k{i}"), i)
    await ops.delete([key("k1"), key("k3")])
    assert await ops.get_many([key(f"k{i}") for i in range(5)]) == [0, None, 2, None, 4]


async def test_delete_tags_removes_exactly_the_tagged_keys(ops: Ops) -> None:
    """delete_tags drops every key carrying the tag (spread over buckets) and no other key."""
    red, blue = tag("red"), tag("blue")
    for i in range(20):
        tags = [red] if i % 2 == 0 else [blue]
        if i % 5 == 0:
            tags.append(blue)
        await ops.set(key(f"t{i}"), i, tags=tags)
    await ops.set(key("untagged"), "u")
    await ops.delete_tags([red])
    got = await ops.get_many([key(f"t{i}") for i in range(20)])
    assert got == [None if i % 2 == 0 else i for i in range(20)]
    assert await ops.get(key("untagged")) == "u"
    await ops.delete_tags([blue])
    assert await ops.get_many([key(f"t{i}") for i in range(20)]) == [None] * 20
    assert await ops.get(key("untagged")) == "u"


async def test_overwriting_a_key_with_other_tags_moves_it_out_of_the_old_tag(ops: Ops) -> None:
    """A key set again without tag 'red' no longer carries it: deleting 'red' keeps the
    new value (tag deletion removes exactly the keys tagged now)."""
    k = key("retagged")
    await ops.set(k, "v1", tags=[tag("red")])
    await ops.set(k, "v2", tags=[tag("blue")])
    await ops.delete_tags([tag("red")])
    assert await ops.get(k) == "v2"
    await ops.delete_tags([tag("blue")])
    assert await ops.get(k) is None


async def test_key_deleted_then_set_without_the_tag_survives_deleting_that_tag(
    ops: Ops,
) -> None:
    """After delete(k), a new value set for k without tag 'red' is not dropped by
    delete_tags(['red']): the old membership went with the old value."""
    k = key("reborn")
    await ops.set(k, "v1", tags=[tag("red")])
    await ops.delete([k])
    await ops.set(k, "v2")
    await ops.delete_tags([tag("red")])
    assert await ops.get(k) == "v2"


async def test_delete_tags_of_an_unknown_tag_is_a_no_op(ops: Ops) -> None:
    """Invalidating a tag nobody carries drops nothing."""
    await ops.set(key("k"), "v", tags=[tag("a")])
    await ops.delete_tags([tag("never-used")])
    assert await ops.get(key("k")) == "v"


# -- leases ----------------------------------------------------------------------------


async def test_lease_is_accepted_when_nothing_was_invalidated(ops: Ops) -> None:
    """A fill with a lease succeeds when its key and tags were not invalidated since."""
    k, t = key("leased"), tag("group")
    value, lease = await ops.get_with_lease(k, [t])
    assert value is None
    assert await ops.set(k, "filled", tags=[t], lease=lease) is True
    assert await ops.get(k) == "filled"


async def test_lease_survives_invalidations_of_other_keys_tags_and_tenants(ops: Ops) -> None:
    """Invalidating another key, another tag, or the same key/tag of another tenant
    does not refuse the fill."""
    k, t = key("leased"), tag("group")
    _, lease = await ops.get_with_lease(k, [t])
    await ops.delete([key("other")])
    await ops.delete_tags([tag("other-group")])
    await ops.delete([key("leased", tenant="globex")])
    await ops.delete_tags([tag("group", tenant="globex")])
    assert await ops.set(k, "filled", tags=[t], lease=lease) is True
    assert await ops.get(k) == "filled"


async def test_lease_is_refused_after_the_key_is_deleted(ops: Ops) -> None:
    """A fill whose lease predates a delete of its key is refused and stores nothing."""
    k = key("leased")
    _, lease = await ops.get_with_lease(k, [])
    await ops.delete([k])
    assert await ops.set(k, "too-late", lease=lease) is False
    assert await ops.get(k) is None


async def test_lease_is_refused_after_a_tag_of_the_key_is_deleted(ops: Ops) -> None:
    """A fill whose lease predates an invalidation of one of its tags is refused."""
    k, t1, t2 = key("leased"), tag("one"), tag("two")
    _, lease = await ops.get_with_lease(k, [t1, t2])
    await ops.delete_tags([t2])
    assert await ops.set(k, "too-late", tags=[t1, t2], lease=lease) is False
    assert await ops.get(k) is None


async def test_lease_is_refused_after_the_key_is_deleted_while_it_had_a_value(ops: Ops) -> None:
    """The lease taken on a hit is refused too once the key is invalidated."""
    k = key("leased")
    await ops.set(k, "old")
    value, lease = await ops.get_with_lease(k, [])
    assert value == "old"
    await ops.delete([k])
    assert await ops.set(k, "refill", lease=lease) is False
    assert await ops.get(k) is None


async def test_bump_write_refuses_fills_with_older_leases(ops: Ops) -> None:
    """set(bump=True) stores its value and refuses a fill whose lease was taken before it."""
    k = key("written")
    _, old_lease = await ops.get_with_lease(k, [])
    assert await ops.set(k, "write", bump=True) is True
    assert await ops.set(k, "stale-fill", lease=old_lease) is False
    assert await ops.get(k) == "write"
    _, new_lease = await ops.get_with_lease(k, [])
    assert await ops.set(k, "fresh-fill", lease=new_lease) is True
    assert await ops.get(k) == "fresh-fill"


async def test_set_without_lease_and_bump_does_not_refuse_leases(ops: Ops) -> None:
    """A plain set (no bump) is not an invalidation: an earlier lease still fills."""
    k = key("plain")
    _, lease = await ops.get_with_lease(k, [])
    assert await ops.set(k, "first") is True
    assert await ops.set(k, "second", lease=lease) is True
    assert await ops.get(k) == "second"


# -- tenants ---------------------------------------------------------------------------


async def test_same_body_in_two_tenants_is_two_entries(ops: Ops) -> None:
    """One key body under tenants acme and globex stores and reads two separate values."""
    await ops.set(key("p:1", "acme"), "acme-value")
    await ops.set(key("p:1", "globex"), "globex-value")
    assert await ops.get(key("p:1", "acme")) == "acme-value"
    assert await ops.get(key("p:1", "globex")) == "globex-value"
    assert await ops.get(key("p:1", "initech")) is None


async def test_deleting_a_key_of_one_tenant_leaves_the_other(ops: Ops) -> None:
    """delete() of acme's key keeps globex's entry with the same body."""
    await ops.set(key("p:1", "acme"), "a")
    await ops.set(key("p:1", "globex"), "g")
    await ops.delete([key("p:1", "acme")])
    assert await ops.get(key("p:1", "acme")) is None
    assert await ops.get(key("p:1", "globex")) == "g"


async def test_deleting_tags_of_one_tenant_leaves_the_other(ops: Ops) -> None:
    """delete_tags() of acme's tag keeps globex's entries carrying the same tag name."""
    for tenant in ("acme", "globex"):
        for i in range(6):
            await ops.set(key(f"p:{i}", tenant), f"{tenant}-{i}", tags=[tag("catalog", tenant)])
    await ops.delete_tags([tag("catalog", "acme")])
    assert await ops.get_many([key(f"p:{i}", "acme") for i in range(6)]) == [None] * 6
    assert await ops.get_many([key(f"p:{i}", "globex") for i in range(6)]) == [
        f"globex-{i}" for i in range(6)
    ]


# -- Redis Cluster placement -----------------------------------------------------------


def _keys_per_node(nodes: Sequence[tuple[str, int]]) -> list[int]:
    sizes = []
    for host, port in nodes:
        with redis.Redis(host=host, port=port) as client:
            sizes.append(client.dbsize())
    assert all(isinstance(size, int) for size in sizes)
    return [int(size) for size in sizes]


@pytest.mark.cluster
def test_cluster_spreads_one_tenant_over_several_nodes_when_tenant_slots_gt_1(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    """With tenant_slots=16 (the cluster default) one tenant's keys land on several masters."""
    layer = RedisLayer(cluster_nodes=redis_cluster_nodes)
    try:
        assert layer.keyspace.tenant_slots == 16
        now = time.time()
        for i in range(64):
            k = key(f"item:{i}")
            entry = Entry(i, now, now + 60, now + 60)
            assert layer.set(k, CODEC.encode(k.full, entry), entry) is True
        buckets = {layer.keyspace.bucket_of(key(f"item:{i}")) for i in range(64)}
        assert len(buckets) > 1
        sizes = _keys_per_node(redis_cluster_nodes)
        assert sum(sizes) == 64
        assert sum(1 for size in sizes if size > 0) >= 2
        assert layer.get_many([key(f"item:{i}") for i in range(64)]) != [None] * 64
    finally:
        layer.close()


@pytest.mark.cluster
def test_cluster_keeps_one_tenant_on_one_node_with_one_tenant_slot(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    """With tenant_slots=1 every key of a tenant shares one hash slot, hence one master."""
    layer = RedisLayer(cluster_nodes=redis_cluster_nodes, tenant_slots=1)
    try:
        now = time.time()
        for i in range(64):
            k = key(f"item:{i}")
            entry = Entry(i, now, now + 60, now + 60)
            assert layer.set(k, CODEC.encode(k.full, entry), entry, [tag("all")]) is True
        sizes = _keys_per_node(redis_cluster_nodes)
        assert sum(1 for size in sizes if size > 0) == 1
        layer.delete_tags([tag("all")])
        assert layer.get_many([key(f"item:{i}") for i in range(64)]) == [None] * 64
    finally:
        layer.close()


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.cluster),
    ]
)
def redis_layer(request: pytest.FixtureRequest) -> Iterator[RedisLayer]:
    if request.param == "redis":
        made = RedisLayer(url=request.getfixturevalue("redis_url"), key_prefix="prune")
    else:
        nodes = request.getfixturevalue("redis_cluster_nodes")
        made = RedisLayer(cluster_nodes=nodes, key_prefix="prune")
    yield made
    made.close()


async def _all_gone(ops: Ops, keys: Sequence[CacheKey]) -> bool:
    return await ops.get_many(keys) == [None] * len(keys)


async def test_tag_sets_shed_the_names_of_expired_values(redis_layer: RedisLayer) -> None:
    """A hot tag's set is refilled all the time and never expires, while the values it
    names do: each fill drops the dead names it samples, so the set stays near its
    live size (100 dead + 100 live: ~10 dead are left on average, 25 at worst in
    20,000 simulated runs; with no pruning all 100 would be)."""
    ops = Ops(redis_layer, use_async=False)
    hot = tag("hot")
    for i in range(100):
        assert await ops.set(key(f"short{i}"), i, ttl=0.05, tags=[hot])
    short = [key(f"short{i}") for i in range(100)]
    # Redis expires them on its own clock; their names are still in the set.
    await await_until(lambda: _all_gone(ops, short), timeout=2.0, message="short values expired")
    live = [key(f"long{i}") for i in range(100)]
    for k in live:
        assert await ops.set(k, "v", tags=[hot])
    client = redis_layer.sync_store().client
    keyspace = redis_layer.keyspace
    sets = {keyspace.tag_names_in(keyspace.slot_of(k), [hot])[0][0] for k in live}
    members = {m.decode() for name in sets for m in client.smembers(name)}
    assert {keyspace.value(k) for k in live} <= members  # the live names all stay
    assert len(members) - len(live) <= 40
    await ops.delete_tags([hot])
    assert await ops.get_many(live) == [None] * 100
