"""The ``@cache.cached`` decorator: sync and async wrappers around the flows.

The in-process hit is the hottest path of the library, so it is written out
by hand in ``__call__``: one ContextVar read, one tuple, one locked dict
lookup, one clock read and one counter increment, no generator and no await.
Everything else builds a :class:`~tieredcache.flows.ReadRequest` and hands it
to a runner under single-flight.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from .errors import ConfigurationError, TenantRequiredError
from .flows import ReadRequest, read_flow, refresh_flow, write_flow, xfetch_due
from .keys import CacheKey, FunctionKeyBuilder, Tag, make_tags
from .metrics import FIELDS, HIT
from .tenancy import get_tenant_var, tenant_scope, validate_tenant

if TYPE_CHECKING:
    from .cache import InvalidationResult, TieredCache
    from .policy import Policy

__all__ = ["AsyncCachedFunction", "CacheDecorator", "CachedFunction"]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
_tenant_var = get_tenant_var()


def _return_type(func: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: decode into plain types
        return Any
    return hints.get("return", Any)


class CacheDecorator:
    """What ``cache.cached(...)`` returns: apply it to a sync or async function."""

    def __init__(self, cache: TieredCache, policy: Policy, **options: Any) -> None:
        self.cache = cache
        self.policy = policy
        self.options = options

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, func: Callable[P, Any]) -> Any:
        if inspect.iscoroutinefunction(func):
            return AsyncCachedFunction(self.cache, self.policy, func, **self.options)
        return CachedFunction(self.cache, self.policy, func, **self.options)


class _CachedBase(Generic[P, R]):
    """Key building and request assembly shared by the sync and async wrappers."""

    def __init__(
        self,
        cache: TieredCache,
        policy: Policy,
        func: Callable[P, Any],
        *,
        tags: Callable[..., Iterable[str]] | Iterable[str] | None,
        key: Callable[..., str] | None,
        name: str | None,
        version: int | str,
        ignore: Iterable[str],
        tenant_param: str | None,
    ) -> None:
        functools.update_wrapper(cast(Any, self), func)
        self._cache = cache
        self.policy = policy
        self._func = func
        self.name = name or f"{func.__module__}.{func.__qualname__}"
        self._builder = FunctionKeyBuilder(
            func, name=self.name, version=version, ignore=ignore, tenant_param=tenant_param
        )
        self._tenant_param = self._builder.tenant_param
        params = list(inspect.signature(func).parameters.values())
        self._tenant_index = next(
            (
                i
                for i, p in enumerate(params)
                if p.name == self._tenant_param
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ),
            None,
        )
        if isinstance(tags, str):
            raise ConfigurationError(f"tags of {self.name} must be a list or a function, not a str")
        self._tags_fn = tags if callable(tags) else None
        self._static_tags = tuple(tags) if tags is not None and not callable(tags) else ()
        self._key_fn = key
        self._decode = cache.codec.serializer.decoder(_return_type(func))
        memory = cache.memory
        self._fast = None if memory is None else memory._fast
        self._recent: deque[Hashable] = deque(maxlen=1) if memory is None else memory._recent
        self._clock = cache.clock
        self._counters: dict[str, list[int]] = {}
        self._hit_index = cache.storage[0] * FIELDS + HIT
        # Inside this band before expiry XFetch may fire (P(-ln U > 10) = 4.5e-5).
        self._xfetch_band = policy.early_refresh_beta * 10.0

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        # Cached methods: ``self`` is bound here and left out of keys.
        return functools.partial(cast(Callable[..., Any], self), instance)

    def _tenant(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        name = self._tenant_param
        if name is None:
            tenant = _tenant_var.get()
            if tenant is None:
                raise TenantRequiredError(self.name)
            return tenant
        if name in kwargs:
            value = kwargs[name]
        elif self._tenant_index is not None and len(args) > self._tenant_index:
            value = args[self._tenant_index]
        else:
            value = self._builder.tenant_from(self._builder.bind(args, kwargs))
        if value is None:
            raise TenantRequiredError(self.name)
        return validate_tenant(value)

    def _counters_for(self, tenant: str) -> list[int]:
        counters = self._counters.get(tenant)
        if counters is None:
            counters = self._counters[tenant] = self._cache.metrics.counters(self.name, tenant)
        return counters

    def _alias(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs:
            return (self, tenant, args, tuple(sorted(kwargs.items())))
        return (self, tenant, args)

    def _cache_key(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CacheKey:
        if self._key_fn is not None:
            body = self._key_fn(*args, **kwargs)
        else:
            body = self._builder.body(self._builder.bind(args, kwargs))
        return CacheKey(self._cache.namespace, tenant, body)

    def _tags(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tag, ...]:
        names: Iterable[str] = self._static_tags
        if self._tags_fn is not None:
            names = (*names, *self._tags_fn(*args, **kwargs))
        return make_tags(self._cache.namespace, tenant, names) if names else ()

    def _request(
        self,
        tenant: str,
        alias: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loader: Callable[[], Any],
    ) -> ReadRequest:
        key = self._cache_key(tenant, args, kwargs)
        if alias is not None:
            try:
                hash(alias)
            except TypeError:  # unhashable arguments: the in-process layer keys by the string
                alias = None
        return self._cache.request(
            key,
            self._tags(tenant, args, kwargs),
            policy=self.policy,
            function=self.name,
            counters=self._counters_for(tenant),
            loader=loader,
            decode=self._decode,
            alias=alias,
        )

    def _hit(self, tenant: str, entry: Any) -> Any:
        self._counters_for(tenant)[self._hit_index] += 1
        return entry.value

    def _early(self, tenant: str, alias: Any, args: Any, kwargs: Any, entry: Any) -> Any:
        """A fresh hit near expiry: maybe start an XFetch refresh (sync callers)."""
        if xfetch_due(entry, self._clock(), self.policy.early_refresh_beta):
            self._cache.spawn_refresh(
                self._request(tenant, alias, args, kwargs, self._loader(args, kwargs))
            )
        return self._hit(tenant, entry)

    def _aearly(self, tenant: str, alias: Any, args: Any, kwargs: Any, entry: Any) -> Any:
        """A fresh hit near expiry: maybe start an XFetch refresh (async callers)."""
        if xfetch_due(entry, self._clock(), self.policy.early_refresh_beta):
            self._cache.spawn_arefresh(
                self._request(tenant, alias, args, kwargs, self._loader(args, kwargs))
            )
        return self._hit(tenant, entry)

    def _loader(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any]:
        return functools.partial(self._func, *args, **kwargs)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> CacheKey:
        """The cache key these arguments map to, for the tenant in scope."""
        return self._cache_key(self._tenant(args, kwargs), args, kwargs)


class CachedFunction(_CachedBase[P, R]):
    """A cached sync function. Call it like the original.

    >>> get_product(42)                 # doctest: +SKIP
    >>> get_product.invalidate(42)      # doctest: +SKIP
    >>> get_product.refresh(42)         # doctest: +SKIP
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._tenant_param is None:
            tenant = _tenant_var.get()
            if tenant is None:
                raise TenantRequiredError(self.name)
        else:
            tenant = self._tenant(args, kwargs)
        alias: Any = None
        fast = self._fast
        if fast is not None:
            alias = (
                (self, tenant, args, tuple(sorted(kwargs.items())))
                if kwargs
                else (self, tenant, args)
            )
            try:
                slot = fast.get(alias)
            except TypeError:  # unhashable arguments: the slow path keys by string
                alias = slot = None
            if slot is not None:
                self._recent.append(alias)
                entry = slot.entry
                if self._clock() < entry.fresh_until - entry.compute_time * self._xfetch_band:
                    counters = self._counters.get(tenant)
                    if counters is None:
                        counters = self._counters_for(tenant)
                    counters[self._hit_index] += 1
                    value: R = entry.value
                    return value
                if self._clock() < entry.fresh_until:  # fresh, inside the XFetch band
                    return self._early(tenant, alias, args, kwargs, entry)  # type: ignore[no-any-return]
        return self._miss(tenant, alias, args, kwargs)

    def _miss(self, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        cache = self._cache
        req = self._request(tenant, alias, args, kwargs, self._loader(args, kwargs))
        cache.notifier()
        runner = cache.sync_runner
        value: R = cache.singleflight.do(req.key.full, lambda: runner.run(read_flow(req), req))
        return value

    def call_for_tenant(self, tenant: str, *args: Any) -> R:
        with tenant_scope(tenant):
            return cast(Callable[..., R], self)(*args)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self._tenant(args, kwargs)
        return self._cache.invalidate([self._cache_key(tenant, args, kwargs)], tenant=tenant)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function now and store its result (fills in flight lose to it)."""
        tenant = self._tenant(args, kwargs)
        req = self._request(tenant, None, args, kwargs, self._loader(args, kwargs))
        self._cache.notifier()
        value: R = self._cache.sync_runner.run(refresh_flow(req, use_lock=False), req)
        return value

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, R]], WriteThroughFunction[Q, R]]:
        """Write-through: decorate the function that writes the store.

        Its return value becomes this function's cached value for the
        arguments ``key_args(*writer_args)`` returns (default: the writer's own
        arguments). See :func:`~tieredcache.flows.write_flow` for the ordering.
        """

        def decorate(func: Callable[Q, R]) -> WriteThroughFunction[Q, R]:
            if inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{self.name} is sync; its writer must be sync too")
            return WriteThroughFunction(self, func, key_args)

        return decorate


class WriteThroughFunction(Generic[Q, R]):
    """A store-writing function whose result is written through every layer."""

    def __init__(
        self,
        reader: CachedFunction[Any, R],
        func: Callable[Q, R],
        key_args: Callable[..., tuple[Any, ...]] | None,
    ) -> None:
        functools.update_wrapper(self, func)
        self._reader = reader
        self._func = func
        self._key_args = key_args

    def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        reader = self._reader
        reader_args = self._key_args(*args, **kwargs) if self._key_args else args
        tenant = reader._tenant(tuple(reader_args), {} if self._key_args else kwargs)
        loader = functools.partial(self._func, *args, **kwargs)
        req = reader._request(
            tenant, None, tuple(reader_args), {} if self._key_args else kwargs, loader
        )
        reader._cache.notifier()
        value: R = reader._cache.sync_runner.run(write_flow(req), req)
        return value


class AsyncCachedFunction(_CachedBase[P, R]):
    """A cached async function. Await it like the original; ``invalidate`` and
    ``refresh`` are awaitable too."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._tenant_param is None:
            tenant = _tenant_var.get()
            if tenant is None:
                raise TenantRequiredError(self.name)
        else:
            tenant = self._tenant(args, kwargs)
        alias: Any = None
        fast = self._fast
        if fast is not None:
            alias = (
                (self, tenant, args, tuple(sorted(kwargs.items())))
                if kwargs
                else (self, tenant, args)
            )
            try:
                slot = fast.get(alias)
            except TypeError:  # unhashable arguments: the slow path keys by string
                alias = slot = None
            if slot is not None:
                self._recent.append(alias)
                entry = slot.entry
                if self._clock() < entry.fresh_until - entry.compute_time * self._xfetch_band:
                    counters = self._counters.get(tenant)
                    if counters is None:
                        counters = self._counters_for(tenant)
                    counters[self._hit_index] += 1
                    value: R = entry.value
                    return value
                if self._clock() < entry.fresh_until:  # fresh, inside the XFetch band
                    return self._aearly(tenant, alias, args, kwargs, entry)  # type: ignore[no-any-return]
        return await self._miss(tenant, alias, args, kwargs)

    async def _miss(
        self, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        cache = self._cache
        req = self._request(tenant, alias, args, kwargs, self._loader(args, kwargs))
        cache.notifier()
        runner = cache.async_runner
        value: R = await cache.async_singleflight.do(
            req.key.full, lambda: runner.run(read_flow(req), req)
        )
        return value

    async def call_for_tenant(self, tenant: str, *args: Any) -> R:
        with tenant_scope(tenant):
            return await cast(Callable[..., Awaitable[R]], self)(*args)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self._tenant(args, kwargs)
        return await self._cache.ainvalidate([self._cache_key(tenant, args, kwargs)], tenant=tenant)

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function now and store its result."""
        tenant = self._tenant(args, kwargs)
        req = self._request(tenant, None, args, kwargs, self._loader(args, kwargs))
        self._cache.notifier()
        value: R = await self._cache.async_runner.run(refresh_flow(req, use_lock=False), req)
        return value

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, Awaitable[R]]], AsyncWriteThroughFunction[Q, R]]:
        """Write-through for async code; see :meth:`CachedFunction.writer`."""

        def decorate(func: Callable[Q, Awaitable[R]]) -> AsyncWriteThroughFunction[Q, R]:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{self.name} is async; its writer must be async too")
            return AsyncWriteThroughFunction(self, func, key_args)

        return decorate


class AsyncWriteThroughFunction(Generic[Q, R]):
    """Async twin of :class:`WriteThroughFunction`."""

    def __init__(
        self,
        reader: AsyncCachedFunction[Any, R],
        func: Callable[Q, Awaitable[R]],
        key_args: Callable[..., tuple[Any, ...]] | None,
    ) -> None:
        functools.update_wrapper(self, func)
        self._reader = reader
        self._func = func
        self._key_args = key_args

    async def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        reader = self._reader
        reader_args = self._key_args(*args, **kwargs) if self._key_args else args
        reader_kwargs: dict[str, Any] = {} if self._key_args else kwargs
        tenant = reader._tenant(tuple(reader_args), reader_kwargs)
        loader = functools.partial(self._func, *args, **kwargs)
        req = reader._request(tenant, None, tuple(reader_args), reader_kwargs, loader)
        reader._cache.notifier()
        value: R = await reader._cache.async_runner.run(write_flow(req), req)
        return value
