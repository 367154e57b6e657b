"""Helpers for testing code that uses tieredcache (and for tieredcache's own tests).

from tieredcache.testing import FakeClock, FlakyLayer

clock = FakeClock()
cache = TieredCache("shop", [MemoryLayer(timer=clock)], clock=clock)
clock.advance(61)          # every entry with ttl=60 is now expired, no sleeping
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .entry import Entry
from .errors import BackendError
from .keys import CacheKey, Tag

__all__ = ["FakeClock", "FlakyLayer"]


class FakeClock:
    """A settable clock: pass it as ``clock=``/``timer=``; move it with :meth:`advance`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self.now += seconds
            return self.now


class FlakyLayer:
    """Wraps a storage layer; while ``failing`` is true every call raises BackendError.

    Use it to check that your service degrades to the next layer or the origin
    when the cache backend fails.
    """

    def __init__(self, inner: Any, name: str | None = None) -> None:
        self.inner = inner
        self.name: str = name or inner.name
        self.stores_objects: bool = inner.stores_objects
        self.failing = False
        self.calls = 0

    def _check(self, operation: str) -> None:
        self.calls += 1
        if self.failing:
            raise BackendError(self.name, operation, "injected failure")

    def get(self, key: CacheKey) -> Any:
        self._check("get")
        return self.inner.get(key)

    def get_many(self, keys: Sequence[CacheKey]) -> list[Any]:
        self._check("get_many")
        return list(self.inner.get_many(keys))

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Any, Any]:
        self._check("get")
        value, lease = self.inner.get_with_lease(key, tags)
        return value, lease

    def set(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool:
        self._check("set")
        return bool(self.inner.set(key, value, entry, tags, lease, bump))

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self._check("delete")
        self.inner.delete(keys)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self._check("delete_tags")
        self.inner.delete_tags(tags)

    def close(self) -> None:
        self.inner.close()

    def lease(self, key: CacheKey, tags: Sequence[Tag]) -> Any:
        self._check("lease")
        return self.inner.lease(key, tags)

    async def aget(self, key: CacheKey) -> Any:
        self._check("get")
        return await self.inner.aget(key)

    async def aget_many(self, keys: Sequence[CacheKey]) -> list[Any]:
        self._check("get_many")
        return list(await self.inner.aget_many(keys))

    async def aget_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Any, Any]:
        self._check("get")
        value, lease = await self.inner.aget_with_lease(key, tags)
        return value, lease

    async def alease(self, key: CacheKey, tags: Sequence[Tag]) -> Any:
        self._check("lease")
        return await self.inner.alease(key, tags)

    async def aset(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool:
        self._check("set")
        return bool(await self.inner.aset(key, value, entry, tags, lease, bump))

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        self._check("delete")
        await self.inner.adelete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        self._check("delete_tags")
        await self.inner.adelete_tags(tags)

    async def aclose(self) -> None:
        await self.inner.aclose()
