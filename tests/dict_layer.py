"""A third-party shared layer written from the Protocols of tieredcache.layers.base alone.

A dict stands in for a shared store (bytes, per-entry expiry, tag sets), with
leases made of generations, a fill lock with owner tokens, and async twins. It
subclasses nothing of tieredcache: the layer contract suite (tests/test_contract.py)
and the engine (tests/test_third_party_layer.py) must accept it as they accept
Redis, which shows the Protocols are the whole contract.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tieredcache import CacheKey, Entry, Tag


class DictSharedLayer:
    """FillLockLayer on a dict: ``get``/``set``/``lease``/fill lock, sync and async."""

    stores_objects = False

    def __init__(self, name: str = "dict", timer: Callable[[], float] = time.time) -> None:
        self.name = name
        self.timer = timer
        self._values: dict[str, tuple[bytes, float, tuple[str, ...]]] = {}
        self._tags: dict[str, set[str]] = {}
        self._generations: dict[str, int] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._counter = itertools.count(1)
        self._mutex = threading.Lock()

    # -- helpers ----------------------------------------------------------------
    def _alive(self, full: str) -> bytes | None:
        found = self._values.get(full)
        if found is None:
            return None
        if found[1] <= self.timer():
            del self._values[full]
            return None
        return found[0]

    def _lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[int, ...]:
        names = ["k:" + key.full, *("t:" + t.full for t in tags)]
        return tuple(self._generations.get(n, 0) for n in names)

    def _bump(self, name: str) -> None:
        self._generations[name] = next(self._counter)

    # -- SharedLayer ------------------------------------------------------------
    def get(self, key: CacheKey) -> bytes | None:
        with self._mutex:
            return self._alive(key.full)

    def get_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def lease(self, key: CacheKey, tags: Sequence[Tag]) -> Any:
        with self._mutex:
            return self._lease(key, tags)

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[bytes | None, Any]:
        with self._mutex:
            return self._alive(key.full), self._lease(key, tags)

    def set(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
        unlock: str | None = None,
    ) -> bool:
        with self._mutex:
            try:
                if lease is not None and lease != self._lease(key, tags):
                    return False
                if entry.stale_until <= self.timer():
                    return False
                old = self._values.get(key.full)
                for name in old[2] if old else ():
                    self._tags.get(name, set()).discard(key.full)
                names = tuple(t.full for t in tags)
                self._values[key.full] = (value, entry.stale_until, names)
                for name in names:
                    self._tags.setdefault(name, set()).add(key.full)
                if bump:
                    self._bump("k:" + key.full)
                return True
            finally:
                if unlock is not None:
                    self._release(key, unlock)

    def delete(self, keys: Sequence[CacheKey]) -> None:
        with self._mutex:
            for key in keys:
                old = self._values.pop(key.full, None)
                for name in old[2] if old else ():  # and out of its tag sets
                    self._tags.get(name, set()).discard(key.full)
                self._bump("k:" + key.full)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        with self._mutex:
            for tag in tags:
                for full in self._tags.pop(tag.full, set()):
                    self._values.pop(full, None)
                self._bump("t:" + tag.full)

    # -- FillLockLayer ----------------------------------------------------------
    def _locked(self, key: CacheKey) -> bool:
        held = self._locks.get(key.full)
        return held is not None and held[1] > time.monotonic()

    def acquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool, Any]:
        with self._mutex:
            if self._locked(key):
                return False, None
            self._locks[key.full] = (token, time.monotonic() + ttl)
            return True, self._lease(key, tags)

    def get_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bytes | None, bool | None, Any]:
        with self._mutex:
            value = self._alive(key.full)
            if value is not None:
                return value, None, None
            if self._locked(key):
                return None, False, None
            self._locks[key.full] = (token, time.monotonic() + ttl)
            return None, True, self._lease(key, tags)

    def _release(self, key: CacheKey, token: str) -> bool:
        held = self._locks.get(key.full)
        if held is not None and held[0] == token:
            del self._locks[key.full]
            return True
        return False

    def release_fill_lock(self, key: CacheKey, token: str) -> bool:
        with self._mutex:
            return self._release(key, token)

    def watch_fill_lock(self, key: CacheKey, wait: float) -> bool:
        with self._mutex:
            return self._locked(key)

    def fill_lock_held(self, key: CacheKey) -> bool:
        with self._mutex:
            return self._locked(key)

    def close(self) -> None:
        pass

    # -- async twins (no I/O: they answer at once) ------------------------------
    async def aget(self, key: CacheKey) -> bytes | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        return self.get_many(keys)

    async def alease(self, key: CacheKey, tags: Sequence[Tag]) -> Any:
        return self.lease(key, tags)

    async def aget_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[bytes | None, Any]:
        return self.get_with_lease(key, tags)

    def aset(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
        unlock: str | None = None,
    ) -> Coroutine[Any, Any, bool]:
        return self._now(self.set(key, value, entry, tags, lease, bump, unlock))

    @staticmethod
    async def _now(result: Any) -> Any:
        return result

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        self.delete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        self.delete_tags(tags)

    def aget_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> Coroutine[Any, Any, tuple[bytes | None, bool | None, Any]]:
        return self._now(self.get_or_lock_fill(key, tags, token, ttl))

    async def aacquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool, Any]:
        return self.acquire_fill_lock(key, tags, token, ttl)

    async def arelease_fill_lock(self, key: CacheKey, token: str) -> bool:
        return self.release_fill_lock(key, token)

    async def awatch_fill_lock(self, key: CacheKey, wait: float) -> bool:
        return self.watch_fill_lock(key, wait)

    async def aclose(self) -> None:
        pass
