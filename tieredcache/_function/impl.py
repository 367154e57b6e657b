"""One cached function: its keys, tags, requests and explicit operations.

Everything about a cached function but its wrapper (``_async/wrapper.py``):
how a call becomes a :class:`~tieredcache._engine.request.ReadRequest` for the
engine, and ``invalidate``/``refresh``/``put``/``writer``, which call the
engine's sync or async functions directly. It receives the layer stack, never
the cache facade.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import typing
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .._engine import _async as engine_async
from .._engine import _sync as engine_sync
from .._engine.request import ReadRequest
from .._engine.result import InvalidationResult
from .._engine.stack import LayerStack
from ..errors import ConfigurationError, TenantRequiredError
from ..keys import CacheKey, FunctionKeyBuilder, Tag, make_tags
from ..metrics import FIELDS, HIT
from ..policy import Policy
from ..tags import TagTemplate
from ..tenancy import get_tenant_var, tenant_scope, validate_tenant
from ._alias import aliasable, make_alias

__all__ = ["CachedImpl", "cached_impl"]

_alias_ids = itertools.count()
_tenant_var = get_tenant_var()


def _never_called(alias: Hashable) -> None:
    raise AssertionError("no in-process layer: nothing is ever found to note")


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
        stack: LayerStack,
        policy: Policy,
        func: Callable[..., Any],
        *,
        tags: Callable[..., Iterable[str]] | Iterable[str | TagTemplate] | None,
        key: Callable[..., str] | None,
        name: str | None,
        version: int | str,
        ignore: Iterable[str],
        tenant_param: str | None,
    ) -> None:
        self.stack = stack
        self.policy = policy
        self.func = func
        self.name = name or f"{func.__module__}.{func.__qualname__}"
        # First item of this function's in-process aliases: a string, so an alias of
        # plain arguments holds no object the garbage collector has to track.
        self.alias_id = f"{self.name}#{next(_alias_ids)}"
        self.builder = FunctionKeyBuilder(
            func,
            name=self.name,
            version=version,
            ignore=ignore,
            tenant_param=tenant_param,
            key=key,
        )
        self.tenant_param = self.builder.tenant_param
        params = list(inspect.signature(func).parameters.values())
        # Arguments left out of the key are left out of the hit path's alias too (not
        # the tenant parameter: a string, and part of every alias anyway).
        names = [p.name for p in params]
        tenant_position = names.index(self.tenant_param) if self.tenant_param in names else None
        tenant_names = {self.tenant_param} if self.tenant_param else set()
        self.alias_dropped: tuple[frozenset[int], frozenset[str]] = (
            frozenset(i for i in self.builder._ignored_positions if i != tenant_position),
            frozenset(self.builder._ignore - tenant_names),
        )
        self.alias_plain = not any(self.alias_dropped)
        # f(x): one positional parameter, no default, no *args, the tenant from the
        # scope. Its wrapper takes the argument by unpacking (see _function/wrapper).
        self.one_argument = (
            self.alias_plain
            and self.tenant_param is None
            and len(params) == 1
            and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)
            and params[0].default is params[0].empty
        )
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
        listed = tuple(tags) if tags is not None and not callable(tags) else ()
        # Tag templates (the same objects the CDC rules and the HTTP routes use) are
        # rendered from the call's bound arguments; plain names are used as they are.
        self.static_tags = tuple(t for t in listed if not isinstance(t, TagTemplate))
        self.tag_templates = tuple(t for t in listed if isinstance(t, TagTemplate))
        for template in self.tag_templates:
            template.check_fields(inspect.signature(func).parameters, where=f"{self.name}()")
        self.decode = stack.codec.serializer.decoder(_return_type(func))
        # Counters per tenant, looked up by the hit path; bounded like the metrics'
        # tenant labels (a tenant-id flood must not grow it without limit).
        self.counters: dict[str, list[int]] = {}
        self._max_counters = stack.metrics.max_tenants + 1
        self.hit_index = stack.storage[0].index * FIELDS + HIT
        self.wrapper: Any = None  # set by attach()

    def hit_lookup(self) -> tuple[Callable[[Hashable], Any], Callable[[Hashable], None]]:
        """The hit path's lookup and recency note (an always-missing lookup without an
        in-process layer: no branch for that case on the hit path)."""
        memory = self.stack.memory
        if memory is None:
            empty: dict[Hashable, Any] = {}
            return empty.get, _never_called
        return memory.hit_lookup()

    def attach(self, wrapper: Any) -> Any:
        """Give ``wrapper`` the function's metadata and helpers."""
        asynchronous = inspect.iscoroutinefunction(wrapper)
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
            counters = self.stack.metrics.counters(self.name, tenant)
            if len(self.counters) < self._max_counters:
                self.counters[tenant] = counters
        return counters

    def cache_key(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CacheKey:
        return CacheKey(self.stack.namespace, tenant, self.builder.body_for(args, kwargs))

    def tags(self, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tag, ...]:
        names: Iterable[str] = self.static_tags
        if self.tag_templates:
            bound = self.builder.bind(args, kwargs).arguments
            names = (*names, *(template.render(bound) for template in self.tag_templates))
        if self.tags_fn is not None:
            names = (*names, *self.tags_fn(*args, **kwargs))
        return make_tags(self.stack.namespace, tenant, names) if names else ()

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
        if alias is not None and self.alias_plain and not kwargs and not aliasable(args):
            alias = None  # stored by key alone (see tieredcache._function._alias)
        return ReadRequest(
            self.stack,
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
        key = self.cache_key(tenant, args, kwargs)
        return engine_sync.invalidate(self.stack, [key], (), self.counters_for(tenant))

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> InvalidationResult:
        """Async :meth:`invalidate`."""
        tenant = self.tenant(args, kwargs)
        key = self.cache_key(tenant, args, kwargs)
        return await engine_async.invalidate(self.stack, [key], (), self.counters_for(tenant))

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function now and store its result (fills in flight lose to it)."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        try:
            return engine_sync.refresh(req, False)
        finally:
            self.stack.forget([req.key], req.tags)

    async def arefresh(self, *args: Any, **kwargs: Any) -> Any:
        """Async :meth:`refresh`."""
        req = self.request(self.tenant(args, kwargs), None, args, kwargs)
        try:
            return await engine_async.refresh(req, False)
        finally:
            self.stack.forget([req.key], req.tags)

    def _put_request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ReadRequest:
        tenant = self.tenant(args, kwargs)
        dropped, dropped_names = self.alias_dropped
        alias = make_alias(self.alias_id, tenant, args, kwargs, dropped, dropped_names)
        return self.request(tenant, alias, args, kwargs)

    def put(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Store ``value`` as the result for these arguments (every layer, every replica
        drops its copy); fills in flight lose to it. Cache-aside's explicit set."""
        req = self._put_request(args, kwargs)
        try:
            engine_sync.put(req, value)
        finally:
            self.stack.forget([req.key], req.tags)

    async def aput(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Async :meth:`put`."""
        req = self._put_request(args, kwargs)
        try:
            await engine_async.put(req, value)
        finally:
            self.stack.forget([req.key], req.tags)

    def _write_request(
        self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any
    ) -> ReadRequest:
        reader_args = tuple(key_args(*args, **kwargs)) if key_args else args
        reader_kwargs = {} if key_args else kwargs
        tenant = self.tenant(reader_args, reader_kwargs)
        loader = functools.partial(writer, *args, **kwargs)
        return self.request(tenant, None, reader_args, reader_kwargs, loader)

    def write(self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any) -> Any:
        req = self._write_request(writer, key_args, args, kwargs)
        try:
            return engine_sync.write(req)
        finally:
            self.stack.forget([req.key], req.tags)

    async def awrite(
        self, writer: Callable[..., Any], key_args: Any, args: Any, kwargs: Any
    ) -> Any:
        req = self._write_request(writer, key_args, args, kwargs)
        try:
            return await engine_async.write(req)
        finally:
            self.stack.forget([req.key], req.tags)

    def writer(self, key_args: Callable[..., tuple[Any, ...]] | None = None) -> Any:
        """Write-through: decorate the function that writes the store.

        Its return value becomes this function's cached value for the
        arguments ``key_args(*writer_args, **writer_kwargs)`` returns (default:
        the writer's own arguments). The ordering is explained in
        :mod:`tieredcache._engine._async.write`.
        """

        def decorate(func: Callable[..., Any]) -> Any:
            if inspect.iscoroutinefunction(func):
                raise ConfigurationError(f"{self.name} is sync; its writer must be sync too")

            @functools.wraps(func)
            def write_through(*args: Any, **kwargs: Any) -> Any:
                return self.write(func, key_args, args, kwargs)

            return write_through

        return decorate

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
