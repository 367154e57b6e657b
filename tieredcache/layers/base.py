"""What a layer can do, as Protocols: the engine's whole contract with its layers.

A layer is any object with the methods of one of these Protocols; nothing has
to subclass anything. The cache resolves each layer's capabilities once, when
it is built (:mod:`tieredcache._engine.stack`), and the engine then calls
exactly these methods:

- :class:`InvalidationLayer`: can only forget keys and tags (a CDN purger).
  Every invalidation reaches it, after the storage layers and the replica
  broadcast. One that works off the caller's path may return a
  :class:`PendingPurge` from ``delete``/``delete_tags``: the invalidation's
  result then lists the layer as pending, and can wait for its real outcome.
- :class:`InProcessLayer`: stores :class:`~tieredcache.entry.Entry` objects in
  this process. No I/O, so async callers use its sync methods; its lease is
  free and comes with every read. It also hands the decorator's wrappers a
  lock-free lookup for the hit path (:meth:`InProcessLayer.hit_lookup`).
- :class:`SharedLayer`: stores encoded bytes that other processes read (Redis,
  Memcached, a disk cache). A hit costs one plain ``get``; the lease that
  guards a fill is taken separately, before the loader runs.
- :class:`FillLockLayer`: a shared layer that can also coordinate one fill per
  key across processes: read-or-lock in one round trip, the lease with the
  lock, a fill that releases the lock, and a wake-up for waiters.

Fills carry a *lease*, an opaque token taken before the loader runs:
``set(..., lease=token)`` is refused when the key or one of its tags was
invalidated after the token was taken, so a slow loader never writes back a
value an invalidation already replaced. ``bump=True`` (a write) refuses every
fill whose lease predates it.

Errors: a layer raises :class:`~tieredcache.errors.BackendError` (or a
subclass) for anything its backend did wrong; the engine counts it, trips the
layer's breaker and carries on with the next layer or the loader.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..entry import Entry
from ..errors import BackendError
from ..keys import CacheKey, Tag

__all__ = [
    "FillLockLayer",
    "InProcessLayer",
    "InvalidationLayer",
    "HealthReportingLayer",
    "NamespaceStateLayer",
    "PendingPurge",
    "ReplicaBroadcastLayer",
    "SharedLayer",
    "StorageLayer",
]


@runtime_checkable
class PendingPurge(Protocol):
    """An invalidation a layer accepted but has not carried out yet (a queued CDN
    purge). It settles once; ``error`` is None if it succeeded, else what went wrong
    (a :class:`~tieredcache.errors.RateLimitedError` carries ``retry_after``).

    Wait with ``wait`` in sync code and ``await_done`` in async code (a sync wait
    on an event loop that must itself send the purge would only time out).

    >>> class Done:
    ...     error = None
    ...     def done(self): return True
    ...     def wait(self, timeout=None): return True
    ...     async def await_done(self, timeout=None): return True
    >>> isinstance(Done(), PendingPurge)
    True
    """

    @property
    def error(self) -> BackendError | None:
        """None while pending or once succeeded; the failure once it failed."""
        ...

    def done(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Block until settled (True) or ``timeout`` seconds passed (False)."""
        ...

    async def await_done(self, timeout: float | None = None) -> bool:
        """Async :meth:`wait`."""
        ...


@runtime_checkable
class InvalidationLayer(Protocol):
    """A layer that can only forget: keys and tags are dropped, nothing is read.

    ``delete`` and ``delete_tags`` return None once done, or a :class:`PendingPurge`
    when the work goes on off the caller's path (only invalidation-only layers
    may; the engine ignores what a storage layer returns).

    >>> class PrintPurger:
    ...     name = "cdn"
    ...     def delete(self, keys): print("purge", [k.full for k in keys])
    ...     def delete_tags(self, tags): print("purge", [t.full for t in tags])
    ...     async def adelete(self, keys): self.delete(keys)
    ...     async def adelete_tags(self, tags): self.delete_tags(tags)
    ...     def close(self): pass
    ...     async def aclose(self): pass
    >>> isinstance(PrintPurger(), InvalidationLayer)
    True
    """

    name: str

    def delete(self, keys: Sequence[CacheKey]) -> PendingPurge | None: ...

    def delete_tags(self, tags: Sequence[Tag]) -> PendingPurge | None: ...

    async def adelete(self, keys: Sequence[CacheKey]) -> PendingPurge | None: ...

    async def adelete_tags(self, tags: Sequence[Tag]) -> PendingPurge | None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


class HitSlot(Protocol):
    """What the hit path reads from an in-process lookup: the value, and the time
    after which a hit must look at the entry (expiry, early refresh)."""

    @property
    def value(self) -> Any: ...

    @property
    def refresh_at(self) -> float: ...

    @property
    def entry(self) -> Entry: ...


@runtime_checkable
class InProcessLayer(InvalidationLayer, Protocol):
    """Entries as Python objects in this process (see :class:`~tieredcache.MemoryLayer`)."""

    evictions: int  # entries dropped for size, for the metrics

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Entry | None, Any]:
        """The entry (None if absent or past ``stale_until``) and a fill lease."""
        ...

    def set(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
        alias: Hashable | None = None,
        refresh_at: float | None = None,
    ) -> bool:
        """Store ``entry``; False if ``lease`` was overtaken. ``alias`` is a second
        lookup key for the hit path; ``refresh_at`` when its hits start checking."""
        ...

    def hit_lookup(
        self,
    ) -> tuple[Callable[[Hashable], HitSlot | None], Callable[[Hashable], None]]:
        """(lookup by alias, note a hit): both lock-free, for the decorator's hit path."""
        ...

    def clear(self) -> None:
        """Drop everything (a replica that may have missed invalidations)."""
        ...

    def suspend(self) -> None:
        """Drop everything and refuse fills until :meth:`resume` (the replica
        broadcast is down: invalidations from other processes would be missed)."""
        ...

    def resume(self) -> None:
        """Accept fills again (after a resync).

        A layer may also have a ``suspended`` attribute (True between :meth:`suspend`
        and :meth:`resume`): the engine then does not offer it sets, whose refusal
        would read as a lease overtaken by an invalidation. It is not part of the
        Protocol, so that layers written without it still are in-process layers."""
        ...

    def delete_tag_everywhere(self, namespace: str, name: str) -> None:
        """Drop tag ``name`` in every tenant of ``namespace``, and refuse fills whose
        lease predates this for any of them (an all-tenant invalidation)."""
        ...


@runtime_checkable
class SharedLayer(InvalidationLayer, Protocol):
    """Encoded entries shared between processes."""

    def get(self, key: CacheKey) -> bytes | None: ...

    def lease(self, key: CacheKey, tags: Sequence[Tag]) -> Any: ...

    def set(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool: ...

    async def aget(self, key: CacheKey) -> bytes | None: ...

    async def alease(self, key: CacheKey, tags: Sequence[Tag]) -> Any: ...

    def aset(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> Coroutine[Any, Any, bool]: ...


@runtime_checkable
class FillLockLayer(SharedLayer, Protocol):
    """A shared layer that runs one fill per key across processes (Redis).

    ``token`` identifies the lock's owner; only its owner releases it.
    ``set(..., unlock=token)`` releases the lock with the fill, in one round trip.
    """

    def get_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bytes | None, bool | None, Any]:
        """The value; if absent, also try the fill lock and take the lease ->
        (value, taken, lease); taken and lease are None on a hit."""
        ...

    def acquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool, Any]: ...

    def release_fill_lock(self, key: CacheKey, token: str) -> bool: ...

    def watch_fill_lock(self, key: CacheKey, wait: float) -> bool:
        """Whether the lock is held; if so, its release is announced to the
        waiters of this key for ``wait`` seconds (see the replica broadcast)."""
        ...

    def aget_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> Coroutine[Any, Any, tuple[bytes | None, bool | None, Any]]: ...

    async def aacquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool, Any]: ...

    async def arelease_fill_lock(self, key: CacheKey, token: str) -> bool: ...

    async def awatch_fill_lock(self, key: CacheKey, wait: float) -> bool: ...


@runtime_checkable
class ReplicaBroadcastLayer(Protocol):
    """A shared layer that can also carry invalidations between replicas (Redis
    pub/sub), so that every process drops what another process invalidated from
    its in-process layers, and fill waiters are woken."""

    def replicas(
        self,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[], None],
        **options: Any,
    ) -> Any:
        """The namespace's broadcast: ``notifier()``, ``publish``/``apublish``,
        ``connect(timeout)``, ``stop()``. ``on_invalidate`` receives what other
        replicas invalidated; ``on_resync`` is called when some may have been missed."""
        ...


@runtime_checkable
class HealthReportingLayer(Protocol):
    """A layer whose connections keep counters worth exporting (``stats().backends``
    and Prometheus): timeouts, replies late because of the caller's own loop, ..."""

    def health(self) -> dict[str, float]: ...


@runtime_checkable
class NamespaceStateLayer(Protocol):
    """A shared layer that keeps a namespace's state for every process: the
    all-tenant invalidations (tag name -> when; see ``LayerStack.epochs``) and the
    keyspace settings an application publishes for CDC workers to check."""

    def record_epochs(self, namespace: str, epochs: Mapping[str, float]) -> bool: ...

    async def arecord_epochs(self, namespace: str, epochs: Mapping[str, float]) -> bool: ...

    def load_epochs(self, namespace: str, publish_settings: bool = False) -> dict[str, float]:
        """The all-tenant invalidations; with ``publish_settings``, also publish this
        application's keyspace settings, in the same round trip."""
        ...

    def check_settings(self, namespace: str, unpublished_ok: bool = False) -> list[str]:
        """Problems with what the application published for ``namespace`` (empty: it
        agrees); ``unpublished_ok``: nothing published is not a problem. Raises
        :class:`~tieredcache.errors.BackendError` when the settings cannot be read."""
        ...


# A layer that stores entries, in this process or shared: what ``TieredCache``
# accepts besides invalidation-only layers.
StorageLayer = InProcessLayer | SharedLayer
