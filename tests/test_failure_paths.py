"""Failure paths found in review: locks never outlive a failed or cancelled load, and a
write that a layer did not confirm does not leave the old value there."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tieredcache import BackendError, MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.testing import FakeClock, FlakyLayer, await_until, wait_until


@pytest.mark.redis
def test_a_late_load_that_fails_after_its_soft_timeout_releases_the_fill_lock(
    redis_url: str,
) -> None:
    clock = FakeClock(time.time())
    layer = RedisLayer(url=redis_url, timer=clock)
    cache = TieredCache("paths", [MemoryLayer(timer=clock), layer], clock=clock)
    failing = False

    @cache.cached(ttl=10, stale_ttl=100, soft_timeout=0.05, hard_timeout=5, lock_wait=1)
    def price(item: int) -> str:
        if failing:
            time.sleep(0.2)
            raise ConnectionError("origin down")
        return "v1"

    with tenant_scope("acme"):
        assert price(1) == "v1"
        key = price.key(1)
        clock.advance(20)
        failing = True
        started = time.perf_counter()
        assert price(1) == "v1"  # stale after the soft timeout
        assert time.perf_counter() - started < 0.2
    wait_until(
        lambda: layer.fill_lock_held(key),
        expect=False,
        timeout=3.0,
        message="the fill lock outlived the load: released",
    )
    cache.close()


@pytest.mark.redis
async def test_a_cancelled_caller_releases_the_fill_lock(redis_url: str) -> None:
    layer = RedisLayer(url=redis_url)
    cache = TieredCache("paths", [layer], broadcast=False)
    started = asyncio.Event()

    @cache.cached(ttl=60)
    async def slow(item: int) -> int:
        started.set()
        await asyncio.sleep(5)
        return item

    with tenant_scope("acme"):
        key = slow.key(1)
        task = asyncio.ensure_future(slow(1))
        await asyncio.wait_for(started.wait(), 2)
        assert await layer.afill_lock_held(key)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await await_until(
        lambda: layer.afill_lock_held(key),
        expect=False,
        timeout=1.0,
        message="a cancelled request kept the fill lock: released",
    )
    await cache.aclose()


@pytest.mark.redis
def test_a_write_redis_did_not_confirm_does_not_leave_the_old_value_there(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer_layer = RedisLayer(url=redis_url)
    writer = TieredCache("paths", [MemoryLayer(), writer_layer], broadcast=False)
    reader = TieredCache("paths", [RedisLayer(url=redis_url)], broadcast=False)
    rows = {1: "old"}

    def load(row: int) -> str:
        return rows[row]

    get_w = writer.cached(ttl=60, name="row")(load)
    get_r = reader.cached(ttl=60, name="row")(load)

    @get_w.writer(key_args=lambda row, value: (row,))
    def save(row: int, value: str) -> str:
        rows[row] = value
        return value

    with tenant_scope("acme"):
        assert get_w(1) == "old"  # in Redis now
        original = writer_layer.set
        calls = 0

        def set_times_out_once(*args: Any, **kwargs: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise BackendError("redis", "set", "timed out (injected)")
            return original(*args, **kwargs)

        monkeypatch.setattr(writer_layer, "set", set_times_out_once)
        assert save(1, "new") == "new"
        assert get_w(1) == "new"  # the writer reads its own write
        assert get_r(1) == "new"  # another replica never sees the old value
    writer.close()
    reader.close()


def test_nested_arguments_that_compare_equal_are_separate_calls() -> None:
    """(1,) and (1.0,) are equal tuples with different keys: no shared in-process entry."""
    cache = TieredCache("paths", [MemoryLayer()])

    @cache.cached(ttl=60)
    def describe(point: tuple[float, ...]) -> str:
        return repr(point)

    with tenant_scope("acme"):
        assert describe((1,)) == "(1,)"
        assert describe((1.0,)) == "(1.0,)"
        assert describe((True,)) == "(True,)"
        assert describe((1,)) == "(1,)"
        describe.invalidate((1.0,))
        assert describe((1.0,)) == "(1.0,)"


def test_background_refreshes_do_not_starve_their_own_timed_loads() -> None:
    """Eight stale keys refreshing at once, each loader 0.3 s under a 0.5 s hard timeout:
    the refreshes (4 threads) must not wait on loads queued behind themselves."""
    clock = FakeClock()
    cache = TieredCache("paths", [MemoryLayer(timer=clock)], clock=clock)
    version = 1

    @cache.cached(ttl=10, stale_while_revalidate=60, hard_timeout=0.5)
    def price(item: int) -> int:
        if version > 1:
            time.sleep(0.3)
        return version

    with tenant_scope("acme"):
        assert [price(i) for i in range(8)] == [1] * 8
        version = 2
        clock.advance(15)
        assert [price(i) for i in range(8)] == [1] * 8  # stale; eight refreshes start
        wait_until(lambda: [price(i) for i in range(8)] == [2] * 8, message="all eight refreshed")
    stats = cache.stats()
    assert stats.loader.timeouts == 0 and stats.loader.errors == 0
    cache.close()


async def test_a_load_past_its_soft_timeout_is_still_stopped_at_the_hard_timeout() -> None:
    clock = FakeClock()
    cache = TieredCache("paths", [MemoryLayer(timer=clock)], clock=clock)
    cancelled = asyncio.Event()
    slow = False

    @cache.cached(ttl=10, stale_ttl=60, soft_timeout=0.05, hard_timeout=0.3)
    async def price(item: int) -> int:
        if slow:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return 1

    with tenant_scope("acme"):
        assert await price(1) == 1
        clock.advance(20)
        slow = True
        assert await price(1) == 1  # stale at the soft timeout
    await asyncio.wait_for(cancelled.wait(), 2)  # and the load ends at the hard one
    await cache.aclose()


@pytest.mark.redis
async def test_flaky_layer_degrades_a_shared_layer_to_the_loader(redis_url: str) -> None:
    """tieredcache.testing.FlakyLayer: while it fails, calls still succeed via the loader."""
    flaky = FlakyLayer(RedisLayer(url=redis_url))
    cache = TieredCache("paths", [MemoryLayer(), flaky], broadcast=False, breaker_failures=100)
    calls = 0

    @cache.cached(ttl=60)
    async def value(item: int) -> int:
        nonlocal calls
        calls += 1
        return item

    with tenant_scope("acme"):
        flaky.failing = True
        assert await value(1) == 1
        assert cache.layers[0] is not None
        cache.layers[0].clear()
        flaky.failing = False
        assert await value(1) == 1
        assert calls == 2  # nothing reached Redis while it failed
        cache.layers[0].clear()
        assert await value(1) == 1
        assert calls == 2  # now it did
    assert cache.stats().layers["redis"].errors >= 1
    await cache.aclose()


@pytest.mark.redis
async def test_a_read_cancelled_while_its_lock_attempt_is_on_the_wire_releases_it(
    redis_url: str,
) -> None:
    """Behind an in-process layer the miss's first command takes the fill lock; a caller
    cancelled before its reply came back must not leave that lock for others to wait on."""
    memory = MemoryLayer()
    layer = RedisLayer(url=redis_url, key_prefix="cancel")
    cache = TieredCache("paths", [memory, layer], broadcast=False)

    @cache.cached(ttl=60, lock_wait=2.0)
    async def item(n: int) -> int:
        await asyncio.sleep(0.01)
        return n

    with tenant_scope("acme"):
        assert await item(0) == 0  # connected, scripts loaded
        key = item.key(1)
        task = asyncio.ensure_future(item(1))
        await asyncio.sleep(0)  # its read-or-lock is written, the reply not yet read
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await await_until(
            lambda: layer.afill_lock_held(key),
            expect=False,
            timeout=1.0,
            message="a cancelled read kept the fill lock: released",
        )
        began = time.monotonic()
        assert await item(1) == 1
        assert time.monotonic() - began < 1.0  # no wait for a lock nobody holds
    await cache.aclose()
