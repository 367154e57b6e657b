"""Early refresh (XFetch), stale-while-revalidate, fail-safe and loader timeouts."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from tieredcache import LoaderTimeoutError, MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache._engine.request import xfetch_due
from tieredcache.entry import Entry
from tieredcache.testing import FakeClock, wait_until


def _cache(clock: FakeClock) -> TieredCache:
    return TieredCache("refresh", [MemoryLayer(timer=clock)], clock=clock)


def test_fail_safe_serves_stale_when_the_loader_fails_and_throttles_retries() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    calls: list[float] = []
    failing = False

    @cache.cached(ttl=10, stale_ttl=100, fail_safe_throttle=5, stale_while_revalidate=0)
    def price(item: int) -> int:
        calls.append(clock())
        if failing:
            raise ConnectionError("origin down")
        return 42

    with tenant_scope("acme"):
        assert price(1) == 42
        failing = True
        clock.advance(20)  # expired, but within the 100 s stale window
        assert price(1) == 42
        assert len(calls) == 2
        clock.advance(1)
        assert price(1) == 42  # throttled: the failing origin is not called again yet
        assert len(calls) == 2
        clock.advance(5)
        assert price(1) == 42  # throttle window over: one more attempt, still stale
        assert len(calls) == 3
        clock.advance(200)  # past the stale window: the error surfaces
        with pytest.raises(ConnectionError):
            price(1)
    stats = cache.stats()
    assert stats.loader.errors == 3
    assert stats.layers["memory"].stale_hits == 2


def test_without_stale_ttl_a_loader_error_propagates() -> None:
    clock = FakeClock()
    cache = _cache(clock)

    @cache.cached(ttl=10)
    def price(item: int) -> int:
        raise ConnectionError("origin down")

    with tenant_scope("acme"), pytest.raises(ConnectionError):
        price(1)


def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    version = 1
    calls = 0
    gate = threading.Event()

    @cache.cached(ttl=10, stale_while_revalidate=30)
    def price(item: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            gate.wait(2)
        return version

    with tenant_scope("acme"):
        assert price(1) == 1
        version = 2
        clock.advance(15)
        started = time.perf_counter()
        assert [price(1) for _ in range(5)] == [1] * 5  # stale, served without waiting
        assert time.perf_counter() - started < 0.5
        gate.set()
        wait_until(lambda: price(1) == 2)
    assert calls == 2  # one background refresh for five stale reads
    cache.close()


def test_xfetch_probability_grows_towards_expiry() -> None:
    entry = Entry("v", created_at=0.0, fresh_until=100.0, stale_until=100.0, compute_time=1.0)
    rng = random.Random(7)
    original = random.random
    random.random = rng.random  # type: ignore[assignment]
    try:
        early = sum(xfetch_due(entry, 90.0, 1.0) for _ in range(10_000))
        late = sum(xfetch_due(entry, 99.5, 1.0) for _ in range(10_000))
        never = sum(xfetch_due(entry, 90.0, 0.0) for _ in range(1_000))
    finally:
        random.random = original  # type: ignore[assignment]
    assert early < 10  # 10 s early with a 1 s computation: about e^-10
    assert 5_000 < late < 7_000  # 0.5 s early: about e^-0.5 = 61 %
    assert never == 0


def test_xfetch_refreshes_a_hot_key_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    cache = _cache(clock)
    calls = 0

    @cache.cached(ttl=10, early_refresh_beta=1.0)
    def price(item: int) -> int:
        nonlocal calls
        calls += 1
        time.sleep(0.05)  # the entry records ~0.05 s of computation
        return calls

    with tenant_scope("acme"):
        assert price(1) == 1
        clock.advance(9.99)  # 10 ms before expiry, inside the XFetch band
        monkeypatch.setattr(random, "random", lambda: 1e-9)  # the coin says refresh
        assert price(1) == 1  # served from cache; the refresh runs in the background
        wait_until(lambda: calls == 2)
        wait_until(lambda: price(1) == 2)
    assert cache.stats().loader.early_refreshes >= 1
    cache.close()


def test_soft_timeout_serves_stale_and_the_late_result_still_fills() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    calls = 0

    @cache.cached(ttl=10, stale_ttl=60, soft_timeout=0.05, hard_timeout=5)
    def price(item: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            time.sleep(0.3)
        return calls

    with tenant_scope("acme"):
        assert price(1) == 1
        clock.advance(11)
        started = time.perf_counter()
        assert price(1) == 1  # stale after the 50 ms soft timeout
        assert time.perf_counter() - started < 0.25
        wait_until(lambda: price(1) == 2)
    cache.close()


def test_hard_timeout_without_stale_raises_loader_timeout() -> None:
    cache = TieredCache("refresh", [MemoryLayer()])

    @cache.cached(ttl=10, hard_timeout=0.05)
    def price(item: int) -> int:
        time.sleep(0.5)
        return 1

    with tenant_scope("acme"):
        started = time.perf_counter()
        with pytest.raises(LoaderTimeoutError, match="hard timeout"):
            price(1)
        assert time.perf_counter() - started < 0.4
    cache.close()


async def test_async_hard_timeout_cancels_the_loader() -> None:
    cache = TieredCache("refresh", [MemoryLayer()])
    cancelled = asyncio.Event()

    @cache.cached(ttl=10, hard_timeout=0.05)
    async def price(item: int) -> int:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with tenant_scope("acme"), pytest.raises(LoaderTimeoutError):
        await price(1)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_async_fail_safe_serves_stale() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    failing = False

    @cache.cached(ttl=10, stale_ttl=100)
    async def price(item: int) -> int:
        if failing:
            raise ConnectionError("origin down")
        return 7

    with tenant_scope("acme"):
        assert await price(1) == 7
        failing = True
        clock.advance(30)
        assert await price(1) == 7
    assert cache.stats().loader.errors == 1


@pytest.mark.redis
def test_stale_while_revalidate_refresh_is_single_cluster_wide(redis_url: str) -> None:
    """Two replicas see the same stale entry; only one recomputes it (the Redis lock)."""
    clock = FakeClock(time.time())
    calls = 0
    gate = threading.Event()

    def load(item: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            gate.wait(2)
        return calls

    replicas = []
    functions = []
    for _ in range(2):
        cache = TieredCache(
            "swr", [MemoryLayer(timer=clock), RedisLayer(url=redis_url, timer=clock)], clock=clock
        )
        replicas.append(cache)
        functions.append(cache.cached(ttl=10, stale_while_revalidate=60, name="load")(load))
    with tenant_scope("acme"):
        assert functions[0](1) == 1
        assert functions[1](1) == 1
        clock.advance(15)
        assert functions[0](1) == 1
        assert functions[1](1) == 1
        wait_until(lambda: calls == 2, message="the first refresh started")
        # No event marks "the other replica's refresh found the lock held": this
        # window is where a second load would show up (an absence cannot be polled).
        time.sleep(0.3)
        gate.set()
        wait_until(lambda: functions[0](1) == 2)
    assert calls == 2
    for cache in replicas:
        cache.close()


@pytest.mark.redis
def test_a_background_refresh_skips_the_load_when_another_replica_already_refreshed(
    redis_url: str,
) -> None:
    """A refresh prompted by an entry created at t0 only back-fills when a layer already
    holds a fresh entry created after t0 (another replica won the race)."""
    from tieredcache._engine._sync.read import refresh
    from tieredcache._function.impl import cached_impl

    clock = FakeClock(time.time())
    calls = 0

    def load(item: int) -> int:
        nonlocal calls
        calls += 1
        return calls

    replicas = [
        TieredCache(
            "skip", [MemoryLayer(timer=clock), RedisLayer(url=redis_url, timer=clock)], clock=clock
        )
        for _ in range(2)
    ]
    functions = [r.cached(ttl=10, stale_while_revalidate=60, name="load")(load) for r in replicas]
    with tenant_scope("acme"):
        assert functions[0](1) == 1
        prompted_by = clock()
        clock.advance(15)
        assert functions[1].refresh(1) == 2  # the other replica refreshed first
        impl = cached_impl(functions[0])
        req = impl.request("acme", None, (1,), {})
        value = refresh(req, True, prompted_by)
        assert value == 2
        assert calls == 2
        assert functions[0](1) == 2
    for cache in replicas:
        cache.close()
