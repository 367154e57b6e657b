"""Tag generations exist only where a lease may hold one (lease protocol "2").

A lease creates the tag generations it reads; a tag invalidation bumps only the ones
that exist. So invalidating tags nobody leased writes nothing (the CDC worker's usual
case: 16 generations per tag on a cluster before), while a fill whose lease predates
the invalidation is still refused, on every way a lease is taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tieredcache import CacheKey, RedisLayer, TieredCache, tenant_scope
from tieredcache.entry import Entry
from tieredcache.keys import Tag

pytestmark = pytest.mark.redis


def _generation_names(clients: list[Any]) -> list[bytes]:
    return sorted(n for c in clients for n in c.scan_iter(match="*:gt:*", count=1000))


@pytest.fixture(params=["standalone", "cluster"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[Callable[..., RedisLayer], list[Any]]]:
    """(a RedisLayer factory, raw clients of every node) on a flushed server."""
    if request.param == "standalone":
        url = request.getfixturevalue("redis_url")
        clients = [redis.Redis.from_url(url)]

        def make(**options: Any) -> RedisLayer:
            return RedisLayer(url=url, **options)
    else:
        nodes = request.getfixturevalue("redis_cluster_nodes")
        clients = [redis.Redis(host=h, port=p) for h, p in nodes]

        def make(**options: Any) -> RedisLayer:
            return RedisLayer(cluster_nodes=nodes, **options)

    for client in clients:
        client.flushall()
    yield make, clients
    for client in clients:
        client.close()


def _entry() -> Entry:
    now = time.time()
    return Entry("old", now, now + 60, now + 60)


def test_invalidating_tags_nobody_leased_writes_no_generation(
    target: tuple[Callable[..., RedisLayer], list[Any]],
) -> None:
    make, clients = target
    layer = make()
    tags = [Tag("gens", f"t{i}", f"product:{n}") for i in range(5) for n in range(40)]
    layer.delete_tags(tags)
    assert _generation_names(clients) == []
    layer.close()


def test_a_tagged_fill_is_still_refused_after_an_invalidation_of_its_tag(
    target: tuple[Callable[..., RedisLayer], list[Any]],
) -> None:
    """Each way of taking a lease (plain, with the fill lock, read-or-lock) creates the
    generations, so the invalidation finds them to bump; a fill leased after the
    invalidation lands."""
    make, clients = target
    layer = make()
    tags = [Tag("gens", "acme", "product:1"), Tag("gens", "acme", "category:7")]
    leases: dict[str, Any] = {}
    for way in ("lease", "lock", "get_or_lock"):
        key = CacheKey("gens", "acme", f"row:{way}")
        if way == "lease":
            leases[way] = (key, layer.lease(key, tags))
        elif way == "lock":
            taken, lease = layer.acquire_fill_lock(key, tags, f"tok-{way}", 5.0)
            assert taken is True
            leases[way] = (key, lease)
        else:
            value, taken, lease = layer.get_or_lock_fill(key, tags, f"tok-{way}", 5.0)
            assert value is None and taken is True and lease is not None
            leases[way] = (key, lease)
    expected = {
        f"{layer.keyspace.slot_of(key)}:gt:{tag.name}".encode()
        for key, _ in leases.values()
        for tag in tags
    }
    assert set(_generation_names(clients)) == expected  # in each key's slot, no other
    layer.delete_tags(tags[1:])  # the category changed while the three loaders ran
    for way, (key, lease) in leases.items():
        assert layer.set(key, b"old", _entry(), tags, lease) is False, way
        assert layer.get(key) is None, way
    key = CacheKey("gens", "acme", "row:after")
    assert layer.set(key, b"new", _entry(), tags, layer.lease(key, tags)) is True
    assert layer.get(key) == b"new"
    layer.close()


async def test_async_leases_create_the_generations_too(
    target: tuple[Callable[..., RedisLayer], list[Any]],
) -> None:
    make, _ = target
    layer = make()
    tags = [Tag("gens", "acme", "product:2")]
    key = CacheKey("gens", "acme", "row:async")
    lease = await layer.alease(key, tags)
    locked_key = CacheKey("gens", "acme", "row:async-lock")
    value, taken, locked = await layer.aget_or_lock_fill(locked_key, tags, "tok", 5.0)
    assert value is None and taken is True and locked is not None
    await layer.adelete_tags(tags)
    assert await layer.aset(key, b"old", _entry(), tags, lease) is False
    assert await layer.aset(locked_key, b"old", _entry(), tags, locked) is False
    await layer.aclose()


def test_an_application_that_predates_the_protocol_is_reported(redis_url: str) -> None:
    """An application that does not publish lease_protocol relies on invalidations
    creating generations: a worker that skips missing ones is told. (The settings
    hash holds what the last application to start published: the HDEL stands for an
    old application publishing on a Redis where no new one has yet.)"""
    app = TieredCache("gens", [RedisLayer(url=redis_url)])

    @app.cached(ttl=60)
    def f() -> int:
        return 1

    with tenant_scope("acme"):
        f()  # publishes the settings
    worker = TieredCache("gens", [RedisLayer(url=redis_url)], broadcast=False)
    assert worker.check_settings() == []
    raw = redis.Redis.from_url(redis_url)
    settings_name = app.layers[0].keyspace.settings("gens")  # type: ignore[attr-defined]
    raw.hdel(settings_name, "lease_protocol")  # as an application of 0.1.0 publishes
    problems = worker.check_settings()
    assert len(problems) == 1 and "lease" in problems[0] and "'1'" in problems[0], problems
    raw.close()
    app.close()
    worker.close()
