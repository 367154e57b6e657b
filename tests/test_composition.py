"""How TieredCache composes its layers: reads fastest first with back-fill at the remaining
TTL, writes and invalidations reaching every layer, read-through loaders, and the replica
broadcast that keeps other processes' in-process layers in step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from tieredcache import (
    CacheKey,
    MemoryLayer,
    RedisLayer,
    Tag,
    TieredCache,
    current_tenant,
    tenant_scope,
)
from tieredcache.testing import FakeClock, wait_until

NS = "compose"


class RecordingCDN:
    """An invalidation-only layer (like a CDN purge API) that records what it was told."""

    def __init__(self, journal: list[tuple[str, str, tuple[str, ...]]], name: str = "cdn"):
        self.name = name
        self.journal = journal

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self.journal.append((self.name, "keys", tuple(k.full for k in keys)))

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self.journal.append((self.name, "tags", tuple(t.full for t in tags)))

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        self.delete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        self.delete_tags(tags)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class RecordingMemory(MemoryLayer):
    """A MemoryLayer that notes when it is told to invalidate."""

    def __init__(self, journal: list[tuple[str, str, tuple[str, ...]]], **kwargs: Any):
        super().__init__(**kwargs)
        self.journal = journal

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self.journal.append((self.name, "keys", tuple(k.full for k in keys)))
        super().delete(keys)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self.journal.append((self.name, "tags", tuple(t.full for t in tags)))
        super().delete_tags(tags)


class RecordingRedis(RedisLayer):
    """A RedisLayer that notes when it is told to invalidate."""

    def __init__(self, journal: list[tuple[str, str, tuple[str, ...]]], **kwargs: Any):
        super().__init__(**kwargs)
        self.journal = journal

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self.journal.append((self.name, "keys", tuple(k.full for k in keys)))
        super().delete(keys)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self.journal.append((self.name, "tags", tuple(t.full for t in tags)))
        super().delete_tags(tags)


@pytest.fixture
def closing() -> Iterator[Callable[[TieredCache], TieredCache]]:
    """Registers caches to be closed after the test."""
    made: list[TieredCache] = []

    def register(cache: TieredCache) -> TieredCache:
        made.append(cache)
        return cache

    yield register
    for cache in made:
        cache.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    made = redis.Redis.from_url(redis_url)
    yield made
    made.close()


def redis_value(cache: TieredCache, client: redis.Redis, key: CacheKey) -> bytes | None:
    layer = next(layer for layer in cache.layers if isinstance(layer, RedisLayer))
    value: bytes | None = client.get(layer.keyspace.value(key))
    return value


# -- reads: fastest first, back-fill at the remaining TTL -----------------------------------


def test_l2_hit_backfills_l1_with_the_remaining_ttl(
    closing: Callable[[TieredCache], TieredCache],
) -> None:
    """Two in-process layers on a fake clock: a value found in L2 60 s into a 100 s TTL is
    copied to L1 expiring with the original entry (40 s left), not a fresh 100 s."""
    clock = FakeClock(1_000.0)
    l1, l2 = MemoryLayer(name="l1", timer=clock), MemoryLayer(name="l2", timer=clock)
    cache = closing(TieredCache(namespace=NS, layers=[l1, l2], clock=clock))
    loads: list[int] = []

    @cache.cached(ttl=100, name="f", early_refresh_beta=0)
    def f(x: int) -> int:
        loads.append(x)
        return len(loads)

    with tenant_scope("acme"):
        assert f(1) == 1
        key = f.key(1)
        assert l1.get(key) is not None and l2.get(key) is not None  # a fill writes both
        l1.clear()
        clock.advance(60)
        assert f(1) == 1
        backfilled = l1.get(key)
        assert backfilled is not None
        assert backfilled.fresh_until == pytest.approx(1_100.0)
        stats = cache.stats()
        assert (stats.layers["l1"].misses, stats.layers["l2"].hits) == (2, 1)
        clock.advance(39)
        assert f(1) == 1
        assert cache.stats().layers["l1"].hits == 1
        clock.advance(2)
        assert f(1) == 2
    assert loads == [1, 1]


@pytest.mark.redis
def test_l1_hit_does_not_touch_redis(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Once L1 holds a value, calls are answered there: Redis sees no further lookups."""
    cache = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)]))

    @cache.cached(ttl=60, name="f")
    def f(x: int) -> int:
        return x

    with tenant_scope("acme"):
        for _ in range(5):
            f(1)
    stats = cache.stats()
    assert (stats.layers["memory"].hits, stats.layers["memory"].misses) == (4, 1)
    assert (stats.layers["redis"].hits, stats.layers["redis"].misses) == (0, 1)


@pytest.mark.redis
def test_redis_hit_backfills_l1_of_another_replica_with_the_remaining_ttl(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Replica B (empty L1) finds A's value in Redis 60 s into its 100 s TTL: no load, and
    B's L1 entry expires with the original (40 s left); after that B loads again."""
    clock = FakeClock(time.time())
    start = clock.now
    loads: list[str] = []

    def replica() -> tuple[TieredCache, Callable[[int], int]]:
        cache = closing(
            TieredCache(
                namespace=NS,
                layers=[MemoryLayer(timer=clock), RedisLayer(url=redis_url, timer=clock)],
                clock=clock,
                broadcast=False,
            )
        )

        @cache.cached(ttl=100, name="f", early_refresh_beta=0)
        def f(x: int) -> int:
            loads.append("load")
            return len(loads)

        return cache, f

    _, fa = replica()
    b, fb = replica()
    with tenant_scope("acme"):
        assert fa(1) == 1
        clock.advance(60)
        assert fb(1) == 1
        assert b.stats().layers["redis"].hits == 1
        assert b.layers[0] is not None
        entry = b.layers[0].get(fb.key(1))
        assert entry is not None
        assert entry.fresh_until == pytest.approx(start + 100)
        clock.advance(39)
        assert fb(1) == 1
        assert b.stats().layers["memory"].hits == 1
        clock.advance(2)
        assert fb(1) == 2
    assert loads == ["load", "load"]


# -- writes and invalidations reach every layer -----------------------------------------------


@pytest.mark.redis
def test_fill_and_explicit_set_write_every_storage_layer(
    redis_url: str, client: redis.Redis, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """A decorated miss and cache.set() both store in the memory layer and in Redis."""
    memory = MemoryLayer()
    cache = closing(TieredCache(namespace=NS, layers=[memory, RedisLayer(url=redis_url)]))
    # Subscribed before the first fill: a subscription that comes up late clears the
    # in-process layer (it may have missed invalidations), which would race the asserts.
    assert cache.connect(timeout=10)

    @cache.cached(ttl=60, name="f")
    def f(x: int) -> int:
        return x * 2

    with tenant_scope("acme"):
        f(21)
        cache.set("explicit", "v", ttl=60)
        for key in (f.key(21), CacheKey(NS, "acme", "explicit")):
            assert memory.get(key) is not None, key
            assert redis_value(cache, client, key) is not None, key


@pytest.mark.redis
def test_invalidate_reaches_every_layer_slowest_first(
    redis_url: str, client: redis.Redis, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """invalidate(keys, tags) drops entries from Redis, then memory, then tells an
    invalidation-only layer (CDN) the tenant-scoped names: a CDN purged before the
    storage layers and the replicas could refetch the old value from one of them."""
    journal: list[tuple[str, str, tuple[str, ...]]] = []
    memory = RecordingMemory(journal)
    cache = closing(
        TieredCache(
            namespace=NS,
            layers=[memory, RecordingRedis(journal, url=redis_url), RecordingCDN(journal)],
        )
    )
    cache.set("a", 1, ttl=60, tenant="acme")
    cache.set("b", 2, ttl=60, tags=["group"], tenant="acme")
    journal.clear()

    assert cache.invalidate(["a"], tags=["group"], tenant="acme").ok
    for body in ("a", "b"):
        key = CacheKey(NS, "acme", body)
        assert memory.get(key) is None
        assert redis_value(cache, client, key) is None
    assert journal == [
        ("redis", "keys", (f"{NS}:acme:a",)),
        ("redis", "tags", (f"{NS}:acme:group",)),
        ("memory", "keys", (f"{NS}:acme:a",)),
        ("memory", "tags", (f"{NS}:acme:group",)),
        ("cdn", "keys", (f"{NS}:acme:a",)),
        ("cdn", "tags", (f"{NS}:acme:group",)),
    ]


def test_async_invalidate_reaches_an_invalidation_only_layer(
    closing: Callable[[TieredCache], TieredCache],
) -> None:
    """ainvalidate() and a decorated function's invalidate() also reach the CDN layer."""
    import asyncio

    journal: list[tuple[str, str, tuple[str, ...]]] = []
    cache = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RecordingCDN(journal)]))

    @cache.cached(ttl=60, name="f")
    def f(x: int) -> int:
        return x

    async def main() -> None:
        await cache.ainvalidate(tags=["t"], tenant="acme")

    asyncio.run(main())
    with tenant_scope("acme"):
        f.invalidate(3)
    assert journal == [
        ("cdn", "tags", (f"{NS}:acme:t",)),
        ("cdn", "keys", (f"{NS}:acme:f:v1:i3",)),
    ]


# -- read-through --------------------------------------------------------------------------


@pytest.fixture
def memory_cache(closing: Callable[[TieredCache], TieredCache]) -> TieredCache:
    return closing(TieredCache(namespace=NS, layers=[MemoryLayer()]))


def test_read_through_get_loads_once_per_key_and_tenant(memory_cache: TieredCache) -> None:
    """After read_through('user', ttl), cache.get('user:42') calls the loader with '42' on a
    miss only, separately per tenant."""
    loads: list[tuple[str | None, str]] = []

    @memory_cache.read_through("user", ttl=60)
    def load_user(user_id: str) -> dict[str, Any]:
        loads.append((current_tenant(), user_id))
        return {"id": user_id, "tenant": current_tenant()}

    assert memory_cache.get("user:42", tenant="acme") == {"id": "42", "tenant": "acme"}
    assert memory_cache.get("user:42", tenant="acme") == {"id": "42", "tenant": "acme"}
    with tenant_scope("globex"):
        assert memory_cache.get("user:42") == {"id": "42", "tenant": "globex"}
    assert loads == [("acme", "42"), ("globex", "42")]
    assert memory_cache.get("other:42", tenant="acme", default="D") == "D"


def test_read_through_refresh_reloads_and_get_returns_the_new_value(
    memory_cache: TieredCache,
) -> None:
    """cache.refresh('user:42') calls the loader now; the next get returns that value."""
    loads: list[str] = []

    @memory_cache.read_through("user", ttl=60)
    def load_user(user_id: str) -> int:
        loads.append(user_id)
        return len(loads)

    assert memory_cache.get("user:42", tenant="acme") == 1
    assert memory_cache.refresh("user:42", tenant="acme") == 2
    assert memory_cache.get("user:42", tenant="acme") == 2
    assert loads == ["42", "42"]


def test_read_through_keys_are_invalidated_by_the_explicit_api(memory_cache: TieredCache) -> None:
    """cache.invalidate(['user:42']) and read_through tags drop the loaded entry."""
    loads: list[str] = []

    @memory_cache.read_through("user", ttl=60, tags=lambda user_id: [f"user:{user_id}"])
    def load_user(user_id: str) -> int:
        loads.append(user_id)
        return len(loads)

    assert memory_cache.get("user:1", tenant="acme") == 1
    memory_cache.invalidate(["user:1"], tenant="acme")
    assert memory_cache.get("user:1", tenant="acme") == 2
    memory_cache.invalidate(tags=["user:1"], tenant="acme")
    assert memory_cache.get("user:1", tenant="acme") == 3


async def test_read_through_aget_with_an_async_loader(memory_cache: TieredCache) -> None:
    """An async read-through loader is reached with await cache.aget('order:7')."""
    loads: list[str] = []

    @memory_cache.read_through("order", ttl=60)
    async def load_order(order_id: str) -> str:
        loads.append(order_id)
        return f"order-{order_id}"

    assert await memory_cache.aget("order:7", tenant="acme") == "order-7"
    assert await memory_cache.aget("order:7", tenant="acme") == "order-7"
    assert loads == ["7"]


async def test_read_through_aget_with_a_sync_loader(memory_cache: TieredCache) -> None:
    """await cache.aget('user:42') works when the registered loader is a plain function."""

    @memory_cache.read_through("user", ttl=60)
    def load_user(user_id: str) -> str:
        return f"user-{user_id}"

    assert await memory_cache.aget("user:42", tenant="acme") == "user-42"


# -- replica broadcast ------------------------------------------------------------------------


@pytest.mark.redis
def test_invalidation_on_one_replica_clears_the_other_replicas_l1(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Two replicas (same namespace, own MemoryLayer, shared Redis): an invalidation by key or
    by tag on replica A removes the entry from replica B's MemoryLayer within 1 s."""
    loads: list[str] = []

    def replica(label: str) -> tuple[TieredCache, Callable[[int], int]]:
        cache = closing(
            TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)])
        )

        @cache.cached(ttl=60, name="f", tags=lambda x: [f"x:{x}"])
        def f(x: int) -> int:
            loads.append(label)
            return x

        return cache, f

    a, fa = replica("a")
    b, fb = replica("b")
    assert b.layers[0] is not None
    with tenant_scope("acme"):
        fa(1), fa(2)
        fb(1), fb(2)  # B's L1 back-filled from Redis
        assert loads == ["a", "a"]
        key1, key2 = fb.key(1), fb.key(2)
        assert b.layers[0].get(key1) is not None and b.layers[0].get(key2) is not None

        assert fa.invalidate(1).ok
        wait_until(lambda: b.layers[0].get(key1) is None, timeout=1.0, message="key dropped on B")
        assert b.layers[0].get(key2) is not None
        assert a.invalidate(tags=["x:2"]).ok
        wait_until(lambda: b.layers[0].get(key2) is None, timeout=1.0, message="tag dropped on B")

        fb(1)
        assert loads == ["a", "a", "b"]


@pytest.mark.redis
def test_explicit_set_on_one_replica_replaces_the_other_replicas_l1_value(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """cache.set() on replica A: replica B stops serving its old L1 value within 1 s."""
    a = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)]))
    b = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)]))
    assert a.connect() and b.connect()
    a.set("k", "old", ttl=60, tenant="acme")
    assert b.get("k", tenant="acme") == "old"
    a.set("k", "new", ttl=60, tenant="acme")
    wait_until(lambda: b.get("k", tenant="acme") == "new", timeout=1.0)


@pytest.mark.redis
def test_broadcast_stays_within_the_tenant(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """A's invalidation of acme's key leaves globex's entry with the same body in B's L1."""
    a = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)]))
    b = closing(TieredCache(namespace=NS, layers=[MemoryLayer(), RedisLayer(url=redis_url)]))
    assert b.connect()
    for tenant in ("acme", "globex"):
        b.set("k", tenant, ttl=60, tenant=tenant)
    a.invalidate(["k"], tenant="acme")
    wait_until(
        lambda: b.layers[0].get(CacheKey(NS, "acme", "k")) is None,
        timeout=1.0,
    )
    assert b.layers[0].get(CacheKey(NS, "globex", "k")) is not None
