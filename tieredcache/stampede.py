"""In-process single-flight: one loader call per key per process, for threads and asyncio.

Every concurrent caller of a key gets the leader's result or the leader's
exception. Across processes the fill lock in Redis (see
:mod:`tieredcache.flows`) takes over; this layer keeps a process from sending
its own callers to that lock at all.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["AsyncSingleFlight", "SingleFlight"]

T = TypeVar("T")


class _Call:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event: threading.Event | None = None  # made only when a second caller waits
        self.result: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    """Thread single-flight: the first caller of a key runs ``fn``; the rest wait for it."""

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()

    def do(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
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
                del self._calls[key]
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
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Future[Any]]
        ] = weakref.WeakKeyDictionary()
        # The last loop's calls: one loop is the common case, and a weak-key lookup
        # costs more than the rest of a hit's bookkeeping. Weak, like the mapping.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], dict[str, Any]] | None = None

    def _calls(self) -> tuple[asyncio.AbstractEventLoop, dict[str, asyncio.Future[Any]]]:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return loop, last[1]
        calls = self._per_loop.get(loop)
        if calls is None:
            calls = self._per_loop.setdefault(loop, {})
        self._last = (weakref.ref(loop), calls)
        return loop, calls

    def in_flight(self, key: str) -> bool:
        return key in self._calls()[1]

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop, calls = self._calls()
        while True:
            future = calls.get(key)
            if future is None:
                return await self._lead(calls, key, fn, loop)
            try:
                result: T = await asyncio.shield(future)
                return result
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if future.cancelled() and (task is None or not task.cancelling()):
                    continue  # the leader was cancelled, not us: take over
                raise

    async def _lead(
        self,
        calls: dict[str, asyncio.Future[Any]],
        key: str,
        fn: Callable[[], Awaitable[T]],
        loop: asyncio.AbstractEventLoop,
    ) -> T:
        future: asyncio.Future[Any] = loop.create_future()
        calls[key] = future
        try:
            result = await fn()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: every waiter re-raises it
            raise
        else:
            future.set_result(result)
            return result
        finally:
            if calls.get(key) is future:
                del calls[key]
