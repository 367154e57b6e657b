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
        self.event = threading.Event()
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
        if not leader:
            call.event.wait()
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
            call.event.set()

    def __len__(self) -> int:
        return len(self._calls)


class AsyncSingleFlight:
    """asyncio single-flight, per event loop.

    The leader's work runs in its own task, so cancelling one caller (the
    leader included) does not cancel the load the others wait for.
    """

    def __init__(self) -> None:
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, asyncio.Task[Any]]
        ] = weakref.WeakKeyDictionary()

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        calls = self._per_loop.get(loop)
        if calls is None:
            calls = self._per_loop.setdefault(loop, {})
        task = calls.get(key)
        if task is None:

            async def lead() -> T:
                return await fn()

            task = loop.create_task(lead())
            calls[key] = task

            def done(
                finished: asyncio.Task[Any], calls: dict[str, asyncio.Task[Any]] = calls
            ) -> None:
                if calls.get(key) is finished:
                    del calls[key]
                if not finished.cancelled():
                    finished.exception()  # retrieved: every caller re-raises it

            task.add_done_callback(done)
        result: T = await asyncio.shield(task)
        return result
