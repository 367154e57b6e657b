"""The ``@cache.cached`` decorator: sync and async wrappers around the flows.

The in-process hit is the hottest path of the library, so the wrapper is a
closure written out by hand with everything it needs bound as locals: one
ContextVar read, one tuple, one dict lookup (no lock, see
:mod:`tieredcache.layers.memory`), one clock read, one append to the recency
buffer and one counter increment; no generator, no await on a hit, no method
binding. Everything else goes to :class:`CachedImpl`, which builds a
:class:`~tieredcache.flows.ReadRequest` and hands it to a runner under
single-flight.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from .errors import ConfigurationError, DecodeError, TenantRequiredError
from .flows import (
    MISSING,
    ReadRequest,
    read_flow,
    refresh_flow,
    set_flow,
    write_flow,
    xfetch_due,
)
from .keys import CacheKey, FunctionKeyBuilder, Tag, make_tags
from .metrics import FIELDS, HIT, MISS, SET
from .tenancy import get_tenant_var, tenant_scope, validate_tenant

if TYPE_CHECKING:
    from .cache import InvalidationResult, TieredCache
    from .policy import Policy

__all__ = ["AsyncCachedFunction", "CacheDecorator", "CachedFunction", "CachedImpl", "cached_impl"]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
_tenant_var = get_tenant_var()
_FAILED: Any = object()


class CachedFunction(Protocol[P, R_co]):
    """A cached sync function: call it like the original.

    >>> get_product(42)                 # doctest: +SKIP
    >>> get_product.invalidate(42)      # drop the entry everywhere  # doctest: +SKIP
    >>> get_product.refresh(42)         # reload and store now       # doctest: +SKIP
    """

    name: str
    policy: Policy

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> CacheKey: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> InvalidationResult: ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def put(self, value: Any, /, *args: P.args, **kwargs: P.kwargs) -> None: ...

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, Any]], Callable[Q, Any]]: ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """A cached async function: await it like the original; ``invalidate`` and
    ``refresh`` are awaitable too."""

    name: str
    policy: Policy

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> CacheKey: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[InvalidationResult]: ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    def put(self, value: Any, /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[None]: ...

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, Awaitable[Any]]], Callable[Q, Awaitable[Any]]]: ...


def make_alias(
    impl: CachedImpl, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """The in-process lookup key of a call; the wrappers inline the same expressions."""
    if kwargs:
        named = tuple(sorted((k, v, type(v)) for k, v in kwargs.items()))
        return (impl, tenant, args, *map(type, args), named)
    if len(args) == 1:
        return (impl, tenant, args, type(args[0]))
    return (impl, tenant, args, *map(type, args))


_CONTAINERS = (tuple, frozenset)


def _has_containers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, _CONTAINERS) for a in args) or any(
        isinstance(v, _CONTAINERS) for v in kwargs.values()
    )


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
        impl = CachedImpl(self.cache, self.policy, func, **self.options)
        asynchronous = inspect.iscoroutinefunction(func)
        wrapper = impl.async_wrapper() if asynchronous else impl.sync_wrapper()
        params = list(inspect.signature(func).parameters)
        if params and params[0] in ("self", "cls"):
            return CachedMethod(wrapper)
        return wrapper


class CachedMethod:
    """A cached method: ``obj.method(...)``, ``obj.method.invalidate(...)`` and the
    other helpers all receive ``obj``. ``self`` is left out of keys (as cachetools'
    ``methodkey`` does): give the method a parameter that says what differs."""

    def __init__(self, wrapper: Any) -> None:
        functools.update_wrapper(self, wrapper)
        self.wrapper = wrapper

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.wrapper
        return BoundCachedMethod(self.wrapper, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)


class BoundCachedMethod:
    """``obj.method`` for a cached method: the wrapper and its helpers with ``obj`` bound."""

    __slots__ = ("__self__", "wrapper")

    def __init__(self, wrapper: Any, instance: Any) -> None:
        self.wrapper = wrapper
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(self.__self__, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.key(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.invalidate(self.__self__, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.refresh(self.__self__, *args, **kwargs)

    def put(self, value: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.put(value, self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapper, name)


class CachedImpl:
    """Everything about one cached function but the hot path."""

    def __init__(
        self,
        cache: TieredCache,
        policy: Policy,
        func: Callable[..., Any],
        *,
        tags: Callable[..., Iterable[str]] | Iterable[str] | None,
        key: Callable[..., str] | None,
        name: str | None,
        version: int | str,
        ignore: Iterable[str],
        tenant_param: str | None,
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.func = func
        self.name = name or f"{func.__module__}.{func.__qualname__}"
        self.builder = FunctionKeyBuilder(
            func, name=self.name, version=version, ignore=ignore, tenant_param=tenant_param
        )
        self.tenant_param = self.builder.tenant_param
        params = list(inspect.signature(func).parameters.values())
        self.tenant_index = next(
            (
                i
                for i, p in enumerate(params)
                if p.name == self.tenant_param
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ),
            None,
        )
        if isinstance(tags, str):
            raise ConfigurationError(f"tags of {self.name} must be a list or a function, not a str")
        self.tags_fn = tags if callable(tags) else None
        self.static_tags = tuple(tags) if tags is not None and not callable(tags) else ()
        self.key_fn = key
        self.decode = cache.codec.serializer.decoder(_return_type(func))
        self.counters: dict[str, list[int]] = {}
        self.hit_index = cache.storage[0] * FIELDS + HIT

    # -- keys and requests ---------------------------------------------------
    def tenant(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        name = self.tenant_param
        if name is None:
            tenant = _tenant_var.get()
            if tenant is None:
                raise TenantRequiredError(self.name)
            return tenant
        if name in kwargs:
            value = kwargs[name]
        elif self.tenant_index is not None and len(args) > self.tenant_index:
            value = args[self.tenant_index]
        else:
            value = self.builder.tenant_from(self.builder.bind(args, kwargs))
        if value is None:
            raise TenantRequiredError(self.name)
        return validate_tenant(value)

    def counters_for(self, tenant: str) -> list[int]:
        counters = self.counters.get(tenant)
        if counters is None:
            counters = self.counters[tenant] = self.cache.metrics.counters(self.name, tenant)
        return counters

    def cache_key(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CacheKey:
        if self.key_fn is not None:
            body = self.key_fn(*args, **kwargs)
        else:
            body = self.builder.body_for(args, kwargs)
        return CacheKey(self.cache.namespace, tenant, body)

    def tags(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tag, ...]:
        names: Iterable[str] = self.static_tags
        if self.tags_fn is not None:
            names = (*names, *self.tags_fn(*args, **kwargs))
        return make_tags(self.cache.namespace, tenant, names) if names else ()

    def loader(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any]:
        return functools.partial(self.func, *args, **kwargs)

    def request(
        self,
        tenant: str,
        alias: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loader: Callable[[], Any] | None = None,
    ) -> ReadRequest:
        if alias is not None and _has_containers(args, kwargs):
            # The alias records only top-level argument types: (1,) and (1.0,) are
            # equal tuples but different keys. Such calls are stored by key alone,
            # so the hot path never finds them under a shared alias.
            alias = None
        return self.cache.request(
            self.cache_key(tenant, args, kwargs),
            self.tags(tenant, args, kwargs),
            policy=self.policy,
            function=self.name,
            counters=self.counters_for(tenant),
            loader=loader or self.loader(args, kwargs),
            decode=self.decode,
            alias=alias,
        )

    def key(self, *args: Any, **kwargs: Any) -> CacheKey:
        """The cache key these arguments map to, for the tenant in scope."""
        return self.cache_key(self.tenant(args, kwargs), args, kwargs)

    # -- sync ---------------------------------------------------------------
    def near_expiry(self, tenant: str, alias: Any, args: Any, kwargs: Any, slot: Any) -> Any:
        """An L1 entry inside its XFetch band or past its freshness (sync callers)."""
        now = self.cache.clock()
        if now < slot.entry.fresh_until:
            if xfetch_due(slot.entry, now, self.policy.early_refresh_beta):
                self.cache.spawn_refresh(
                    self.request(tenant, alias, args, kwargs), slot.entry.created_at
                )
            self.counters_for(tenant)[self.hit_index] += 1
            return slot.value
        return self.miss(tenant, alias, args, kwargs)

    def miss(self, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        cache = self.cache
        req = self.request(tenant, alias, args, kwargs)
        cache.notifier()
        position = cache.fast_shared
        if position is not None and not cache.singleflight.in_flight(req.key.full):
            in_memory = None if position == 0 else cache.memory.get_with_lease(req.key, req.tags)  # type: ignore[union-attr]
            if in_memory is None or in_memory[0] is None:
                guard = cache.guards[req.storage[position]]
                layer = guard.layer
                stored = guard.call(
                    "get",
                    self.name,
                    req.counters,
                    lambda: layer.get(req.key),
                    _FAILED,
                    failed=req.failed,
                )
                found = self.shared_hit(req, position, in_memory, stored, False)
                if found is not MISSING:
                    return found
        runner = cache.sync_runner
        return cache.singleflight.do(req.key.full, lambda: runner.run(read_flow(req), req))

    def shared_hit(
        self, req: ReadRequest, position: int, in_memory: Any, stored: Any, asynchronous: bool
    ) -> Any:
        """The shared-layer hit without the flow machinery: the second-hottest path.

        Only a fresh, decodable entry is handled here (the in-process layer, if
        any, was empty and its lease taken before the shared read); anything
        else hands what was read to the flow, which does not read it again.
        """
        cache = self.cache
        if stored is _FAILED:
            return MISSING
        prefetched: dict[int, Any] = {position: (stored, None)}
        if in_memory is not None:
            prefetched[0] = in_memory
        if stored is not None:
            try:
                entry = cache.codec.decode(req.key.full, stored, self.decode)
            except DecodeError:
                del prefetched[position]  # the flow reads it again, counts it and drops it
                entry = None
            now = cache.clock()
            if entry is not None and entry.fresh_until > now:
                counters = req.counters
                counters[cache.storage[position] * FIELDS + HIT] += 1
                if in_memory is not None and cache.memory is not None:
                    counters[cache.storage[0] * FIELDS + MISS] += 1
                    band = entry.compute_time * self.policy.early_refresh_beta * 10
                    if cache.memory.set(
                        req.key,
                        entry,
                        entry,
                        req.tags,
                        in_memory[1],
                        False,
                        req.alias,
                        entry.fresh_until - band,
                    ):
                        counters[cache.storage[0] * FIELDS + SET] += 1
                if xfetch_due(entry, now, self.policy.early_refresh_beta):
                    spawn = cache.spawn_arefresh if asynchronous else cache.spawn_refresh
                    spawn(req, entry.created_at)
                return entry.value
        req.prefetched = prefetched
        return MISSING

    def invalidate(self, *args: Any, **kwargs: Any) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self.tenant(args, kwargs)
        return self.cache.invalidate([self.cache_key(tenant, args, kwargs)], tenant=tenant)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function now and store its result (fills in flight lose to it)."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        self.cache.notifier()
        return self.cache.sync_runner.run(refresh_flow(req, use_lock=False), req)

    def _put_request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ReadRequest:
        tenant = self.tenant(args, kwargs)
        alias: Any = make_alias(self, tenant, args, kwargs)
        try:
            hash(alias)
        except TypeError:
            alias = None
        self.cache.notifier()
        return self.request(tenant, alias, args, kwargs)

    def put(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Store ``value`` as the result for these arguments (every layer, every replica
        drops its copy); fills in flight lose to it. Cache-aside's explicit set."""
        req = self._put_request(args, kwargs)
        self.cache.sync_runner.run(set_flow(req, value), req)

    async def aput(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Async :meth:`put`."""
        req = self._put_request(args, kwargs)
        await self.cache.async_runner.run(set_flow(req, value), req)

    def write(self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any) -> Any:
        reader_args = tuple(key_args(*args, **kwargs)) if key_args else args
        reader_kwargs = {} if key_args else kwargs
        tenant = self.tenant(reader_args, reader_kwargs)
        loader = functools.partial(writer, *args, **kwargs)
        req = self.request(tenant, None, reader_args, reader_kwargs, loader)
        self.cache.notifier()
        return self.cache.sync_runner.run(write_flow(req), req)

    def writer(self, key_args: Callable[..., tuple[Any, ...]] | None = None) -> Any:
        """Write-through: decorate the function that writes the store.

        Its return value becomes this function's cached value for the
        arguments ``key_args(*writer_args, **writer_kwargs)`` returns (default:
        the writer's own arguments). The ordering is explained in
        :mod:`tieredcache.flows`.
        """

        def decorate(func: Callable[..., Any]) -> Any:
            if inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{self.name} is sync; its writer must be sync too")

            @functools.wraps(func)
            def write_through(*args: Any, **kwargs: Any) -> Any:
                return self.write(func, key_args, args, kwargs)

            return write_through

        return decorate

    # -- async ----------------------------------------------------------------
    async def anear_expiry(self, tenant: str, alias: Any, args: Any, kwargs: Any, slot: Any) -> Any:
        """An L1 entry inside its XFetch band or past its freshness (async callers)."""
        now = self.cache.clock()
        if now < slot.entry.fresh_until:
            if xfetch_due(slot.entry, now, self.policy.early_refresh_beta):
                self.cache.spawn_arefresh(
                    self.request(tenant, alias, args, kwargs), slot.entry.created_at
                )
            self.counters_for(tenant)[self.hit_index] += 1
            return slot.value
        return await self.amiss(tenant, alias, args, kwargs)

    async def amiss(
        self, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        cache = self.cache
        req = self.request(tenant, alias, args, kwargs)
        cache.notifier()
        position = cache.fast_shared
        if position is not None and not cache.async_singleflight.in_flight(req.key.full):
            in_memory = None if position == 0 else cache.memory.get_with_lease(req.key, req.tags)  # type: ignore[union-attr]
            if in_memory is None or in_memory[0] is None:
                guard = cache.guards[req.storage[position]]
                layer = guard.layer
                stored = await guard.acall(
                    "get",
                    self.name,
                    req.counters,
                    lambda: layer.aget(req.key),
                    _FAILED,
                    failed=req.failed,
                )
                found = self.shared_hit(req, position, in_memory, stored, True)
                if found is not MISSING:
                    return found
        runner = cache.async_runner
        return await cache.async_singleflight.do(
            req.key.full, lambda: runner.run(read_flow(req), req)
        )

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self.tenant(args, kwargs)
        return await self.cache.ainvalidate([self.cache_key(tenant, args, kwargs)], tenant=tenant)

    async def arefresh(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function now and store its result."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        self.cache.notifier()
        return await self.cache.async_runner.run(refresh_flow(req, use_lock=False), req)

    async def awrite(
        self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any
    ) -> Any:
        reader_args = tuple(key_args(*args, **kwargs)) if key_args else args
        reader_kwargs = {} if key_args else kwargs
        tenant = self.tenant(reader_args, reader_kwargs)
        loader = functools.partial(writer, *args, **kwargs)
        req = self.request(tenant, None, reader_args, reader_kwargs, loader)
        self.cache.notifier()
        return await self.cache.async_runner.run(write_flow(req), req)

    def awriter(self, key_args: Callable[..., tuple[Any, ...]] | None = None) -> Any:
        """Write-through for async code; see :meth:`writer`."""

        def decorate(func: Callable[..., Any]) -> Any:
            if not inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{self.name} is async; its writer must be async too")

            @functools.wraps(func)
            async def write_through(*args: Any, **kwargs: Any) -> Any:
                return await self.awrite(func, key_args, args, kwargs)

            return write_through

        return decorate

    def call_for_tenant(self, tenant: str, *args: Any) -> Any:
        """Call the wrapper with ``tenant`` in scope (read-through ``cache.get``)."""
        if inspect.iscoroutinefunction(self.func):
            raise ConfigurationError(
                f"the read-through loader {self.name} is async: use await cache.aget(...)"
            )
        with tenant_scope(tenant):
            return self.wrapper(*args)

    async def acall_for_tenant(self, tenant: str, *args: Any) -> Any:
        if not inspect.iscoroutinefunction(self.func):
            # A sync loader must not block the event loop: run it on a thread
            # (to_thread copies the context, so the tenant scope goes along).
            return await asyncio.to_thread(self.call_for_tenant, tenant, *args)
        with tenant_scope(tenant):
            return await self.wrapper(*args)

    # -- the wrappers: the hot path ------------------------------------------
    def _attach(self, wrapper: Any, asynchronous: bool) -> Any:
        functools.update_wrapper(wrapper, self.func)
        wrapper.name = self.name
        wrapper.policy = self.policy
        wrapper.key = self.key
        wrapper.invalidate = self.ainvalidate if asynchronous else self.invalidate
        wrapper.refresh = self.arefresh if asynchronous else self.refresh
        wrapper.put = self.aput if asynchronous else self.put
        wrapper.writer = self.awriter if asynchronous else self.writer
        wrapper.cache_impl = self
        self.wrapper = wrapper
        return wrapper

    def _hot_locals(self) -> tuple[Any, ...]:
        memory = self.cache.memory
        if memory is None:
            return None, None
        return memory._fast.get, memory._recent.append

    def sync_wrapper(self) -> Any:
        impl = self
        tenant_var_get = _tenant_var.get
        fast_get, remember = self._hot_locals()
        clock = self.cache.clock
        counters_get = self.counters.get
        hit_index = self.hit_index
        resolve_tenant = self.tenant if self.tenant_param is not None else None
        name = self.name
        near_expiry, miss, counters_for = self.near_expiry, self.miss, self.counters_for

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if resolve_tenant is None:
                tenant = tenant_var_get()
                if tenant is None:
                    raise TenantRequiredError(name)
            else:
                tenant = resolve_tenant(args, kwargs)
            if fast_get is None:
                return miss(tenant, None, args, kwargs)
            # Argument types are part of the alias: 1, 1.0 and True are equal in Python
            # but are different calls (and different keys) here.
            if kwargs:
                alias = make_alias(impl, tenant, args, kwargs)
            elif len(args) == 1:
                alias = (impl, tenant, args, type(args[0]))
            else:
                alias = (impl, tenant, args, *map(type, args))
            try:
                slot = fast_get(alias)
            except TypeError:  # unhashable arguments: the slow path keys by string
                return miss(tenant, None, args, kwargs)
            if slot is None:
                return miss(tenant, alias, args, kwargs)
            if clock() < slot.refresh_at:
                remember(alias)
                counters = counters_get(tenant)
                if counters is None:
                    counters = counters_for(tenant)
                counters[hit_index] += 1
                return slot.value
            return near_expiry(tenant, alias, args, kwargs, slot)

        return self._attach(wrapper, asynchronous=False)

    def async_wrapper(self) -> Any:
        impl = self
        tenant_var_get = _tenant_var.get
        fast_get, remember = self._hot_locals()
        clock = self.cache.clock
        counters_get = self.counters.get
        hit_index = self.hit_index
        resolve_tenant = self.tenant if self.tenant_param is not None else None
        name = self.name
        near_expiry, miss, counters_for = self.anear_expiry, self.amiss, self.counters_for

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if resolve_tenant is None:
                tenant = tenant_var_get()
                if tenant is None:
                    raise TenantRequiredError(name)
            else:
                tenant = resolve_tenant(args, kwargs)
            if fast_get is None:
                return await miss(tenant, None, args, kwargs)
            # Argument types are part of the alias: 1, 1.0 and True are equal in Python
            # but are different calls (and different keys) here.
            if kwargs:
                alias = make_alias(impl, tenant, args, kwargs)
            elif len(args) == 1:
                alias = (impl, tenant, args, type(args[0]))
            else:
                alias = (impl, tenant, args, *map(type, args))
            try:
                slot = fast_get(alias)
            except TypeError:
                return await miss(tenant, None, args, kwargs)
            if slot is None:
                return await miss(tenant, alias, args, kwargs)
            if clock() < slot.refresh_at:
                remember(alias)
                counters = counters_get(tenant)
                if counters is None:
                    counters = counters_for(tenant)
                counters[hit_index] += 1
                return slot.value
            return await near_expiry(tenant, alias, args, kwargs, slot)

        return self._attach(wrapper, asynchronous=True)


def cached_impl(function: Any) -> CachedImpl:
    """The implementation object behind a cached function (for read-through and tools)."""
    impl = getattr(function, "cache_impl", None)
    if not isinstance(impl, CachedImpl):
        raise ConfigurationError(f"{function!r} is not a tieredcache-cached function")
    return impl
