"""Helpers for testing code that uses tieredcache (and for tieredcache's own tests).

from tieredcache.testing import FakeClock, FlakyLayer, await_until, wait_until

clock = FakeClock()
cache = TieredCache("shop", [MemoryLayer(timer=clock)], clock=clock)
clock.advance(61)          # every entry with ttl=60 is now expired, no sleeping

wait_until(lambda: flusher.backlog() == 0)           # raises AssertionError after 5 s
await await_until(lambda: layer.afill_lock_held(key), expect=False)

Time that tieredcache computes with (TTLs, stale windows, XFetch) is moved with
FakeClock. Work that happens on another thread, task or process (a background
refresh, a broadcast, a release handed to a task) is waited for with
wait_until/await_until, never with a bare sleep of a guessed length.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .entry import Entry
from .errors import BackendError
from .keys import CacheKey, Tag

__all__ = ["FakeClock", "FlakyLayer", "await_until", "wait_until"]

DEFAULT_TIMEOUT = 5.0
DEFAULT_INTERVAL = 0.005


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"{what} not true within {timeout:g} s (last value: {last!r})")


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    expect: object = True,
    message: str | None = None,
) -> Any:
    """Call ``predicate`` until its result is truthy, and return that result.

    With ``expect=False`` it waits for a falsy result instead. It polls every
    ``interval`` seconds of real time and raises ``AssertionError`` (naming
    ``message`` and the last value) when ``timeout`` seconds pass first, so a
    test that waits for work on another thread fails with a reason instead of
    hanging or guessing a sleep::

        wait_until(lambda: loader.calls == 2, message="the background refresh ran")
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if bool(result) is bool(expect):
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(message or "condition", timeout, result)
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], object | Awaitable[object]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    expect: object = True,
    message: str | None = None,
) -> Any:
    """The async twin of :func:`wait_until`: the event loop runs while it waits.

    ``predicate`` may be a plain function or return an awaitable (an async
    method such as ``layer.afill_lock_held``), which is awaited each time::

        await await_until(lambda: layer.afill_lock_held(key), expect=False)
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if bool(result) is bool(expect):
            return result
        if time.monotonic() >= deadline:
            raise _timed_out(message or "condition", timeout, result)
        await asyncio.sleep(interval)


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
