"""The async front end: :class:`AsyncWriteBack` for async cached functions,
:class:`AsyncFlusher` a task of the running loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from ..errors import ConfigurationError, WriteBackError
from .base import FlusherBase, WriteBackBase, log
from .flush import Ack, DeadLetter, FlushOp, FlushSettings, Read, Store, Touch
from .records import FlushReport, WriteRecord

if TYPE_CHECKING:
    from .._function.types import AsyncCachedFunction
    from ..cache import TieredCache
    from ._async.journal import AsyncJournal

__all__ = ["AsyncFlusher", "AsyncWriteBack"]

P = ParamSpec("P")
R = TypeVar("R")


class AsyncWriteBack(WriteBackBase["AsyncFlusher", Callable[[float], Awaitable[object]]]):
    """:class:`WriteBack` for async cached functions, an async journal and an async store.

    >>> wb = AsyncWriteBack(cache, journal=AsyncRedisStreamJournal("shop"), store=upsert)
    ... # doctest: +SKIP
    """

    def __init__(
        self,
        cache: TieredCache,
        *,
        journal: AsyncJournal,
        store: Callable[[list[WriteRecord]], Awaitable[object]],
    ) -> None:
        super().__init__(cache, journal)
        self.journal = journal
        self.store = store

    def pending_first(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        """Async :meth:`WriteBack.pending_first`."""
        if not inspect.iscoroutinefunction(func):
            raise ConfigurationError(f"{func.__qualname__} is sync: use WriteBack")

        @functools.wraps(func)
        async def load(*args: P.args, **kwargs: P.kwargs) -> R:
            impl = self._loaders.get(load)
            if impl is not None:
                record = await self.journal.pending(impl.key(*args, **kwargs).full)
                if record is not None:
                    found, value = self._pending_value(record, impl)
                    if found:
                        return value  # type: ignore[no-any-return]
            return await func(*args, **kwargs)

        self._loaders[load] = None
        return load

    def writer(
        self, reader: AsyncCachedFunction[P, R], *, read_your_writes: bool = True
    ) -> Callable[Concatenate[R, P], Coroutine[Any, Any, str]]:
        """Async :meth:`WriteBack.writer`: ``await save(value, *args, **kwargs)``."""
        impl = self._register(reader, read_your_writes)
        cache, journal = self.cache, self.journal

        async def save(value: R, /, *args: P.args, **kwargs: P.kwargs) -> str:
            key, record = self._prepare(impl, value, args, kwargs)
            try:
                record_id = await journal.append(record)
            except WriteBackError:
                await cache.ainvalidate([key.body], tenant=key.tenant)  # it may have landed
                raise
            await impl.aput(value, *args, **kwargs)
            try:
                newest = await journal.pending(key.full)
            except WriteBackError:
                newest = None
            if newest is None or newest.id != record_id:
                # A newer write (or the flush) overtook this one: no stale value may stay.
                await cache.ainvalidate([key.body], tenant=key.tenant)
            return record_id

        return save

    def _make_flusher(
        self,
        settings: FlushSettings,
        sleep: Callable[[float], Awaitable[object]] | None,
        timer: Callable[[], float],
    ) -> AsyncFlusher:
        return AsyncFlusher(self, settings, sleep, timer)

    async def aclose(self) -> None:
        """Close the journal."""
        await self.journal.close()


class AsyncFlusher(FlusherBase[AsyncWriteBack, Callable[[float], Awaitable[object]]]):
    """Async :class:`Flusher`: ``await run_once()``, ``start()`` a task, ``await stop()``.

    >>> async with wb.flusher().start():   # doctest: +SKIP
    ...     await serve_requests()         # await stop(drain=True) when the block ends
    """

    def __init__(
        self,
        writeback: AsyncWriteBack,
        settings: FlushSettings,
        sleep: Callable[[float], Awaitable[object]] | None,
        timer: Callable[[], float],
    ) -> None:
        super().__init__(writeback, settings, sleep, timer)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._abort = asyncio.Event()

    async def run_once(self, block: float = 0.0) -> FlushReport:
        """One round: read a batch (waiting up to ``block`` s), store it, ack it."""
        flow = self._round(block)
        send: Any = None
        while True:
            try:
                op = flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send = await self._dispatch(op)

    async def _dispatch(self, op: FlushOp) -> Any:
        wb = self.writeback
        if isinstance(op, Read):
            return await wb.journal.read(op.count, op.block)
        if isinstance(op, Store):
            try:
                await wb.store(op.records)
            except Exception as exc:
                return self._store_failed(op, exc)
            return None
        if isinstance(op, Ack):
            await wb.journal.ack(op.records)
        elif isinstance(op, Touch):
            await wb.journal.touch(op.records)
        elif isinstance(op, DeadLetter):
            self._dead_lettering(op)
            if await wb.journal.dead_letter(op.record, op.reason) and wb._owns(op.record):
                await wb.cache.ainvalidate([op.record.body], tenant=op.record.tenant)
        else:
            if self._sleep is not None:
                await self._sleep(op.seconds)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abort.wait(), op.seconds)
            return not self._abort.is_set()
        return None

    async def drain(self, timeout: float = 10.0) -> FlushReport:
        """Run rounds until the journal has nothing for this flusher (or ``timeout``)."""
        total, deadline = FlushReport(), self._deadline(timeout)
        while True:
            if self._drained(total, await self.run_once(), deadline):
                return total

    def start(self) -> Self:
        """Run rounds in a task of the running loop until :meth:`stop`."""
        if self._task is not None:
            raise ConfigurationError("this flusher is already running")
        self._stopping.clear()
        self._abort.clear()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once(self.settings.block)
            except Exception:
                log.exception("tieredcache write-back: flusher round failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.settings.error_pause)
        if self._drain_timeout is not None:
            try:
                await self.drain(self._drain_timeout)
            except Exception:
                log.exception(
                    "tieredcache write-back: final drain failed; the rest stays journaled"
                )

    async def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Async :meth:`Flusher.stop`."""
        task = self._task
        if task is None:
            if drain:
                await self.drain(timeout)
            return
        self._drain_timeout = timeout if drain else None
        if not drain:
            self._abort.set()
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=timeout + self.settings.block + 1.0)
        if not done:
            self._abort.set()
            await task
        self._task = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
