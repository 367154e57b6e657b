"""What the sync and async front ends share: everything about a write-back but its I/O.

:class:`WriteBackBase` registers readers, builds and decodes records, says
which keys a record may touch and checks a flusher's settings;
:class:`FlusherBase` holds a flusher's settings and state and starts its
rounds. :mod:`.sync` and :mod:`.aio` add the journal, store and cache calls,
blocking or awaited, and the flusher's thread or task.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._function.types import CachedImpl, cached_impl
from ..entry import Entry
from ..errors import ConfigurationError, TieredCacheError, WriteBackError
from ..tenancy import validate_tenant
from .flush import DeadLetter, FlushRound, FlushSettings, Store, flush_round
from .records import FlushReport, WriteRecord, id_parts

if TYPE_CHECKING:
    from ..cache import TieredCache
    from ..keys import CacheKey

__all__ = ["FlusherBase", "WriteBackBase"]

log = logging.getLogger("tieredcache")


F = TypeVar("F")  # the flusher a front end makes
S = TypeVar("S")  # the injected sleep: blocking or awaitable


class WriteBackBase(Generic[F, S]):
    """A write-back's cache, its readers and its records, without the journal calls.

    A writer's ``save`` (sync or async) does, in this order: append the record
    to the journal (the acknowledgement; on failure drop the key, since a
    timed-out append may still have landed); ``put`` the value through the
    reader; then drop the key again unless the write is still the key's newest
    unflushed one, as another writer may have reached the cache after it and
    before it.
    """

    def __init__(self, cache: TieredCache, journal: object) -> None:
        namespace = getattr(journal, "namespace", cache.namespace)
        if namespace != cache.namespace:
            raise ConfigurationError(
                f"the journal is for namespace {namespace!r}, the cache is {cache.namespace!r}"
            )
        self.cache = cache
        self._any = cache._codec.serializer.decoder(Any)
        self._decoders: dict[str, Callable[[bytes], Any]] = {}
        # pending_first loaders -> the cached function they load for (set by writer()).
        self._loaders: dict[Callable[..., Any], CachedImpl | None] = {}

    def _register(self, reader: Any, read_your_writes: bool) -> CachedImpl:
        impl = cached_impl(reader)
        if impl.stack is not self.cache._stack:
            raise ConfigurationError(f"{impl.name} is cached by another TieredCache")
        if impl.func in self._loaders:
            self._loaders[impl.func] = impl
        elif read_your_writes:
            raise ConfigurationError(
                f"{impl.name}: decorate its function with @wb.pending_first (under "
                "@cache.cached) so a miss sees writes the flusher has not stored yet, "
                "or pass read_your_writes=False"
            )
        self._decoders[impl.name] = impl.decode
        return impl

    def _prepare(
        self, impl: CachedImpl, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[CacheKey, WriteRecord]:
        """The key and the record of a write; raises what the arguments make ``put`` raise
        (key, tags, encoding) before the write is journaled, not after."""
        key = impl.key(*args, **kwargs)
        impl.tags(key.tenant, args, kwargs)
        now = self.cache.clock()
        codec = self.cache._codec
        record = WriteRecord(
            id="",
            tenant=key.tenant,
            key=key.full,
            reader=impl.name,
            payload=codec.encode(key.full, Entry(value, now, now, now)),
            serializer=codec.serializer.name,
            value=value,
        )
        return key, record

    def decode(self, record: WriteRecord, decoder: Callable[[bytes], Any] | None = None) -> Any:
        """The value of a journaled record; :class:`TieredCacheError` if it is unusable."""
        id_parts(record.id)
        if not self._owns(record):
            raise WriteBackError(
                f"journal entry {record.id}: key {record.key!r} is not a key of tenant "
                f"{record.tenant!r} in namespace {self.cache.namespace!r}"
            )
        name = self.cache._codec.serializer.name
        if record.serializer != name:
            raise WriteBackError(
                f"journal entry {record.id} was encoded with {record.serializer!r}, "
                f"this cache decodes {name!r}"
            )
        decoder = decoder or self._decoders.get(record.reader, self._any)
        return self.cache._codec.decode(record.key, record.payload, decoder).value

    def _pending_value(self, record: WriteRecord, impl: CachedImpl) -> tuple[bool, Any]:
        try:
            return True, self.decode(record, impl.decode)
        except TieredCacheError as exc:  # the flusher will dead-letter it; read the store
            log.warning("tieredcache write-back: pending write %s unusable: %s", record.id, exc)
            return False, None

    def _owns(self, record: WriteRecord) -> bool:
        """Whether the record names a key of this cache (a dead letter's key can be dropped)."""
        prefix = f"{self.cache.namespace}:{record.tenant}:"
        if not record.tenant or not record.key.startswith(prefix) or record.key == prefix:
            return False
        try:
            validate_tenant(record.tenant)
        except TieredCacheError:
            return False
        return True

    def flusher(
        self,
        *,
        batch_size: int = 100,
        max_attempts: int = 8,
        max_deliveries: int = 10,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        block: float = 0.25,
        error_pause: float = 1.0,
        sleep: S | None = None,
        jitter: Callable[[], float] = random.random,
        timer: Callable[[], float] = time.monotonic,
    ) -> F:
        """A flusher: call ``run_once()``/``drain()`` yourself or ``start()`` it (a
        thread; for :class:`AsyncWriteBack` a task of the running loop).

        A failing batch is stored up to ``max_attempts`` times; ``backoff`` is
        the first pause, doubled per failure up to ``max_backoff`` and
        jittered. With the defaults a store outage longer than about 45 s
        dead-letters the writes of the batch in hand: raise ``max_attempts``
        where outages last longer. ``max_deliveries`` dead-letters an entry
        that crashed that many flushers. ``block`` bounds how long an idle
        round waits for new writes (and so how long ``stop()`` waits).
        ``sleep``, ``jitter`` and ``timer`` are injectable for tests. A journal
        object is one consumer of the group: run one flusher per WriteBack,
        one round at a time.

        >>> with wb.flusher(batch_size=100).start():   # doctest: +SKIP
        ...     serve_requests()
        """
        settings = FlushSettings(
            batch_size,
            max_attempts,
            max_deliveries,
            backoff,
            max_backoff,
            block,
            error_pause,
            jitter,
        )
        return self._make_flusher(settings, sleep, timer)

    def _make_flusher(
        self, settings: FlushSettings, sleep: S | None, timer: Callable[[], float]
    ) -> F:
        raise NotImplementedError


W = TypeVar("W", bound=WriteBackBase[Any, Any])


class FlusherBase(Generic[W, S]):
    """A flusher's settings and state; the subclass runs the rounds (thread or task)."""

    def __init__(
        self, writeback: W, settings: FlushSettings, sleep: S | None, timer: Callable[[], float]
    ) -> None:
        self.writeback = writeback
        self.settings = settings
        self._sleep = sleep
        self._timer = timer
        self._drain_timeout: float | None = None

    def _round(self, block: float) -> FlushRound:
        return flush_round(self.settings, self.writeback.decode, block)

    def _deadline(self, timeout: float) -> float:
        return self._timer() + timeout

    def _drained(self, total: FlushReport, report: FlushReport, deadline: float) -> bool:
        """Add a drain round's report; whether the drain is over (nothing left, or time)."""
        total.add(report)
        return not report.read or report.aborted or self._timer() >= deadline

    @staticmethod
    def _store_failed(op: Store, exc: Exception) -> Exception:
        log.warning("tieredcache write-back: store of %d failed: %r", len(op.records), exc)
        return exc

    @staticmethod
    def _dead_lettering(op: DeadLetter) -> None:
        record = op.record
        log.error("tieredcache write-back: dead letter %s %s: %s", record.id, record.key, op.reason)
