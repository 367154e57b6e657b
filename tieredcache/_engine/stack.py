"""The layer stack: a cache's layers with their roles resolved once, at build time.

The engine receives a :class:`LayerStack` and nothing else of the cache: which
layers store entries (fastest first) and which can only forget; which one is
in-process, which one takes the fill lock, whether the lock is taken by the
read itself; each layer's guard (breaker, error and latency accounting); the
codec, the clock, the metrics sink, the background pools, the single-flights
and the replica broadcast. Roles come from the Protocols of
:mod:`tieredcache.layers.base`, never from a layer's class.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ..breaker import CLOSED_TICKET, CircuitBreaker
from ..errors import BackendError, ConfigurationError, RateLimitedError
from ..keys import CacheKey, Tag
from ..layers.base import (
    FillLockLayer,
    InProcessLayer,
    InvalidationLayer,
    NamespaceStateLayer,
    SharedLayer,
)
from ..metrics import ERROR, FIELDS, LATENCY_BUCKETS, Histogram, Metrics
from ..serde import EntryCodec
from ._background import Background
from ._singleflight import AsyncSingleFlight, SingleFlight

__all__ = ["ALL_TENANTS", "Broadcast", "LayerGuard", "LayerStack"]

ALL_TENANTS = "*"  # the tenant of a tag invalidated for every tenant (never a real tenant)

log = logging.getLogger("tieredcache")
T = TypeVar("T")


class Broadcast(Protocol):
    """The replica broadcast as the engine uses it (see ``layers/redis/broadcast.py``)."""

    def notifier(self) -> Any:
        """The fill wake-up subscriber (``register``/``register_async``/``unregister``),
        started on first use; None when there are no replicas to hear from."""
        ...

    def publish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool: ...

    async def apublish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool: ...


class _NoBroadcast:
    """No shared layer to carry a broadcast: nothing to tell, nothing to hear."""

    def notifier(self) -> None:
        return None

    def publish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        return True

    async def apublish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        return True


class LayerGuard:
    """One layer with its breaker: failures are counted and become a default result.

    ``position`` is the layer's place among the storage layers (fastest first;
    -1 for an invalidation-only layer); ``index`` its place in the cache's
    layer list, which is how its metrics are filed.
    """

    __slots__ = (
        "breaker",
        "index",
        "latency",
        "layer",
        "local",
        "lockable",
        "metrics",
        "name",
        "position",
    )

    def __init__(
        self,
        layer: Any,
        index: int,
        position: int,
        metrics: Metrics,
        breaker: CircuitBreaker | None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.position = position
        self.name: str = layer.name
        self.metrics = metrics
        self.breaker = breaker
        self.local = isinstance(layer, InProcessLayer)
        self.lockable = isinstance(layer, FillLockLayer)
        # operation -> function -> the metrics' histogram: two lookups by interned
        # strings per call, instead of building and hashing a tuple.
        self.latency: dict[str, dict[str, Histogram]] = {}

    def admit(self, failed: set[int] | None) -> int | None:
        """The breaker's ticket for a call (None: not even tried, because the breaker is
        open or the layer failed earlier in the request). Every way out of the call
        settles the ticket: :meth:`succeeded`, :meth:`errored` or :meth:`abandoned`."""
        if failed is not None and self.position in failed:
            return None
        breaker = self.breaker
        return CLOSED_TICKET if breaker is None or breaker.clean else breaker.admit()

    def succeeded(self, function: str, operation: str, start: float, ticket: int) -> None:
        # Histogram.observe and CircuitBreaker.success, inlined: this runs for every
        # layer call of every miss.
        seconds = time.perf_counter() - start
        per_function = self.latency.get(operation)
        histogram = None if per_function is None else per_function.get(function)
        if histogram is None:
            histogram = self.metrics.histogram(self.name, function, operation)
            self.latency.setdefault(operation, {})[function] = histogram
        histogram.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.sum += seconds
        histogram.count += 1
        breaker = self.breaker
        if breaker is not None and not breaker.clean:
            breaker.success(ticket)

    def errored(
        self,
        operation: str,
        counters: list[int] | None,
        failed: set[int] | None,
        exc: BaseException,
        ticket: int,
    ) -> None:
        if self.breaker is not None:
            if isinstance(exc, RateLimitedError):
                self.breaker.success(ticket)  # it answered: a rate limit is not a fault
            else:
                self.breaker.failure(ticket)
        if counters is not None:
            counters[self.index * FIELDS + ERROR] += 1
        log.warning("tieredcache layer %s %s failed: %s", self.name, operation, exc)
        if failed is not None:
            failed.add(self.position)

    def abandoned(self, ticket: int) -> None:
        """The call ended without a verdict on the backend (cancelled, or a non-backend
        error): a half-open probe it carried lets the next call probe at once."""
        if self.breaker is not None:
            self.breaker.abandon(ticket)

    def call(
        self,
        operation: str,
        function: str,
        counters: list[int] | None,
        fn: Callable[..., T],
        default: T,
        failed: set[int] | None = None,
        args: tuple[Any, ...] = (),
    ) -> T:
        """``fn(*args)`` (blocking), or ``default`` if the layer fails or is skipped."""
        ticket = self.admit(failed)
        if ticket is None:
            return default
        start = time.perf_counter()
        try:
            result = fn(*args)
        except BackendError as exc:
            self.errored(operation, counters, failed, exc, ticket)
            return default
        except BaseException:
            self.abandoned(ticket)
            raise
        self.succeeded(function, operation, start, ticket)
        return result


class LayerStack:
    """A cache's layers, roles resolved; see the module docstring."""

    def __init__(
        self,
        namespace: str,
        layers: Sequence[Any],
        *,
        codec: EntryCodec,
        clock: Callable[[], float],
        metrics: Metrics,
        breaker_failures: int,
        breaker_reset: float,
        background_workers: int,
    ) -> None:
        self.namespace = namespace
        self.layers = tuple(layers)
        self.codec = codec
        self.clock = clock
        self.metrics = metrics
        self.loader_base = metrics.loader_base
        storage: list[LayerGuard] = []
        purgers: list[LayerGuard] = []
        self.guards: list[LayerGuard] = []
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, InvalidationLayer):
                raise ConfigurationError(
                    f"layer {layer!r} does not implement the layer contract "
                    "(tieredcache.layers.base: delete, delete_tags, close and their async twins)"
                )
            stores = isinstance(layer, InProcessLayer | SharedLayer)
            local = isinstance(layer, InProcessLayer)
            guard = LayerGuard(
                layer,
                index,
                len(storage) if stores else -1,
                metrics,
                None if local else CircuitBreaker(breaker_failures, breaker_reset),
            )
            self.guards.append(guard)
            (storage if stores else purgers).append(guard)
        if not storage:
            raise ConfigurationError(
                "TieredCache needs at least one storage layer (in-process or shared)"
            )
        self.storage = tuple(storage)
        self.purgers = tuple(purgers)
        # The in-process layer whose lookup the hit path reads: only the fastest.
        first = storage[0]
        self.memory: InProcessLayer | None = first.layer if first.local else None
        self.memories = tuple(g.layer for g in storage if g.local)
        lockable = [g.position for g in storage if g.lockable]
        self.lock: int | None = lockable[0] if lockable else None
        # With an in-process layer in front, a shared read happens when this process
        # does not have the key: on a miss it also tries the fill lock (one round
        # trip, not two). Without one, a shared read is most often a hit and stays a
        # plain GET. Only when the lock layer is read last: a lock taken by the read
        # is then always followed by the load it is for.
        self.fused: int | None = None
        if self.memory is not None and self.lock == len(storage) - 1:
            self.fused = self.lock
        self.background = Background(namespace, background_workers)
        self.flights = SingleFlight()
        self.async_flights = AsyncSingleFlight()
        self.broadcast: Broadcast = _NoBroadcast()
        # The guard of the layer that carries the broadcast (its breaker and errors).
        self.broadcast_guard: LayerGuard | None = None
        # broadcast=False although a layer could carry it: results say it was unsent.
        self.broadcast_disabled = False
        # All-tenant invalidations: tag name -> the wall time it was invalidated for
        # every tenant. An entry carrying such a tag whose load began before that
        # time is not served (checked on every read of a layer, O(tags) and only
        # while this map is not empty), so invalidating a tag or a table for all
        # tenants costs O(1) wherever it happens: no scan of any layer. Shared by
        # every process through the namespace-state layer and the broadcast.
        self.epochs: dict[str, float] = {}
        self.state_guard: LayerGuard | None = next(
            (g for g in storage if isinstance(g.layer, NamespaceStateLayer)), None
        )
        self._started = False

    def attach_broadcast(self, broadcast: Broadcast, carrier: Any) -> None:
        """Send invalidations to the replicas over ``broadcast``, which ``carrier`` (one
        of this stack's layers) carries: its guard accounts for the broadcast's calls."""
        self.broadcast = broadcast
        self.broadcast_guard = next(g for g in self.guards if g.layer is carrier)

    @property
    def lock_guard(self) -> LayerGuard | None:
        return None if self.lock is None else self.storage[self.lock]

    def forget(
        self, keys: Sequence[CacheKey] = (), tags: Sequence[Tag] = (), everything: bool = False
    ) -> None:
        """After an invalidation or a write: later callers of these keys (or tags, or of
        every key) start a load of their own instead of joining one from before."""
        if everything:
            self.flights.forget(everything=True)
            self.async_flights.forget(everything=True)
        elif keys or tags:
            full_keys = [key.full for key in keys]
            tag_names = [tag.full for tag in tags]
            self.flights.forget(full_keys, tag_names)
            self.async_flights.forget(full_keys, tag_names)

    def start(self, counters: list[int] | None = None) -> None:
        """On a process's first read or write (every engine entry point calls this; a
        flag check after the first): subscribe to the replica broadcast, learn the
        all-tenant invalidations made before this process started, and publish the
        keyspace settings for CDC workers to check (one round trip)."""
        if self._started:
            return
        self._started = True
        self.broadcast.notifier()
        self.load_state(publish=True, counters=counters)

    def load_state(self, publish: bool = False, counters: list[int] | None = None) -> None:
        guard = self.state_guard
        if guard is None:
            return
        epochs = guard.call(
            "epochs",
            "(api)",
            counters,
            guard.layer.load_epochs,
            None,
            None,
            (self.namespace, publish),
        )
        if epochs:
            self.apply_epochs(epochs)

    def apply_epochs(self, epochs: Mapping[str, float]) -> None:
        """Tags invalidated for every tenant (name -> when): entries of theirs whose
        load began before are not served; the in-process layers drop them now."""
        for name, at in epochs.items():
            if at > self.epochs.get(name, 0.0):
                self.epochs[name] = at
        for layer in self.memories:
            for name in epochs:
                layer.delete_tag_everywhere(self.namespace, name)
        self.forget(everything=True)

    def suspend_local(self) -> None:
        """The replica broadcast is down: this process cannot hear invalidations, so
        its in-process layers are emptied and refuse fills until :meth:`resume_local`
        (reads go to the shared layers, which every invalidation reaches)."""
        for layer in self.memories:
            layer.suspend()
        self.forget(everything=True)

    def resume_local(self) -> None:
        """The broadcast is proven again (after its resync): fill in-process again."""
        for layer in self.memories:
            layer.resume()

    def drop_local(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> None:
        """Another replica invalidated these: drop them from the in-process layers.
        A tag of tenant ``*`` was invalidated for every tenant."""
        everywhere = [tag.name for tag in tags if tag.tenant == ALL_TENANTS]
        if everywhere:
            now = self.clock()
            self.apply_epochs(dict.fromkeys(everywhere, now))
            tags = [tag for tag in tags if tag.tenant != ALL_TENANTS]
        for layer in self.memories:
            if keys:
                layer.delete(keys)
            if tags:
                layer.delete_tags(tags)
        self.forget(keys, tags)

    def resync(self) -> None:
        """Invalidations may have been missed: clear the in-process layers, learn the
        all-tenant invalidations again, and no later caller joins a load from before."""
        for layer in self.memories:
            layer.clear()
        self.forget(everything=True)
        self.load_state()
