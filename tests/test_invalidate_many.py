"""Cross-tenant batch invalidation, all-tenant invalidation, failure reasons, the
settings check and the read that reports its outcome (the core the CDC worker and
the HTTP middleware build on)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tieredcache import (
    Invalidation,
    MemoryLayer,
    RateLimitedError,
    RedisLayer,
    TieredCache,
    tenant_scope,
)
from tieredcache.errors import BackendError, ConfigurationError
from tieredcache.keys import CacheKey, Tag
from tieredcache.layers.cdn import (
    FASTLY,
    CdnPurgeLayer,
    PurgeAck,
    Purger,
    PurgeRateLimitedError,
    PurgeResult,
)
from tieredcache.testing import FakeClock, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
def caches(redis_url: str) -> Iterator[list[TieredCache]]:
    made: list[TieredCache] = []
    yield made
    for cache in made:
        cache.close()


def _app(redis_url: str, made: list[TieredCache], **options: Any) -> TieredCache:
    cache = TieredCache("inv", [MemoryLayer(), RedisLayer(url=redis_url)], **options)
    made.append(cache)
    return cache


def test_one_call_invalidates_many_tenants_keys_and_tags(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """invalidate_many drops each tenant's keys and tags, and no other tenant's."""
    cache = _app(redis_url, caches)
    loads: list[tuple[str, int]] = []

    @cache.cached(ttl=60, tags=lambda n: [f"item:{n}"])
    def item(n: int) -> str:
        loads.append(("load", n))
        return f"v{len(loads)}"

    for tenant in ("acme", "globex", "initech"):
        with tenant_scope(tenant):
            item(1), item(2)
    assert len(loads) == 6
    with tenant_scope("globex"):
        globex_key = item.key(2).body
    result = cache.invalidate_many(
        [
            Invalidation("acme", tags=("item:1",)),
            Invalidation("globex", keys=(globex_key,)),
            Invalidation("acme", tags=("item:1",)),  # repeated: sent once
        ]
    )
    assert result.ok and result.failures == []
    with tenant_scope("acme"):
        assert item(1) == "v7" and item(2) == "v2"
    with tenant_scope("globex"):
        assert item(1) == "v3" and item(2) == "v8"
    with tenant_scope("initech"):
        assert item(1) == "v5" and item(2) == "v6"


def test_an_all_tenant_tag_invalidation_reaches_every_tenant_and_later_processes(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """Invalidation(None, tags) drops the tag for every tenant, here and in a process
    running meanwhile (broadcast), and a process started afterwards does not serve
    the entries left in Redis either (the epoch is kept in Redis)."""
    first, second = _app(redis_url, caches), _app(redis_url, caches)
    assert first.connect() and second.connect()
    version = {"n": 1}

    def define(cache: TieredCache) -> Any:
        @cache.cached(ttl=600, tags=["table:public.products"], name="product")
        def product(n: int) -> str:
            return f"{n}@{version['n']}"

        return product

    p1, p2 = define(first), define(second)
    for tenant in ("acme", "globex"):
        with tenant_scope(tenant):
            assert p1(1) == "1@1" and p2(1) == "1@1"
    version["n"] = 2
    worker = _app(redis_url, caches, broadcast=True)
    assert worker.invalidate_many([Invalidation(None, tags=("table:public.products",))]).ok
    for tenant in ("acme", "globex"):
        with tenant_scope(tenant):
            for product in (p1, p2):
                wait_until(
                    lambda product=product: product(1) == "1@2",
                    timeout=2.0,
                    message="a running replica heard the all-tenant invalidation",
                )
    later = _app(redis_url, caches)
    version["n"] = 3
    p3 = define(later)
    with tenant_scope("acme"):
        # Redis holds "1@2", filled after the invalidation: served.
        assert p3(1) == "1@2"
    assert "table:public.products" in later._stack.epochs


def test_an_entry_loaded_before_an_all_tenant_invalidation_is_not_served(
    redis_url: str, caches: list[TieredCache], clock: FakeClock
) -> None:
    """An entry whose load began before the epoch is a miss, whatever its TTL."""
    cache = TieredCache("inv", [RedisLayer(url=redis_url, timer=clock)], clock=clock)
    caches.append(cache)
    calls = {"n": 0}

    @cache.cached(ttl=600, tags=["t:x"])
    def f() -> int:
        calls["n"] += 1
        return calls["n"]

    with tenant_scope("acme"):
        assert f() == 1
        clock.advance(1)
        cache.invalidate_many([Invalidation(None, tags=("t:x",))])
        clock.advance(1)
        assert f() == 2
        assert f() == 2  # the new entry began after the epoch: a hit
    assert cache.stats().layers["redis"].hits == 1


def test_an_all_tenant_invalidation_takes_no_keys() -> None:
    with pytest.raises(ConfigurationError, match="every tenant"):
        Invalidation(None, keys=("k",))
    with pytest.raises(ConfigurationError, match="not the str"):
        Invalidation("acme", tags="product:1")  # type: ignore[arg-type]


def test_a_failed_layer_is_reported_with_its_reason_and_retried_alone(
    fresh_redis_server: Any, caches: list[TieredCache]
) -> None:
    """With Redis down, the result names it and says why; layers= retries only it."""
    cache = TieredCache(
        "inv", [MemoryLayer(), RedisLayer(url=fresh_redis_server.url)], broadcast=False
    )
    caches.append(cache)
    fresh_redis_server.stop()
    result = cache.invalidate_many([Invalidation("acme", tags=("a",))])
    assert result.failed == ["redis"]
    assert [f.reason for f in result.failures] in (["refused"], ["timeout"])
    with pytest.raises(Exception, match="not confirmed"):
        result.raise_for_failure()
    fresh_redis_server.start()
    retried = cache.invalidate_many([Invalidation("acme", tags=("a",))], layers=result.failed)
    assert retried.ok


class RateLimitedPurger:
    """A CDN purger that answers 429 (a rate limit) to everything."""

    name = "cdn"

    def __init__(self) -> None:
        self.calls = 0

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self.calls += 1
        raise RateLimitedError("cdn", "purge", "429", retry_after=2.5)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self.delete([])

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        self.delete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        self.delete([])

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_a_rate_limit_is_reported_with_retry_after_and_does_not_trip_the_breaker() -> None:
    purger = RateLimitedPurger()
    cache = TieredCache("inv", [MemoryLayer(), purger], breaker_failures=1)
    for _ in range(3):
        result = cache.invalidate(tags=["a"], tenant="acme")
        assert result.failed == ["cdn"]
        assert result.failures[0].reason == "rate-limited"
        assert result.retry_after == 2.5
    assert purger.calls == 3  # never skipped: a 429 is not a fault
    assert cache.stats().breakers["cdn"] == "closed"


class QueuedRateLimitedPurger(Purger):
    """A CDN purger behind a CdnPurgeLayer whose first ``limited`` purges answer 429."""

    scheme = FASTLY

    def __init__(self, limited: int) -> None:
        super().__init__(name="queued")
        self.limited = limited
        self.batches: list[tuple[str, ...]] = []

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        self.batches.append(tuple(keys))
        if len(self.batches) <= self.limited:
            raise PurgeRateLimitedError("queued", "purge", 3.0, keys)
        return PurgeResult((PurgeAck("queued", tuple(keys), 200),))

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        return self.purge(keys, soft=soft)


def test_a_queued_cdn_purge_reports_its_rate_limit_and_is_retried_alone(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """The CDN's purge is queued off the call's path (pending); once settled, its 429
    is a rate-limited failure with retry_after that trips no breaker, and
    layers=settled.failed purges the CDN again without touching Redis or memory."""
    purger = QueuedRateLimitedPurger(limited=2)
    cdn = CdnPurgeLayer(purger, name="cdn")
    cache = TieredCache("inv", [MemoryLayer(), RedisLayer(url=redis_url), cdn], breaker_failures=1)
    caches.append(cache)
    loads: list[int] = []

    @cache.cached(ttl=60, tags=lambda n: [f"item:{n}"])
    def item(n: int) -> int:
        loads.append(n)
        return n

    items = [Invalidation("acme", tags=("item:1",))]
    for _ in range(2):
        result = cache.invalidate_many(items)
        assert result.ok and result.pending == ["cdn"] and not result.complete
        settled = result.wait_purges(timeout=10)
        assert settled.failed == ["cdn"] and settled.retry_after == 3.0
        assert [f.reason for f in settled.failures] == ["rate-limited"]
    assert cache.stats().breakers["cdn"] == "closed"
    with tenant_scope("acme"):
        item(1)
    retried = cache.invalidate_many(items, layers=settled.failed)
    assert retried.wait_purges(timeout=10).complete
    with tenant_scope("acme"):
        item(1)
    assert loads == [1]  # the retry reached the CDN only: the entry was kept
    assert len(purger.batches) == 3


def test_check_settings_finds_a_worker_that_would_miss_the_applications_keys(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """The application publishes its keyspace settings; a worker with other settings
    (or another prefix) is told before it invalidates names nobody reads."""
    app = TieredCache("shop", [MemoryLayer(), RedisLayer(url=redis_url, tenant_slots=4)])
    caches.append(app)

    @app.cached(ttl=60)
    def f() -> int:
        return 1

    with tenant_scope("acme"):
        f()  # the first miss publishes the settings
    same = TieredCache("shop", [RedisLayer(url=redis_url, tenant_slots=4)], broadcast="publish")
    other_slots = TieredCache("shop", [RedisLayer(url=redis_url)], broadcast=False)
    other_prefix = TieredCache(
        "shop", [RedisLayer(url=redis_url, tenant_slots=4, key_prefix="x")], broadcast=False
    )
    caches += [same, other_slots, other_prefix]
    assert same.check_settings() == []
    assert any("tenant_slots" in p for p in other_slots.check_settings())
    assert any("no application published" in p for p in other_prefix.check_settings())
    # A running worker's re-check: nothing published (a Redis restarted empty) is not
    # a disagreement, other settings still are, and unreadable ones raise (the worker
    # keeps its last verdict).
    assert other_prefix.check_settings(unpublished_ok=True) == []
    assert any("tenant_slots" in p for p in other_slots.check_settings(unpublished_ok=True))
    unreachable = TieredCache(
        "shop", [RedisLayer(url="redis://127.0.0.1:1/0", socket_timeout=0.2)], broadcast=False
    )
    caches.append(unreachable)
    with pytest.raises(BackendError):
        unreachable.check_settings(unpublished_ok=True)
    assert any("cannot read" in p for p in unreachable.check_settings())


async def test_get_or_load_reports_where_the_value_came_from(
    redis_url: str, clock: FakeClock
) -> None:
    """The outcome says miss, then a hit in memory with its age, a hit in Redis, and a
    stale read; the sync twin and a metrics name work the same way."""
    cache = TieredCache(
        "inv",
        [MemoryLayer(timer=clock), RedisLayer(url=redis_url, timer=clock)],
        clock=clock,
        broadcast=False,
    )
    loads = {"n": 0}

    async def render() -> bytes:
        loads["n"] += 1
        return b"page %d" % loads["n"]

    opts: dict[str, Any] = {"ttl": 10, "tenant": "acme", "stale_while_revalidate": 60}
    value, outcome = await cache.aget_or_load("page:/", render, **opts)
    assert (value, outcome.state, outcome.layer) == (b"page 1", "miss", None)
    clock.advance(2)
    value, outcome = await cache.aget_or_load("page:/", render, **opts)
    assert (value, outcome.state, outcome.layer, outcome.age) == (b"page 1", "hit", "memory", 2)
    cache.layers[0].clear()  # type: ignore[union-attr]
    value, outcome = await cache.aget_or_load("page:/", render, **opts)
    assert (outcome.state, outcome.layer) == ("hit", "redis")
    clock.advance(10)
    value, outcome = await cache.aget_or_load("page:/", render, **opts)
    assert (value, outcome.state) == (b"page 1", "stale")
    sync_value, sync_outcome = cache.get_or_load(
        "other", lambda: b"sync", ttl=10, tenant="acme", name="pages"
    )
    assert (sync_value, sync_outcome.state) == (b"sync", "miss")
    assert cache.stats().functions["pages"]["redis"].misses == 1
    await cache.aclose()


def test_a_broadcast_that_was_not_sent_is_not_reported_as_sent(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """broadcast=False: the other replicas were not told, and the result says so
    (``unsent``, ``complete`` False) instead of reporting a broadcast as done."""
    quiet = _app(redis_url, caches, broadcast=False)
    loud = _app(redis_url, caches)
    silent = quiet.invalidate(tags=["a"], tenant="acme")
    assert silent.ok and silent.unsent == ["broadcast"] and not silent.complete
    told = loud.invalidate(tags=["a"], tenant="acme")
    assert told.ok and told.unsent == [] and told.complete
    alone = TieredCache("inv", [MemoryLayer()], broadcast=False)  # no replicas to tell
    assert alone.invalidate(tags=["a"], tenant="acme").complete


@pytest.mark.cluster
def test_batch_and_all_tenant_invalidation_work_on_redis_cluster(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    """The CDC worker's calls on a 3-master Redis Cluster: many tenants' tags in one
    call (their slots on several nodes), an all-tenant tag, publish-only broadcast."""
    app = TieredCache("cl", [MemoryLayer(), RedisLayer(cluster_nodes=redis_cluster_nodes)])
    worker = TieredCache("cl", [RedisLayer(cluster_nodes=redis_cluster_nodes)], broadcast="publish")
    loads: list[str] = []

    @app.cached(ttl=600, tags=lambda n: [f"item:{n}", "table:items"])
    def item(n: int) -> int:
        loads.append(f"{n}")
        return n

    tenants = [f"t{i}" for i in range(12)]
    try:
        for tenant in tenants:
            with tenant_scope(tenant):
                item(1)
        result = worker.invalidate_many([Invalidation(t, tags=("item:1",)) for t in tenants])
        assert result.ok and result.complete, result.failures
        app.layers[0].clear()  # type: ignore[union-attr]  # read Redis again
        for tenant in tenants:
            with tenant_scope(tenant):
                item(1)
        assert len(loads) == 24
        assert worker.invalidate_many([Invalidation(None, tags=("table:items",))]).ok
        wait_until(lambda: "table:items" in app._stack.epochs, timeout=2.0, message="epoch heard")
        with tenant_scope("t3"):
            item(1)
        assert len(loads) == 25
    finally:
        app.close()
        worker.close()


def test_a_later_process_reading_through_get_or_load_respects_an_all_tenant_invalidation(
    redis_url: str, caches: list[TieredCache]
) -> None:
    """Every engine entry point learns the epochs on the process's first read."""
    app = _app(redis_url, caches)
    value, _ = app.get_or_load("k", lambda: "old", ttl=600, tags=["table:t"], tenant="acme")
    assert value == "old"
    assert app.invalidate_many([Invalidation(None, tags=("table:t",))]).ok
    later = _app(redis_url, caches)
    value, outcome = later.get_or_load("k", lambda: "new", ttl=600, tags=["table:t"], tenant="acme")
    assert (value, outcome.state) == ("new", "miss")
