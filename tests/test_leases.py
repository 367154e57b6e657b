"""Leases: a fill that started before an invalidation never lands after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.base import StorageLayer
from tieredcache.testing import wait_until


@pytest.fixture(params=["memory", "memory+redis", "redis"])
def make_cache(request: pytest.FixtureRequest) -> Iterator[Callable[[], TieredCache]]:
    caches: list[TieredCache] = []

    def make() -> TieredCache:
        layers: list[StorageLayer] = []
        if "memory" in request.param:
            layers.append(MemoryLayer())
        if "redis" in request.param:
            layers.append(RedisLayer(url=request.getfixturevalue("redis_url")))
        cache = TieredCache("lease", layers)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


class SlowOrigin:
    """A 'database' whose first read blocks until released, returning what it read."""

    def __init__(self) -> None:
        self.rows = {1: "v1"}
        self.reading = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def read(self, row: int) -> str:
        self.calls += 1
        value = self.rows[row]
        if self.calls == 1:
            self.reading.set()
            assert self.release.wait(5)
        return value


def _race(
    cache: TieredCache, invalidate: Callable[[Any], None], lock: bool = False
) -> tuple[str, list[str]]:
    origin = SlowOrigin()

    @cache.cached(ttl=60, tags=lambda row: [f"row:{row}"], lock=lock)
    def get_row(row: int) -> str:
        return origin.read(row)

    first: list[str] = []

    def slow_reader() -> None:
        with tenant_scope("acme"):
            first.append(get_row(1))

    reader = threading.Thread(target=slow_reader)
    reader.start()
    assert origin.reading.wait(5)
    origin.rows[1] = "v2"  # the row changes while the slow loader holds "v1"
    with tenant_scope("acme"):
        invalidate(get_row)
    origin.release.set()
    reader.join()
    with tenant_scope("acme"):
        after = [get_row(1) for _ in range(3)]
    return first[0], after


def test_key_invalidation_defeats_a_fill_in_flight(make_cache: Callable[[], TieredCache]) -> None:
    cache = make_cache()
    first, after = _race(cache, lambda fn: fn.invalidate(1))
    assert first == "v1"  # the caller that started before the change gets what it read
    assert after == ["v2", "v2", "v2"]  # nobody after the invalidation sees "v1"


@pytest.mark.parametrize("lock", [False, True], ids=["lease", "fill-lock"])
def test_tag_invalidation_defeats_a_fill_in_flight(
    make_cache: Callable[[], TieredCache], lock: bool
) -> None:
    """With the fill lock, the lease comes from the read-or-lock script, which creates
    the tag generations it reads (see tests/test_tag_generations.py)."""
    cache = make_cache()
    first, after = _race(cache, lambda fn: cache.invalidate(tags=["row:1"]), lock)
    assert first == "v1"
    assert after == ["v2", "v2", "v2"]


@pytest.mark.redis
def test_invalidation_from_another_replica_defeats_a_fill_in_flight(redis_url: str) -> None:
    """Replica A loads slowly; replica B invalidates; neither serves the old value after."""
    replica_a = TieredCache("lease", [MemoryLayer(), RedisLayer(url=redis_url)])
    replica_b = TieredCache("lease", [MemoryLayer(), RedisLayer(url=redis_url)])
    origin = SlowOrigin()

    def read(row: int) -> str:
        return origin.read(row)

    get_a = replica_a.cached(ttl=60, name="get_row", lock=False)(read)
    get_b = replica_b.cached(ttl=60, name="get_row", lock=False)(read)
    assert replica_a.connect()
    assert replica_b.connect()
    first: list[str] = []

    def slow_reader() -> None:
        with tenant_scope("acme"):
            first.append(get_a(1))

    reader = threading.Thread(target=slow_reader)
    reader.start()
    assert origin.reading.wait(5)
    origin.rows[1] = "v2"
    with tenant_scope("acme"):
        assert get_b.invalidate(1).ok
    origin.release.set()
    reader.join()
    with tenant_scope("acme"):
        wait_until(lambda: get_a(1) == "v2", message="B's invalidation reached A")
        assert [get_a(1), get_b(1)] == ["v2", "v2"]
    assert first == ["v1"]
    replica_a.close()
    replica_b.close()


def test_an_invalidation_between_reading_l2_and_backfilling_l1_wins(redis_url: str) -> None:
    """The L1 lease is taken before L2 is read, so a back-fill that lost a race is refused."""
    memory = MemoryLayer()
    cache = TieredCache("lease", [memory, RedisLayer(url=redis_url)])

    @cache.cached(ttl=60)
    def get_row(row: int) -> str:
        return "v1"

    with tenant_scope("acme"):
        get_row(1)
        memory.clear()
        key = get_row.key(1)
        entry, token = memory.get_with_lease(key, ())
        assert entry is None
        stored, _ = cache.layers[1].get_with_lease(key, ())  # type: ignore[union-attr]
        assert stored is not None
        memory.delete([key])  # the invalidation lands here
        decoded = cache._codec.decode(key.full, stored, lambda b: b)
        assert memory.set(key, None, decoded, (), lease=token) is False
    cache.close()


@pytest.mark.redis
def test_an_expired_generation_never_restarts_at_a_value_a_lease_holds(redis_url: str) -> None:
    """A lease taken just before its key's generation expired is still refused after
    the next invalidation (INCR from nothing would have restarted the generation at 1)."""
    from tieredcache import CacheKey
    from tieredcache.entry import Entry

    layer = RedisLayer(url=redis_url, lease_ttl=1.0)
    key = CacheKey("lease", "acme", "row:1")
    layer.delete([key])  # generation set, expiring in 1 s
    time.sleep(0.6)  # Redis expires the generation on its own clock: the wait is the test
    lease = layer.lease(key, ())
    time.sleep(0.6)  # the generation has expired; the lease is 0.6 s old
    layer.delete([key])  # the row changed again
    now = time.time()
    entry = Entry("old", now, now + 60, now + 60)
    assert layer.set(key, b"old", entry, (), lease) is False
    assert layer.get(key) is None
    layer.close()
