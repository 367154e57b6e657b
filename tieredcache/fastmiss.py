"""The async miss of the usual layer stack, in one coroutine.

What :func:`~tieredcache.flows.read.read_flow` does, run by the async runner,
for its most common case: layers [in-process, Redis], the Redis read fused
with the fill lock, the lock on, no hard loader timeout; the key absent from
the in-process layer, and either fresh in Redis or absent there with the fill
lock taken. That is a shared hit, or a load and its fills.

Why a second path: under a burst of misses, every object a miss keeps alive
while its loader runs is walked by each garbage collection that happens
meanwhile, and the collections themselves come sooner the more objects misses
allocate. The generic path keeps the runner, two flow generators, the
single-flight and their operation objects alive per miss; this one keeps two
frames (the single-flight's and the read's). In the Zipf benchmark (1,000
callers, 0.1 s loader; benchmarks/RESULTS.md) the run went from 7.4 s to 6.4 s
with this and fewer coroutine layers around the Redis calls.

It is the same algorithm, step for step, with the same metrics, breakers and
layer calls; every other case (a stale or undecodable entry, the lock held
elsewhere, a failing Redis) hands over to the generic flow at the point where
the two part, with the reads made so far. ``tests/test_fastmiss.py`` checks
the two paths against each other.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .errors import BackendError, EncodeError
from .flows import (
    Delete,
    Flow,
    ReadRequest,
    make_entry,
    unlock_flow,
    xfetch_band_start,
    xfetch_due,
)
from .flows.ops import count, decode_entry
from .flows.read import fill_token, load_and_fill, read_after_miss
from .metrics import (
    ERROR,
    FIELDS,
    HIT,
    LEASE_REJECTED,
    LOAD_CALLS,
    LOAD_ERRORS,
    LOAD_TIMEOUTS,
    MISS,
    SET,
)

if TYPE_CHECKING:
    from .cache import TieredCache

__all__ = ["eligible", "fast_miss"]

_FAILED: Any = object()  # a layer call that failed or was skipped


def eligible(cache: TieredCache) -> bool:
    """Whether ``cache``'s layers are the ones this path is written for."""
    return (
        len(cache.storage) == 2
        and cache.stores_objects == [True, False]
        and cache.lock_layer == cache.storage[1]
        and cache.fused_read == 1
    )


async def fast_miss(cache: TieredCache, req: ReadRequest, tags: tuple[str, ...]) -> Any:
    """``req``'s read, one load per key per event loop (the single-flight's leader
    runs here inline; a caller that finds a load in flight joins it)."""
    single = cache.async_singleflight
    flights = single.flights()
    full = req.key.full
    if full in flights.calls:
        return await single.do(full, cache.async_runner.read, tags, req)
    future = flights.lead(full, tags)
    try:
        result = await _read(cache, req)
    except BaseException as exc:
        # The lock release is on its way before a waiter wakes (one may take over if
        # this was a cancellation): its read-or-lock then follows it, as with the runner.
        _release_if_held(cache, req)
        flights.settle(full, future, error=exc)
        raise
    flights.settle(full, future, result)
    return result


def _release_if_held(cache: TieredCache, req: ReadRequest) -> None:
    # As the runner does for a flow interrupted while holding the fill lock (a flow
    # handed over to the runner has released it already: the token is cleared then).
    if req.lock_token is not None:
        cache.background.arun(unlock_flow(req), req)
        req.lock_token = None


def _read(cache: TieredCache, req: ReadRequest) -> Coroutine[Any, Any, Any]:
    """The in-process read, then the shared read-or-lock (a coroutine only from there)."""
    now = req.clock()  # as _walk(): freshness is judged as of before the reads
    memory_guard = cache.guards[req.storage[0]]
    got = memory_guard.call(
        "get",
        req.function,
        req.counters,
        memory_guard.layer.get_with_lease,
        _FAILED,
        req.failed,
        (req.key, req.tags),
    )
    if got is _FAILED or got[0] is not None:
        # The in-process layer failed, or holds an entry (stale: the hot path saw it,
        # or filled meanwhile): the generic flow takes it from this read, not another.
        req.prefetched = {0: (None, None) if got is _FAILED else got}
        return cache.async_runner.read(req)
    count(req, 0, MISS)
    return _shared_then_load(cache, req, got[1], now)


async def _shared_then_load(
    cache: TieredCache, req: ReadRequest, memory_lease: Any, now: float
) -> Any:
    """The shared read-or-lock; on a miss with the lock taken, the load (awaited in this
    frame: the one this path keeps alive while the loader runs) and the fills."""
    guard = cache.guards[req.storage[1]]
    token = fill_token()
    failed = req.failed
    stored = taken = lease = None
    if not guard.skips(failed):
        req.lock_token = token  # held from the moment the attempt may reach Redis
        start = time.perf_counter()
        try:
            stored, taken, lease = await guard.layer.aget_or_lock_fill(
                req.key, req.tags, token, req.policy.lock_ttl
            )
        except BackendError as exc:
            guard.errored("get", req.counters, failed, exc)
        else:
            guard.succeeded(req.function, "get", start)
        req.lock_token = token if taken else None
    runner = cache.async_runner
    if stored is not None:
        entry = decode_entry(req, 1, stored)
        if entry is None:  # undecodable or tampered: an error, a miss, and gone
            count(req, 1, ERROR)
            return await runner.run(_drop_then_load(req, [memory_lease, None]), req)
        if entry.fresh_until > now:
            count(req, 1, HIT)
            _set_memory(cache, req, entry, memory_lease)
            if xfetch_due(entry, now, req.policy.early_refresh_beta):
                cache.background.spawn_arefresh(req, entry.created_at)
            return entry.value
        count(req, 1, MISS)
        stale = None
        if entry.stale_until > now:
            stale, req.stale_position = entry, 1
        return await runner.run(read_after_miss(req, [memory_lease, None], stale), req)
    count(req, 1, MISS)
    if not taken:  # held elsewhere (wait for it), or Redis failed (load without it)
        req.prelock = (token, taken, lease)
        return await runner.run(read_after_miss(req, [memory_lease, None], None), req)
    req.counters[req.loader_base + LOAD_CALLS] += 1
    start = time.perf_counter()
    try:
        value = await req.loader()
    except Exception as exc:
        await _unlock(cache, req, token)
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        raise
    seconds = time.perf_counter() - start
    return await _fill(cache, req, value, seconds, (memory_lease, lease), token)


def _drop_then_load(req: ReadRequest, leases: list[Any]) -> Flow:
    yield Delete(1)
    count(req, 1, MISS)
    return (yield from load_and_fill(req, leases, None))


def _set_memory(cache: TieredCache, req: ReadRequest, entry: Any, lease: Any) -> None:
    """The in-process set of a fill or back-fill, counted as the runner's Set is."""
    guard = cache.guards[req.storage[0]]
    refresh_at = xfetch_band_start(entry, req.policy.early_refresh_beta)
    args = (req.key, entry, entry, req.tags, lease, False, req.alias, refresh_at)
    accepted = guard.call(
        "set", req.function, req.counters, guard.layer.set, None, req.failed, args
    )
    if accepted:
        req.counters[guard.index * FIELDS + SET] += 1
    elif accepted is False:
        req.counters[req.loader_base + LEASE_REJECTED] += 1


async def _fill(
    cache: TieredCache,
    req: ReadRequest,
    value: Any,
    seconds: float,
    leases: tuple[Any, Any],
    token: str,
) -> Any:
    """What fill_flow() and store() do: the shared layer first (a refused shared fill
    fills nothing), then the in-process one, then release the lock if still held."""
    entry = make_entry(req.policy, value, req.clock(), seconds)
    released = False
    if entry is not None:
        guard = cache.guards[req.storage[1]]
        try:
            payload: bytes | None = req.codec.encode(req.key.full, entry)
        except EncodeError:  # the value cannot be shared; it still serves this process
            count(req, 1, ERROR)
            payload = None
        if payload is not None:
            accepted = None
            failed = req.failed
            if not guard.skips(failed):
                begun = time.perf_counter()
                try:
                    accepted = await guard.layer.aset(
                        req.key, payload, entry, req.tags, leases[1], False, token
                    )
                except BackendError as exc:
                    guard.errored("set", req.counters, failed, exc)
                else:
                    guard.succeeded(req.function, "set", begun)
            if accepted:
                req.counters[guard.index * FIELDS + SET] += 1
            if accepted is not None:
                released = True
                req.lock_token = None
            if accepted is False:
                req.counters[req.loader_base + LEASE_REJECTED] += 1
                return value
        _set_memory(cache, req, entry, leases[0])
    if not released:
        await _unlock(cache, req, token)
    return value


async def _unlock(cache: TieredCache, req: ReadRequest, token: str) -> None:
    assert req.lock_layer is not None
    guard = cache.guards[req.lock_layer]
    layer = guard.layer
    await guard.acall(
        "unlock",
        req.function,
        req.counters,
        lambda: layer.arelease_fill_lock(req.key, token),
        None,
        req.failed,
    )
    req.lock_token = None
