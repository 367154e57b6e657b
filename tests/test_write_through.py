"""Write-through: store first, then every layer, in an order no concurrent read can beat."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.base import StorageLayer
from tieredcache.testing import wait_until


@pytest.fixture(params=["memory", "memory+redis"])
def cache(request: pytest.FixtureRequest) -> Iterator[TieredCache]:
    layers: list[StorageLayer] = [MemoryLayer()]
    if "redis" in request.param:
        layers.append(RedisLayer(url=request.getfixturevalue("redis_url")))
    built = TieredCache("wt", layers)
    yield built
    built.close()


class Store:
    """A 'database' of rows; writes can be held at a gate to force interleavings."""

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}
        self.gates: dict[str, tuple[threading.Event, threading.Event]] = {}

    def hold(self, value: str) -> tuple[threading.Event, threading.Event]:
        reached, release = threading.Event(), threading.Event()
        self.gates[value] = (reached, release)
        return reached, release

    def pause(self, value: str) -> None:
        if value in self.gates:
            reached, release = self.gates[value]
            reached.set()
            assert release.wait(5)


def _functions(cache: TieredCache, store: Store) -> tuple[Any, Any, list[int]]:
    reads: list[int] = []

    @cache.cached(ttl=60, negative_ttl=60, lock=False)
    def get_row(row: int) -> str | None:
        reads.append(row)
        value = store.rows.get(row)
        if value is not None:
            store.pause("read:" + value)
        return value

    @get_row.writer(key_args=lambda row, value: (row,))
    def save_row(row: int, value: str) -> str:
        store.rows[row] = value
        store.pause("write:" + value)  # held after the store write, before the cache
        return value

    return get_row, save_row, reads


def _in_thread(fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        with tenant_scope("acme"):
            fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_process_reads_its_own_write(cache: TieredCache) -> None:
    store = Store()
    get_row, save_row, reads = _functions(cache, store)
    with tenant_scope("acme"):
        store.rows[1] = "old"
        assert get_row(1) == "old"
        assert save_row(1, "new") == "new"
        assert get_row(1) == "new"
    assert reads == [1]  # the write put the value in the cache; no reload needed


def test_a_negative_entry_is_cleared_when_the_row_is_created(cache: TieredCache) -> None:
    store = Store()
    get_row, save_row, _ = _functions(cache, store)
    with tenant_scope("acme"):
        assert get_row(5) is None  # cached "not found"
        assert get_row(5) is None
        save_row(5, "created")
        assert get_row(5) == "created"


def test_racing_writers_leave_the_later_value_or_nothing(cache: TieredCache) -> None:
    """W1 writes the store first but reaches the cache last: the cache never keeps W1's value."""
    store = Store()
    get_row, save_row, _ = _functions(cache, store)
    reached, release = store.hold("write:first")
    writer1 = _in_thread(lambda: save_row(1, "first"))
    assert reached.wait(5)  # W1 has written the store, not the cache yet
    with tenant_scope("acme"):
        save_row(1, "second")  # W2 writes store and cache completely
    release.set()
    writer1.join()
    with tenant_scope("acme"):
        assert store.rows[1] == "second"
        assert get_row(1) == "second"


def test_a_read_that_began_before_a_write_cannot_overwrite_it(cache: TieredCache) -> None:
    """A slow reader loaded the old row; the write lands; the reader's fill is refused."""
    store = Store()
    get_row, save_row, _ = _functions(cache, store)
    store.rows[1] = "old"
    reached, release = store.hold("read:old")
    seen: list[str] = []
    reader = _in_thread(lambda: seen.append(get_row(1)))
    assert reached.wait(5)  # the reader holds "old", not yet in the cache
    with tenant_scope("acme"):
        save_row(1, "new")
    release.set()
    reader.join()
    with tenant_scope("acme"):
        assert [get_row(1) for _ in range(3)] == ["new", "new", "new"]
    assert seen == ["old"]


@pytest.mark.redis
def test_a_write_reaches_other_replicas_in_process_layers(redis_url: str) -> None:
    """A write-through on replica A replaces the value in B's in-process layer (broadcast)."""
    replicas = [TieredCache("wt", [MemoryLayer(), RedisLayer(url=redis_url)]) for _ in range(2)]
    store = Store()
    store.rows[1] = "old"
    getters = []
    for replica in replicas:
        getters.append(replica.cached(ttl=60, name="get_row")(lambda row: store.rows[row]))
        assert replica.connect()
    save_row = getters[0].writer(key_args=lambda row, value: (row,))(
        lambda row, value: store.rows.__setitem__(row, value) or value
    )
    with tenant_scope("acme"):
        assert [g(1) for g in getters] == ["old", "old"]
        save_row(1, "new")
        wait_until(lambda: getters[1](1) == "new", timeout=1.0, message="the write reached B")
        assert [g(1) for g in getters] == ["new", "new"]
    client = redis.Redis.from_url(redis_url)
    assert any(b":v:get_row" in k for k in client.keys("*"))
    for replica in replicas:
        replica.close()
