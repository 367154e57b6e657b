"""TieredCache: the facade over one namespace's layer stack."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._engine import _async as engine_async
from ._engine import _sync as engine_sync
from ._engine.request import MISSING, ReadRequest
from ._engine.result import InvalidationResult, ReadOutcome
from ._engine.stack import LayerStack
from ._function.impl import cached_impl
from ._function.types import CacheDecorator
from .errors import BackendError, ConfigurationError, TenantRequiredError
from .keys import CacheKey, Tag, make_tags, validate_namespace, validate_tag_name
from .layers.base import (
    HealthReportingLayer,
    InvalidationLayer,
    NamespaceStateLayer,
    ReplicaBroadcastLayer,
    StorageLayer,
)
from .metrics import CacheStats, Metrics
from .policy import Policy
from .serde import EntryCodec, MsgpackSerializer, Serializer
from .tags import TagTemplate
from .tenancy import current_tenant, tenant_scope, validate_tenant

__all__ = ["Invalidation", "InvalidationResult", "TieredCache"]

log = logging.getLogger("tieredcache")
API_FUNCTION = "(api)"
BATCH_TENANT = "(batch)"  # the metrics row of cross-tenant batch invalidations


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One tenant's keys and tags to invalidate, for :meth:`TieredCache.invalidate_many`.

    ``tenant=None`` invalidates ``tags`` for every tenant of the namespace (a
    truncated table, an event that cannot be mapped to a tenant); it costs O(1)
    whatever the number of tenants and entries, and takes no ``keys``.

    >>> Invalidation("acme", tags=("product:42",))
    Invalidation(tenant='acme', keys=(), tags=('product:42',))
    """

    tenant: str | None
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tenant is None and self.keys:
            raise ConfigurationError(
                f"Invalidation for every tenant takes tags only, got keys {list(self.keys)!r}"
            )
        for field_name in ("keys", "tags"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise ConfigurationError(
                    f"Invalidation {field_name} must be a sequence of names, not the str {value!r}"
                )
            object.__setattr__(self, field_name, tuple(value))


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

    Storage layers (in-process, Redis) are read fastest first and back-filled;
    invalidation-only layers (a CDN) are reached by every invalidation, after
    the storage layers and the other replicas. A failing shared layer is
    skipped (its circuit breaker opens after ``breaker_failures`` consecutive
    failures and probes again after ``breaker_reset`` seconds); calls fall
    through to the next layer or the loader. ``clock`` is the wall clock for
    entry times; inject a fake in tests.
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
        broadcast: bool | Literal["publish"] = True,
        background_workers: int = 4,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        if not layers:
            raise ConfigurationError("TieredCache layers must name at least one layer")
        names = [getattr(layer, "name", None) for layer in layers]
        if len(set(names)) != len(names) or None in names:
            raise ConfigurationError(f"TieredCache layers need distinct names, got {names}")
        self.layers = list(layers)
        self.clock = clock
        self._codec = EntryCodec(serializer or MsgpackSerializer(), signing_secrets)
        self._metrics = Metrics([layer.name for layer in self.layers], max_tenants=max_tenants)
        self._stack = LayerStack(
            self.namespace,
            self.layers,
            codec=self._codec,
            clock=clock,
            metrics=self._metrics,
            breaker_failures=breaker_failures,
            breaker_reset=breaker_reset,
            background_workers=background_workers,
        )
        self._replicas: Any = None
        carrier = next(
            (g.layer for g in self._stack.storage if isinstance(g.layer, ReplicaBroadcastLayer)),
            None,
        )
        self._stack.broadcast_disabled = carrier is not None and not broadcast
        if broadcast and carrier is not None:
            options: dict[str, Any] = (
                {"publish_only": True}
                if broadcast == "publish"
                else {"on_down": self._stack.suspend_local, "on_up": self._stack.resume_local}
            )
            self._replicas = carrier.replicas(
                self.namespace, self._stack.drop_local, self._resync, **options
            )
            self._stack.attach_broadcast(self._replicas, carrier)
        self._api_counters: dict[str, list[int]] = {}
        self._read_through: dict[str, Any] = {}
        self._policies: dict[tuple[Any, ...], Policy] = {}

    # -- decorators ---------------------------------------------------------
    def cached(
        self,
        ttl: float,
        *,
        tags: Callable[..., Iterable[str]] | Iterable[str | TagTemplate] | None = None,
        key: Callable[..., str] | None = None,
        name: str | None = None,
        version: int | str = 1,
        ignore: Iterable[str] = (),
        tenant_param: str | None = None,
        **policy: Any,
    ) -> CacheDecorator:
        """Cache a sync or async function (cache-aside: the function is the loader).

        ``tags`` (names, :class:`~tieredcache.tags.TagTemplate` objects rendered from
        the call's arguments, or a function of the same arguments) scope invalidation;
        ``key`` replaces the argument digest with your own key body; ``name``
        and ``version`` name the function in keys (bump ``version`` when the
        return shape changes, so old entries are never decoded into the new
        shape). The tenant comes from :func:`tenant_scope`, or from the
        parameter named ``tenant`` (or ``tenant_param``) if the function has
        one. Further keyword arguments are :class:`Policy` fields.

        The wrapper keeps the signature and adds ``invalidate(...)``,
        ``refresh(...)``, ``key(...)``, ``put(...)`` and ``writer(...)``
        (write-through).
        """
        try:
            resolved = Policy(ttl=ttl, **policy)
        except TypeError as exc:
            raise ConfigurationError(f"cached(): {exc}") from None
        return CacheDecorator(
            self._stack,
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
    def _tenant(self, tenant: str | None, function: str) -> str:
        if tenant is not None:
            return validate_tenant(tenant)
        scoped = current_tenant()
        if scoped is None:
            raise TenantRequiredError(function)
        return scoped

    def _counters(self, tenant: str) -> list[int]:
        counters = self._api_counters.get(tenant)
        if counters is None:
            counters = self._metrics.counters(API_FUNCTION, tenant)
            if len(self._api_counters) <= self._metrics.max_tenants:  # bounded, as the labels
                self._api_counters[tenant] = counters
        return counters

    def _request(
        self, key: str, tenant: str | None, ttl: float, tags: Iterable[str]
    ) -> ReadRequest:
        """The request of an explicit get/set (they never load)."""
        return self._load_request(
            key, _no_loader, ttl, tags, tenant, API_FUNCTION, {}, caller="TieredCache"
        )

    def _loader_for(self, key: str) -> tuple[Any, Any]:
        prefix, sep, ident = key.partition(":")
        if sep and prefix in self._read_through:
            return self._read_through[prefix], ident
        return None, None

    # -- explicit API (cache-aside) ------------------------------------------------
    def get(self, key: str, *, tenant: str | None = None, default: Any = None) -> Any:
        """The value under ``key`` for the tenant in scope, or ``default``.

        If a :meth:`read_through` loader owns the key's prefix, a miss loads
        through it instead of returning ``default``. ``get`` does not know which
        tags the entry was stored with: after an all-tenant invalidation
        (``Invalidation(None, tags=...)``) it treats every entry stored before
        it as absent, whatever its tags (wider, never stale).
        """
        loader, ident = self._loader_for(key)
        if loader is not None:
            return cached_impl(loader).call_for_tenant(self._tenant(tenant, key), ident)
        value = engine_sync.lookup(self._request(key, tenant, 1.0, ()), tags_known=False)
        return default if value is MISSING else value

    async def aget(self, key: str, *, tenant: str | None = None, default: Any = None) -> Any:
        """Async :meth:`get`."""
        loader, ident = self._loader_for(key)
        if loader is not None:
            return await cached_impl(loader).acall_for_tenant(self._tenant(tenant, key), ident)
        value = await engine_async.lookup(self._request(key, tenant, 1.0, ()), tags_known=False)
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
        req = self._request(key, tenant, ttl, tags)
        try:
            engine_sync.put(req, value)
        finally:
            self._stack.forget([req.key], req.tags)

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
        req = self._request(key, tenant, ttl, tags)
        try:
            await engine_async.put(req, value)
        finally:
            self._stack.forget([req.key], req.tags)

    def refresh(self, key: str, *, tenant: str | None = None) -> Any:
        """Reload a read-through key now and store the result."""
        loader, ident = self._loader_for(key)
        if loader is None:
            raise ConfigurationError(f"no read_through loader owns key {key!r}")
        with tenant_scope(self._tenant(tenant, key)):
            return loader.refresh(ident)

    def _scoped(
        self, keys: Iterable[str | CacheKey], tags: Iterable[str], tenant: str | None
    ) -> tuple[list[CacheKey], tuple[Tag, ...], list[int]]:
        scoped = self._tenant(tenant, "invalidate")
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
        return cache_keys, make_tags(self.namespace, scoped, tags), self._counters(scoped)

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
        where an unconfirmed invalidation must be retried. A CDN layer's purge is
        queued, not waited for: the result names it in ``pending``, and
        ``result.wait_purges(timeout)`` returns the result with its outcome.
        """
        cache_keys, cache_tags, counters = self._scoped(keys, tags, tenant)
        return engine_sync.invalidate(self._stack, cache_keys, cache_tags, counters)

    async def ainvalidate(
        self,
        keys: Iterable[str | CacheKey] = (),
        *,
        tags: Iterable[str] = (),
        tenant: str | None = None,
    ) -> InvalidationResult:
        """Async :meth:`invalidate`."""
        cache_keys, cache_tags, counters = self._scoped(keys, tags, tenant)
        return await engine_async.invalidate(self._stack, cache_keys, cache_tags, counters)

    def _batch(
        self, items: Iterable[Invalidation]
    ) -> tuple[list[CacheKey], list[Tag], list[str], list[int]]:
        keys: dict[CacheKey, None] = {}
        tags: dict[Tag, None] = {}
        everywhere: dict[str, None] = {}
        for item in items:
            if item.tenant is None:
                for name in item.tags:
                    everywhere[validate_tag_name(name)] = None
                continue
            tenant = validate_tenant(item.tenant)
            for key in item.keys:
                keys[CacheKey(self.namespace, tenant, key)] = None
            for tag in make_tags(self.namespace, tenant, item.tags):
                tags[tag] = None
        counters = self._counters(BATCH_TENANT)
        return list(keys), list(tags), list(everywhere), counters

    def invalidate_many(
        self, items: Iterable[Invalidation], *, layers: Collection[str] | None = None
    ) -> InvalidationResult:
        """Invalidate many tenants' keys and tags in one call: one round trip per Redis
        node (keys of one slot in one script, the scripts pipelined), one replica
        broadcast, one CDN batch; repeated names are sent once.

        ``layers``: only these layer names (``"broadcast"`` for the replicas), to
        retry what an earlier result reported as failed. Never raises for a failing
        layer; the result says which failed and why.

        >>> cache.invalidate_many([Invalidation("acme", tags=("product:1",)),
        ...                        Invalidation(None, tags=("table:public.products",))])
        ...                                                     # doctest: +SKIP
        """
        keys, tags, everywhere, counters = self._batch(items)
        return engine_sync.invalidate(
            self._stack, keys, tags, counters, everywhere=everywhere, only=layers
        )

    async def ainvalidate_many(
        self, items: Iterable[Invalidation], *, layers: Collection[str] | None = None
    ) -> InvalidationResult:
        """Async :meth:`invalidate_many`."""
        keys, tags, everywhere, counters = self._batch(items)
        return await engine_async.invalidate(
            self._stack, keys, tags, counters, everywhere=everywhere, only=layers
        )

    def check_settings(self, *, unpublished_ok: bool = False) -> list[str]:
        """Problems that would make this cache's invalidations miss an application's
        entries: for each shared layer that keeps namespace state, what the
        application published (namespace, key prefix, tenant slots, lease protocol)
        differs, or nothing was published (unless ``unpublished_ok``: a Redis restarted
        empty has lost them until an application starts again), or they cannot be read
        (with ``unpublished_ok``, raised as :class:`~tieredcache.errors.BackendError`
        instead: a running worker keeps its last verdict). Empty when all agree. For CDC
        workers (``check``, and every ``settings_check_interval`` while running)."""
        problems: list[str] = []
        for guard in self._stack.storage:
            layer = guard.layer
            if isinstance(layer, NamespaceStateLayer):
                try:
                    problems += layer.check_settings(self.namespace, unpublished_ok)
                except BackendError as exc:
                    if unpublished_ok:
                        raise
                    problems.append(f"layer {guard.name!r}: cannot read its settings: {exc}")
        return problems

    # -- get-or-load for loaders that are not decorated ---------------------------
    def _policy(self, ttl: float, options: dict[str, Any]) -> Policy:
        marker = (ttl, *sorted(options.items()))
        policy = self._policies.get(marker)
        if policy is None:
            try:
                policy = Policy(ttl=ttl, **options)
            except TypeError as exc:
                raise ConfigurationError(f"get_or_load(): {exc}") from None
            if len(self._policies) < 1024:
                self._policies[marker] = policy
        return policy

    def _load_request(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl: float,
        tags: Iterable[str],
        tenant: str | None,
        name: str,
        options: dict[str, Any],
        caller: str | None = None,
    ) -> ReadRequest:
        scoped = self._tenant(tenant, caller or name)
        return ReadRequest(
            self._stack,
            CacheKey(self.namespace, scoped, key),
            make_tags(self.namespace, scoped, tags),
            policy=self._policy(ttl, options),
            function=name,
            counters=self._counters(scoped)
            if name == API_FUNCTION
            else self._metrics.counters(name, scoped),
            loader=loader,
            decode=self._codec.serializer.decoder(Any),
        )

    def _outcome(self, req: ReadRequest) -> ReadOutcome:
        entry = req.answered_entry
        if entry is None:
            return ReadOutcome("miss")
        layer = self._stack.storage[req.answered].name
        now = self.clock()
        age = max(0.0, now - entry.created_at)
        return ReadOutcome("hit" if entry.fresh_until > now else "stale", layer, age)

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        *,
        ttl: float,
        tags: Iterable[str] = (),
        tenant: str | None = None,
        name: str = API_FUNCTION,
        **policy: Any,
    ) -> tuple[Any, ReadOutcome]:
        """The value under ``key``, loaded with ``loader`` on a miss (one load per key
        across callers and processes, as for decorated functions), and what the read
        found: a hit in which layer, a stale entry, or a miss; and the entry's age.
        ``name`` files the metrics; further keyword arguments are Policy fields.

        >>> body, outcome = cache.get_or_load("page:/", render, ttl=30)   # doctest: +SKIP
        >>> outcome.state, outcome.layer                                   # doctest: +SKIP
        ('hit', 'memory')
        """
        req = self._load_request(key, loader, ttl, tags, tenant, name, policy)
        value = engine_sync.read(req)
        return value, self._outcome(req)

    async def aget_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        tags: Iterable[str] = (),
        tenant: str | None = None,
        name: str = API_FUNCTION,
        **policy: Any,
    ) -> tuple[Any, ReadOutcome]:
        """Async :meth:`get_or_load`; ``loader`` is an async function."""
        req = self._load_request(key, loader, ttl, tags, tenant, name, policy)
        value = await engine_async.read(req)
        return value, self._outcome(req)

    # -- broadcast -------------------------------------------------------------
    def _resync(self) -> None:
        self._stack.resync()

    def connect(self, timeout: float = 2.0) -> bool:
        """Subscribe to the replica broadcast now and wait up to ``timeout`` for it.

        Optional: the subscriber also starts on first use. Call it at start-up so
        the first requests already hear other replicas' invalidations. Returns
        whether the subscription is up (always True without a shared layer that
        carries the broadcast).
        """
        return True if self._replicas is None else bool(self._replicas.connect(timeout))

    # -- introspection and lifecycle -------------------------------------------
    def _layer_states(self) -> tuple[dict[str, int], dict[str, str]]:
        evictions = {layer.name: layer.evictions for layer in self._stack.memories}
        breakers: dict[str, str] = {
            g.name: g.breaker.state for g in self._stack.guards if g.breaker is not None
        }
        return evictions, breakers

    def _backends(self) -> dict[str, dict[str, float]]:
        backends = {
            layer.name: layer.health()
            for layer in self.layers
            if isinstance(layer, HealthReportingLayer)
        }
        if self._replicas is not None and isinstance(self._replicas, HealthReportingLayer):
            backends["broadcast"] = self._replicas.health()
        return backends

    def stats(self) -> CacheStats:
        """Hit rates and counts per layer, per function and per tenant; the breakers'
        states; and what each backend's connections saw (``backends``)."""
        stats = self._metrics.snapshot(*self._layer_states())
        stats.backends = self._backends()
        return stats

    def metrics_source(
        self,
    ) -> tuple[
        str, Metrics, Mapping[str, int], Mapping[str, str], Mapping[str, Mapping[str, float]]
    ]:
        """What the Prometheus collector reads (see :mod:`tieredcache.prometheus`)."""
        return (self.namespace, self._metrics, *self._layer_states(), self._backends())

    def prometheus_collector(self) -> Any:
        """A prometheus-client collector; register it with ``REGISTRY.register(...)``."""
        from .prometheus import PrometheusCollector

        return PrometheusCollector([self])

    def _stop_background(self) -> None:
        if self._replicas is not None:
            self._replicas.stop()
        self._stack.background.stop()

    def close(self) -> None:
        """Stop background threads, then close the layers' connections."""
        self._stop_background()
        for layer in self.layers:
            layer.close()

    async def aclose(self) -> None:
        """Async :meth:`close` (also closes this loop's async connections)."""
        await self._stack.background.acancel()
        self._stop_background()
        for layer in self.layers:
            await layer.aclose()


def _no_loader() -> Any:
    raise AssertionError("an explicit get() never loads")
