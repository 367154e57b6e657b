"""Per-key stampede protection: in-process single-flight and the Redis fill lock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache._engine._singleflight import AsyncSingleFlight, SingleFlight
from tieredcache.testing import await_until, wait_until

ROOT = Path(__file__).resolve().parent.parent


async def test_thousand_asyncio_callers_on_a_cold_key_make_one_loader_call() -> None:
    cache = TieredCache("stampede", [MemoryLayer()])
    calls = 0

    @cache.cached(ttl=60)
    async def load(item: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"item": item}

    with tenant_scope("acme"):
        results = await asyncio.gather(*(load(1) for _ in range(1000)))
    assert calls == 1
    assert results == [{"item": 1}] * 1000


async def test_asyncio_waiters_all_get_the_leaders_exception() -> None:
    cache = TieredCache("stampede", [MemoryLayer()])
    calls = 0

    @cache.cached(ttl=60)
    async def load(item: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        raise LookupError(f"no item {item}")

    with tenant_scope("acme"):
        results = await asyncio.gather(*(load(1) for _ in range(50)), return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, LookupError) and "no item 1" in str(r) for r in results)


async def test_cancelling_the_leader_does_not_cancel_the_shared_load() -> None:
    flight = AsyncSingleFlight()
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        await asyncio.sleep(0.05)
        return "done"

    leader = asyncio.ensure_future(flight.do("k", work))
    await started.wait()
    follower = asyncio.ensure_future(flight.do("k", work))
    leader.cancel()
    assert await follower == "done"


def test_threads_share_one_loader_call_and_its_result() -> None:
    cache = TieredCache("stampede", [MemoryLayer()])
    calls = 0
    gate = threading.Event()

    @cache.cached(ttl=60)
    def load(item: int) -> int:
        nonlocal calls
        calls += 1
        gate.wait(2)
        return item * 10

    results: list[int] = []
    arrived = threading.Semaphore(0)

    def call() -> None:
        arrived.release()
        with tenant_scope("acme"):
            results.append(load(3))

    threads = [threading.Thread(target=call) for _ in range(64)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert arrived.acquire(timeout=5)
    wait_until(lambda: calls == 1, message="the leader is loading")
    gate.set()
    for thread in threads:
        thread.join()
    assert calls == 1
    assert results == [30] * 64


def test_singleflight_waiters_get_the_leaders_exception() -> None:
    flight = SingleFlight()
    gate = threading.Event()
    errors: list[BaseException] = []

    def fail() -> int:
        gate.wait(2)
        raise ValueError("boom")

    arrived = threading.Semaphore(0)

    def call() -> None:
        arrived.release()
        try:
            flight.do("k", fail)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert arrived.acquire(timeout=5)
    wait_until(lambda: len(flight) == 1, message="the leader is in flight")
    gate.set()
    for thread in threads:
        thread.join()
    assert len(errors) == 8
    assert len(flight) == 0


@pytest.mark.redis
@pytest.mark.slow
def test_eight_processes_of_32_threads_make_one_loader_call_in_total(redis_url: str) -> None:
    """8 x 32 callers of one cold key across processes: the Redis lock lets one load."""
    start_at = time.time() + 4.0  # time for every interpreter to start and import
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "stampede_worker.py"),
                redis_url,
                "stampede8",
                str(start_at),
                "32",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(8)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    client = redis.Redis.from_url(redis_url)
    assert int(client.get("stampede8:loader-calls") or 0) == 1
    assert all(not r["errors"] for r in reports), reports
    assert sum(r["count"] for r in reports) == 256
    distinct = {d for r in reports for d in r["distinct"]}
    assert distinct == {json.dumps({"call": 1, "item": 7}, sort_keys=True)}


@pytest.mark.redis
def test_waiters_are_woken_by_the_release_not_by_polling(redis_url: str) -> None:
    """A second process waiting on the fill lock costs a handful of commands, not a poll loop."""
    client = redis.Redis.from_url(redis_url)
    first = TieredCache("wake", [RedisLayer(url=redis_url)])
    second = TieredCache("wake", [RedisLayer(url=redis_url)])
    calls = 0
    gate = threading.Event()

    def loader(item: int) -> int:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return item

    load_first = first.cached(ttl=60, name="load")(loader)
    load_second = second.cached(ttl=60, name="load")(loader)
    assert second.connect()  # subscribed before the race starts
    results: list[int] = []

    def call(fn: object) -> None:
        with tenant_scope("acme"):
            results.append(fn(5))  # type: ignore[operator]

    leader = threading.Thread(target=call, args=(load_first,))
    leader.start()
    wait_until(lambda: calls == 1, message="the leader holds the fill lock and loads")
    client.config_resetstat()
    waiter = threading.Thread(target=call, args=(load_second,))
    waiter.start()
    time.sleep(1.0)  # the waiter waits a whole second
    gate.set()
    leader.join()
    waiter.join()
    stats = client.info("commandstats")
    reads = sum(
        stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("mget", "get", "exists")
    )
    assert results == [5, 5]
    assert calls == 1
    # The waiter reads the key once, checks the lock once, and re-reads once when woken
    # (GETs inside the leader's fill script count too): a poll loop over the one-second
    # wait would add a read per poll.
    assert reads <= 6, stats
    first.close()
    second.close()


@pytest.mark.parametrize("by", ["key", "tag"])
async def test_a_read_after_an_invalidation_does_not_join_a_load_begun_before_it(by: str) -> None:
    cache = TieredCache("sf", [MemoryLayer()])
    version = 0
    started = asyncio.Event()
    release = asyncio.Event()

    @cache.cached(ttl=60, tags=lambda n: [f"item:{n}"])
    async def item(n: int) -> int:
        seen = version
        started.set()
        await release.wait()
        return seen

    with tenant_scope("acme"):
        first = asyncio.create_task(item(1))
        await started.wait()
        joined = asyncio.create_task(item(1))  # before the invalidation: shares the load
        await asyncio.sleep(0)
        version = 1
        if by == "key":
            await item.invalidate(1)
        else:
            await cache.ainvalidate(tags=["item:1"])
        after = asyncio.create_task(item(1))  # after it: a load of its own
        await asyncio.sleep(0)
        release.set()
        assert (await first, await joined, await after) == (0, 0, 1)
        assert await item(1) == 1  # the old load's fill was refused; the new one stays
    await cache.aclose()


def test_a_thread_reading_after_an_invalidation_does_not_join_a_load_begun_before_it() -> None:
    cache = TieredCache("sf", [MemoryLayer()])
    version = 0
    started = threading.Event()
    release = threading.Event()

    @cache.cached(ttl=60)
    def item(n: int) -> int:
        seen = version
        if seen == 0:  # only the load from before the change is slow
            started.set()
            release.wait(5)
        return seen

    results: dict[str, int] = {}

    def read(name: str) -> None:
        with tenant_scope("acme"):
            results[name] = item(1)

    first = threading.Thread(target=read, args=("first",))
    first.start()
    assert started.wait(5)
    version = 1
    with tenant_scope("acme"):
        item.invalidate(1)
        began = time.monotonic()
        assert item(1) == 1  # a load of its own, not the slow one in flight
        assert time.monotonic() - began < 2
    release.set()
    first.join(5)
    assert results == {"first": 0}
    cache.close()


async def test_a_broadcast_invalidation_detaches_the_loads_in_flight(redis_url: str) -> None:
    here = TieredCache("sfb", [MemoryLayer(), RedisLayer(url=redis_url, key_prefix="sfb")])
    there = TieredCache("sfb", [MemoryLayer(), RedisLayer(url=redis_url, key_prefix="sfb")])
    assert here.connect() and there.connect()
    release = asyncio.Event()

    @here.cached(ttl=60, name="item")
    async def item(n: int) -> int:
        await release.wait()
        return n

    with tenant_scope("acme"):
        load = asyncio.create_task(item(1))
        key = item.key(1)
        await await_until(lambda: here._stack.async_flights.in_flight(key.full))
        await there.ainvalidate([key])  # another replica
        await await_until(
            lambda: here._stack.async_flights.in_flight(key.full),
            expect=False,
            message="the broadcast detached the load",
        )
        release.set()
        assert await load == 1
    await here.aclose()
    await there.aclose()
