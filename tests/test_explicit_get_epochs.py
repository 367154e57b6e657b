"""An explicit ``get`` after an all-tenant invalidation.

``cache.get(key)`` does not know the tags an entry was stored with, so it cannot
tell whether an all-tenant invalidation (``Invalidation(None, tags=...)``) covered
it. It must not serve such an entry: every entry stored before the latest
all-tenant invalidation reads as absent; entries stored after it are served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tieredcache import Invalidation, MemoryLayer, RedisLayer, TieredCache
from tieredcache.testing import FakeClock


@pytest.fixture
def made() -> Iterator[list[TieredCache]]:
    caches: list[TieredCache] = []
    yield caches
    for cache in caches:
        cache.close()


def _cache(redis_url: str, clock: FakeClock, made: list[TieredCache]) -> TieredCache:
    cache = TieredCache(
        "explicit",
        [MemoryLayer(maxsize=100, timer=clock), RedisLayer(url=redis_url, timer=clock)],
        clock=clock,
    )
    made.append(cache)
    return cache


def test_get_does_not_serve_an_entry_stored_before_an_all_tenant_invalidation(
    redis_url: str, clock: FakeClock, made: list[TieredCache]
) -> None:
    cache = _cache(redis_url, clock, made)
    cache.set("product:1", "old", ttl=600, tags=["table:products"], tenant="acme")
    cache.set("untagged", "old", ttl=600, tenant="globex")
    assert cache.get("product:1", tenant="acme") == "old"
    clock.advance(1)
    assert cache.invalidate_many([Invalidation(None, tags=("table:products",))]).ok
    # Tagged or not, get cannot know: both are absent now (wider, never stale).
    assert cache.get("product:1", tenant="acme", default="absent") == "absent"
    assert cache.get("untagged", tenant="globex", default="absent") == "absent"
    clock.advance(1)
    cache.set("product:1", "new", ttl=600, tags=["table:products"], tenant="acme")
    assert cache.get("product:1", tenant="acme") == "new"


def test_a_process_started_later_applies_the_epoch_to_get(
    redis_url: str, clock: FakeClock, made: list[TieredCache]
) -> None:
    """The epoch lives in Redis: a cache built after the invalidation, which never
    heard the broadcast, still refuses the old entry that Redis holds."""
    first = _cache(redis_url, clock, made)
    first.set("product:2", "old", ttl=600, tags=["table:products"], tenant="acme")
    clock.advance(1)
    assert first.invalidate_many([Invalidation(None, tags=("table:products",))]).ok
    later = _cache(redis_url, clock, made)
    assert later.get("product:2", tenant="acme", default="absent") == "absent"


def test_aget_applies_the_epoch_too(redis_url: str, clock: FakeClock) -> None:
    async def scenario() -> tuple[object, object]:
        cache = TieredCache(
            "explicit",
            [MemoryLayer(maxsize=100, timer=clock), RedisLayer(url=redis_url, timer=clock)],
            clock=clock,
        )
        try:
            await cache.aset("product:3", "old", ttl=600, tags=["table:products"], tenant="acme")
            before = await cache.aget("product:3", tenant="acme")
            clock.advance(1)
            items = [Invalidation(None, tags=("table:products",))]
            assert (await cache.ainvalidate_many(items)).ok
            return before, await cache.aget("product:3", tenant="acme", default="absent")
        finally:
            await cache.aclose()

    assert asyncio.run(scenario()) == ("old", "absent")
