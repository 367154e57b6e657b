"""The hot path: the wrapper closures and what they call on a miss.

The in-process hit is the hottest path of the library, so the wrapper is a
closure written out by hand with everything it needs bound as locals: one
ContextVar read, one tuple, one dict lookup (no lock, see
:mod:`tieredcache.layers.memory`), one clock read, one append to the recency
buffer and one counter increment; no generator, no await on a hit, no method
binding. A miss first tries the shared layer directly (the second-hottest
path, :func:`shared_hit`), then builds a :class:`~tieredcache.flows.ReadRequest`
and hands it to a runner under single-flight. Every function here takes the
:class:`~tieredcache.cached.CachedImpl` of the cached function it serves.
"""

from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .errors import DecodeError, TenantRequiredError
from .fastmiss import fast_miss
from .flows import MISSING, ReadRequest, read_flow, xfetch_band_start, xfetch_due
from .metrics import FIELDS, HIT, MISS, SET
from .tenancy import get_tenant_var

if TYPE_CHECKING:
    from .cache import TieredCache
    from .cached import CachedImpl

_tenant_var = get_tenant_var()
_FAILED: Any = object()


def make_alias(
    impl: CachedImpl, tenant: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """The in-process lookup key of a call; the wrappers inline the same expressions."""
    if kwargs:
        named = tuple(sorted((k, v, type(v)) for k, v in kwargs.items()))
        return (impl.alias_id, tenant, args, *map(type, args), named)
    if len(args) == 1:
        return (impl.alias_id, tenant, args, type(args[0]))
    return (impl.alias_id, tenant, args, *map(type, args))


_CONTAINERS = (tuple, frozenset)


def has_containers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call has tuple or frozenset arguments: equal containers can hold
    unequal keys ((1,) and (1.0,)), which top-level argument types do not tell."""
    return any(isinstance(a, _CONTAINERS) for a in args) or any(
        isinstance(v, _CONTAINERS) for v in kwargs.values()
    )


# -- sync misses -----------------------------------------------------------
def near_expiry(
    impl: CachedImpl, tenant: str, alias: Any, args: Any, kwargs: Any, slot: Any
) -> Any:
    """An L1 entry inside its XFetch band or past its freshness (sync callers)."""
    now = impl.cache.clock()
    if now < slot.entry.fresh_until:
        if xfetch_due(slot.entry, now, impl.policy.early_refresh_beta):
            impl.cache.background.spawn_refresh(
                impl.request(tenant, alias, args, kwargs), slot.entry.created_at
            )
        impl.counters_for(tenant)[impl.hit_index] += 1
        return slot.value
    return miss(impl, tenant, alias, args, kwargs)


def miss(
    impl: CachedImpl, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Not (fresh) in the in-process layer: the shared layer, then the read flow."""
    cache = impl.cache
    req = impl.request(tenant, alias, args, kwargs)
    cache.notifier()
    target = shortcut(impl, req, cache.singleflight.in_flight(req.key.full))
    if target is not None:
        position, guard, in_memory = target
        layer = guard.layer
        stored = guard.call(
            "get", impl.name, req.counters, lambda: layer.get(req.key), _FAILED, req.failed
        )
        found = shared_hit(impl, req, position, in_memory, stored, False)
        if found is not MISSING:
            return found
    runner = cache.sync_runner
    tags = tuple(tag.full for tag in req.tags) if req.tags else ()
    return cache.singleflight.do(req.key.full, lambda: runner.run(read_flow(req), req), tags)


def shortcut(impl: CachedImpl, req: ReadRequest, in_flight: bool) -> tuple[int, Any, Any] | None:
    """Whether a miss may read the shared layer directly: (its position, its guard,
    the in-process read with its lease) or None. Not while a load of the key is in
    flight here (its followers wait for it), nor if the in-process layer holds a
    stale entry (the flow decides what to do with it)."""
    cache = impl.cache
    position = cache.fast_shared
    if position is None or in_flight:
        return None
    if cache.fused_read is not None and impl.policy.lock:
        return None  # the flow reads it, with the fill lock on a miss
    in_memory = None
    if position != 0 and cache.memory is not None:
        in_memory = cache.memory.get_with_lease(req.key, req.tags)
        if in_memory[0] is not None:
            return None
    return position, cache.guards[req.storage[position]], in_memory


def shared_hit(
    impl: CachedImpl,
    req: ReadRequest,
    position: int,
    in_memory: Any,
    stored: Any,
    asynchronous: bool,
) -> Any:
    """The shared-layer hit without the flow machinery: the second-hottest path.

    Only a fresh, decodable entry is handled here (the in-process layer, if
    any, was empty and its lease taken before the shared read); anything
    else hands what was read to the flow, which does not read it again.
    """
    cache = impl.cache
    if stored is _FAILED:
        return MISSING
    prefetched: dict[int, Any] = {position: (stored, None)}
    if in_memory is not None:
        prefetched[0] = in_memory
    if stored is not None:
        try:
            entry = cache.codec.decode(req.key.full, stored, impl.decode)
        except DecodeError:
            del prefetched[position]  # the flow reads it again, counts it and drops it
            entry = None
        now = cache.clock()
        if entry is not None and entry.fresh_until > now:
            counters = req.counters
            counters[cache.storage[position] * FIELDS + HIT] += 1
            if in_memory is not None and cache.memory is not None:
                counters[cache.storage[0] * FIELDS + MISS] += 1
                if cache.memory.set(
                    req.key,
                    entry,
                    entry,
                    req.tags,
                    in_memory[1],
                    False,
                    req.alias,
                    xfetch_band_start(entry, impl.policy.early_refresh_beta),
                ):
                    counters[cache.storage[0] * FIELDS + SET] += 1
            if xfetch_due(entry, now, impl.policy.early_refresh_beta):
                spawn = (
                    cache.background.spawn_arefresh
                    if asynchronous
                    else cache.background.spawn_refresh
                )
                spawn(req, entry.created_at)
            return entry.value
    req.prefetched = prefetched
    return MISSING


# -- async ----------------------------------------------------------------
async def anear_expiry(
    impl: CachedImpl, tenant: str, alias: Any, args: Any, kwargs: Any, slot: Any
) -> Any:
    """An L1 entry inside its XFetch band or past its freshness (async callers)."""
    now = impl.cache.clock()
    if now < slot.entry.fresh_until:
        if xfetch_due(slot.entry, now, impl.policy.early_refresh_beta):
            impl.cache.background.spawn_arefresh(
                impl.request(tenant, alias, args, kwargs), slot.entry.created_at
            )
        impl.counters_for(tenant)[impl.hit_index] += 1
        return slot.value
    return await amiss(impl, tenant, alias, args, kwargs)


def amiss(
    impl: CachedImpl, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Coroutine[Any, Any, Any]:
    """The read of an L1 miss, as a coroutine for the wrapper to await.

    A plain function: without the shared-hit shortcut it hands back the
    single-flight's coroutine itself, so no frame of its own stays alive (for the
    collector to walk) while the load runs.
    """
    cache = impl.cache
    req = impl.request(tenant, alias, args, kwargs)
    cache.notifier()
    target = shortcut(impl, req, cache.async_singleflight.in_flight(req.key.full))
    if target is not None:
        return _ashared_then_load(impl, req, target)
    return _aload(cache, req)


async def _ashared_then_load(impl: CachedImpl, req: ReadRequest, target: Any) -> Any:
    position, guard, in_memory = target
    layer = guard.layer
    stored = await guard.acall(
        "get", impl.name, req.counters, lambda: layer.aget(req.key), _FAILED, req.failed
    )
    found = shared_hit(impl, req, position, in_memory, stored, True)
    if found is not MISSING:
        return found
    return await _aload(impl.cache, req)


def _aload(cache: TieredCache, req: ReadRequest) -> Coroutine[Any, Any, Any]:
    tags = tuple(tag.full for tag in req.tags) if req.tags else ()
    policy = req.policy
    if cache.fast_miss and policy.lock and policy.hard_timeout is None:
        return fast_miss(cache, req, tags)
    return cache.async_singleflight.do(req.key.full, cache.async_runner.read, tags, req)


# -- the wrappers: the hot path ------------------------------------------
def attach(impl: CachedImpl, wrapper: Any, asynchronous: bool) -> Any:
    functools.update_wrapper(wrapper, impl.func)
    wrapper.name = impl.name
    wrapper.policy = impl.policy
    wrapper.key = impl.key
    wrapper.invalidate = impl.ainvalidate if asynchronous else impl.invalidate
    wrapper.refresh = impl.arefresh if asynchronous else impl.refresh
    wrapper.put = impl.aput if asynchronous else impl.put
    wrapper.writer = impl.awriter if asynchronous else impl.writer
    wrapper.cache_impl = impl
    impl.wrapper = wrapper
    return wrapper


def hot_locals(impl: CachedImpl) -> tuple[Any, ...]:
    memory = impl.cache.memory
    if memory is None:  # every lookup misses: no branch for this case on the hot path
        return {}.get, None
    return memory._fast.get, memory._recent.append


def sync_wrapper(impl: CachedImpl) -> Any:
    tenant_var_get = _tenant_var.get
    fast_get, remember = hot_locals(impl)
    alias_id = impl.alias_id
    clock = impl.cache.clock
    counters_get = impl.counters.get
    hit_index = impl.hit_index
    resolve_tenant = impl.tenant if impl.tenant_param is not None else None
    name = impl.name
    near_expiry_, miss_, counters_for = (
        functools.partial(near_expiry, impl),
        functools.partial(miss, impl),
        impl.counters_for,
    )

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if resolve_tenant is None:
            tenant = tenant_var_get()
            if tenant is None:
                raise TenantRequiredError(name)
        else:
            tenant = resolve_tenant(args, kwargs)
        # Argument types are part of the alias: 1, 1.0 and True are equal in Python
        # but are different calls (and different keys) here.
        if kwargs:
            alias = make_alias(impl, tenant, args, kwargs)
        elif len(args) == 1:
            alias = (alias_id, tenant, args, type(args[0]))
        else:
            alias = (alias_id, tenant, args, *map(type, args))
        try:
            slot = fast_get(alias)
        except TypeError:  # unhashable arguments: the slow path keys by string
            return miss_(tenant, None, args, kwargs)
        if slot is None:
            return miss_(tenant, alias, args, kwargs)
        if clock() < slot.refresh_at:
            remember(alias)
            counters = counters_get(tenant)
            if counters is None:
                counters = counters_for(tenant)
            counters[hit_index] += 1
            return slot.value
        return near_expiry_(tenant, alias, args, kwargs, slot)

    return attach(impl, wrapper, asynchronous=False)


def async_wrapper(impl: CachedImpl) -> Any:
    tenant_var_get = _tenant_var.get
    fast_get, remember = hot_locals(impl)
    alias_id = impl.alias_id
    clock = impl.cache.clock
    counters_get = impl.counters.get
    hit_index = impl.hit_index
    resolve_tenant = impl.tenant if impl.tenant_param is not None else None
    name = impl.name
    near_expiry_, miss_, counters_for = (
        functools.partial(anear_expiry, impl),
        functools.partial(amiss, impl),
        impl.counters_for,
    )

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if resolve_tenant is None:
            tenant = tenant_var_get()
            if tenant is None:
                raise TenantRequiredError(name)
        else:
            tenant = resolve_tenant(args, kwargs)
        # Argument types are part of the alias: 1, 1.0 and True are equal in Python
        # but are different calls (and different keys) here.
        if kwargs:
            alias = make_alias(impl, tenant, args, kwargs)
        elif len(args) == 1:
            alias = (alias_id, tenant, args, type(args[0]))
        else:
            alias = (alias_id, tenant, args, *map(type, args))
        try:
            slot = fast_get(alias)
        except TypeError:
            return await miss_(tenant, None, args, kwargs)
        if slot is None:
            return await miss_(tenant, alias, args, kwargs)
        if clock() < slot.refresh_at:
            remember(alias)
            counters = counters_get(tenant)
            if counters is None:
                counters = counters_for(tenant)
            counters[hit_index] += 1
            return slot.value
        return await near_expiry_(tenant, alias, args, kwargs, slot)

    return attach(impl, wrapper, asynchronous=True)
