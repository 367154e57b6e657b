"""In-process single-flight: one loader call per key per process, for threads and asyncio.

Every concurrent caller of a key gets the leader's result or the leader's
exception. Across processes the fill lock in Redis (see
:mod:`tieredcache.flows`) takes over; this layer keeps a process from sending
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

from .perloop import PerLoop

__all__ = ["AsyncSingleFlight", "SingleFlight"]

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

    def do(self, key: str, fn: Callable[[], T], tags: tuple[str, ...] = ()) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
                if tags:
                    self._tags[key] = tags
            elif call.event is None:
                call.event = threading.Event()
            event = call.event
        if not leader:
            assert event is not None
            event.wait()
            if call.error is not None:
                raise call.error
            result: T = call.result
            return result
        try:
            call.result = fn()
            return call.result  # type: ignore[no-any-return]
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                if self._calls.get(key) is call:  # not forgotten meanwhile
                    del self._calls[key]
                    self._tags.pop(key, None)
                event = call.event
            if event is not None:
                event.set()

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
        """This event loop's calls in flight (for a leader that runs inline, as
        :mod:`tieredcache.fastmiss` does: ``lead``, then ``settle``)."""
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

    async def do(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        tags: tuple[str, ...] = (),
        *args: Any,
    ) -> T:
        """``fn(*args)`` once for every concurrent caller of ``key`` in this loop.

        The leader runs it inline in this coroutine (one frame fewer kept alive
        while it awaits, which the garbage collector would otherwise walk).
        """
        flights = self._per_loop.get(_Flights)
        calls = flights.calls
        while True:
            future = calls.get(key)
            if future is not None:
                try:
                    result: T = await asyncio.shield(future)
                    return result
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if future.cancelled() and (task is None or not task.cancelling()):
                        continue  # the leader was cancelled, not us: take over
                    raise
            future = flights.lead(key, tags)
            try:
                result = await fn(*args)
            except BaseException as exc:
                flights.settle(key, future, error=exc)
                raise
            flights.settle(key, future, result)
            return result


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
