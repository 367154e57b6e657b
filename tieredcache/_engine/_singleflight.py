"""In-process single-flight: one loader call per key per process, for threads and asyncio.

Every concurrent caller of a key gets the leader's result or the leader's
exception. Across processes the fill lock of the shared layer
(see :mod:`tieredcache._engine`) takes over; this layer keeps a process from sending
its own callers to that lock at all.

A caller that arrives after an invalidation or a write of its key must not be
answered by a load that began before it: :meth:`forget` (called by the cache
on every invalidation, broadcast one included, and every write) lets later
callers start afresh while those already waiting still get the load's result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from .._perloop import PerLoop

__all__ = ["TAKE_OVER", "AsyncSingleFlight", "SingleFlight"]

TAKE_OVER: Any = object()  # a waiter whose leader was cancelled: lead in its place

T = TypeVar("T")


class _Call:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event: threading.Event | None = None  # made only when a second caller waits
        self.result: Any = None
        self.error: BaseException | None = None


def _matches(key: str, tags: tuple[str, ...], keys: set[str], dropped: set[str]) -> bool:
    return key in keys or any(tag in dropped for tag in tags)


class SingleFlight:
    """Thread single-flight: the first caller of a key runs ``fn``; the rest wait for it."""

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._tags: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def forget(
        self, keys: Iterable[str] = (), tags: Iterable[str] = (), everything: bool = False
    ) -> None:
        """Later callers of ``keys`` (or of keys with ``tags``, or of any key) do not join
        calls in flight."""
        key_set, tag_set = set(keys), set(tags)
        with self._lock:
            for key in [
                k
                for k in self._calls
                if everything or _matches(k, self._tags.get(k, ()), key_set, tag_set)
            ]:
                del self._calls[key]
                self._tags.pop(key, None)

    def join(self, key: str, tags: tuple[str, ...] = ()) -> tuple[_Call, bool]:
        """(the call of ``key``, whether the caller leads it). A leader runs the load
        itself and hands its outcome to :meth:`settle`; the others :meth:`follow`."""
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = _Call()
                if tags:
                    self._tags[key] = tags
                return call, True
            if call.event is None:
                call.event = threading.Event()
            return call, False

    @staticmethod
    def follow(call: _Call) -> Any:
        """Wait for the leader of ``call``: its result, or its exception raised."""
        assert call.event is not None
        call.event.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def settle(
        self, key: str, call: _Call, result: Any = None, error: BaseException | None = None
    ) -> None:
        """Hand the leader's result (or ``error``) to its followers; the call leaves."""
        call.result, call.error = result, error
        with self._lock:
            if self._calls.get(key) is call:  # not forgotten meanwhile
                del self._calls[key]
                self._tags.pop(key, None)
            event = call.event
        if event is not None:
            event.set()

    def do(self, key: str, fn: Callable[[], T], tags: tuple[str, ...] = ()) -> T:
        """``fn()`` once for every concurrent caller of ``key``."""
        call, leader = self.join(key, tags)
        if not leader:
            result: T = self.follow(call)
            return result
        try:
            value = fn()
        except BaseException as exc:
            self.settle(key, call, error=exc)
            raise
        self.settle(key, call, value)
        return value

    def __len__(self) -> int:
        return len(self._calls)

    def in_flight(self, key: str) -> bool:
        return key in self._calls


class AsyncSingleFlight:
    """asyncio single-flight, per event loop.

    The first caller runs ``fn`` itself (no task, no extra loop turns); the others
    await a future it resolves. If that first caller is cancelled, its waiters
    are not: the first of them to notice runs ``fn`` again in its place.
    """

    def __init__(self) -> None:
        self._per_loop: PerLoop[_Flights] = PerLoop()

    def in_flight(self, key: str) -> bool:
        return key in self._per_loop.get(_Flights).calls

    def flights(self) -> _Flights:
        """This event loop's calls in flight."""
        return self._per_loop.get(_Flights)

    def forget(
        self, keys: Iterable[str] = (), tags: Iterable[str] = (), everything: bool = False
    ) -> None:
        """Later callers of ``keys`` (or of keys with ``tags``, or of any key) do not join
        calls in flight, in any loop. Callable from any thread."""
        key_set, tag_set = set(keys), set(tags)
        for flights in self._per_loop.values():
            calls, flight_tags = flights.calls, flights.tags
            for key in [
                k
                for k in list(calls)
                if everything or _matches(k, flight_tags.get(k, ()), key_set, tag_set)
            ]:
                calls.pop(key, None)
                flight_tags.pop(key, None)

    def join(self, key: str, tags: tuple[str, ...] = ()) -> tuple[asyncio.Future[Any], bool]:
        """(the call of ``key`` in this loop, whether the caller leads it); see
        :meth:`SingleFlight.join`. The leader runs the load inline in its own
        coroutine: no task, and one frame fewer kept alive while it awaits."""
        flights = self._per_loop.get(_Flights)
        future = flights.calls.get(key)
        if future is not None:
            return future, False
        return flights.lead(key, tags), True

    @staticmethod
    async def follow(future: asyncio.Future[Any]) -> Any:
        """The leader's result (its exception raised), or TAKE_OVER if the leader was
        cancelled and this waiter was not: it then leads in the leader's place."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and (task is None or not task.cancelling()):
                return TAKE_OVER
            raise

    def settle(
        self,
        key: str,
        future: asyncio.Future[Any],
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        self._per_loop.get(_Flights).settle(key, future, result, error)

    async def do(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        tags: tuple[str, ...] = (),
        *args: Any,
    ) -> T:
        """``fn(*args)`` once for every concurrent caller of ``key`` in this loop."""
        while True:
            future, leader = self.join(key, tags)
            if leader:
                break
            result = await self.follow(future)
            if result is not TAKE_OVER:
                return result  # type: ignore[no-any-return]
        try:
            value = await fn(*args)
        except BaseException as exc:
            self.settle(key, future, error=exc)
            raise
        self.settle(key, future, value)
        return value


class _Flights:
    """One loop's calls in flight, and the tags of those that have some."""

    __slots__ = ("calls", "tags")

    def __init__(self) -> None:
        self.calls: dict[str, asyncio.Future[Any]] = {}
        self.tags: dict[str, tuple[str, ...]] = {}

    def lead(self, key: str, tags: tuple[str, ...]) -> asyncio.Future[Any]:
        """Register a call of ``key`` that its caller runs itself; later callers wait
        for the future returned, which :meth:`settle` resolves."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls[key] = future
        if tags:
            self.tags[key] = tags
        return future

    def settle(
        self,
        key: str,
        future: asyncio.Future[Any],
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        """Hand the leader's result (or ``error``) to its waiters; the call leaves."""
        try:
            if error is None:
                future.set_result(result)
            elif isinstance(error, asyncio.CancelledError):
                future.cancel()  # a waiter that was not cancelled itself takes over
            else:
                future.set_exception(error)
                future.exception()  # retrieved: every waiter re-raises it
        finally:
            self.release(key, future)

    def release(self, key: str, future: asyncio.Future[Any]) -> None:
        if self.calls.get(key) is future:  # not forgotten (and replaced) meanwhile
            # pop, not del: forget() may drop it from another thread in between
            self.calls.pop(key, None)
            self.tags.pop(key, None)
