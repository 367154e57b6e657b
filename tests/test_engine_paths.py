"""The engine's read paths on the usual [MemoryLayer, RedisLayer] stack, branch by branch.

These scenarios once checked a hand-written fast miss against the generic flow;
there is one engine now (tieredcache/_engine), and each scenario pins what one
of its branches does: results, loader calls, per-layer counters, what each layer
holds, the fill lock, against real Redis. tests/test_sync_parity.py runs the
same kind of scenario through the generated sync engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.errors import BackendError
from tieredcache.keys import CacheKey
from tieredcache.testing import FakeClock

pytestmark = pytest.mark.redis

_prefixes = iter(range(1_000_000))


@dataclass
class Setup:
    cache: TieredCache
    memory: MemoryLayer
    redis: RedisLayer
    clock: FakeClock
    url: str

    def counts(self) -> dict[str, Any]:
        stats = self.cache.stats()
        out: dict[str, Any] = {
            f"{name}.{f}": getattr(layer, f)
            for name, layer in stats.layers.items()
            for f in ("hits", "misses", "sets", "errors", "invalidations")
        }
        loader = stats.loader
        out.update(
            calls=loader.calls,
            errors=loader.errors,
            lease_rejections=loader.lease_rejections,
            lock_waits=loader.lock_waits,
        )
        return out

    async def raw_set(self, key: CacheKey, payload: bytes) -> None:
        client = redis.asyncio.Redis.from_url(self.url)
        await client.set(self.redis.keyspace.value(key), payload)
        await client.aclose()


@pytest.fixture
async def setup(redis_url: str) -> AsyncIterator[Setup]:
    clock = FakeClock()
    memory = MemoryLayer(timer=clock)
    layer = RedisLayer(url=redis_url, key_prefix=f"fm{next(_prefixes)}", timer=clock)
    cache = TieredCache("fm", [memory, layer], broadcast=False, clock=clock)
    made = Setup(cache, memory, layer, clock, redis_url)
    yield made
    await cache.aclose()


async def test_concurrent_callers_share_one_load_that_fills_both_layers(
    setup: Setup, fill_lock_released: Any
) -> None:
    loads: list[int] = []

    @setup.cache.cached(ttl=60, tags=lambda n: [f"group:{n % 2}"])
    async def item(n: int) -> dict[str, int]:
        loads.append(n)
        await asyncio.sleep(0.05)
        return {"n": n}

    with tenant_scope("acme"):
        results = await asyncio.gather(*(item(7) for _ in range(50)))
        key = item.key(7)
    assert results == [{"n": 7}] * 50 and loads == [7]
    assert await setup.redis.aget(key) is not None
    assert setup.memory.get(key) is not None
    assert await fill_lock_released(setup.redis, key)
    counts = setup.counts()
    assert counts["calls"] == 1
    assert (counts["redis.misses"], counts["redis.sets"], counts["memory.sets"]) == (1, 1, 1)


async def test_a_shared_hit_fills_memory_without_loading(setup: Setup) -> None:
    loads: list[int] = []

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        loads.append(n)
        return n * 10

    with tenant_scope("acme"):
        assert await item(1) == 10
        setup.memory.clear()
        assert await item(1) == 10
        assert await item(1) == 10  # now from memory
    assert loads == [1]
    counts = setup.counts()
    assert (counts["redis.hits"], counts["memory.hits"], counts["memory.sets"]) == (1, 1, 2)


async def test_a_failing_loader_reaches_every_waiter_and_releases_the_lock(setup: Setup) -> None:
    calls = 0

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise ValueError(f"no row {n}")

    with tenant_scope("acme"):
        results = await asyncio.gather(*(item(3) for _ in range(10)), return_exceptions=True)
        key = item.key(3)
    assert calls == 1
    assert all(isinstance(r, ValueError) and str(r) == "no row 3" for r in results)
    assert not await setup.redis.afill_lock_held(key)
    assert setup.counts()["errors"] == 1


async def test_a_cancelled_load_releases_the_fill_lock(
    setup: Setup, fill_lock_released: Any
) -> None:
    started = asyncio.Event()

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        started.set()
        await asyncio.sleep(5)
        return n

    with tenant_scope("acme"):
        key = item.key(4)
        task = asyncio.ensure_future(item(4))
        await asyncio.wait_for(started.wait(), 2)
        assert await setup.redis.afill_lock_held(key)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await fill_lock_released(setup.redis, key), "a cancelled load kept the fill lock"


async def test_an_undecodable_shared_entry_is_counted_dropped_and_loaded(
    setup: Setup, fill_lock_released: Any
) -> None:
    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        return n + 1

    with tenant_scope("acme"):
        key = item.key(5)
        await setup.raw_set(key, b"\x00not an entry")
        assert await item(5) == 6
    counts = setup.counts()
    assert (counts["calls"], counts["redis.errors"], counts["redis.sets"]) == (1, 1, 1)
    assert await fill_lock_released(setup.redis, key)


async def test_a_stale_memory_entry_is_served_while_it_is_refreshed(setup: Setup) -> None:
    values = iter(range(100))

    @setup.cache.cached(ttl=10, stale_ttl=100, stale_while_revalidate=100)
    async def item(n: int) -> int:
        return next(values)

    with tenant_scope("acme"):
        assert await item(1) == 0
        setup.clock.advance(20)  # past fresh, inside the stale window
        assert await item(1) == 0  # stale, refresh spawned
        layers = setup.cache.stats().layers
        assert (layers["memory"].stale_hits, layers["redis"].stale_hits) == (1, 0)
        for _ in range(100):
            if await item(1) == 1:
                break
            await asyncio.sleep(0.01)
        assert await item(1) == 1


async def test_a_stale_shared_entry_is_served_while_it_is_refreshed(setup: Setup) -> None:
    values = iter(range(100))

    @setup.cache.cached(ttl=10, stale_ttl=100, stale_while_revalidate=100)
    async def item(n: int) -> int:
        return next(values)

    with tenant_scope("acme"):
        assert await item(2) == 0
        setup.memory.clear()
        setup.clock.advance(20)
        assert await item(2) == 0  # read from Redis, stale: served, refreshed
        layers = setup.cache.stats().layers
        # The stale hit is Redis's: the in-process layer had nothing.
        assert (layers["redis"].stale_hits, layers["memory"].stale_hits) == (1, 0)
        for _ in range(100):
            setup.memory.clear()
            if await item(2) == 1:
                break
            await asyncio.sleep(0.01)
        assert await item(2) == 1


async def test_a_shared_hit_due_for_early_refresh_refreshes_in_the_background(
    setup: Setup,
) -> None:
    calls = 0

    @setup.cache.cached(ttl=10, early_refresh_beta=1e9)  # XFetch always due
    async def item(n: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # a compute time, which XFetch scales
        return calls

    with tenant_scope("acme"):
        assert await item(3) == 1
        setup.memory.clear()
        assert await item(3) == 1  # the shared hit is served, a refresh starts
        for _ in range(100):
            if calls == 2:
                break
            await asyncio.sleep(0.01)
    assert calls == 2


async def test_a_value_that_cannot_be_shared_still_serves_this_process(
    setup: Setup, fill_lock_released: Any
) -> None:
    class Opaque:
        pass

    opaque = Opaque()
    calls = 0

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> Opaque:
        nonlocal calls
        calls += 1
        return opaque

    with tenant_scope("acme"):
        assert await item(1) is opaque
        assert await item(1) is opaque
        key = item.key(1)
    assert calls == 1
    assert await setup.redis.aget(key) is None
    assert await fill_lock_released(setup.redis, key)
    counts = setup.counts()
    assert (counts["redis.errors"], counts["memory.sets"], counts["redis.sets"]) == (1, 1, 0)


async def test_a_result_with_zero_ttl_is_not_stored_and_releases_the_lock(
    setup: Setup, fill_lock_released: Any
) -> None:
    calls = 0

    @setup.cache.cached(ttl=60, negative_ttl=0)
    async def item(n: int) -> None:
        nonlocal calls
        calls += 1

    with tenant_scope("acme"):
        assert await item(1) is None
        assert await item(1) is None
        key = item.key(1)
    assert calls == 2
    assert await fill_lock_released(setup.redis, key)
    assert setup.counts()["redis.sets"] == 0


def _failing(operation: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("redis", operation, "injected")

    return fail


async def test_a_failing_shared_read_degrades_to_the_loader(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(setup.redis, "aget_or_lock_fill", _failing("get"))

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        return n

    with tenant_scope("acme"):
        assert await item(9) == 9
        assert await item(9) == 9  # from memory
    counts = setup.counts()
    assert (counts["calls"], counts["redis.errors"], counts["memory.sets"]) == (1, 1, 1)


async def test_a_failing_shared_fill_still_fills_memory(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(setup.redis, "aset", _failing("set"))

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        return n

    with tenant_scope("acme"):
        assert await item(8) == 8
        assert await item(8) == 8
        key = item.key(8)
    counts = setup.counts()
    assert (counts["calls"], counts["redis.errors"], counts["memory.sets"]) == (1, 1, 1)
    assert await setup.redis.aget(key) is None


async def test_an_invalidation_during_the_load_refuses_its_fills(
    setup: Setup, fill_lock_released: Any
) -> None:
    calls = 0

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await item.invalidate(n)  # the row changed while we read it
        return calls

    with tenant_scope("acme"):
        assert await item(6) == 1  # the caller gets what it loaded...
        assert await item(6) == 2  # ...but nobody after the invalidation does
        key = item.key(6)
    assert setup.counts()["lease_rejections"] == 1
    assert await fill_lock_released(setup.redis, key)


async def test_an_in_process_invalidation_during_the_load_refuses_only_that_fill(
    setup: Setup,
    fill_lock_released: Any,
) -> None:
    calls = 0

    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            setup.memory.delete([item.key(n)])  # this process only (a broadcast, say)
        return calls

    with tenant_scope("acme"):
        assert await item(2) == 1
        key = item.key(2)
        assert setup.memory.get(key) is None  # refused here...
        assert await setup.redis.aget(key) is not None  # ...accepted in Redis
        assert await item(2) == 1  # a shared hit
    assert setup.counts()["lease_rejections"] == 1
    assert await fill_lock_released(setup.redis, key)


async def test_an_in_process_invalidation_during_a_shared_read_refuses_the_backfill(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    @setup.cache.cached(ttl=60)
    async def item(n: int) -> int:
        return n

    with tenant_scope("acme"):
        assert await item(4) == 4
        key = item.key(4)
        setup.memory.clear()
        read = setup.redis.aget_or_lock_fill

        async def invalidated_meanwhile(*args: Any) -> Any:
            result = await read(*args)
            setup.memory.delete([key])
            return result

        monkeypatch.setattr(setup.redis, "aget_or_lock_fill", invalidated_meanwhile)
        assert await item(4) == 4  # the shared hit is served...
        assert setup.memory.get(key) is None  # ...but not kept past the invalidation
    assert setup.counts()["lease_rejections"] == 1


async def test_a_lock_held_elsewhere_is_waited_for_and_its_fill_served(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder fills (and releases) right after one of the waiter's reads found the
    key absent: the waiter must serve that fill, not take the freed lock and load again
    (it did, when the wait loop read, then locked, in two steps)."""
    other_layer = RedisLayer(url=setup.url, key_prefix=setup.redis.keyspace.prefix)
    other = TieredCache("fm", [MemoryLayer(), other_layer], broadcast=False)
    release = asyncio.Event()
    calls: list[str] = []

    def define(cache: TieredCache, who: str) -> Any:
        @cache.cached(ttl=60, lock_wait=5)
        async def item(n: int) -> str:
            calls.append(who)
            if who == "other":
                await release.wait()
            return who

        return item

    ours, theirs = define(setup.cache, "us"), define(other, "other")
    reads = 0

    def filled_right_after(read: Callable[..., Any], absent: Callable[[Any], bool]) -> Any:
        async def wrapped(*args: Any) -> Any:
            nonlocal reads
            result = await read(*args)
            reads += 1
            if reads > 1 and absent(result) and not release.is_set():
                release.set()
                await loading  # the holder's fill and release land now
            return result

        return wrapped

    monkeypatch.setattr(
        setup.redis, "aget", filled_right_after(setup.redis.aget, lambda r: r is None)
    )
    monkeypatch.setattr(
        setup.redis,
        "aget_or_lock_fill",
        filled_right_after(setup.redis.aget_or_lock_fill, lambda r: r[0] is None),
    )
    with tenant_scope("acme"):
        loading = asyncio.ensure_future(theirs(1))
        while not calls:
            await asyncio.sleep(0.01)
        assert await ours(1) == "other"  # filled by the lock holder, not loaded again
        assert await loading == "other"
    assert calls == ["other"]
    assert setup.counts()["lock_waits"] == 1
    await other.aclose()


async def test_a_waiter_that_takes_over_from_a_cancelled_leader_finds_the_lock_free(
    setup: Setup,
) -> None:
    """The leader's release reaches Redis before the waiter's own read-or-lock: the
    waiter loads at once instead of waiting out a lock nobody holds."""
    started = asyncio.Event()
    calls: list[str] = []

    @setup.cache.cached(ttl=60, lock_wait=5)
    async def item(n: int) -> str:
        calls.append("load")
        if len(calls) == 2:
            started.set()
            await asyncio.sleep(5)  # the leader: cancelled here
        return "loaded"

    admin = redis.asyncio.Redis.from_url(setup.url)
    await admin.script_flush()  # as after a Redis restart: no script cached there
    await admin.aclose()
    with tenant_scope("acme"):
        assert await item(0) == "loaded"  # connected: commands leave at once
        leader = asyncio.ensure_future(item(1))
        await asyncio.wait_for(started.wait(), 2)
        follower = asyncio.ensure_future(item(1))
        await asyncio.sleep(0.01)  # joined the leader's call
        leader.cancel()
        assert await asyncio.wait_for(follower, 2) == "loaded"
        with pytest.raises(asyncio.CancelledError):
            await leader
    assert calls == ["load", "load", "load"]
    assert setup.counts()["lock_waits"] == 0


async def test_freshness_is_judged_as_of_before_the_reads(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry that expires while the shared read is on the wire is still the hit it
    was when the read began (the generic walk reads the clock once, first)."""
    calls = 0

    @setup.cache.cached(ttl=10)
    async def item(n: int) -> int:
        nonlocal calls
        calls += 1
        return calls

    with tenant_scope("acme"):
        assert await item(1) == 1
        setup.memory.clear()
        setup.clock.advance(9.99)
        read = setup.redis.aget_or_lock_fill

        async def slow_read(*args: Any) -> Any:
            result = await read(*args)
            setup.clock.advance(0.02)  # past fresh_until by the time it returns
            return result

        monkeypatch.setattr(setup.redis, "aget_or_lock_fill", slow_read)
        assert await item(1) == 1
    counts = setup.counts()
    assert (calls, counts["redis.hits"]) == (1, 1)


async def test_a_stale_memory_entry_is_read_once(setup: Setup) -> None:
    """Handing a stale in-process entry to the generic flow passes the read along: one
    in-process read (and one latency sample) per call, as on the generic path."""

    @setup.cache.cached(ttl=10, stale_ttl=100, stale_while_revalidate=100)
    async def item(n: int) -> int:
        return n

    with tenant_scope("acme"):
        assert await item(1) == 1
        before = setup.cache._metrics.histogram("memory", item.name, "get").count
        setup.clock.advance(20)
        assert await item(1) == 1  # stale, served; a refresh starts
        assert setup.cache._metrics.histogram("memory", item.name, "get").count == before + 1
