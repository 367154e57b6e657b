"""One object per asyncio event loop (a client, a table of calls in flight)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Maps event loops to objects, weakly: a loop that is gone takes its object along.

    Most programs run one loop, so the object of the loop seen last is found
    without a weak-key lookup, which would cost more than the rest of a cache
    hit's bookkeeping. That shortcut holds the loop weakly too.
    """

    __slots__ = ("_by_loop", "_last")

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None

    def get(self, factory: Callable[[], T]) -> T:
        """The running loop's object, made by ``factory`` on first use."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        value = self._by_loop.get(loop)
        if value is None:
            value = self._by_loop.setdefault(loop, factory())
        self._last = (weakref.ref(loop), value)
        return value

    def pop(self) -> T | None:
        """Forget the running loop's object and return it (None if it had none)."""
        loop = asyncio.get_running_loop()
        if self._last is not None and self._last[0]() is loop:
            self._last = None
        return self._by_loop.pop(loop, None)

    def values(self) -> list[T]:
        """Every loop's object; callable from any thread."""
        while True:
            try:
                return list(self._by_loop.values())
            except RuntimeError:  # a loop's object was added meanwhile
                continue
