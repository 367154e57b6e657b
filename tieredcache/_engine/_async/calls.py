"""The one guarded call on a shared or invalidation-only layer.

Every awaited layer call of the engine goes through :func:`shared`: the
breaker decides whether it is tried at all, a :class:`~tieredcache.errors.BackendError`
becomes ``default`` (counted, logged, the breaker told, the layer skipped for
the rest of the request), latency is recorded, and a call that ends any other
way (a cancellation) still settles a breaker probe it carried. In-process
layers do no I/O and are called through :meth:`LayerGuard.call` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ...errors import BackendError
from ..stack import LayerGuard

__all__ = ["shared"]


async def shared(
    guard: LayerGuard,
    function: str,
    counters: list[int] | None,
    failed: set[int] | None,
    operation: str,
    method: Callable[..., Any],
    args: tuple[Any, ...],
    default: Any,
    errors: list[BaseException | None] | None = None,
) -> Any:
    """``await method(*args)`` on ``guard``'s layer, or ``default`` if it fails or is
    skipped. ``failed``: the request's positions that failed it already. ``errors``
    receives the exception of a failed call (None if it was not tried)."""
    ticket = guard.admit(failed)
    if ticket is None:
        if errors is not None:
            errors.append(None)
        return default
    start = time.perf_counter()
    try:
        result = await method(*args)
    except BackendError as exc:
        guard.errored(operation, counters, failed, exc, ticket)
        if errors is not None:
            errors.append(exc)
        return default
    except BaseException:
        guard.abandoned(ticket)  # a cancelled call still settles a breaker probe
        raise
    guard.succeeded(function, operation, start, ticket)
    return result
