"""One call on one layer: the guard that wraps it and what each operation calls.

:class:`LayerGuard` applies a layer's circuit breaker, counts its errors and
latency, and turns a failing layer into a default result, so a flow never sees
a backend error. :func:`layer_call` maps a flow operation (``Get``, ``Set``,
``Lock``...) to the layer method and arguments that carry it out; the sync and
async runners (:mod:`tieredcache.runners`) differ only in whether they await it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .breaker import CircuitBreaker
from .errors import BackendError
from .flows import (
    MISSING,
    Delete,
    Get,
    GetOrLock,
    Lease,
    Lock,
    ReadRequest,
    Set,
    Unlock,
    xfetch_band_start,
)
from .layers.memory import MemoryLayer
from .metrics import ERROR, FIELDS, INVALIDATION, SET, Metrics

if TYPE_CHECKING:
    from .cache import TieredCache

__all__ = ["LOCKING", "LayerCall", "LayerGuard", "layer_call", "prefetched", "settle"]

log = logging.getLogger("tieredcache")
T = TypeVar("T")


class LayerGuard:
    """One layer with its breaker: failures are counted and become the default result."""

    __slots__ = ("breaker", "index", "layer", "local", "metrics", "name")

    def __init__(
        self, layer: Any, index: int, metrics: Metrics, breaker: CircuitBreaker | None
    ) -> None:
        self.layer = layer
        self.index = index
        self.name: str = layer.name
        self.metrics = metrics
        self.breaker = breaker
        # In-process layers do no I/O: async runners call their sync methods.
        self.local = isinstance(layer, MemoryLayer)

    def skips(self, failed: set[int] | None) -> bool:
        """Whether a call is not even tried: breaker open, or failed earlier in the request."""
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            return True
        return failed is not None and self.index in failed

    def succeeded(self, function: str, operation: str, start: float) -> None:
        self.metrics.histogram(self.name, function, operation).observe(time.perf_counter() - start)
        if self.breaker is not None:
            self.breaker.success()

    def errored(
        self,
        operation: str,
        counters: list[int] | None,
        failed: set[int] | None,
        exc: BaseException,
    ) -> None:
        self._failed(operation, counters, exc)
        if failed is not None:
            failed.add(self.index)

    def _failed(self, operation: str, counters: list[int] | None, exc: BaseException) -> None:
        if self.breaker is not None:
            self.breaker.failure()
        if counters is not None:
            counters[self.index * FIELDS + ERROR] += 1
        log.warning("tieredcache layer %s %s failed: %s", self.name, operation, exc)

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
        """``fn(*args)``, or ``default`` if the layer fails or is skipped. ``failed``:
        the request's set of layers that already failed it; a layer that failed once
        is skipped for the rest of the request (one timeout, not one per operation)."""
        if self.skips(failed):
            return default
        start = time.perf_counter()
        try:
            result = fn(*args)
        except BackendError as exc:
            self.errored(operation, counters, failed, exc)
            return default
        self.succeeded(function, operation, start)
        return result

    async def acall(
        self,
        operation: str,
        function: str,
        counters: list[int] | None,
        fn: Callable[[], Any],
        default: Any,
        failed: set[int] | None = None,
    ) -> Any:
        if self.skips(failed):
            return default
        start = time.perf_counter()
        try:
            result = await fn()
        except BackendError as exc:
            self.errored(operation, counters, failed, exc)
            return default
        self.succeeded(function, operation, start)
        return result


def _set_args(guard: LayerGuard, req: ReadRequest, op: Set) -> tuple[Any, ...]:
    if guard.local:
        entry = op.entry
        refresh_at = xfetch_band_start(entry, req.policy.early_refresh_beta)
        return (req.key, op.stored, entry, req.tags, op.lease, op.bump, req.alias, refresh_at)
    if op.unlock is not None:  # only ever the lock layer, a RedisLayer
        return (req.key, op.stored, op.entry, req.tags, op.lease, op.bump, op.unlock)
    return (req.key, op.stored, op.entry, req.tags, op.lease, op.bump)


# (guard, operation name, method, its arguments, result if it fails, whether the
# method's result is a shared read to pair with a None lease). Methods and argument
# tuples rather than closures: a miss keeps fewer objects alive while it waits.
LayerCall = tuple[LayerGuard, str, Callable[..., Any], tuple[Any, ...], Any, bool]


def layer_call(cache: TieredCache, op: Any, req: ReadRequest, prefix: str) -> LayerCall | None:
    """For an operation on one layer, what to call and how (see ``LayerCall``).

    ``prefix`` is "" for the sync methods and "a" for their async twins; the
    runners differ only in whether they await the call. In-process layers
    (``guard.local``) are always called through their sync methods.
    """
    kind = type(op)
    if kind is Lock or kind is Unlock:
        guard = cache.guards[op.layer]
    elif kind in _STORAGE_OPS:
        guard = cache.guards[req.storage[op.layer]]
    else:
        return None
    layer = guard.layer
    if guard.local:
        prefix = ""
    if kind is Get:
        if req.stores_objects[op.layer]:  # in-process layers read with their (free) lease
            method = getattr(layer, prefix + "get_with_lease")
            return guard, "get", method, (req.key, req.tags), (None, None), False
        # shared layers with a plain get; their lease comes later
        return guard, "get", getattr(layer, prefix + "get"), (req.key,), (None, None), True
    if kind is GetOrLock:
        method = getattr(layer, prefix + "get_or_lock_fill")
        return (
            guard,
            "get",
            method,
            (req.key, req.tags, op.token, op.ttl),
            (None, None, None),
            False,
        )
    if kind is Set:
        return guard, "set", getattr(layer, prefix + "set"), _set_args(guard, req, op), None, False
    if kind is Lease:
        return guard, "lease", getattr(layer, prefix + "lease"), (req.key, req.tags), None, False
    if kind is Delete:
        return guard, "delete", getattr(layer, prefix + "delete"), ([req.key],), None, False
    if kind is Lock:
        method = getattr(layer, prefix + "acquire_fill_lock")
        return guard, "lock", method, (req.key, req.tags, op.token, op.ttl), (None, None), False
    method = getattr(layer, prefix + "release_fill_lock")
    return guard, "unlock", method, (req.key, op.token), None, False


_STORAGE_OPS = (Get, GetOrLock, Set, Lease, Delete)
LOCKING = (Lock, GetOrLock)  # operations that may take the fill lock


def settle(op: Any, req: ReadRequest, guard: LayerGuard, result: Any) -> Any:
    """Count what a layer call did; the flow gets ``result``."""
    kind = type(op)
    if kind is Set:
        if result:
            req.counters[guard.index * FIELDS + SET] += 1
        if op.unlock is not None and result is not None:
            req.lock_token = None
    elif kind is Lock:
        req.lock_token = op.token if result[0] else None
    elif kind is GetOrLock:
        req.lock_token = op.token if result[1] else None
    elif kind is Unlock:
        req.lock_token = None
    elif kind is Delete:
        req.counters[guard.index * FIELDS + INVALIDATION] += 1
        return None
    return result


def prefetched(op: Any, req: ReadRequest) -> Any:
    """A read the shared-hit shortcut already made for this flow, or MISSING."""
    if type(op) is Get and req.prefetched and op.layer in req.prefetched:
        return req.prefetched.pop(op.layer)
    return MISSING
