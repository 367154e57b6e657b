"""TieredCache: the layers, the codec, the metrics and the runners of one namespace."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from . import fastmiss
from .background import Background
from .breaker import CircuitBreaker
from .broadcast import Notifier, Replicas
from .errors import BackendError, ConfigurationError, TenantRequiredError
from .flows import (
    BROADCAST,
    MISSING,
    ReadRequest,
    invalidate_flow,
    lookup_flow,
    set_flow,
)
from .keys import CacheKey, Tag, make_tags, validate_namespace
from .layercalls import LayerGuard
from .layers.base import InvalidationLayer, StorageLayer
from .layers.memory import MemoryLayer
from .layers.redis import RedisLayer
from .metrics import CacheStats, Metrics
from .policy import Policy
from .runners import AsyncRunner, SyncRunner
from .serde import EntryCodec, MsgpackSerializer, Serializer
from .stampede import AsyncSingleFlight, SingleFlight
from .tenancy import current_tenant, tenant_scope, validate_tenant

if TYPE_CHECKING:
    from .decorator import CacheDecorator
from .decorator import cached_impl

__all__ = ["InvalidationResult", "TieredCache"]

log = logging.getLogger("tieredcache")
T = TypeVar("T")
API_FUNCTION = "(api)"


@dataclass(slots=True)
class InvalidationResult:
    """What an invalidation reached. ``failed`` names the layers that did not confirm it
    (``"broadcast"`` when the replicas could not be told)."""

    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failure(self) -> None:
        """Raise :class:`BackendError` if any layer missed the invalidation."""
        if self.failed:
            raise BackendError(",".join(self.failed), "invalidate", "not confirmed; retry it")


class TieredCache:
    """Composes layers, fastest first, into one tenant-scoped cache.

    >>> from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
    >>> cache = TieredCache(namespace="shop", layers=[MemoryLayer(maxsize=10_000)])
    >>> @cache.cached(ttl=60, tags=lambda product_id: [f"product:{product_id}"])
    ... def get_product(product_id: int) -> dict[str, int]:
    ...     return {"id": product_id}
    >>> with tenant_scope("acme"):
    ...     get_product(42)
    {'id': 42}

    Storage layers (memory, Redis) are read fastest first and back-filled;
    invalidation-only layers (a CDN) are reached by every invalidation. A
    failing shared layer is skipped (its circuit breaker opens after
    ``breaker_failures`` consecutive failures and probes again after
    ``breaker_reset`` seconds); calls fall through to the next layer or the
    loader. ``clock`` is the wall clock for entry times; inject a fake in tests.
    """

    def __init__(
        self,
        namespace: str,
        layers: Sequence[StorageLayer | InvalidationLayer],
        *,
        serializer: Serializer | None = None,
        signing_secrets: Sequence[bytes | str] = (),
        clock: Callable[[], float] = time.time,
        breaker_failures: int = 5,
        breaker_reset: float = 5.0,
        max_tenants: int = 100,
        broadcast: bool = True,
        background_workers: int = 4,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        if not layers:
            raise ConfigurationError("TieredCache layers must name at least one layer")
        names = [getattr(layer, "name", None) for layer in layers]
        if len(set(names)) != len(names) or None in names:
            raise ConfigurationError(f"TieredCache layers need distinct names, got {names}")
        for layer in layers:
            if not isinstance(layer, InvalidationLayer):
                raise ConfigurationError(f"layer {layer!r} does not implement delete/delete_tags")
        self.layers = list(layers)
        self.clock = clock
        self.codec = EntryCodec(serializer or MsgpackSerializer(), signing_secrets)
        self.metrics = Metrics([layer.name for layer in self.layers], max_tenants=max_tenants)
        self.guards = [
            LayerGuard(
                layer,
                index,
                self.metrics,
                None
                if isinstance(layer, MemoryLayer)
                else CircuitBreaker(breaker_failures, breaker_reset),
            )
            for index, layer in enumerate(self.layers)
        ]
        self.storage = [i for i, layer in enumerate(self.layers) if isinstance(layer, StorageLayer)]
        if not self.storage:
            raise ConfigurationError(
                "TieredCache needs at least one storage layer (memory or Redis)"
            )
        self.stores_objects = [
            bool(getattr(self.layers[i], "stores_objects", False)) for i in self.storage
        ]
        first = self.layers[self.storage[0]]
        self.memory: MemoryLayer | None = first if isinstance(first, MemoryLayer) else None
        redis_layers = [i for i in self.storage if isinstance(self.layers[i], RedisLayer)]
        self.lock_layer: int | None = redis_layers[0] if redis_layers else None
        # The shape of the shared-hit shortcut (see tieredcache.hotpath.shared_hit): exactly one
        # shared storage layer, last, optionally behind the in-process layer.
        shared = [p for p, objects in enumerate(self.stores_objects) if not objects]
        self.fast_shared: int | None = None
        if shared == [len(self.storage) - 1] and (len(self.storage) == 1 or self.memory):
            self.fast_shared = shared[0]
        # With an in-process layer in front, the shared layer is read when this process
        # does not have the key: on a miss that read also tries the fill lock (one
        # round trip, not two). Without one, a shared read is most often a hit, and
        # stays a plain GET. Only when the lock layer is read last: a lock taken by
        # the read is then always followed by the load it is for.
        self.fused_read: int | None = None
        if self.memory is not None and self.storage[-1] == self.lock_layer:
            self.fused_read = len(self.storage) - 1
        # [in-process, Redis]: async misses take the one-coroutine path (fastmiss.py).
        self.fast_miss = fastmiss.eligible(self)
        redis_layer = self.layers[redis_layers[0]] if redis_layers else None
        self._redis: RedisLayer | None = (
            redis_layer if isinstance(redis_layer, RedisLayer) else None
        )
        self.replicas = Replicas(self, self._redis if broadcast else None)
        self.background = Background(self, background_workers)
        self._api_counters: dict[str, list[int]] = {}
        self.singleflight = SingleFlight()
        self.async_singleflight = AsyncSingleFlight()
        self.sync_runner = SyncRunner(self)
        self.async_runner = AsyncRunner(self)
        self._read_through: dict[str, Any] = {}

    # -- decorators ---------------------------------------------------------
    def cached(
        self,
        ttl: float,
        *,
        tags: Callable[..., Iterable[str]] | Iterable[str] | None = None,
        key: Callable[..., str] | None = None,
        name: str | None = None,
        version: int | str = 1,
        ignore: Iterable[str] = (),
        tenant_param: str | None = None,
        **policy: Any,
    ) -> CacheDecorator:
        """Cache a sync or async function (cache-aside: the function is the loader).

        ``tags`` (names or a function of the same arguments) scope invalidation;
        ``key`` replaces the argument digest with your own key body; ``name``
        and ``version`` name the function in keys (bump ``version`` when the
        return shape changes, so old entries are never decoded into the new
        shape). The tenant comes from :func:`tenant_scope`, or from the
        parameter named ``tenant`` (or ``tenant_param``) if the function has
        one. Further keyword arguments are :class:`Policy` fields.

        The wrapper keeps the signature and adds ``invalidate(...)``,
        ``refresh(...)``, ``key(...)`` and ``writer(...)`` (write-through).
        """
        from .decorator import CacheDecorator

        try:
            resolved = Policy(ttl=ttl, **policy)
        except TypeError as exc:
            raise ConfigurationError(f"cached(): {exc}") from None
        return CacheDecorator(
            self,
            resolved,
            tags=tags,
            key=key,
            name=name,
            version=version,
            ignore=ignore,
            tenant_param=tenant_param,
        )

    def read_through(
        self,
        prefix: str,
        ttl: float,
        *,
        tags: Callable[[str], Iterable[str]] | Iterable[str] | None = None,
        **policy: Any,
    ) -> Callable[[Callable[[str], Any]], Any]:
        """Register a loader that owns the keys ``prefix:<id>`` (read-through).

        Afterwards ``cache.get("prefix:<id>")`` (and ``aget``, ``refresh``)
        loads through it on a miss: callers never call the loader themselves.
        """
        if ":" in prefix or not prefix:
            raise ConfigurationError(
                f"read_through prefix {prefix!r} must be non-empty, without ':'"
            )

        def register(loader: Callable[[str], Any]) -> Any:
            cached_loader = self.cached(
                ttl, tags=tags, key=lambda id: f"{prefix}:{id}", name=prefix, **policy
            )(loader)
            self._read_through[prefix] = cached_loader
            return cached_loader

        return register

    # -- tenant and request helpers ------------------------------------------------
    def resolve_tenant(self, tenant: str | None, function: str) -> str:
        if tenant is not None:
            return validate_tenant(tenant)
        scoped = current_tenant()
        if scoped is None:
            raise TenantRequiredError(function)
        return scoped

    def api_counters(self, tenant: str) -> list[int]:
        counters = self._api_counters.get(tenant)
        if counters is None:
            counters = self._api_counters[tenant] = self.metrics.counters(API_FUNCTION, tenant)
        return counters

    def request(
        self,
        key: CacheKey,
        tags: tuple[Tag, ...],
        *,
        policy: Policy,
        function: str,
        counters: list[int],
        loader: Callable[[], Any],
        decode: Callable[[bytes], Any],
        alias: Any = None,
    ) -> ReadRequest:
        return ReadRequest(
            key=key,
            tags=tags,
            alias=key.full if alias is None else alias,
            policy=policy,
            function=function,
            counters=counters,
            loader=loader,
            decode=decode,
            codec=self.codec,
            clock=self.clock,
            storage=self.storage,
            stores_objects=self.stores_objects,
            lock_layer=self.lock_layer,
            loader_base=self.metrics.loader_base,
            fused_read=self.fused_read,
        )

    def _api_request(
        self, key: str, tenant: str | None, ttl: float, tags: Iterable[str]
    ) -> ReadRequest:
        scoped = self.resolve_tenant(tenant, "TieredCache")
        cache_key = CacheKey(self.namespace, scoped, key)
        return self.request(
            cache_key,
            make_tags(self.namespace, scoped, tags),
            policy=Policy(ttl=ttl),
            function=API_FUNCTION,
            counters=self.api_counters(scoped),
            loader=_no_loader,
            decode=self.codec.serializer.decoder(Any),
        )

    def _loader_for(self, key: str) -> Any:
        prefix, sep, ident = key.partition(":")
        if sep and prefix in self._read_through:
            return self._read_through[prefix], ident
        return None, None

    # -- explicit API (cache-aside) ------------------------------------------------
    def get(self, key: str, *, tenant: str | None = None, default: Any = None) -> Any:
        """The value under ``key`` for the tenant in scope, or ``default``.

        If a :meth:`read_through` loader owns the key's prefix, a miss loads
        through it instead of returning ``default``.
        """
        loader, ident = self._loader_for(key)
        if loader is not None:
            return cached_impl(loader).call_for_tenant(self.resolve_tenant(tenant, key), ident)
        req = self._api_request(key, tenant, 1.0, ())
        value = self.sync_runner.run(lookup_flow(req), req)
        return default if value is MISSING else value

    async def aget(self, key: str, *, tenant: str | None = None, default: Any = None) -> Any:
        """Async :meth:`get`."""
        loader, ident = self._loader_for(key)
        if loader is not None:
            return await cached_impl(loader).acall_for_tenant(
                self.resolve_tenant(tenant, key), ident
            )
        req = self._api_request(key, tenant, 1.0, ())
        value = await self.async_runner.run(lookup_flow(req), req)
        return default if value is MISSING else value

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float,
        tags: Iterable[str] = (),
        tenant: str | None = None,
    ) -> None:
        """Store ``value`` under ``key`` in every storage layer; fills in flight lose to it."""
        req = self._api_request(key, tenant, ttl, tags)
        self.sync_runner.run(set_flow(req, value), req)
        self.forget_in_flight([req.key], req.tags)

    async def aset(
        self,
        key: str,
        value: Any,
        *,
        ttl: float,
        tags: Iterable[str] = (),
        tenant: str | None = None,
    ) -> None:
        """Async :meth:`set`."""
        req = self._api_request(key, tenant, ttl, tags)
        await self.async_runner.run(set_flow(req, value), req)
        self.forget_in_flight([req.key], req.tags)

    def refresh(self, key: str, *, tenant: str | None = None) -> Any:
        """Reload a read-through key now and store the result."""
        loader, ident = self._loader_for(key)
        if loader is None:
            raise ConfigurationError(f"no read_through loader owns key {key!r}")
        with tenant_scope(self.resolve_tenant(tenant, key)):
            return loader.refresh(ident)

    def _scoped(
        self, keys: Iterable[str | CacheKey], tags: Iterable[str], tenant: str | None
    ) -> tuple[list[CacheKey], tuple[Tag, ...], list[int]]:
        scoped = self.resolve_tenant(tenant, "invalidate")
        cache_keys = []
        for key in keys:
            if isinstance(key, CacheKey):
                if key.tenant != scoped or key.namespace != self.namespace:
                    raise ConfigurationError(
                        f"key {key} is not in tenant {scoped!r} of {self.namespace!r}"
                    )
                cache_keys.append(key)
            else:
                cache_keys.append(CacheKey(self.namespace, scoped, key))
        return cache_keys, make_tags(self.namespace, scoped, tags), self.api_counters(scoped)

    def _result(self, failed: list[int]) -> InvalidationResult:
        names = ["broadcast" if i == BROADCAST else self.layers[i].name for i in failed]
        return InvalidationResult(names)

    def invalidate(
        self,
        keys: Iterable[str | CacheKey] = (),
        *,
        tags: Iterable[str] = (),
        tenant: str | None = None,
    ) -> InvalidationResult:
        """Drop keys and tags of one tenant from every layer and every replica.

        Never raises for a failing layer (the request that changed the data
        should not fail); check the result, or call ``raise_for_failure()``
        where an unconfirmed invalidation must be retried.
        """
        cache_keys, cache_tags, counters = self._scoped(keys, tags, tenant)
        flow = invalidate_flow(len(self.layers), cache_keys, cache_tags, counters)
        failed = self.sync_runner.run(flow)
        self.forget_in_flight(cache_keys, cache_tags)
        return self._result(failed)

    async def ainvalidate(
        self,
        keys: Iterable[str | CacheKey] = (),
        *,
        tags: Iterable[str] = (),
        tenant: str | None = None,
    ) -> InvalidationResult:
        """Async :meth:`invalidate`."""
        cache_keys, cache_tags, counters = self._scoped(keys, tags, tenant)
        flow = invalidate_flow(len(self.layers), cache_keys, cache_tags, counters)
        failed = await self.async_runner.run(flow)
        self.forget_in_flight(cache_keys, cache_tags)
        return self._result(failed)

    def forget_in_flight(
        self, keys: Sequence[CacheKey], tags: Sequence[Tag], everything: bool = False
    ) -> None:
        """After an invalidation or a write: later callers of these keys (or tags, or of
        every key) start a load of their own instead of joining one that began before it."""
        if everything:
            self.singleflight.forget(everything=True)
            self.async_singleflight.forget(everything=True)
        elif keys or tags:
            full_keys = [key.full for key in keys]
            tag_names = [tag.full for tag in tags]
            self.singleflight.forget(full_keys, tag_names)
            self.async_singleflight.forget(full_keys, tag_names)

    # -- broadcast -------------------------------------------------------------
    def notifier(self) -> Notifier | None:
        """The replica broadcast subscriber, started on first use (None without Redis)."""
        return self.replicas.notifier()

    def connect(self, timeout: float = 2.0) -> bool:
        """Subscribe to the replica broadcast now and wait up to ``timeout`` for it.

        Optional: the subscriber also starts on first use. Call it at start-up so
        the first requests already hear other replicas' invalidations. Returns
        whether the subscription is up (always True without a Redis layer).
        """
        return self.replicas.connect(timeout)

    # -- introspection and lifecycle -------------------------------------------
    def stats(self) -> CacheStats:
        """Hit rates and counts per layer, per function and per tenant."""
        evictions = {
            layer.name: layer.evictions for layer in self.layers if isinstance(layer, MemoryLayer)
        }
        breakers = {g.name: g.breaker.state for g in self.guards if g.breaker is not None}
        return self.metrics.snapshot(evictions, breakers)

    def prometheus_collector(self) -> Any:
        """A prometheus-client collector; register it with ``REGISTRY.register(...)``."""
        from .prometheus import PrometheusCollector

        return PrometheusCollector([self])

    def _stop_background(self) -> None:
        self.replicas.stop()
        self.background.stop()

    def close(self) -> None:
        """Stop background threads, then close the layers' connections."""
        self._stop_background()
        for layer in self.layers:
            layer.close()

    async def aclose(self) -> None:
        """Async :meth:`close` (also closes this loop's async connections)."""
        await self.background.acancel()
        self._stop_background()
        for layer in self.layers:
            await layer.aclose()


def _no_loader() -> Any:
    raise AssertionError("the explicit get() never loads")
