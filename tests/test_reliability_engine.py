"""Issue 9's defects that lived in the read path the engine rewrite merged: a
cross-process stale read through the single-flight (#4), the in-process lookup
returning another argument's value (#5), arguments kept alive by it (#10), and
per-tenant maps of cached functions growing without bound (#9)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope


@pytest.mark.redis
async def test_a_read_that_starts_after_another_process_invalidated_never_gets_the_old_value(
    redis_url: str,
) -> None:
    """Read-your-invalidation across processes: once B's invalidate() returned, a read in
    A does not receive the value of a load A began before it, even before A hears the
    broadcast (here it never does). A's own earlier caller may still get it."""
    here = TieredCache("ryi", [MemoryLayer(), RedisLayer(url=redis_url)], broadcast=False)
    there = TieredCache("ryi", [MemoryLayer(), RedisLayer(url=redis_url)], broadcast=False)
    source = {"version": "old"}
    loading = asyncio.Event()
    release = asyncio.Event()

    @here.cached(ttl=60, name="row")
    async def row(n: int) -> str:
        seen = source["version"]
        loading.set()
        await release.wait()
        return seen

    with tenant_scope("acme"):
        first = asyncio.create_task(row(1))
        await loading.wait()
        source["version"] = "new"
        assert (await there.ainvalidate([row.key(1)])).ok  # another process
        later = asyncio.create_task(row(1))  # starts after the invalidation returned
        await asyncio.sleep(0)
        loading.clear()
        release.set()
        assert await first == "old"  # began before the invalidation: allowed
        assert await later == "new"
        assert await row(1) == "new"
    await here.aclose()
    await there.aclose()


@dataclass(frozen=True)
class Point:
    x: Any


EQUAL_BUT_DIFFERENT = [
    (0.0, -0.0),
    (Decimal("1.0"), Decimal("1.00")),
    (Point(1), Point(1.0)),
    ((1,), (1.0,)),
    (frozenset({1}), frozenset({1.0})),
    (1, True),
    (1, 1.0),
]


@pytest.mark.parametrize(("a", "b"), EQUAL_BUT_DIFFERENT)
def test_equal_arguments_with_different_keys_never_share_an_in_process_entry(
    a: Any, b: Any
) -> None:
    """Python calls these equal, their keys differ: each call gets its own value."""
    cache = TieredCache("alias", [MemoryLayer()])

    @cache.cached(ttl=60)
    def show(value: Any) -> str:
        return repr(value)

    with tenant_scope("acme"):
        for _ in range(2):  # the second round is answered by the in-process layer
            assert show(a) == repr(a)
            assert show(b) == repr(b)
            assert show(value=a) == repr(a)
            assert show(value=b) == repr(b)


def test_a_hit_path_alias_still_serves_plain_arguments_from_memory() -> None:
    cache = TieredCache("alias", [MemoryLayer()])

    @cache.cached(ttl=60)
    def f(a: int, b: str, c: float) -> tuple[int, str, float]:
        return (a, b, c)

    with tenant_scope("acme"):
        for _ in range(3):
            assert f(1, "x", 2.5) == (1, "x", 2.5)
    assert cache.stats().layers["memory"].hits == 2


class Resource:
    """Something a caller passes that is not part of the key."""


def test_arguments_left_out_of_the_key_are_not_kept_alive() -> None:
    """ignore= parameters and a method's self are not held by the cached entry."""
    cache = TieredCache("alias", [MemoryLayer()])

    @cache.cached(ttl=60, ignore=["conn"])
    def fetch(n: int, conn: Resource) -> int:
        return n

    class Repo:
        @cache.cached(ttl=60)
        def get(self, n: int) -> int:
            return n * 2

    conn, repo = Resource(), Repo()
    refs = [weakref.ref(conn), weakref.ref(repo)]
    with tenant_scope("acme"):
        assert fetch(1, conn) == 1 and fetch(1, conn) == 1
        assert repo.get(2) == 4 and repo.get(2) == 4
    assert cache.stats().layers["memory"].hits == 2
    del conn, repo
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_a_tenant_id_flood_does_not_grow_a_functions_counter_map() -> None:
    cache = TieredCache("flood", [MemoryLayer()], max_tenants=10)

    @cache.cached(ttl=60)
    def f(n: int) -> int:
        return n

    for i in range(500):
        with tenant_scope(f"t{i}"):
            f(1)
    impl: Any = f.cache_impl  # type: ignore[attr-defined]
    assert len(impl.counters) <= 11
    stats = cache.stats()
    assert sum(s.misses for s in stats.tenants.values() for s in [s["memory"]]) == 500
