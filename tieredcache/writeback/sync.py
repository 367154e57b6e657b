"""The sync front end: :class:`WriteBack` for sync cached functions, :class:`Flusher` a thread."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from ..errors import ConfigurationError, WriteBackError
from .base import FlusherBase, WriteBackBase, log
from .flush import Ack, DeadLetter, FlushOp, FlushSettings, Read, Store, Touch
from .records import FlushReport, WriteRecord

if TYPE_CHECKING:
    from .._function.types import CachedFunction
    from ..cache import TieredCache
    from ._sync.journal import Journal

__all__ = ["Flusher", "WriteBack"]

P = ParamSpec("P")
R = TypeVar("R")


class WriteBack(WriteBackBase["Flusher", Callable[[float], object]]):
    """Write-back for sync cached functions; see :mod:`tieredcache.writeback`.

    ``store(records)`` writes a batch to your database and must be idempotent
    (compare ``record.version``). ``journal`` is a :class:`RedisStreamJournal`
    or your own :class:`Journal`.

    >>> wb = WriteBack(cache, journal=RedisStreamJournal("shop"), store=upsert)  # doctest: +SKIP
    """

    def __init__(
        self,
        cache: TieredCache,
        *,
        journal: Journal,
        store: Callable[[list[WriteRecord]], object],
    ) -> None:
        super().__init__(cache, journal)
        self.journal = journal
        self.store = store

    def pending_first(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a loader (under ``@cache.cached``): a miss returns the key's
        newest unflushed write, if there is one, instead of calling it."""
        if inspect.iscoroutinefunction(func):
            raise ConfigurationError(f"{func.__qualname__} is async: use AsyncWriteBack")

        @functools.wraps(func)
        def load(*args: P.args, **kwargs: P.kwargs) -> R:
            impl = self._loaders.get(load)
            if impl is not None:
                record = self.journal.pending(impl.key(*args, **kwargs).full)
                if record is not None:
                    found, value = self._pending_value(record, impl)
                    if found:
                        return value  # type: ignore[no-any-return]
            return func(*args, **kwargs)

        self._loaders[load] = None
        return load

    def writer(
        self, reader: CachedFunction[P, R], *, read_your_writes: bool = True
    ) -> Callable[Concatenate[R, P], str]:
        """``save(value, *args, **kwargs)``: journal ``value`` as the new value of
        ``reader(*args, **kwargs)``, put it in the cache, return the journal id.

        The cache gets it through ``reader.put``: under the reader's key and
        argument alias, with its whole policy, and every replica drops its copy.
        """
        impl = self._register(reader, read_your_writes)
        cache, journal = self.cache, self.journal

        def save(value: R, /, *args: P.args, **kwargs: P.kwargs) -> str:
            key, record = self._prepare(impl, value, args, kwargs)
            try:
                record_id = journal.append(record)
            except WriteBackError:
                cache.invalidate([key.body], tenant=key.tenant)  # it may have landed anyway
                raise
            impl.put(value, *args, **kwargs)
            try:
                newest = journal.pending(key.full)
            except WriteBackError:
                newest = None
            if newest is None or newest.id != record_id:
                # A newer write (or the flush) overtook this one: no stale value may stay.
                cache.invalidate([key.body], tenant=key.tenant)
            return record_id

        return save

    def _make_flusher(
        self,
        settings: FlushSettings,
        sleep: Callable[[float], object] | None,
        timer: Callable[[], float],
    ) -> Flusher:
        return Flusher(self, settings, sleep, timer)

    def close(self) -> None:
        """Close the journal."""
        self.journal.close()


class Flusher(FlusherBase[WriteBack, Callable[[float], object]]):
    """Drains a :class:`WriteBack` journal to its store (see :meth:`WriteBack.flusher`).

    >>> with wb.flusher().start():      # doctest: +SKIP
    ...     serve_requests()            # stop(drain=True) when the block ends
    """

    def __init__(
        self,
        writeback: WriteBack,
        settings: FlushSettings,
        sleep: Callable[[float], object] | None,
        timer: Callable[[], float],
    ) -> None:
        super().__init__(writeback, settings, sleep, timer)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._abort = threading.Event()

    def run_once(self, block: float = 0.0) -> FlushReport:
        """One round: read a batch (waiting up to ``block`` s), store it, ack it."""
        flow = self._round(block)
        send: Any = None
        while True:
            try:
                op = flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send = self._dispatch(op)

    def _dispatch(self, op: FlushOp) -> Any:
        wb = self.writeback
        if isinstance(op, Read):
            return wb.journal.read(op.count, op.block)
        if isinstance(op, Store):
            try:
                wb.store(op.records)
            except Exception as exc:
                return self._store_failed(op, exc)
            return None
        if isinstance(op, Ack):
            wb.journal.ack(op.records)
        elif isinstance(op, Touch):
            wb.journal.touch(op.records)
        elif isinstance(op, DeadLetter):
            self._dead_lettering(op)
            if wb.journal.dead_letter(op.record, op.reason) and wb._owns(op.record):
                wb.cache.invalidate([op.record.body], tenant=op.record.tenant)
        else:
            if self._sleep is not None:
                self._sleep(op.seconds)
            else:
                self._abort.wait(op.seconds)
            return not self._abort.is_set()
        return None

    def drain(self, timeout: float = 10.0) -> FlushReport:
        """Run rounds until the journal has nothing for this flusher (or ``timeout``)."""
        total, deadline = FlushReport(), self._deadline(timeout)
        while True:
            if self._drained(total, self.run_once(), deadline):
                return total

    def start(self) -> Self:
        """Run rounds on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise ConfigurationError("this flusher is already running")
        self._stopping.clear()
        self._abort.clear()
        self._thread = threading.Thread(target=self._loop, name="tieredcache-flusher", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once(self.settings.block)
            except Exception:
                log.exception("tieredcache write-back: flusher round failed; retrying")
                self._stopping.wait(self.settings.error_pause)
        if self._drain_timeout is not None:
            try:
                self.drain(self._drain_timeout)
            except Exception:
                log.exception(
                    "tieredcache write-back: final drain failed; the rest stays journaled"
                )

    def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop the thread; with ``drain``, flush what is journaled first (up to ``timeout``).

        Past the timeout a retry in progress is cut short; its batch stays in the
        journal and the next flusher claims it. Without a thread, ``drain`` only.
        """
        thread = self._thread
        if thread is None:
            if drain:
                self.drain(timeout)
            return
        self._drain_timeout = timeout if drain else None
        if not drain:
            self._abort.set()
        self._stopping.set()
        thread.join(timeout + self.settings.block + 1.0)
        if thread.is_alive():
            self._abort.set()
            thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
