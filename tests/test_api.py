"""The public API: the package namespace, the explicit cache-aside calls, the decorator,
and stats()."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tieredcache
from tieredcache import (
    CacheKey,
    CacheStats,
    ConfigurationError,
    InvalidationResult,
    MemoryLayer,
    TieredCache,
    current_tenant,
    tenant_scope,
)
from tieredcache.errors import TenantRequiredError
from tieredcache.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(clock: FakeClock) -> Iterator[TieredCache]:
    """A memory-only cache on a fake clock."""
    made = TieredCache(namespace="api", layers=[MemoryLayer(timer=clock)], clock=clock)
    yield made
    made.close()


def _run(code: str, *, extra_env: dict[str, str] | None = None) -> str:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- the namespace ---------------------------------------------------------------------


def test_all_is_sorted_and_equals_the_public_names_of_the_package() -> None:
    """tieredcache.__all__ is sorted and lists exactly the public, non-module names."""
    public = {
        name
        for name, value in vars(tieredcache).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert tieredcache.__all__ == sorted(tieredcache.__all__)
    assert len(set(tieredcache.__all__)) == len(tieredcache.__all__)
    assert set(tieredcache.__all__) == public


def test_every_exported_error_derives_from_tiered_cache_error() -> None:
    """Every exception class exported by the package is a TieredCacheError."""
    errors = [
        value
        for name in tieredcache.__all__
        if isinstance(value := getattr(tieredcache, name), type) and issubclass(value, Exception)
    ]
    assert errors
    assert all(issubclass(error, tieredcache.TieredCacheError) for error in errors)
    assert all(error.__name__.endswith("Error") for error in errors)


def test_import_does_no_work() -> None:
    """Importing tieredcache starts no thread and builds no cache or connection."""
    out = _run(
        """
        import threading, gc
        before = threading.active_count()
        import tieredcache
        from tieredcache import TieredCache, RedisLayer
        after = threading.active_count()
        caches = [o for o in gc.get_objects() if isinstance(o, TieredCache)]
        layers = [o for o in gc.get_objects() if isinstance(o, RedisLayer)]
        print(before, after, len(caches), len(layers))
        """
    )
    assert out.split() == ["1", "1", "0", "0"]


def test_constructing_a_cache_with_redis_opens_no_connection() -> None:
    """TieredCache(...) with a RedisLayer to an unused port succeeds: connections are lazy."""
    from tieredcache import RedisLayer

    layers = [MemoryLayer(), RedisLayer(url="redis://127.0.0.1:1/0")]
    cache = TieredCache(namespace="api", layers=layers)
    assert list(cache.layers) == layers
    assert cache.stats().layers["redis"].errors == 0  # nothing was tried yet
    cache.close()


def test_import_without_the_redis_extra_works_and_redis_layer_names_the_extra() -> None:
    """Without redis-py installed, `import tieredcache` and a memory-only cache work; using a
    RedisLayer raises MissingExtraError naming `pip install 'tieredcache[redis]'`."""
    out = _run(
        """
        import sys
        sys.modules["redis"] = None  # as if the [redis] extra were not installed
        import tieredcache
        from tieredcache import MemoryLayer, MissingExtraError, TieredCache, tenant_scope
        cache = TieredCache(namespace="noredis", layers=[MemoryLayer()])
        cache.set("k", 1, ttl=5, tenant="acme")
        assert cache.get("k", tenant="acme") == 1
        try:
            layer = tieredcache.RedisLayer(url="redis://127.0.0.1:1/0")
            layer.get(tieredcache.CacheKey("noredis", "acme", "k"))
        except MissingExtraError as exc:
            print("missing-extra:", exc)
        """
    )
    assert "missing-extra:" in out
    assert "tieredcache[redis]" in out


# -- explicit cache-aside API ------------------------------------------------------------


def test_get_returns_default_until_set(cache: TieredCache) -> None:
    """cache.get of an unknown key returns None or the given default."""
    assert cache.get("k", tenant="acme") is None
    assert cache.get("k", tenant="acme", default="D") == "D"
    cache.set("k", {"v": 1}, ttl=30, tenant="acme")
    assert cache.get("k", tenant="acme", default="D") == {"v": 1}


def test_set_value_expires_after_ttl(cache: TieredCache, clock: FakeClock) -> None:
    """An explicitly set value is served until its ttl passes, then get returns default."""
    cache.set("k", "v", ttl=30, tenant="acme")
    clock.advance(29)
    assert cache.get("k", tenant="acme") == "v"
    clock.advance(2)
    assert cache.get("k", tenant="acme") is None


def test_set_replaces_the_value(cache: TieredCache) -> None:
    """A second set of one key replaces the first value."""
    cache.set("k", 1, ttl=30, tenant="acme")
    cache.set("k", 2, ttl=30, tenant="acme")
    assert cache.get("k", tenant="acme") == 2


def test_invalidate_by_key_and_by_tag(cache: TieredCache) -> None:
    """invalidate(keys) drops those keys; invalidate(tags=...) drops the tagged ones only."""
    cache.set("a", 1, ttl=30, tags=["group:1"], tenant="acme")
    cache.set("b", 2, ttl=30, tags=["group:1", "group:2"], tenant="acme")
    cache.set("c", 3, ttl=30, tags=["group:2"], tenant="acme")
    cache.set("d", 4, ttl=30, tenant="acme")
    result = cache.invalidate(["d"], tenant="acme")
    assert isinstance(result, InvalidationResult) and result.ok and result.failed == []
    assert cache.get("d", tenant="acme") is None
    cache.invalidate(tags=["group:1"], tenant="acme")
    got = [cache.get(k, tenant="acme") for k in "abc"]
    assert got == [None, None, 3]


def test_explicit_api_uses_the_scoped_tenant(cache: TieredCache) -> None:
    """Without tenant=, get/set/invalidate use tenant_scope; tenants do not see each other."""
    with tenant_scope("acme"):
        cache.set("k", "acme-value", ttl=30)
        assert cache.get("k") == "acme-value"
    with tenant_scope("globex"):
        assert cache.get("k") is None
        cache.set("k", "globex-value", ttl=30)
        cache.invalidate(["k"])
    assert cache.get("k", tenant="acme") == "acme-value"


async def test_async_explicit_api(cache: TieredCache, clock: FakeClock) -> None:
    """aget/aset/ainvalidate behave like get/set/invalidate."""
    assert await cache.aget("k", tenant="acme", default="D") == "D"
    await cache.aset("k", [1, 2], ttl=30, tags=["t"], tenant="acme")
    assert await cache.aget("k", tenant="acme") == [1, 2]
    assert (await cache.ainvalidate(tags=["t"], tenant="acme")).ok
    assert await cache.aget("k", tenant="acme") is None
    await cache.aset("k2", "v", ttl=5, tenant="acme")
    clock.advance(6)
    assert await cache.aget("k2", tenant="acme") is None


# -- the decorator ---------------------------------------------------------------------


def test_sync_decorator_preserves_signature_and_metadata(cache: TieredCache) -> None:
    """The wrapper has the original's signature, name, qualname, doc and __wrapped__."""

    def original(product_id: int, *, locale: str = "en", tenant: str = "x") -> dict[str, Any]:
        """Load a product."""
        return {"id": product_id}

    wrapped = cache.cached(ttl=60)(original)
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert wrapped.__name__ == original.__name__
    assert wrapped.__qualname__ == original.__qualname__
    assert wrapped.__doc__ == "Load a product."
    assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert not inspect.iscoroutinefunction(wrapped)


def test_async_decorator_preserves_signature_and_stays_a_coroutine_function(
    cache: TieredCache,
) -> None:
    """An async function stays a coroutine function with the same signature."""

    async def original(order_id: int, expand: bool = False) -> int:
        """Load an order."""
        return order_id

    wrapped = cache.cached(ttl=60)(original)
    assert inspect.signature(wrapped) == inspect.signature(original)
    assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__doc__ == "Load an order."


def test_sync_decorator_caches_and_offers_key_and_invalidate(cache: TieredCache) -> None:
    """f(x) loads once; f.key(x) is its CacheKey; f.invalidate(x) forces a reload."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="product")
    def product(product_id: int) -> tuple[int, int]:
        loads.append(product_id)
        return (product_id, len(loads))

    with tenant_scope("acme"):
        assert product(1) == (1, 1)
        assert product(1) == (1, 1)
        assert product(product_id=1) == (1, 1)
        assert product.key(1) == CacheKey("api", "acme", "product:v1:i1")
        assert product.invalidate(1).ok
        assert product(1) == (1, 2)
    assert loads == [1, 1]


def test_sync_refresh_replaces_the_value_later_calls_return(cache: TieredCache) -> None:
    """f.refresh(x) runs the function now, and the following f(x) returns that new value
    without running it again."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="product")
    def product(product_id: int) -> tuple[int, int]:
        loads.append(product_id)
        return (product_id, len(loads))

    with tenant_scope("acme"):
        assert product(1) == (1, 1)
        assert product.refresh(1) == (1, 2)
        assert product(1) == (1, 2)
        assert product(product_id=1) == (1, 2)
    assert loads == [1, 1]


async def test_async_decorator_caches_and_offers_key_and_invalidate(
    cache: TieredCache,
) -> None:
    """The async wrapper: awaited calls are cached; .key works; invalidate is awaitable."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="order")
    async def order(order_id: int) -> tuple[int, int]:
        loads.append(order_id)
        return (order_id, len(loads))

    with tenant_scope("acme"):
        assert await order(7) == (7, 1)
        assert await order(7) == (7, 1)
        assert order.key(7) == CacheKey("api", "acme", "order:v1:i7")
        assert (await order.invalidate(7)).ok
        assert await order(7) == (7, 2)
    assert loads == [7, 7]


async def test_async_refresh_replaces_the_value_later_calls_return(cache: TieredCache) -> None:
    """await f.refresh(x) runs the function now; the following await f(x) returns it."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="order")
    async def order(order_id: int) -> tuple[int, int]:
        loads.append(order_id)
        return (order_id, len(loads))

    with tenant_scope("acme"):
        assert await order(7) == (7, 1)
        assert await order.refresh(7) == (7, 2)
        assert await order(7) == (7, 2)
    assert loads == [7, 7]


def test_decorated_value_expires_after_ttl(cache: TieredCache, clock: FakeClock) -> None:
    """A decorated result is reused until ttl passes, then the function runs again."""
    loads: list[int] = []

    @cache.cached(ttl=10, name="ttl", early_refresh_beta=0)
    def f(x: int) -> int:
        loads.append(x)
        return len(loads)

    with tenant_scope("acme"):
        assert f(1) == 1
        clock.advance(9)
        assert f(1) == 1
        clock.advance(2)
        assert f(1) == 2


def test_wrong_arguments_raise_type_error_without_calling_the_function(
    cache: TieredCache,
) -> None:
    """Calling the wrapper with arguments the signature rejects raises TypeError."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="strict")
    def f(x: int) -> int:
        loads.append(x)
        return x

    with tenant_scope("acme"):
        with pytest.raises(TypeError):
            f()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            f(1, 2)  # type: ignore[call-arg]
    assert loads == []


def test_static_tag_list_invalidates_every_entry_of_the_function(cache: TieredCache) -> None:
    """tags=['catalog']: invalidate(tags=['catalog']) drops all of the function's entries."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="listed", tags=["catalog"])
    def f(x: int) -> int:
        loads.append(x)
        return x

    with tenant_scope("acme"):
        f(1), f(2)
        cache.invalidate(tags=["catalog"])
        f(1), f(2)
    assert loads == [1, 2, 1, 2]


def test_tag_function_invalidates_only_matching_entries(cache: TieredCache) -> None:
    """tags=lambda product_id: [f'product:{product_id}'] scopes invalidation per argument."""
    loads: list[int] = []

    @cache.cached(ttl=60, name="tagged", tags=lambda product_id: [f"product:{product_id}"])
    def product(product_id: int) -> int:
        loads.append(product_id)
        return product_id

    with tenant_scope("acme"):
        product(1), product(2)
        cache.invalidate(tags=["product:1"])
        product(1), product(2)
    assert loads == [1, 2, 1]


def test_tags_given_as_a_string_are_refused(cache: TieredCache) -> None:
    """tags='catalog' (a str, not a list) is a ConfigurationError naming the function."""
    with pytest.raises(ConfigurationError, match="tags"):

        @cache.cached(ttl=60, name="bad", tags="catalog")  # type: ignore[arg-type]
        def f(x: int) -> int:
            return x


def test_unknown_policy_option_and_bad_ttl_are_refused(cache: TieredCache) -> None:
    """cached() rejects an unknown policy keyword and a non-positive ttl."""
    with pytest.raises(ConfigurationError):
        cache.cached(ttl=60, no_such_option=1)
    with pytest.raises(ConfigurationError, match="ttl"):
        cache.cached(ttl=0)


def test_cached_method_through_an_instance_keeps_key_invalidate_refresh(
    cache: TieredCache,
) -> None:
    """repo.get_item.invalidate(5) (through an instance) drops the entry of repo.get_item(5);
    .key and .refresh take the same arguments as the call."""
    loads: list[int] = []

    class Repo:
        @cache.cached(ttl=60, name="repo.item")
        def get_item(self, item_id: int) -> int:
            loads.append(item_id)
            return len(loads)

    repo = Repo()
    with tenant_scope("acme"):
        assert repo.get_item(5) == 1
        assert repo.get_item.key(5) == CacheKey("api", "acme", "repo.item:v1:i5")
        assert repo.get_item.invalidate(5).ok
        assert repo.get_item(5) == 2
        assert repo.get_item.refresh(5) == 3


# -- stats ---------------------------------------------------------------------------------


def test_stats_report_hit_rates_per_layer_function_and_tenant(cache: TieredCache) -> None:
    """stats() counts hits and misses per layer, per function and per tenant."""

    @cache.cached(ttl=60, name="f")
    def f(x: int) -> int:
        return x

    @cache.cached(ttl=60, name="g")
    def g(x: int) -> int:
        return x

    with tenant_scope("a"):
        for _ in range(4):
            f(1)
        g(1)
    with tenant_scope("b"):
        f(1), f(1)

    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    memory = stats.layers["memory"]
    assert (memory.hits, memory.misses) == (4, 3)
    assert memory.hit_rate == pytest.approx(4 / 7)
    assert (stats.functions["f"]["memory"].hits, stats.functions["f"]["memory"].misses) == (4, 2)
    assert stats.functions["f"]["memory"].hit_rate == pytest.approx(4 / 6)
    assert stats.functions["g"]["memory"].hit_rate == 0.0
    assert (stats.tenants["a"]["memory"].hits, stats.tenants["a"]["memory"].misses) == (3, 2)
    assert stats.tenants["b"]["memory"].hit_rate == pytest.approx(0.5)
    assert stats.loader.calls == 3
    assert stats.hit_rate == pytest.approx(4 / 7)


def test_stats_count_evictions_of_the_memory_layer(clock: FakeClock) -> None:
    """A MemoryLayer of maxsize 2 holding 3 keys reports one eviction."""
    cache = TieredCache(namespace="api", layers=[MemoryLayer(maxsize=2, timer=clock)], clock=clock)
    try:
        for key in ("a", "b", "c"):
            cache.set(key, 1, ttl=30, tenant="acme")
        assert cache.stats().layers["memory"].evictions == 1
    finally:
        cache.close()


def test_stats_bound_tenant_cardinality_with_other(clock: FakeClock) -> None:
    """With max_tenants=3, a 4th and 5th tenant are counted under '__other__'."""
    cache = TieredCache(
        namespace="api", layers=[MemoryLayer(timer=clock)], clock=clock, max_tenants=3
    )
    try:

        @cache.cached(ttl=60, name="f")
        def f(x: int) -> str | None:
            return current_tenant()

        for i in range(5):
            with tenant_scope(f"t{i}"):
                assert f(1) == f"t{i}"
                f(1)
        tenants = cache.stats().tenants
        assert set(tenants) == {"t0", "t1", "t2", "__other__"}
        assert tenants["__other__"]["memory"].misses == 2
        assert tenants["__other__"]["memory"].hits == 2
        assert tenants["t0"]["memory"].misses == 1
    finally:
        cache.close()


async def test_the_one_argument_wrapper_keeps_the_general_wrappers_rules(
    cache: TieredCache,
) -> None:
    """f(x) gets the wrapper chosen for one positional argument: equal but differently
    typed arguments are still different entries, a keyword call finds the positional
    call's entry, a wrong call raises TypeError, and a call without a tenant is an
    error; the same for a coroutine function."""
    loads: list[object] = []

    @cache.cached(ttl=60)
    def f(x: object) -> str:
        loads.append(x)
        return repr(x)

    @cache.cached(ttl=60)
    async def g(x: object) -> str:
        loads.append(("g", x))
        return repr(x)

    assert f.cache_impl.one_argument and g.cache_impl.one_argument  # type: ignore[attr-defined]
    with pytest.raises(TenantRequiredError):
        f(1)
    with tenant_scope("acme"):
        assert [f(1), f(1.0), f(True), f(1), f(x=1)] == ["1", "1.0", "True", "1", "1"]
        assert [await g(1), await g(True), await g(x=1)] == ["1", "True", "1"]
        with pytest.raises(TypeError):
            f(1, 2)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            await g()  # type: ignore[call-arg]
        assert f([1]) == "[1]"  # unhashable: by its key
        assert f([1]) == "[1]"
    assert loads == [1, 1.0, True, ("g", 1), ("g", True), [1]]
