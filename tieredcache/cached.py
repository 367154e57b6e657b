"""One cached function's keys, requests and explicit operations (everything but the
hot path, which lives in :mod:`tieredcache.hotpath`)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, TenantRequiredError
from .flows import ReadRequest, refresh_flow, set_flow, write_flow
from .hotpath import _tenant_var, has_containers, make_alias
from .keys import CacheKey, FunctionKeyBuilder, Tag, make_tags
from .metrics import FIELDS, HIT
from .tenancy import tenant_scope, validate_tenant

if TYPE_CHECKING:
    from .cache import InvalidationResult, TieredCache
    from .policy import Policy

__all__ = ["CachedImpl", "cached_impl"]

_alias_ids = itertools.count()


def _return_type(func: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: decode into plain types
        return Any
    return hints.get("return", Any)


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
        # First item of this function's in-process aliases: a string, so an alias of
        # plain arguments holds no object the garbage collector has to track.
        self.alias_id = f"{self.name}#{next(_alias_ids)}"
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
        self.wrapper: Any = None  # set by tieredcache.hotpath.attach

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
        if alias is not None and has_containers(args, kwargs):
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

    def invalidate(self, *args: Any, **kwargs: Any) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self.tenant(args, kwargs)
        return self.cache.invalidate([self.cache_key(tenant, args, kwargs)], tenant=tenant)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function now and store its result (fills in flight lose to it)."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        self.cache.notifier()
        try:
            return self.cache.sync_runner.run(refresh_flow(req, use_lock=False), req)
        finally:
            self.cache.forget_in_flight([req.key], req.tags)

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
        self.cache.forget_in_flight([req.key], req.tags)

    async def aput(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Async :meth:`put`."""
        req = self._put_request(args, kwargs)
        await self.cache.async_runner.run(set_flow(req, value), req)
        self.cache.forget_in_flight([req.key], req.tags)

    def write(self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any) -> Any:
        reader_args = tuple(key_args(*args, **kwargs)) if key_args else args
        reader_kwargs = {} if key_args else kwargs
        tenant = self.tenant(reader_args, reader_kwargs)
        loader = functools.partial(writer, *args, **kwargs)
        req = self.request(tenant, None, reader_args, reader_kwargs, loader)
        self.cache.notifier()
        try:
            return self.cache.sync_runner.run(write_flow(req), req)
        finally:
            self.cache.forget_in_flight([req.key], req.tags)

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

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> InvalidationResult:
        """Drop the entry for these arguments from every layer and replica."""
        tenant = self.tenant(args, kwargs)
        return await self.cache.ainvalidate([self.cache_key(tenant, args, kwargs)], tenant=tenant)

    async def arefresh(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function now and store its result."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        self.cache.notifier()
        try:
            return await self.cache.async_runner.run(refresh_flow(req, use_lock=False), req)
        finally:
            self.cache.forget_in_flight([req.key], req.tags)

    async def awrite(
        self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any
    ) -> Any:
        reader_args = tuple(key_args(*args, **kwargs)) if key_args else args
        reader_kwargs = {} if key_args else kwargs
        tenant = self.tenant(reader_args, reader_kwargs)
        loader = functools.partial(writer, *args, **kwargs)
        req = self.request(tenant, None, reader_args, reader_kwargs, loader)
        self.cache.notifier()
        try:
            return await self.cache.async_runner.run(write_flow(req), req)
        finally:
            self.cache.forget_in_flight([req.key], req.tags)

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


def cached_impl(function: Any) -> CachedImpl:
    """The implementation object behind a cached function (for read-through and tools)."""
    impl = getattr(function, "cache_impl", None)
    if not isinstance(impl, CachedImpl):
        raise ConfigurationError(f"{function!r} is not a tieredcache-cached function")
    return impl
