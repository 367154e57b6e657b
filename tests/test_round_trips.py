"""What one call costs in Redis commands: the budget the design promises."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.keys import CacheKey
from tieredcache.layers.redis.wire.direct import DirectClient


class CommandCounter:
    """Counts the commands the sync store sends (a pipeline counts once): those of
    redis-py's client, and those of the per-thread sockets of the fast path."""

    def __init__(self, client: Any) -> None:
        self.names: list[str] = []
        if isinstance(client, DirectClient):
            self._count(client.connections, "execute")
            client = client.client
        self._count(client, "execute_command")

    def _count(self, target: Any, method: str) -> None:
        original = getattr(target, method)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.names.append(str(args[0]).upper())
            return original(*args, **kwargs)

        setattr(target, method, counting)

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


@pytest.fixture
def counted(redis_url: str) -> Iterator[tuple[TieredCache, CommandCounter]]:
    layer = RedisLayer(url=redis_url)
    cache = TieredCache("rt", [MemoryLayer(), layer], broadcast=False)
    counter = CommandCounter(layer.sync_store().client)
    yield cache, counter
    cache.close()


def test_behind_memory_a_miss_costs_two_round_trips_and_a_shared_hit_one(
    counted: tuple[TieredCache, CommandCounter],
) -> None:
    cache, counter = counted

    @cache.cached(ttl=60, tags=lambda item: [f"item:{item}"])
    def load(item: int) -> int:
        return item

    with tenant_scope("acme"):
        load(0)  # scripts loaded once
        counter.take()
        assert load(1) == 1
        # the read that takes the fill lock and lease when the key is absent, then
        # the fill that releases the lock
        assert counter.take() == ["EVALSHA", "EVALSHA"]
        assert load(1) == 1
        assert counter.take() == []  # in-process hit
        assert cache.layers[0] is not None
        cache.layers[0].clear()
        assert load(1) == 1
        assert counter.take() == ["EVALSHA"]  # shared hit: the same read, no lock taken
        redis_layer = cache.layers[1]
        assert isinstance(redis_layer, RedisLayer)
        assert not redis_layer.fill_lock_held(load.key(1))
        counter.take()
        assert load(1) == 1
        assert counter.take() == []


def test_alone_a_miss_costs_three_round_trips_and_a_shared_hit_one_get(redis_url: str) -> None:
    layer = RedisLayer(url=redis_url)
    cache = TieredCache("rt", [layer], broadcast=False)
    counter = CommandCounter(layer.sync_store().client)

    @cache.cached(ttl=60)
    def load(item: int) -> int:
        return item

    with tenant_scope("acme"):
        load(0)
        counter.take()
        assert load(1) == 1
        # GET (miss), the fill lock with its lease, the fill that releases the lock
        assert counter.take() == ["GET", "EVALSHA", "EVALSHA"]
        assert load(1) == 1
        assert counter.take() == ["GET"]  # without an in-process layer: a plain GET
    cache.close()


def test_without_the_fill_lock_a_miss_takes_its_lease_with_one_command(redis_url: str) -> None:
    """The lease of an untagged fill is its key's generation (one GET); with tags, one
    script reads them and creates the missing tag generations (LEASE_LUA)."""
    layer = RedisLayer(url=redis_url)
    cache = TieredCache("rt", [layer], broadcast=False)
    counter = CommandCounter(layer.sync_store().client)

    @cache.cached(ttl=60, lock=False)
    def load(item: int) -> int:
        return item

    @cache.cached(ttl=60, lock=False, tags=lambda item: [f"item:{item}"])
    def tagged(item: int) -> int:
        return item

    with tenant_scope("acme"):
        load(0)
        tagged(0)  # the server learns the scripts
        counter.take()
        assert load(1) == 1
        assert counter.take() == ["GET", "GET", "EVALSHA"]
        assert tagged(2) == 2
        assert counter.take() == ["GET", "EVALSHA", "EVALSHA"]
    cache.close()


def test_only_a_fill_somebody_waits_for_is_published(redis_url: str) -> None:
    layer = RedisLayer(url=redis_url, key_prefix="pubrt")
    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(layer.keyspace.fills_channel("rt"))
    listener.get_message(timeout=1.0)  # the subscription confirmation

    def published() -> list[bytes]:
        out = []
        while (message := listener.get_message(timeout=0.2)) is not None:
            out.append(message["data"])
        return out

    key = CacheKey("rt", "acme", "f:k1")
    got, _ = layer.acquire_fill_lock(key, [], "owner-1", 5.0)
    assert got
    assert layer.release_fill_lock(key, "owner-1")
    assert published() == []  # nobody waited: no message for every replica to read

    got, _ = layer.acquire_fill_lock(key, [], "owner-2", 5.0)
    assert got
    assert layer.watch_fill_lock(key, 2.0)  # a waiter marks its interest
    assert not layer.release_fill_lock(key, "someone-else")  # not the owner: kept
    assert layer.release_fill_lock(key, "owner-2")
    assert published() == [key.full.encode()]
    assert not layer.watch_fill_lock(key, 2.0)  # released: nothing to wait for
    listener.close()
    layer.close()
