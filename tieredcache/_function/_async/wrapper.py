"""The wrapper of a cached function: the in-process hit, then the engine.

The in-process hit is the hottest path of the library, so the wrapper is a
closure written out by hand with everything it needs bound as locals: one
ContextVar read, one tuple, one dict lookup (no lock, see
:mod:`tieredcache.layers.memory`), one clock read, one append to the recency
buffer and one counter increment; no generator, no await on a hit, no method
binding. Anything else (a miss, an entry near expiry, arguments without an
alias) goes to the engine's :func:`~tieredcache._engine._async.read.read`.

As cachetools does, the wrapper is chosen whole at decoration time: the general
one, or, for ``f(x)`` with its tenant from the scope (most cached functions), one
with those choices made, which takes its argument by unpacking instead of
measuring ``args`` (~10% of a hit, benchmarks/RESULTS.md).

Written once, as async; ``scripts/unasync.py`` generates ``_sync/wrapper.py``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ..._engine import _backend_async as backend
from ..._engine._async.read import read, refresh
from ..._engine.request import xfetch_due
from ...errors import TenantRequiredError
from ...tenancy import get_tenant_var
from .._alias import make_alias

if TYPE_CHECKING:
    from ..impl import CachedImpl

__all__ = ["wrap"]

_tenant_var = get_tenant_var()


def miss(
    impl: CachedImpl, tenant: str, alias: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Not (fresh) in the in-process layer: the engine's read. A plain function that
    hands back the engine's coroutine: no frame of its own stays alive while it runs."""
    return read(impl.request(tenant, alias, args, kwargs))


async def near_expiry(
    impl: CachedImpl, tenant: str, alias: Any, args: Any, kwargs: Any, slot: Any
) -> Any:
    """An in-process entry inside its XFetch band or past its freshness."""
    entry = slot.entry
    now = impl.stack.clock()
    if now < entry.fresh_until:
        if xfetch_due(entry, now, impl.policy.early_refresh_beta):
            req = impl.request(tenant, alias, args, kwargs)
            backend.spawn_refresh(req, refresh, entry.created_at)
        impl.counters_for(tenant)[impl.hit_index] += 1
        return slot.value
    return await miss(impl, tenant, alias, args, kwargs)


def wrap(impl: CachedImpl) -> Any:
    """The wrapper of ``impl``'s function."""
    tenant_var_get = _tenant_var.get
    fast_get, remember = impl.hit_lookup()
    alias_id = impl.alias_id
    clock = impl.stack.clock
    counters_get = impl.counters.get
    counters_for = impl.counters_for
    hit_index = impl.hit_index
    resolve_tenant = impl.tenant if impl.tenant_param is not None else None
    name = impl.name
    dropped, dropped_names = impl.alias_dropped
    plain = impl.alias_plain
    near_expiry_ = functools.partial(near_expiry, impl)
    miss_ = functools.partial(miss, impl)

    async def one_argument(*args: Any, **kwargs: Any) -> Any:
        """``wrapper`` for ``impl.one_argument``: tenant from the scope, plain alias."""
        tenant = tenant_var_get()
        if tenant is None:
            raise TenantRequiredError(name)
        if kwargs:
            alias = make_alias(alias_id, tenant, args, kwargs, dropped, dropped_names)
            if alias is None:
                return await miss_(tenant, None, args, kwargs)
        else:
            try:
                (arg,) = args
            except ValueError:  # a wrong call: the miss raises the signature's TypeError
                return await miss_(tenant, None, args, kwargs)
            alias = (alias_id, tenant, arg, type(arg))
        try:
            slot = fast_get(alias)
        except TypeError:  # unhashable arguments: looked up by their key
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

    if impl.one_argument:
        return impl.attach(one_argument)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if resolve_tenant is None:
            tenant = tenant_var_get()
            if tenant is None:
                raise TenantRequiredError(name)
        else:
            tenant = resolve_tenant(args, kwargs)
        # Argument types are part of the alias: 1, 1.0 and True are equal in Python
        # but are different calls (and different keys) here. Whether the arguments
        # may have an alias at all is checked when an entry is stored under one (see
        # tieredcache._function._alias): a lookup never finds another call's entry.
        if kwargs or not plain:
            alias = make_alias(alias_id, tenant, args, kwargs, dropped, dropped_names)
            if alias is None:
                return await miss_(tenant, None, args, kwargs)
        elif len(args) == 1:
            # Flat: the arguments tuple itself is not kept alive by the entry (48 B).
            arg = args[0]
            alias = (alias_id, tenant, arg, type(arg))
        else:
            alias = (alias_id, tenant, *args, *map(type, args))
        try:
            slot = fast_get(alias)
        except TypeError:  # unhashable arguments: looked up by their key
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

    return impl.attach(wrapper)
