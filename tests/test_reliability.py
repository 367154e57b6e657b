"""Reliability defects of issue 9, each pinned by a test that failed before its fix:
a probe that never settles, fill locks taken after a Redis stall, a value name of
the wrong Redis type, keys of huge ints, key= ignoring version=, and per-tenant
metrics growing with a tenant-id flood."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis

from scripts.services import RedisService
from tieredcache import (
    CircuitBreaker,
    InvalidKeyError,
    MemoryLayer,
    RedisLayer,
    TieredCache,
    tenant_scope,
)
from tieredcache.keys import FunctionKeyBuilder
from tieredcache.metrics import Metrics
from tieredcache.testing import FakeClock


@pytest.fixture
def stoppable(fresh_redis_server: RedisService) -> Iterator[tuple[str, int, redis.Redis]]:
    """A Redis of the test's own: (url, server pid for SIGSTOP/SIGCONT, a client).
    The server is always continued afterwards."""
    admin = redis.Redis.from_url(fresh_redis_server.url)
    pid = int(admin.info("server")["process_id"])
    try:
        yield fresh_redis_server.url, pid, admin
    finally:
        os.kill(pid, signal.SIGCONT)
        admin.close()


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[TieredCache], TieredCache]]:
    """``closing(cache)`` returns the cache and closes it after the test, pass or fail."""
    made: list[TieredCache] = []

    def track(cache: TieredCache) -> TieredCache:
        made.append(cache)
        return cache

    yield track
    for cache in made:
        await cache.aclose()


# -- 1. the half-open probe always settles ----------------------------------------------
def test_a_probe_nobody_settles_expires_after_reset_timeout() -> None:
    """A probe that is neither a success nor a failure (its caller was cancelled, or
    never reports) does not hold the breaker half-open: after reset_timeout the next
    call probes."""
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.5, timer=clock)
    breaker.failure()
    assert not breaker.allow()
    clock.advance(0.6)
    assert breaker.allow()  # the probe, which is then lost
    assert not breaker.allow()  # one probe at a time...
    clock.advance(0.4)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow()  # ...but not forever
    breaker.success()
    assert breaker.state == "closed"


def test_an_abandoned_probe_lets_the_next_call_probe_at_once() -> None:
    """abandon(ticket) settles a probe that ended without a verdict; abandoning a
    closed-state ticket or a stale probe ticket leaves the current probe alone."""
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.5, timer=clock)
    closed = breaker.admit()
    assert closed == 0
    breaker.failure(closed)
    clock.advance(0.6)
    first = breaker.admit()
    assert first
    assert breaker.admit() is None
    breaker.abandon(first)
    second = breaker.admit()
    assert second and second != first
    breaker.abandon(closed)
    breaker.abandon(first)  # stale: the probe out now is `second`
    assert breaker.admit() is None
    breaker.failure(second)
    assert breaker.state == "open"


@pytest.mark.redis
async def test_a_cancelled_probe_does_not_keep_redis_unused(
    stoppable: tuple[str, int, redis.Redis], closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Issue 9.1: a call, SIGSTOP, a call (the breaker opens), past breaker_reset a call
    cancelled mid-probe, SIGCONT: Redis is used again and invalidations reach it."""
    url, pid, _ = stoppable
    cache = closing(
        TieredCache(
            "probe",
            [MemoryLayer(), RedisLayer(url=url)],
            breaker_failures=1,
            breaker_reset=0.5,
            broadcast=False,
        )
    )

    @cache.cached(ttl=60, name="item")
    async def item(i: int) -> int:
        return i

    with tenant_scope("acme"):
        assert await item(1) == 1
        os.kill(pid, signal.SIGSTOP)
        assert await item(2) == 2  # times out: the breaker opens
        assert cache.stats().breakers["redis"] == "open"
        await asyncio.sleep(0.6)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(item(3), 0.05)  # the probe, cancelled
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.6)
        result = await cache.ainvalidate([item.key(1)])
        assert result.ok, result.failed
        assert cache.stats().breakers["redis"] == "closed"


# -- 2. no fill lock outlives a Redis stall ---------------------------------------------
@pytest.mark.redis
async def test_locks_queued_during_a_redis_stall_are_not_taken_and_nobody_waits(
    stoppable: tuple[str, int, redis.Redis], closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Issue 9.2: 20 misses sent to a SIGSTOPped Redis time out and load without it;
    their read-or-lock scripts, run after SIGCONT, take no lock (they are past their
    deadline), so no lock key is left and another cache's misses for those keys load
    at once instead of waiting lock_wait (5 s) for a lock nobody holds."""
    url, pid, admin = stoppable
    stalled = closing(TieredCache("stall", [MemoryLayer(), RedisLayer(url=url)], broadcast=False))
    other = closing(TieredCache("stall", [MemoryLayer(), RedisLayer(url=url)], broadcast=False))
    loads: list[int] = []

    @stalled.cached(ttl=60, name="item")
    async def item(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    @other.cached(ttl=60, name="item")
    async def other_item(i: int) -> int:
        loads.append(i)
        return i

    with tenant_scope("acme"):
        assert await item(-1) == -1  # connected, scripts loaded
        os.kill(pid, signal.SIGSTOP)
        try:
            tasks = [asyncio.ensure_future(item(i)) for i in range(20)]
            await asyncio.sleep(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await asyncio.gather(*tasks) == list(range(20))
        await asyncio.sleep(0.2)  # the queued scripts have run by now
        assert admin.keys("*:l:*") == []
        started = time.perf_counter()
        assert await asyncio.gather(*(other_item(i) for i in range(20))) == list(range(20))
        assert time.perf_counter() - started < 1.0
        assert sorted(loads) == list(range(20))


@pytest.mark.redis
async def test_a_lock_taken_for_a_reply_that_never_arrived_is_released_by_its_owner(
    stoppable: tuple[str, int, redis.Redis], closing: Callable[[TieredCache], TieredCache]
) -> None:
    """A stall shorter than the lock deadline: the script runs in time and takes the
    lock, but its caller gave up on the reply (socket_timeout 0.05 s). The owner
    releases that lock once the deadline is past, with its next lock attempt, instead
    of leaving it for lock_ttl (30 s)."""
    url, pid, _ = stoppable
    layer = RedisLayer(url=url, socket_timeout=0.05)
    cache = closing(
        TieredCache("unanswered", [MemoryLayer(), layer], breaker_failures=100, broadcast=False)
    )

    @cache.cached(ttl=60, name="item")
    async def item(i: int) -> int:
        return i

    with tenant_scope("acme"):
        assert await item(0) == 0
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await item(1) == 1  # times out, loads without Redis
            await asyncio.sleep(0.15)
        finally:
            os.kill(pid, signal.SIGCONT)
        key = item.key(1)
        assert await layer.afill_lock_held(key)  # taken, for no one
        released = False
        for i in range(2, 40):  # misses, each a lock attempt that gets its reply
            await asyncio.sleep(0.05)
            assert await item(i) == i
            if not await layer.afill_lock_held(key):
                released = True
                break
        assert released, "the unanswered lock was left for lock_ttl"


@pytest.mark.redis
async def test_a_lock_attempt_refused_as_late_recalibrates_the_deadline(
    redis_url: str, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """A client clock far behind Redis's makes every deadline look past: the first
    attempt is refused (the caller loads without the lock, it does not wait), its reply
    recalibrates the deadline, and the next miss takes the lock again."""
    layer = RedisLayer(url=redis_url)
    cache = closing(TieredCache("skew", [MemoryLayer(), layer], broadcast=False))
    store = layer.async_store()
    store.clock_offset_ms -= 3_600_000  # as if this host's clock were an hour behind
    held: list[bool] = []

    @cache.cached(ttl=60, name="item")
    async def item(i: int) -> int:
        held.append(await layer.afill_lock_held(item.key(i)))
        return i

    with tenant_scope("acme"):
        started = time.perf_counter()
        assert await item(1) == 1
        assert time.perf_counter() - started < 1.0
        assert await item(2) == 2
    assert held == [False, True]


# -- 7. a value name of the wrong Redis type ----------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("memory", [False, True], ids=["redis", "memory+redis"])
async def test_a_value_name_of_the_wrong_type_is_repaired_and_counted_once(
    redis_url: str, asynchronous: bool, memory: bool, closing: Callable[[TieredCache], TieredCache]
) -> None:
    """Issue 9.7: after an LPUSH on a value name, the next read counts one error, drops
    the name and reloads; the breaker (opening at the first failure) stays closed and
    the name holds a value again."""

    def build() -> TieredCache:
        layers: list[Any] = [MemoryLayer()] if memory else []
        layers.append(RedisLayer(url=redis_url))
        return closing(TieredCache("wrongtype", layers, breaker_failures=1, broadcast=False))

    writer, reader = build(), build()
    loads: list[int] = []

    def load(i: int) -> int:
        loads.append(i)
        return i

    @writer.cached(ttl=60, name="item")
    def write_item(i: int) -> int:
        return load(i)

    if asynchronous:

        @reader.cached(ttl=60, name="item")
        async def read_item(i: int) -> int:
            return load(i)

    else:

        @reader.cached(ttl=60, name="item")
        def read_item(i: int) -> int:
            return load(i)

    with redis.Redis.from_url(redis_url) as admin, tenant_scope("acme"):
        write_item(1)
        [name] = admin.keys("*:v:*")
        admin.delete(name)
        admin.lpush(name, "not an entry")
        for _ in range(3):
            value: Any = read_item(1)
            if asynchronous:
                value = await value
            assert value == 1
        assert admin.type(name) == b"string"
    stats = reader.stats()
    assert stats.breakers["redis"] == "closed"
    assert stats.layers["redis"].errors == 1
    assert loads == [1, 1]


# -- 6. keys of ints msgpack cannot hold -------------------------------------------------
@pytest.mark.parametrize(
    "argument",
    [10**70, -(2**64), [1, 2**64], {"n": 10**30}],
    ids=["huge", "very negative", "in a list", "in a dict"],
)
def test_an_int_msgpack_cannot_hold_raises_invalid_key_error(argument: Any) -> None:
    """Issue 9.6: f(10**70) raised OverflowError; it is the documented InvalidKeyError."""
    cache = TieredCache("bigint", [MemoryLayer()])

    @cache.cached(ttl=60, name="big")
    def f(x: Any, y: float = 0.5) -> int:
        return 1

    with tenant_scope("acme"), pytest.raises(InvalidKeyError, match="big"):
        f(argument)
    with tenant_scope("acme"):
        assert f(2**64 - 1) == 1  # the largest int msgpack holds still works


def test_an_argument_nested_too_deep_raises_invalid_key_error() -> None:
    """A structure nested deeper than the encoder recurses is a key it cannot build."""
    builder = FunctionKeyBuilder(lambda x, y=0.5: x, name="deep", version=1)
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(InvalidKeyError, match="deep"):
        builder.body_for((nested,), {})


# -- 11. key= honours version= ------------------------------------------------------------
def test_a_custom_key_body_carries_the_version() -> None:
    """Issue 9.11: with key=, version 1 keeps the body as given (the documented
    'product:42'); any other version is appended, so two versions never share a key."""

    def product(product_id: int) -> int:
        return product_id

    def body(version: int | str) -> str:
        builder = FunctionKeyBuilder(
            product, name="p", version=version, key=lambda product_id: f"product:{product_id}"
        )
        return builder.body_for((42,), {})

    assert body(1) == "product:42"
    assert body(2) == "product:42@v2"
    assert body("2024-06") == "product:42@v2024-06"
    assert len({body(1), body(2), body("2")}) == 2


def test_a_version_bump_with_the_same_key_function_misses_the_old_entry() -> None:
    """Issue 9.11 through the decorator: v2 with the same key= never reads v1's entry."""
    cache = TieredCache("version", [MemoryLayer()])

    @cache.cached(ttl=60, name="profile", version=1, key=lambda user: f"user:{user}")
    def v1(user: int) -> dict[str, int]:
        return {"id": user}

    @cache.cached(ttl=60, name="profile", version=2, key=lambda user: f"user:{user}")
    def v2(user: int) -> list[int]:
        return [user]

    with tenant_scope("acme"):
        assert v1(7) == {"id": 7}
        assert v2.key(7) != v1.key(7)
        assert v2(7) == [7]


# -- 9. a tenant-id flood does not grow the metrics ---------------------------------------
def test_a_tenant_id_flood_does_not_grow_the_metrics_registry() -> None:
    """Issue 9.9: past max_tenants, each new tenant id costs the registry nothing (it
    was remembered per function for good: ~60 B each); their counts go to __other__."""
    metrics = Metrics(["memory"], max_tenants=10)
    tenants = [f"tenant-{i}" for i in range(20_000)]
    for tenant in tenants[:10]:
        metrics.counters("f", tenant)[0] += 1
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for tenant in tenants[10:]:
            metrics.counters("f", tenant)[0] += 1
            metrics.counters("g", tenant)[0] += 1
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16_384, f"{grown} bytes for 39,980 flooding lookups"
    stats = metrics.snapshot({}, {})
    assert set(stats.tenants) == {*tenants[:10], "__other__"}
    assert stats.tenants["__other__"]["memory"].hits == 2 * (len(tenants) - 10)
    assert stats.layers["memory"].hits == 10 + 2 * (len(tenants) - 10)
    assert metrics.counters("f", "tenant-3") is metrics.counters("f", "tenant-3")
