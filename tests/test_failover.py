"""Redis failures never fail a cached call: L1 or the loader answers, the breaker opens,
and Redis is used again once it is back."""

from __future__ import annotations

import gc
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from scripts.services import RedisService
from tieredcache import BackendError, MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.testing import wait_until

pytestmark = pytest.mark.redis

RESET = 0.2


@pytest.fixture
def make_cache() -> Iterator[Callable[..., TieredCache]]:
    """Builds memory+Redis caches (breaker_reset=0.2) and closes them after the test."""
    made: list[TieredCache] = []

    def build(url: str, **options: Any) -> TieredCache:
        options.setdefault("breaker_reset", RESET)
        cache = TieredCache(
            namespace="failover", layers=[MemoryLayer(), RedisLayer(url=url)], **options
        )
        made.append(cache)
        return cache

    yield build
    for cache in made:
        cache.close()


class SilentServer:
    """A TCP server that accepts connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _value_names(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return sorted(client.scan_iter(match="*:v:*"))
    finally:
        client.close()


# -- Redis killed ----------------------------------------------------------------------------


def test_calls_keep_succeeding_after_redis_is_killed(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """Without a replica broadcast (one process), with Redis killed mid-run cached keys
    come from L1, new keys from the loader; the errors are counted and the breaker opens."""
    cache = make_cache(fresh_redis_server.url, broadcast=False)
    calls: list[int] = []

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        calls.append(item)
        return item * 10

    with tenant_scope("acme"):
        assert [price(i) for i in range(3)] == [0, 10, 20]
        assert _value_names(fresh_redis_server.url) != []
        fresh_redis_server.kill()
        assert [price(i) for i in range(3)] == [0, 10, 20]  # L1
        assert calls == [0, 1, 2]
        assert [price(i) for i in range(3, 8)] == [30, 40, 50, 60, 70]  # loader
        assert calls == list(range(8))
        stats = cache.stats()
    assert stats.layers["redis"].errors >= 5
    assert stats.breakers["redis"] == "open"
    assert stats.layers["memory"].hits >= 3


def test_a_replica_that_cannot_hear_the_broadcast_bypasses_its_l1(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """With the broadcast on, a killed Redis also kills the subscription: once the process
    notices, its in-process layer is bypassed (it could not hear other replicas'
    invalidations), so every call still succeeds, from the loader; errors are counted,
    the breaker opens, and nothing is kept in-process until the subscription is back."""
    cache = make_cache(fresh_redis_server.url)
    memory = cache.layers[0]
    calls: list[int] = []

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        calls.append(item)
        return item * 10

    with tenant_scope("acme"):
        assert [price(i) for i in range(3)] == [0, 10, 20]
        fresh_redis_server.kill()
        wait_until(lambda: memory.suspended, timeout=5.0, message="subscription loss noticed")
        assert [price(i) for i in range(3)] == [0, 10, 20]
        assert [price(i) for i in range(3, 8)] == [30, 40, 50, 60, 70]
        assert calls == [0, 1, 2, *range(8)]
        assert len(memory) == 0
    stats = cache.stats()
    assert stats.layers["redis"].errors >= 5
    assert stats.breakers["redis"] == "open"
    assert stats.backends["broadcast"]["up"] == 0.0


async def test_async_calls_keep_succeeding_after_redis_is_killed(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """The async path falls back the same way: L1 or loader, errors counted, breaker open."""
    cache = make_cache(fresh_redis_server.url, broadcast=False)
    calls: list[int] = []

    @cache.cached(ttl=60, name="aprice")
    async def price(item: int) -> int:
        calls.append(item)
        return item * 10

    try:
        with tenant_scope("acme"):
            assert [await price(i) for i in range(3)] == [0, 10, 20]
            fresh_redis_server.kill()
            assert [await price(i) for i in range(3)] == [0, 10, 20]
            assert [await price(i) for i in range(3, 8)] == [30, 40, 50, 60, 70]
        assert calls == list(range(8))
        stats = cache.stats()
        assert stats.layers["redis"].errors >= 5
        assert stats.breakers["redis"] == "open"
    finally:
        await cache.aclose()


def test_redis_is_used_again_after_restart_and_reset_timeout(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """After the breaker opened, restart() on the same port plus breaker_reset lets the next
    call reach Redis: the value it loads is written to Redis and the breaker closes."""
    cache = make_cache(fresh_redis_server.url)

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        return item * 10

    with tenant_scope("acme"):
        price(0)
        fresh_redis_server.kill()
        for i in range(1, 6):
            price(i)
        assert cache.stats().breakers["redis"] == "open"
        fresh_redis_server.restart()
        assert _value_names(fresh_redis_server.url) == []  # a restarted server is empty
        # The breaker that TieredCache builds times its reset on time.monotonic and takes
        # no injected clock, so waiting out the reset timeout is the behaviour under test.
        time.sleep(RESET + 0.1)
        assert price(100) == 1000
        names = _value_names(fresh_redis_server.url)
        key_name = cache.layers[1].keyspace.value(price.key(100))  # type: ignore[union-attr]
    assert names == [key_name.encode()]
    assert cache.stats().breakers["redis"] == "closed"


def test_explicit_api_keeps_working_while_redis_is_down(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """cache.set/get with Redis killed do not raise: the value lives in L1."""
    cache = make_cache(fresh_redis_server.url)
    fresh_redis_server.kill()
    cache.set("k", {"v": 1}, ttl=60, tenant="acme")
    assert cache.get("k", tenant="acme") == {"v": 1}
    assert cache.get("missing", tenant="acme", default="D") == "D"


def test_invalidation_result_names_redis_when_it_is_down(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """With Redis killed, invalidate() still drops L1 but reports 'redis' as failed;
    raise_for_failure() raises BackendError naming it. Also once the breaker is open."""
    cache = make_cache(fresh_redis_server.url)
    calls: list[int] = []

    @cache.cached(ttl=60, name="price", tags=lambda item: [f"item:{item}"])
    def price(item: int) -> int:
        calls.append(item)
        return item

    with tenant_scope("acme"):
        price(1)
        fresh_redis_server.kill()
        result = cache.invalidate(tags=["item:1"])
        assert "redis" in result.failed
        assert "memory" not in result.failed
        assert not result.ok
        with pytest.raises(BackendError, match="redis"):
            result.raise_for_failure()
        assert price(1) == 1
        assert calls == [1, 1]  # L1 was invalidated: the loader ran again

        for i in range(10):  # open the breaker
            price(100 + i)
        assert cache.stats().breakers["redis"] == "open"
        decorated_result = price.invalidate(1)
        assert "redis" in decorated_result.failed
        assert "memory" not in decorated_result.failed


async def test_async_invalidation_result_names_redis_when_it_is_down(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """ainvalidate() reports 'redis' as failed with Redis killed."""
    cache = make_cache(fresh_redis_server.url)
    try:
        await cache.aset("k", 1, ttl=60, tenant="acme")
        fresh_redis_server.kill()
        result = await cache.ainvalidate(["k"], tenant="acme")
        gc.collect()
        assert "redis" in result.failed and "memory" not in result.failed
        assert await cache.aget("k", tenant="acme") is None
    finally:
        await cache.aclose()


async def test_failed_async_invalidation_releases_its_connection(
    fresh_redis_server: RedisService, make_cache: Callable[..., TieredCache]
) -> None:
    """An async invalidation that fails because Redis died returns its pooled connection:
    no connection stays checked out and no unclosed redis-py pipeline is left behind."""
    cache = make_cache(fresh_redis_server.url, broadcast=False)
    layer = cache.layers[1]
    assert isinstance(layer, RedisLayer)
    try:
        await cache.aset("k", 1, ttl=60, tenant="acme")  # a live pooled connection
        fresh_redis_server.kill()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = await cache.ainvalidate(["k"], tenant="acme")
            gc.collect()
        assert result.failed == ["redis"]
        pool = layer.async_store().client.connection_pool
        assert len(pool._in_use_connections) == 0
        assert [str(w.message)[:80] for w in caught if w.category is ResourceWarning] == []
    finally:
        await cache.aclose()


# -- Redis that never answers -------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def test_silent_redis_times_out_quickly_and_calls_succeed(
    silent_server: SilentServer, make_cache: Callable[..., TieredCache]
) -> None:
    """Against a server that accepts but never replies, every call returns the loader's value
    in under a second (socket timeout), and the breaker then opens."""
    cache = make_cache(silent_server.url, broadcast=False)

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        return item * 10

    with tenant_scope("acme"):
        for i in range(5):
            value, seconds = _timed(lambda i=i: price(i))
            assert value == i * 10
            assert seconds < 1.0, f"call {i} took {seconds:.2f}s"
    stats = cache.stats()
    assert stats.layers["redis"].errors >= 5
    assert stats.breakers["redis"] == "open"


async def test_silent_redis_times_out_quickly_for_async_calls(
    silent_server: SilentServer, make_cache: Callable[..., TieredCache]
) -> None:
    """The async client honours the same socket timeout: each awaited call < 1 s."""
    cache = make_cache(silent_server.url, broadcast=False)

    @cache.cached(ttl=60, name="aprice")
    async def price(item: int) -> int:
        return item * 10

    try:
        with tenant_scope("acme"):
            for i in range(5):
                start = time.perf_counter()
                assert await price(i) == i * 10
                seconds = time.perf_counter() - start
                assert seconds < 1.0, f"call {i} took {seconds:.2f}s"
        assert cache.stats().breakers["redis"] == "open"
    finally:
        await cache.aclose()


def test_silent_redis_with_default_settings_keeps_every_call_under_a_second(
    silent_server: SilentServer, make_cache: Callable[..., TieredCache]
) -> None:
    """With the default configuration (replica broadcast on) a hung Redis is still a miss,
    not a slow request: the first call, which starts the broadcast subscriber, stays < 1 s."""
    cache = make_cache(silent_server.url)

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        return item * 10

    with tenant_scope("acme"):
        for i in range(3):
            value, seconds = _timed(lambda i=i: price(i))
            assert value == i * 10
            assert seconds < 1.0, f"call {i} took {seconds:.2f}s"


def test_silent_redis_invalidation_reports_redis_quickly(
    silent_server: SilentServer, make_cache: Callable[..., TieredCache]
) -> None:
    """invalidate() against a hung Redis returns within a second naming 'redis' as failed."""
    cache = make_cache(silent_server.url, broadcast=False)
    result, seconds = _timed(lambda: cache.invalidate(["k"], tenant="acme"))
    assert result.failed == ["redis"]
    assert seconds < 1.0
