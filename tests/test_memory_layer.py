"""MemoryLayer on its own: LRU order, its indexes, suspend/resume, all-tenant tag
invalidation, and what an entry costs it."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Hashable

import pytest

from tieredcache import CacheKey, Entry, MemoryLayer, Tag, TieredCache, tenant_scope
from tieredcache.testing import FakeClock

NS = "ns"


def key(body: str, tenant: str = "acme", namespace: str = NS) -> CacheKey:
    return CacheKey(namespace, tenant, body)


def tag(name: str, tenant: str = "acme", namespace: str = NS) -> Tag:
    return Tag(namespace, tenant, name)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def entry(clock: FakeClock, value: object = "v", ttl: float = 60.0) -> Entry:
    now = clock()
    return Entry(value, now, now + ttl, now + ttl + 0.0)


def store(
    layer: MemoryLayer,
    clock: FakeClock,
    k: CacheKey,
    value: object = "v",
    tags: tuple[Tag, ...] = (),
    alias: Hashable | None = None,
    lease: int | None = None,
) -> bool:
    return layer.set(k, None, entry(clock, value), tags, lease=lease, alias=alias)


def value_of(layer: MemoryLayer, k: CacheKey) -> object:
    got = layer.get(k)
    return None if got is None else got.value


# -- LRU and indexes ----------------------------------------------------------------


def test_a_noted_hit_keeps_its_entry_and_the_least_recent_one_is_evicted(clock: FakeClock) -> None:
    """LRU: a hit noted through hit_lookup() moves its entry to the recent end."""
    layer = MemoryLayer(maxsize=3, timer=clock)
    for name in "abc":
        store(layer, clock, key(name), name, alias=("f", name))
    lookup, note_hit = layer.hit_lookup()
    assert lookup(("f", "a")) is not None
    note_hit(("f", "a"))
    store(layer, clock, key("d"), "d", alias=("f", "d"))
    assert [value_of(layer, key(n)) for n in "abcd"] == ["a", None, "c", "d"]
    assert layer.evictions == 1
    assert lookup(("f", "b")) is None and len(layer) == 3


def test_eviction_order_without_hits_is_insertion_order(clock: FakeClock) -> None:
    """With no hits, the oldest entries go first, and evicted ones leave every index."""
    layer = MemoryLayer(maxsize=2, timer=clock)
    for i in range(5):
        store(layer, clock, key(f"k{i}"), i, tags=(tag("t"),), alias=("f", i))
    assert [value_of(layer, key(f"k{i}")) for i in range(5)] == [None, None, None, 3, 4]
    assert layer.evictions == 3
    layer.delete_tags([tag("t")])
    assert len(layer) == 0
    assert layer._by_key == {} and layer._by_tag == {} and layer._tag_groups == {}


def test_an_aliased_entry_is_found_and_deleted_by_its_key(clock: FakeClock) -> None:
    """An entry stored under an alias is also the key's entry: get and delete by key."""
    layer = MemoryLayer(timer=clock)
    store(layer, clock, key("p:1"), "one", alias=("f", 1))
    lookup, _ = layer.hit_lookup()
    slot = lookup(("f", 1))
    assert slot is not None and slot.value == "one" and slot.entry.value == "one"
    assert value_of(layer, key("p:1")) == "one"
    layer.delete([key("p:1")])
    assert lookup(("f", 1)) is None and layer.get(key("p:1")) is None


def test_storing_a_key_under_a_new_alias_drops_the_old_alias(clock: FakeClock) -> None:
    """f(1) then f(x=1): one key, one entry; the older alias no longer answers."""
    layer = MemoryLayer(timer=clock)
    store(layer, clock, key("p:1"), "old", alias=("f", 1))
    store(layer, clock, key("p:1"), "new", alias=("f", "x", 1))
    lookup, _ = layer.hit_lookup()
    assert lookup(("f", 1)) is None
    assert lookup(("f", "x", 1)).value == "new"  # type: ignore[union-attr]
    assert value_of(layer, key("p:1")) == "new" and len(layer) == 1


def test_an_alias_reused_for_another_key_drops_the_first_key(clock: FakeClock) -> None:
    """An alias now naming another key (a new key version): the old key's entry goes."""
    layer = MemoryLayer(timer=clock)
    store(layer, clock, key("v1:1"), "old", alias=("f", 1))
    store(layer, clock, key("v2:1"), "new", alias=("f", 1))
    assert layer.get(key("v1:1")) is None
    assert value_of(layer, key("v2:1")) == "new" and len(layer) == 1


def test_clear_and_collection_unlink_the_slots(clock: FakeClock) -> None:
    """Slots are untracked by the GC, so the layer breaks their LRU links itself."""
    layer = MemoryLayer(timer=clock)
    for i in range(3):
        store(layer, clock, key(f"k{i}"), i, alias=("f", i))
    lookup, _ = layer.hit_lookup()
    slot = lookup(("f", 1))
    assert slot is not None and slot.next is not None
    layer.clear()
    assert slot.prev is None and slot.next is None
    store(layer, clock, key("k1"), 1, alias=("f", 1))
    slot = lookup(("f", 1))
    del layer
    gc.collect()
    assert slot is not None and slot.prev is None and slot.next is None


def test_no_stale_window_shares_one_float(clock: FakeClock) -> None:
    """stale_until equal to fresh_until is kept as the same float object."""
    layer = MemoryLayer(timer=clock)
    made = entry(clock)
    assert made.stale_until is not made.fresh_until
    layer.set(key("k"), None, made)
    assert made.stale_until is made.fresh_until and layer.get(key("k")) is made


def test_the_layer_books_at_most_150_bytes_per_aliased_entry(clock: FakeClock) -> None:
    """The layer's own objects for an aliased entry (slot, dict slots; keys, entries and
    aliases aside): ~115 B at 20,000 entries (~155 B at 100,000); was ~210 (~305) B."""
    layer = MemoryLayer(maxsize=50_000, timer=clock)
    n = 20_000
    items = [(key(f"k{i}"), entry(clock, i), ("f", "acme", (i,), int)) for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k, made, alias in items:
            layer.set(k, None, made, alias=alias)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(layer) == n
    assert grown / n <= 150, grown / n


# -- suspend / resume -------------------------------------------------------------------


def test_suspend_drops_everything_and_refuses_sets_until_resume(clock: FakeClock) -> None:
    """Suspended: nothing is served and nothing is stored; resumed: sets land again."""
    layer = MemoryLayer(timer=clock)
    store(layer, clock, key("a"), "a", alias=("f", "a"))
    layer.suspend()
    assert layer.suspended and len(layer) == 0
    assert layer.get(key("a")) is None and layer.hit_lookup()[0](("f", "a")) is None
    assert store(layer, clock, key("b"), "b") is False
    assert layer.get(key("b")) is None and len(layer) == 0
    layer.resume()
    assert not layer.suspended
    assert store(layer, clock, key("b"), "b") is True
    assert value_of(layer, key("b")) == "b"


def test_resume_refuses_fills_whose_lease_was_taken_before_it(clock: FakeClock) -> None:
    """A load that started before resume() (while invalidations could be missed) is refused."""
    layer = MemoryLayer(timer=clock)
    layer.suspend()
    _, lease = layer.get_with_lease(key("a"), ())
    layer.resume()
    assert store(layer, clock, key("a"), "a", lease=lease) is False
    _, lease = layer.get_with_lease(key("a"), ())
    assert store(layer, clock, key("a"), "a", lease=lease) is True


def test_a_suspended_memory_layer_sends_every_call_to_the_loader(clock: FakeClock) -> None:
    """Through the decorator: while suspended each call loads; after resume hits return."""
    layer = MemoryLayer(timer=clock)
    cache = TieredCache("ns", [layer], clock=clock)
    loads: list[int] = []

    @cache.cached(ttl=60)
    def f(i: int) -> int:
        loads.append(i)
        return i

    with tenant_scope("acme"):
        f(1)
        layer.suspend()
        f(1), f(1)
        layer.resume()
        f(1), f(1)
    assert loads == [1, 1, 1, 1]
    cache.close()


# -- delete_tag_everywhere ------------------------------------------------------------


def test_delete_tag_everywhere_drops_the_tag_in_every_tenant_of_the_namespace(
    clock: FakeClock,
) -> None:
    """Every tenant's entries tagged ``cat`` in ``ns`` go; other tags and namespaces stay."""
    layer = MemoryLayer(timer=clock)
    store(layer, clock, key("a", "t1"), 1, tags=(tag("cat", "t1"),), alias=("f", "t1", 1))
    store(layer, clock, key("b", "t2"), 2, tags=(tag("cat", "t2"), tag("dog", "t2")))
    store(layer, clock, key("c", "t2"), 3, tags=(tag("dog", "t2"),))
    store(layer, clock, key("d", "t1", "other"), 4, tags=(tag("cat", "t1", "other"),))
    store(layer, clock, key("e", "t1"), 5, tags=(tag("cat:x", "t1"),))
    layer.delete_tag_everywhere(NS, "cat")
    assert layer.get(key("a", "t1")) is None and layer.get(key("b", "t2")) is None
    assert value_of(layer, key("c", "t2")) == 3
    assert value_of(layer, key("d", "t1", "other")) == 4
    assert value_of(layer, key("e", "t1")) == 5
    assert set(layer._by_tag) == {"ns:t2:dog", "other:t1:cat", "ns:t1:cat:x"}
    layer.delete_tags([tag("dog", "t2")])
    assert layer.get(key("c", "t2")) is None


def test_delete_tag_everywhere_refuses_earlier_fills_in_any_tenant(clock: FakeClock) -> None:
    """A fill whose lease predates the call is refused for that tag in every tenant,
    including one that held no entry; later leases, other tags and namespaces pass."""
    layer = MemoryLayer(timer=clock)
    _, early = layer.get_with_lease(key("a", "t9"), ())
    layer.delete_tag_everywhere(NS, "cat")
    assert store(layer, clock, key("a", "t9"), 1, tags=(tag("cat", "t9"),), lease=early) is False
    assert store(layer, clock, key("b", "t9"), 2, tags=(tag("dog", "t9"),), lease=early) is True
    other = key("c", "t9", "other")
    assert store(layer, clock, other, 3, tags=(tag("cat", "t9", "other"),), lease=early) is True
    _, late = layer.get_with_lease(key("a", "t9"), ())
    assert store(layer, clock, key("a", "t9"), 1, tags=(tag("cat", "t9"),), lease=late) is True


def test_a_suspended_memory_layer_is_skipped_not_counted_as_a_lease_refusal() -> None:
    """While the in-process layer is suspended (the replica broadcast is unproven, as at
    every start), fills and writes pass it by: no lease rejection is counted, and an
    explicit put still lands in the shared layer instead of being read as "overtaken
    by an invalidation" and dropped everywhere."""
    from tests.dict_layer import DictSharedLayer

    memory, shared = MemoryLayer(), DictSharedLayer()
    cache = TieredCache("ns", [memory, shared], broadcast=False)
    loads: list[int] = []

    @cache.cached(ttl=60)
    def f(i: int) -> int:
        loads.append(i)
        return i * 10

    memory.suspend()
    with tenant_scope("acme"):
        assert f(1) == 10
        f.put(99, 7)
        key7 = f.key(7)
        assert f(7) == 99  # a shared hit: the put was stored, not dropped
    stats = cache.stats()
    assert stats.loader.lease_rejections == 0
    assert stats.layers["memory"].sets == 0 and len(memory) == 0
    assert shared.get(key7) is not None
    assert loads == [1]
    memory.resume()
    with tenant_scope("acme"):
        assert f(2) == 20
    assert cache.stats().layers["memory"].sets == 1
    cache.close()
