"""Write-back: a write is acknowledged once journaled, the cache shows it at once,
and a flusher drains the journal to your store in batches.

    wb = WriteBack(cache, journal=RedisStreamJournal("shop", url=REDIS_URL), store=save_rows)

    @cache.cached(ttl=60)
    @wb.pending_first                      # a miss sees writes not flushed yet
    def get_product(product_id: int) -> dict[str, Any]: ...

    save = wb.writer(get_product)          # save(value, *get_product_args) -> journal id
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)     # acknowledged: journaled, then cached
    with wb.flusher(batch_size=100).start():   # a thread; stop() (or the with) drains
        ...

How a write travels
-------------------
1. ``save(value, *args)`` encodes ``value`` with the cache's codec (signed when
   the cache has signing secrets) and appends it to the journal. When that
   returns, the write is acknowledged; if it raises :class:`WriteBackError`
   the write was not (and the key is dropped from the cache, since a timed-out
   append may still have landed).
2. The cache is set at once (``cache.set``: every layer, fills in flight
   lose). Two writers racing on one key can reach the cache in the opposite
   order from the journal; so the writer then checks that its write is still
   the key's newest unflushed one, and drops the key from the cache if not.
3. A flusher reads a batch (first the entries of flushers that crashed, idle
   for the journal's ``claim_idle``), coalesces writes to the same key (the
   last one wins; the survivors keep journal order) and calls
   ``store(records)``. On success it acks: the entries leave the journal. On
   failure it retries with exponential backoff and jitter, up to
   ``max_attempts`` calls; then it stores each record alone, once, so that one
   bad record does not sink the batch. A record that still fails goes to the
   dead-letter stream with the reason (and its key leaves the cache unless a
   newer write is pending); the flusher carries on.
4. ``stop(drain=True)`` (or leaving the ``with``) flushes what is left.

Delivery is at least once: a flusher killed after the store committed but
before the ack leaves its batch to be claimed and stored again. ``store`` must
be idempotent; ``WriteRecord.version`` (journal order) makes that one guard::

    INSERT INTO product (tenant, id, doc, version) VALUES (%s, %s, %s, %s)
    ON CONFLICT (tenant, id) DO UPDATE SET doc = EXCLUDED.doc, version = EXCLUDED.version
    WHERE product.version < EXCLUDED.version

and every acknowledged write then takes effect exactly once (a redelivered or
superseded write changes nothing).

Reading your writes: ``@wb.pending_first`` under ``@cache.cached`` makes a
miss (eviction, TTL) return the key's newest unflushed write instead of the
older row the store still has; ``writer()`` insists on it unless you pass
``read_your_writes=False``.

Loss window
-----------
A write is acknowledged when ``save()`` returns: the journal has it. From then
on it is lost only if the journal loses it before a flusher has stored it; the
flusher deletes an entry only after ``store()`` returned, so ``store()`` must
have committed by then. For the Redis Stream journal it depends on Redis
persistence:

* No persistence (``save ""``, ``appendonly no``): a restart or crash of Redis
  loses every acknowledged write not yet flushed: the flusher's lag, usually
  one batch (milliseconds), but everything written while the store was down or
  no flusher ran. With RDB snapshots only (``save 60 1000``): the unflushed
  writes made since the last completed snapshot.
* ``appendonly yes`` + ``appendfsync everysec``: Redis normally writes the AOF
  to the kernel before it replies, so a crash of the Redis process alone loses
  nothing, and an OS crash or power loss loses up to about 1 s of
  acknowledged writes. While the disk is slow, Redis postpones that write for
  up to 2 s; a crash of Redis then loses up to about 2 s too.
* ``appendonly yes`` + ``appendfsync always``: Redis writes and fsyncs the AOF
  before it sends the replies, so an acknowledged write survives a crash of
  Redis or of the machine (on a disk that honours fsync). No loss window, at
  the price of an fsync per append (concurrent appends share one).
* Replication is asynchronous whatever the fsync setting: on a failover, the
  writes the promoted replica had not received are lost (usually well under a
  second of writes; more during a network partition). ``min_replicas=N`` makes
  each append wait (``WAIT``) for N replicas and raise instead of
  acknowledging without them; that narrows the window, but ``WAIT`` does not
  make Redis strongly consistent.

``tests/test_writeback.py::test_sigkilled_writer_loses_no_acknowledged_write``
shows the ``always`` case: the writing process (with its flusher, mid-batch)
and then Redis are SIGKILLed; after a restart every acknowledged write is in
PostgreSQL exactly once in effect. If the journal does lose a write, the cache
may show a value the store never gets, until it expires or is invalidated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from .decorator import CachedImpl, cached_impl
from .entry import Entry
from .errors import ConfigurationError, TieredCacheError, WriteBackError
from .tenancy import validate_tenant

if TYPE_CHECKING:
    from ._async.journal import AsyncJournal, AsyncRedisStreamJournal
    from ._sync.journal import Journal, RedisStreamJournal
    from .cache import TieredCache
    from .decorator import AsyncCachedFunction, CachedFunction
    from .keys import CacheKey

__all__ = [
    "AsyncFlusher",
    "AsyncJournal",
    "AsyncRedisStreamJournal",
    "AsyncWriteBack",
    "FlushReport",
    "Flusher",
    "Journal",
    "RedisStreamJournal",
    "WriteBack",
    "WriteRecord",
]

log = logging.getLogger("tieredcache")
P = ParamSpec("P")
R = TypeVar("R")
_SEQ_BITS = 20
# The journal classes import this module; they are loaded on first use.
_JOURNALS = {
    "AsyncJournal": "._async.journal",
    "AsyncRedisStreamJournal": "._async.journal",
    "Journal": "._sync.journal",
    "RedisStreamJournal": "._sync.journal",
}


def __getattr__(name: str) -> Any:
    module = _JOURNALS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __package__), name)


def _id_parts(entry_id: str) -> tuple[int, int]:
    ms, sep, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq) if sep else 0
    except ValueError:
        raise WriteBackError(f"journal id {entry_id!r} is not '<ms>-<seq>'") from None


def _order(record: WriteRecord) -> tuple[int, int]:
    try:
        return _id_parts(record.id)
    except WriteBackError:
        return (-1, -1)  # dead-lettered by the decode check


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One acknowledged write, as your store receives it.

    ``id`` is the journal id (``"<ms>-<seq>"``, increasing per namespace) and
    ``version`` the same order as one integer (``ms << 20 | seq``, fits a
    BIGINT until 2248): compare it in the store to make writes idempotent.
    ``key`` is the full cache key (``namespace:tenant:body``), ``reader`` the
    cached function's name, ``value`` the decoded value (typed by the reader's
    return annotation when this process made its writer, else plain data) and
    ``payload`` its encoded form. ``attempts`` counts the store calls that
    included it, ``deliveries`` how often the journal handed it out (above 1
    after a flusher crashed); ``error`` is the dead-letter reason.
    """

    id: str
    tenant: str
    key: str
    reader: str
    payload: bytes
    serializer: str
    value: Any = None
    attempts: int = 0
    deliveries: int = 1
    error: str | None = None

    @property
    def body(self) -> str:
        """The key without ``namespace:tenant:``, as ``cache.get`` takes it."""
        return self.key.split(":", 2)[-1]

    @property
    def version(self) -> int:
        ms, seq = _id_parts(self.id)
        if seq >> _SEQ_BITS:
            raise WriteBackError(f"journal id {self.id} does not fit a 64-bit version")
        return ms << _SEQ_BITS | seq


@dataclass(slots=True)
class FlushReport:
    """What a flusher round (or a drain) did.

    ``read``: entries taken from the journal; ``stored``: records the store
    accepted; ``coalesced``: writes skipped because a later write to the same
    key was in the batch; ``retries``: store calls repeated after a failure;
    ``dead``: records dead-lettered (``error`` says why); ``aborted``: stopped
    while retrying, the batch stays in the journal for the next flusher.
    """

    read: int = 0
    stored: int = 0
    coalesced: int = 0
    retries: int = 0
    dead: list[WriteRecord] = field(default_factory=list)
    aborted: bool = False

    def add(self, other: FlushReport) -> None:
        self.read += other.read
        self.stored += other.stored
        self.coalesced += other.coalesced
        self.retries += other.retries
        self.dead.extend(other.dead)
        self.aborted = self.aborted or other.aborted


# -- the flush round, without I/O ------------------------------------------------------
@dataclass(slots=True)
class _Read:
    count: int
    block: float


@dataclass(slots=True)
class _Store:
    records: list[WriteRecord]


@dataclass(slots=True)
class _Ack:
    records: list[WriteRecord]


@dataclass(slots=True)
class _Touch:
    records: list[WriteRecord]


@dataclass(slots=True)
class _DeadLetter:
    record: WriteRecord
    reason: str


@dataclass(slots=True)
class _Sleep:
    seconds: float


_Op = _Read | _Store | _Ack | _Touch | _DeadLetter | _Sleep
_Round = Generator[_Op, Any, FlushReport]


@dataclass(frozen=True, slots=True)
class _Settings:
    batch_size: int
    max_attempts: int
    max_deliveries: int
    backoff: float
    max_backoff: float
    block: float
    error_pause: float
    jitter: Callable[[], float]

    def delay(self, failures: int) -> float:
        """Exponential backoff with jitter in [d/2, d): spread out, never zero."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return ceiling / 2 + self.jitter() * ceiling / 2


def _dead(record: WriteRecord, reason: str, report: FlushReport) -> Generator[_Op, Any, None]:
    reason = reason if len(reason) <= 1000 else reason[:999] + "…"
    yield _DeadLetter(record, reason)
    report.dead.append(replace(record, error=reason))


def _flush_round(s: _Settings, decode: Callable[[WriteRecord], Any], block: float) -> _Round:
    """One flusher round: yields journal and store operations, receives their results.

    A ``_Store`` gets back None or the exception the store raised; a ``_Sleep``
    gets back False when the flusher is being stopped without waiting.
    """
    taken: list[WriteRecord] = yield _Read(s.batch_size, block)
    report = FlushReport(read=len(taken))
    good: list[WriteRecord] = []
    for record in sorted(taken, key=_order):
        if record.deliveries > s.max_deliveries:
            reason = (
                f"handed out {record.deliveries} times and never flushed "
                "(did it crash the flushers that took it?)"
            )
        else:
            try:
                good.append(replace(record, value=decode(record)))
                continue
            except TieredCacheError as exc:
                reason = str(exc)
        yield from _dead(record, reason, report)
    newest: dict[str, WriteRecord] = {}
    older: dict[str, list[WriteRecord]] = {}
    for record in good:
        if record.key in newest:
            older.setdefault(record.key, []).append(newest[record.key])
        newest[record.key] = record
    batch = sorted(newest.values(), key=_order)
    report.coalesced = len(good) - len(batch)
    if not batch:
        return report
    error: BaseException | None = None
    for attempt in range(1, s.max_attempts + 1):
        if attempt > 1:
            report.retries += 1
            if not (yield _Sleep(s.delay(attempt - 1))):
                report.aborted = True
                return report
            yield _Touch(good)  # still ours: not to be claimed by another flusher
        batch = [replace(record, attempts=attempt) for record in batch]
        error = yield _Store(batch)
        if error is None:
            yield _Ack(good)
            report.stored += len(batch)
            return report
    # Still failing: store each record alone, once, so one bad record cannot sink the rest.
    failed: list[tuple[WriteRecord, BaseException]] = []
    if len(batch) == 1:
        assert error is not None
        failed.append((batch[0], error))
    else:
        for record in batch:
            record = replace(record, attempts=record.attempts + 1)
            alone = yield _Store([record])
            if alone is None:
                yield _Ack([record, *older.get(record.key, [])])
                report.stored += 1
            else:
                failed.append((record, alone))
    for record, failure in failed:
        reason = f"store failed {record.attempts} times: {type(failure).__name__}: {failure}"
        yield from _dead(record, reason, report)
        if record.key in older:
            yield _Ack(older[record.key])  # superseded by the dead letter, which holds the value
    return report


# -- shared by the sync and async front ends ----------------------------------------------
class _WriteBackBase:
    def __init__(self, cache: TieredCache, journal: object) -> None:
        namespace = getattr(journal, "namespace", cache.namespace)
        if namespace != cache.namespace:
            raise ConfigurationError(
                f"the journal is for namespace {namespace!r}, the cache is {cache.namespace!r}"
            )
        self.cache = cache
        self._any = cache.codec.serializer.decoder(Any)
        self._decoders: dict[str, Callable[[bytes], Any]] = {}
        # pending_first loaders -> the cached function they load for (set by writer()).
        self._loaders: dict[Callable[..., Any], CachedImpl | None] = {}

    def _register(self, reader: Any, read_your_writes: bool) -> CachedImpl:
        impl = cached_impl(reader)
        if impl.cache is not self.cache:
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

    def _record(self, impl: CachedImpl, key: CacheKey, value: Any) -> WriteRecord:
        now = self.cache.clock()
        codec = self.cache.codec
        return WriteRecord(
            id="",
            tenant=key.tenant,
            key=key.full,
            reader=impl.name,
            payload=codec.encode(key.full, Entry(value, now, now, now)),
            serializer=codec.serializer.name,
            value=value,
        )

    def decode(self, record: WriteRecord, decoder: Callable[[bytes], Any] | None = None) -> Any:
        """The value of a journaled record; :class:`TieredCacheError` if it is unusable."""
        _id_parts(record.id)
        if not self._owns(record):
            raise WriteBackError(
                f"journal entry {record.id}: key {record.key!r} is not a key of tenant "
                f"{record.tenant!r} in namespace {self.cache.namespace!r}"
            )
        name = self.cache.codec.serializer.name
        if record.serializer != name:
            raise WriteBackError(
                f"journal entry {record.id} was encoded with {record.serializer!r}, "
                f"this cache decodes {name!r}"
            )
        decoder = decoder or self._decoders.get(record.reader, self._any)
        return self.cache.codec.decode(record.key, record.payload, decoder).value

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

    @staticmethod
    def _settings(
        batch_size: int,
        max_attempts: int,
        max_deliveries: int,
        backoff: float,
        max_backoff: float,
        block: float,
        error_pause: float,
        jitter: Callable[[], float],
    ) -> _Settings:
        if not 1 <= batch_size <= 1000:  # one script call acks the batch: bounded arguments
            raise ConfigurationError(f"batch_size must be 1..1000, got {batch_size}")
        if max_attempts < 1 or max_deliveries < 1:
            raise ConfigurationError("max_attempts and max_deliveries must be >= 1")
        if min(backoff, max_backoff, block, error_pause) < 0:
            raise ConfigurationError("backoff, max_backoff, block and error_pause must be >= 0")
        return _Settings(
            batch_size,
            max_attempts,
            max_deliveries,
            backoff,
            max_backoff,
            block,
            error_pause,
            jitter,
        )


class WriteBack(_WriteBackBase):
    """Write-back for sync cached functions; see the module docs.

    ``store(records)`` writes a batch to your database and must be idempotent
    (compare ``record.version``). ``journal`` is a :class:`RedisStreamJournal`
    or your own :class:`Journal`.
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
        ``reader(*args, **kwargs)``, set it in the cache, return the journal id."""
        impl = self._register(reader, read_your_writes)
        cache, journal, ttl = self.cache, self.journal, impl.policy.ttl

        def save(value: R, /, *args: P.args, **kwargs: P.kwargs) -> str:
            key = impl.key(*args, **kwargs)
            tags = [tag.name for tag in impl.tags(key.tenant, args, kwargs)]
            record = self._record(impl, key, value)
            try:
                record_id = journal.append(record)
            except WriteBackError:
                cache.invalidate([key.body], tenant=key.tenant)  # it may have landed anyway
                raise
            cache.set(key.body, value, ttl=ttl, tags=tags, tenant=key.tenant)
            try:
                newest = journal.pending(key.full)
            except WriteBackError:
                newest = None
            if newest is None or newest.id != record_id:
                # A newer write (or the flush) overtook this one: no stale value may stay.
                cache.invalidate([key.body], tenant=key.tenant)
            return record_id

        return save

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
        sleep: Callable[[float], object] | None = None,
        jitter: Callable[[], float] = random.random,
        timer: Callable[[], float] = time.monotonic,
    ) -> Flusher:
        """A flusher: call ``run_once()``/``drain()`` yourself or ``start()`` a thread.

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
        """
        settings = self._settings(
            batch_size,
            max_attempts,
            max_deliveries,
            backoff,
            max_backoff,
            block,
            error_pause,
            jitter,
        )
        return Flusher(self, settings, sleep, timer)

    def close(self) -> None:
        self.journal.close()


class Flusher:
    """Drains a :class:`WriteBack` journal to its store (see :meth:`WriteBack.flusher`).

    >>> with wb.flusher().start():      # doctest: +SKIP
    ...     serve_requests()            # stop(drain=True) when the block ends
    """

    def __init__(
        self,
        writeback: WriteBack,
        settings: _Settings,
        sleep: Callable[[float], object] | None,
        timer: Callable[[], float],
    ) -> None:
        self.writeback = writeback
        self.settings = settings
        self._sleep = sleep
        self._timer = timer
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._drain_timeout: float | None = None

    def run_once(self, block: float = 0.0) -> FlushReport:
        """One round: read a batch (waiting up to ``block`` s), store it, ack it."""
        wb = self.writeback
        flow = _flush_round(self.settings, wb.decode, block)
        send: Any = None
        while True:
            try:
                op = flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send = self._dispatch(op)

    def _dispatch(self, op: _Op) -> Any:
        wb = self.writeback
        if isinstance(op, _Read):
            return wb.journal.read(op.count, op.block)
        if isinstance(op, _Store):
            try:
                wb.store(op.records)
            except Exception as exc:
                log.warning("tieredcache write-back: store of %d failed: %r", len(op.records), exc)
                return exc
            return None
        if isinstance(op, _Ack):
            wb.journal.ack(op.records)
        elif isinstance(op, _Touch):
            wb.journal.touch(op.records)
        elif isinstance(op, _DeadLetter):
            record = op.record
            log.error(
                "tieredcache write-back: dead letter %s %s: %s", record.id, record.key, op.reason
            )
            if wb.journal.dead_letter(record, op.reason) and wb._owns(record):
                wb.cache.invalidate([record.body], tenant=record.tenant)
        else:
            if self._sleep is not None:
                self._sleep(op.seconds)
            else:
                self._abort.wait(op.seconds)
            return not self._abort.is_set()
        return None

    def drain(self, timeout: float = 10.0) -> FlushReport:
        """Run rounds until the journal has nothing for this flusher (or ``timeout``)."""
        total = FlushReport()
        deadline = self._timer() + timeout
        while True:
            report = self.run_once()
            total.add(report)
            if not report.read or report.aborted or self._timer() >= deadline:
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


class AsyncWriteBack(_WriteBackBase):
    """:class:`WriteBack` for async cached functions, an async journal and an async store."""

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
        cache, journal, ttl = self.cache, self.journal, impl.policy.ttl

        async def save(value: R, /, *args: P.args, **kwargs: P.kwargs) -> str:
            key = impl.key(*args, **kwargs)
            tags = [tag.name for tag in impl.tags(key.tenant, args, kwargs)]
            record = self._record(impl, key, value)
            try:
                record_id = await journal.append(record)
            except WriteBackError:
                await cache.ainvalidate([key.body], tenant=key.tenant)
                raise
            await cache.aset(key.body, value, ttl=ttl, tags=tags, tenant=key.tenant)
            try:
                newest = await journal.pending(key.full)
            except WriteBackError:
                newest = None
            if newest is None or newest.id != record_id:
                await cache.ainvalidate([key.body], tenant=key.tenant)
            return record_id

        return save

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
        sleep: Callable[[float], Awaitable[object]] | None = None,
        jitter: Callable[[], float] = random.random,
        timer: Callable[[], float] = time.monotonic,
    ) -> AsyncFlusher:
        """Async :meth:`WriteBack.flusher` (``start()`` makes a task)."""
        settings = self._settings(
            batch_size,
            max_attempts,
            max_deliveries,
            backoff,
            max_backoff,
            block,
            error_pause,
            jitter,
        )
        return AsyncFlusher(self, settings, sleep, timer)

    async def aclose(self) -> None:
        await self.journal.close()


class AsyncFlusher:
    """Async :class:`Flusher`: ``await run_once()``, ``start()`` a task, ``await stop()``."""

    def __init__(
        self,
        writeback: AsyncWriteBack,
        settings: _Settings,
        sleep: Callable[[float], Awaitable[object]] | None,
        timer: Callable[[], float],
    ) -> None:
        self.writeback = writeback
        self.settings = settings
        self._sleep = sleep
        self._timer = timer
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._abort = asyncio.Event()
        self._drain_timeout: float | None = None

    async def run_once(self, block: float = 0.0) -> FlushReport:
        """One round: read a batch (waiting up to ``block`` s), store it, ack it."""
        wb = self.writeback
        flow = _flush_round(self.settings, wb.decode, block)
        send: Any = None
        while True:
            try:
                op = flow.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            send = await self._dispatch(op)

    async def _dispatch(self, op: _Op) -> Any:
        wb = self.writeback
        if isinstance(op, _Read):
            return await wb.journal.read(op.count, op.block)
        if isinstance(op, _Store):
            try:
                await wb.store(op.records)
            except Exception as exc:
                log.warning("tieredcache write-back: store of %d failed: %r", len(op.records), exc)
                return exc
            return None
        if isinstance(op, _Ack):
            await wb.journal.ack(op.records)
        elif isinstance(op, _Touch):
            await wb.journal.touch(op.records)
        elif isinstance(op, _DeadLetter):
            record = op.record
            log.error(
                "tieredcache write-back: dead letter %s %s: %s", record.id, record.key, op.reason
            )
            if await wb.journal.dead_letter(record, op.reason) and wb._owns(record):
                await wb.cache.ainvalidate([record.body], tenant=record.tenant)
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
        total = FlushReport()
        deadline = self._timer() + timeout
        while True:
            report = await self.run_once()
            total.add(report)
            if not report.read or report.aborted or self._timer() >= deadline:
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
