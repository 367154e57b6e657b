"""The engine runs on a layer it has never heard of: the dict-backed shared layer of
tests/dict_layer.py, written from the Protocols of tieredcache.layers.base alone,
takes Redis's place behind the in-process layer, sync and async."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.dict_layer import DictSharedLayer
from tieredcache import MemoryLayer, TieredCache, tenant_scope
from tieredcache.layers.base import FillLockLayer, InProcessLayer, SharedLayer


def test_the_protocols_recognise_the_layer_by_its_methods() -> None:
    layer = DictSharedLayer()
    assert isinstance(layer, FillLockLayer) and isinstance(layer, SharedLayer)
    assert not isinstance(layer, InProcessLayer)


def test_threads_share_one_load_through_the_layers_fill_lock() -> None:
    shared = DictSharedLayer()
    cache = TieredCache("tp", [MemoryLayer(), shared])
    gate = threading.Event()
    loads: list[int] = []

    @cache.cached(ttl=60, tags=lambda n: [f"item:{n}"])
    def item(n: int) -> int:
        loads.append(n)
        gate.wait(0.1)
        return n * 2

    with tenant_scope("acme"):
        context = contextvars.copy_context()  # threads get the tenant scope with it
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: context.copy().run(item, 4), range(8))) == [8] * 8
        key = item.key(4)
    assert loads == [4]
    assert shared.get(key) is not None and not shared.fill_lock_held(key)
    cache.invalidate(tags=["item:4"], tenant="acme")
    assert shared.get(key) is None
    with tenant_scope("acme"):
        assert item(4) == 8
    assert loads == [4, 4]


async def test_async_callers_read_back_fill_and_invalidate_through_it() -> None:
    shared = DictSharedLayer()
    first = TieredCache("tp", [MemoryLayer(), shared])
    second = TieredCache("tp", [MemoryLayer(), shared])  # another "process"
    loads: list[str] = []

    def define(cache: TieredCache) -> object:
        @cache.cached(ttl=60, name="page")
        async def page(path: str) -> str:
            loads.append(path)
            await asyncio.sleep(0.01)
            return path.upper()

        return page

    page1, page2 = define(first), define(second)
    with tenant_scope("acme"):
        assert await asyncio.gather(*(page1("/a") for _ in range(5))) == ["/A"] * 5  # type: ignore[operator]
        assert await page2("/a") == "/A"  # type: ignore[operator]  # a shared hit, back-filled
    assert loads == ["/a"]
    assert second.stats().layers["dict"].hits == 1
    assert first.stats().loader.coalesced == 4
