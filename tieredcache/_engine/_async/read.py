"""Reads over N layers: the hit, the miss, the load under the fill lock, the fills.

Written once, as async; ``scripts/unasync.py`` generates ``_sync/read.py``.
What differs between the two (single-flight, timed loads, fill waits,
background work) is in ``_backend_async.py`` / ``_backend_sync.py``.

Orderings that matter, and why:

- Reads walk the storage layers fastest first and back-fill the faster layers
  with what a slower one had. The lease of a faster layer is taken before a
  slower layer is read, so an invalidation that lands in between refuses the
  back-fill.
- Behind an in-process layer, the read of the fill-lock layer (Redis) also
  takes the fill lock and the lease when the key is absent (one round trip
  instead of two); a hit stays lock-free.
- Fills go slowest first (shared layers, then the in-process one). A shared
  layer that refuses a fill because of an invalidation stops the fill: the
  shared layer's generations are the authority on what was invalidated across
  processes.
- While a miss waits for its loader, two frames stay alive (:func:`read` and
  :func:`_miss`) and nothing else the garbage collector has to walk: under a
  burst of misses that is most of what a miss costs (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import time
from typing import Any

from ...entry import Entry
from ...errors import EncodeError
from ...metrics import (
    COALESCED,
    ERROR,
    FIELDS,
    HIT,
    INVALIDATION,
    LEASE_REJECTED,
    LOAD_CALLS,
    LOAD_ERRORS,
    LOAD_TIMEOUTS,
    LOCK_WAITS,
    MISS,
    SET,
    STALE,
)
from .. import _backend_async as backend
from .._singleflight import TAKE_OVER
from ..request import (
    FAILED,
    MISSING,
    SOFT_TIMEOUT,
    ReadRequest,
    Refused,
    count,
    decode_entry,
    fill_token,
    make_entry,
    predates_any_epoch,
    predates_epoch,
    xfetch_band_start,
    xfetch_due,
)
from .calls import shared

__all__ = ["fill", "lookup", "read", "refresh", "store", "unlock"]


async def read(req: ReadRequest) -> Any:
    """A call the hit path could not answer: one load per key per process.

    The first caller of a key leads (runs the read in this coroutine); the
    others wait for its outcome. A follower whose leader's fill was refused by
    an invalidation reads again: it may have arrived after that invalidation.
    """
    req.stack.start(req.counters)
    key = req.key.full
    retried = False
    while True:
        flight, leader = backend.join(req.stack, key, req.tag_names)
        if leader:
            break
        result = await backend.follow(flight)
        if result is TAKE_OVER:
            continue
        if type(result) is Refused:
            if not retried:
                retried = True
                continue
            result = result.value
        req.counters[req.loader_base + COALESCED] += 1
        return result
    try:
        leases: list[Any] = [None] * len(req.stack.storage)
        hit, value = await _walk(req, leases, True)
        if not hit:
            value = await _miss(req, leases, value)
    except BaseException as exc:
        # The lock release is on its way before a follower wakes (one may take over
        # after a cancellation): its read-or-lock then comes after the release.
        backend.release_on_exit(req, unlock)
        backend.settle(req.stack, key, flight, error=exc)
        raise
    backend.settle(req.stack, key, flight, Refused(value) if req.refused else value)
    return value


async def lookup(req: ReadRequest, tags_known: bool = True) -> Any:
    """An explicit read: the value, or MISSING; never loads. ``tags_known=False``:
    the caller does not know the entry's tags (``cache.get(key)``), so an entry
    older than any all-tenant invalidation is not served."""
    req.stack.start(req.counters)
    hit, value = await _walk(req, [None] * len(req.stack.storage), False, not tags_known)
    return value if hit else MISSING


async def _get(req: ReadRequest, position: int) -> tuple[Any, Any]:
    """(what storage layer ``position`` holds, its lease if it comes with the read)."""
    guard = req.stack.storage[position]
    if guard.local:
        got = guard.call(
            "get",
            req.function,
            req.counters,
            guard.layer.get_with_lease,
            FAILED,
            req.failed,
            (req.key, req.tags),
        )
        return (None, None) if got is FAILED else got
    stored = await shared(
        guard, req.function, req.counters, req.failed, "get", guard.layer.aget, (req.key,), None
    )
    return stored, None


async def _get_or_lock(req: ReadRequest, position: int, token: str) -> tuple[Any, Any, Any]:
    """Read the fill-lock layer and, if the key is absent, take the lock and lease in
    the same round trip -> (stored, taken, lease)."""
    guard = req.stack.storage[position]
    req.lock_token = token  # held from the moment the attempt may reach the layer
    got = await shared(
        guard,
        req.function,
        req.counters,
        req.failed,
        "get",
        guard.layer.aget_or_lock_fill,
        (req.key, req.tags, token, req.policy.lock_ttl),
        FAILED,
    )
    if got is FAILED:
        req.lock_token = None
        return None, None, None
    req.lock_token = token if got[1] else None
    return got  # type: ignore[no-any-return]


async def _walk(
    req: ReadRequest, leases: list[Any], fuse: bool, untagged: bool = False
) -> tuple[bool, Any]:
    """Read the layers fastest first -> (True, value) on a fresh hit, else (False, the
    freshest stale entry met or None). ``fuse``: the fill-lock layer's read also
    tries the lock when the key is absent there. ``untagged``: the request does not
    know the entry's tags (see :func:`lookup`)."""
    stack = req.stack
    now = stack.clock()
    stale: Entry | None = None
    last = len(stack.storage) - 1
    fused = stack.fused if fuse and req.policy.lock else None
    for position in range(last + 1):
        if position == fused and stale is None:  # (a stale entry may be served: no lock)
            token = fill_token()
            stored, taken, lease = await _get_or_lock(req, position, token)
            if stored is None:
                req.prelock = (token, taken, lease)
        else:
            stored, leases[position] = await _get(req, position)
        entry = None if stored is None else decode_entry(req, position, stored)
        if stored is not None and entry is None:
            # Undecodable or tampered: an error, a miss, and gone. (Shared layers take
            # their lease later, so the generation this delete bumps is included.)
            count(req, position, ERROR)
            await _delete(req, position, force=False)
        if (
            entry is not None
            and stack.epochs
            and (predates_any_epoch(req, entry) if untagged else predates_epoch(req, entry))
        ):
            entry = None  # its load began before an all-tenant invalidation of a tag
        if entry is not None and entry.fresh_until > now:
            count(req, position, HIT)
            req.answered, req.answered_entry = position, entry
            await _backfill(req, entry, leases, position)
            if xfetch_due(entry, now, req.policy.early_refresh_beta):
                backend.spawn_refresh(req, refresh, entry.created_at)
            return True, entry.value
        count(req, position, MISS)
        if (
            entry is not None
            and entry.stale_until > now
            and (stale is None or entry.fresh_until > stale.fresh_until)
        ):
            stale = entry
            req.stale_position = position  # where a stale hit is counted
        if position < last and leases[position] is None:
            # A layer that a slower one may back-fill: its lease must predate that
            # slower read. (In-process layers took theirs with the read.)
            leases[position] = await _lease(req, position)
    return False, stale


async def _miss(req: ReadRequest, leases: list[Any], stale: Entry | None) -> Any:
    """No layer had a fresh entry: serve ``stale`` while it is refreshed, or load under
    the fill lock and fill every layer; serve stale if the load fails (fail-safe)."""
    stack, policy = req.stack, req.policy
    if stale is not None:
        if stack.clock() < stale.fresh_until + policy.stale_while_revalidate:
            backend.spawn_refresh(req, refresh, stale.created_at)
            return _serve_stale(req, stale)
        if req.key.full in stack.background.pending:
            # A load that outlived its soft timeout is still running: serve stale
            # until it lands rather than start another one.
            return _serve_stale(req, stale)
    token: str | None = None
    lock = stack.lock
    if lock is not None and policy.lock:
        if req.prelock is not None:  # tried with the read
            (token, got, lease), req.prelock = req.prelock, None
        else:
            token = fill_token()
            got, lease = await _lock(req, token)
        if got is False:
            req.counters[req.loader_base + LOCK_WAITS] += 1
            got, lease, found = await _wait_for_fill(req, leases, token)
            if found is not MISSING:
                return found
            if got is False and stale is not None:
                return _serve_stale(req, stale)
        if got:
            leases[lock] = lease
        else:
            token = None  # the lock layer failed or the wait ran out: load without it
    await _missing_leases(req, leases)
    soft = policy.soft_timeout if stale is not None else None
    start = time.perf_counter()
    try:
        loaded = await _start_load(req, soft, leases, token)
    except Exception as exc:
        if token is not None:
            await _unlock(req, token)
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        if stale is not None and stale.stale_until > stack.clock():
            await _throttle(req, stale, leases)
            return _serve_stale(req, stale)
        raise
    if loaded is SOFT_TIMEOUT:
        req.counters[req.loader_base + LOAD_TIMEOUTS] += 1
        assert stale is not None  # a soft timeout is only set with a stale entry
        return _serve_stale(req, stale)
    await fill(req, loaded, time.perf_counter() - start, leases, token)
    return loaded


def _serve_stale(req: ReadRequest, stale: Entry) -> Any:
    count(req, req.stale_position, STALE)
    req.answered, req.answered_entry = req.stale_position, stale
    return stale.value


def _start_load(req: ReadRequest, soft: float | None, leases: list[Any], token: str | None) -> Any:
    """The loader's awaitable: the loader's own when untimed (no frame of ours kept
    alive while it runs), else the backend's timed load, which gives the value or
    SOFT_TIMEOUT (the load goes on, and fills the layers when it lands)."""
    req.counters[req.loader_base + LOAD_CALLS] += 1
    hard = req.policy.hard_timeout
    if soft is None and hard is None:
        return req.loader()
    return backend.load(req, soft, hard, fill, unlock, leases, token)


async def _wait_for_fill(req: ReadRequest, leases: list[Any], token: str) -> tuple[Any, Any, Any]:
    """The fill lock is held elsewhere: wait for its fill (woken by its release) ->
    (taken, lease, value found or MISSING). Each wake-up reads and, if the key is
    still absent, locks in one step: a lock taken after a separate read could
    follow the holder's fill, and load again."""
    stack, policy = req.stack, req.policy
    position = stack.lock
    assert position is not None
    guard = stack.storage[position]
    deadline = stack.clock() + policy.lock_wait
    got: Any = False
    lease: Any = None
    while got is False:
        remaining = deadline - stack.clock()
        if remaining <= 0:
            break
        await backend.wait_fill(req, guard, remaining)
        stored, got, lease = await _get_or_lock(req, position, token)
        if stored is None:
            continue
        entry = decode_entry(req, position, stored)
        if entry is not None and entry.fresh_until > stack.clock():
            count(req, position, HIT)
            req.answered, req.answered_entry = position, entry
            await _backfill(req, entry, leases, position)
            return got, lease, entry.value
        got, lease = await _lock(req, token)
    return got, lease, MISSING


async def _lock(req: ReadRequest, token: str) -> tuple[Any, Any]:
    """Try the fill lock -> (taken: True, False if held elsewhere, None if the layer
    failed; the lease that comes with it)."""
    guard = req.stack.lock_guard
    assert guard is not None
    req.lock_token = token
    got = await shared(
        guard,
        req.function,
        req.counters,
        req.failed,
        "lock",
        guard.layer.aacquire_fill_lock,
        (req.key, req.tags, token, req.policy.lock_ttl),
        FAILED,
    )
    if got is FAILED:
        req.lock_token = None
        return None, None
    req.lock_token = token if got[0] else None
    return got  # type: ignore[no-any-return]


async def _unlock(req: ReadRequest, token: str) -> None:
    """Release the fill lock this read holds (skipped if the layer failed it already)."""
    await unlock(req, token, req.failed)
    req.lock_token = None


async def unlock(req: ReadRequest, token: str, failed: set[int] | None = None) -> None:
    """Release a fill lock by its token: compare-and-delete, so harmless if it is gone
    already. Without ``failed``, also for a call that ended early (cancelled, a late
    load that failed) whose layer failures no longer matter."""
    guard = req.stack.lock_guard
    if guard is not None:
        await shared(
            guard,
            req.function,
            req.counters,
            failed,
            "unlock",
            guard.layer.arelease_fill_lock,
            (req.key, token),
            None,
        )


async def _lease(req: ReadRequest, position: int) -> Any:
    guard = req.stack.storage[position]
    if guard.local:
        got = guard.call(
            "lease",
            req.function,
            req.counters,
            guard.layer.get_with_lease,
            FAILED,
            req.failed,
            (req.key, req.tags),
        )
        return None if got is FAILED else got[1]
    return await shared(
        guard,
        req.function,
        req.counters,
        req.failed,
        "lease",
        guard.layer.alease,
        (req.key, req.tags),
        None,
    )


async def _missing_leases(req: ReadRequest, leases: list[Any]) -> None:
    """Take the leases not taken yet (shared layers without the fill lock)."""
    for position in range(len(leases)):
        if leases[position] is None:
            leases[position] = await _lease(req, position)


async def _delete(req: ReadRequest, position: int, force: bool) -> None:
    """Drop the request's key from one storage layer. ``force``: even if that layer
    failed this request already (a write must not leave the old value behind)."""
    guard = req.stack.storage[position]
    failed = None if force else req.failed
    if guard.local:
        guard.call(
            "delete", req.function, req.counters, guard.layer.delete, None, failed, ([req.key],)
        )
    else:
        await shared(
            guard,
            req.function,
            req.counters,
            failed,
            "delete",
            guard.layer.adelete,
            ([req.key],),
            None,
        )
    req.counters[guard.index * FIELDS + INVALIDATION] += 1


async def _set(
    req: ReadRequest,
    position: int,
    stored: Any,
    entry: Entry,
    lease: Any,
    bump: bool,
    unlock_token: str | None,
) -> Any:
    """Store in one layer -> True, False (refused by its lease) or None (failed, or
    an in-process layer that is suspended: not a refusal, which would count as a lease
    overtaken and make a write drop the key everywhere)."""
    guard = req.stack.storage[position]
    if guard.local:
        if getattr(guard.layer, "suspended", False):
            return None
        band = xfetch_band_start(entry, req.policy.early_refresh_beta)
        args: tuple[Any, ...] = (req.key, entry, entry, req.tags, lease, bump, req.alias, band)
        accepted = guard.call(
            "set", req.function, req.counters, guard.layer.set, None, req.failed, args
        )
    else:
        if unlock_token is None:  # only the fill-lock layer takes an unlock
            args = (req.key, stored, entry, req.tags, lease, bump)
        else:
            args = (req.key, stored, entry, req.tags, lease, bump, unlock_token)
        accepted = await shared(
            guard, req.function, req.counters, req.failed, "set", guard.layer.aset, args, None
        )
        if unlock_token is not None and accepted is not None:
            req.lock_token = None  # released with the fill, accepted or refused
    if accepted:
        req.counters[guard.index * FIELDS + SET] += 1
    elif accepted is False:
        req.counters[req.loader_base + LEASE_REJECTED] += 1
        # Refused by a shared layer: another process invalidated the key while this
        # load ran, and callers that joined the load may have come after that (a
        # local invalidation detaches the load from later callers itself).
        req.refused = req.refused or not guard.local
    return accepted


async def _backfill(req: ReadRequest, entry: Entry, leases: list[Any], found_at: int) -> None:
    """Copy an entry found at ``found_at`` into the faster layers (with their leases)."""
    payload: bytes | None = None
    storage = req.stack.storage
    for position in range(found_at - 1, -1, -1):
        if storage[position].local:
            stored: Any = entry
        else:
            if leases[position] is None:
                continue  # no lease from before the slower read: never back-fill blind
            if payload is None:
                payload = req.stack.codec.encode(req.key.full, entry)
            stored = payload
        if await _set(req, position, stored, entry, leases[position], False, None) is False:
            return


async def fill(
    req: ReadRequest, value: Any, seconds: float, leases: list[Any], token: str | None
) -> None:
    """Store a loaded value slowest layer first, then release the fill lock."""
    entry = make_entry(req.policy, value, req.stack.clock(), seconds)
    released = False
    if entry is not None:
        _, released, _ = await store(req, entry, leases, bump=False, unlock_token=token)
    if token is not None and not released and req.stack.lock is not None:
        await _unlock(req, token)


async def store(
    req: ReadRequest,
    entry: Entry,
    leases: list[Any],
    *,
    bump: bool,
    unlock_token: str | None = None,
    conditional: bool = True,
) -> tuple[bool, bool, list[int]]:
    """Set ``entry`` in every storage layer, slowest first -> (not refused by a lease,
    fill lock released, positions that did not confirm the set).

    ``conditional``: a layer without a lease is skipped rather than written blind
    (its lease could not be taken, so a stale fill could not be refused); an
    explicit set writes unconditionally. ``unlock_token`` releases the fill lock
    with the fill-lock layer's set.
    """
    payload: bytes | None = None
    encodable = True
    released = False
    unconfirmed: list[int] = []
    stack = req.stack
    for position in range(len(stack.storage) - 1, -1, -1):
        if conditional and leases[position] is None:
            continue
        if stack.storage[position].local:
            stored: Any = entry
        else:
            if not encodable:
                continue
            if payload is None:
                try:
                    payload = stack.codec.encode(req.key.full, entry)
                except EncodeError:
                    # The value cannot be shared; it still serves this process.
                    encodable = False
                    count(req, position, ERROR)
                    continue
            stored = payload
        release = unlock_token if position == stack.lock else None
        accepted = await _set(req, position, stored, entry, leases[position], bump, release)
        if release is not None and accepted is not None:
            released = True
        if accepted is False:
            return False, released, unconfirmed
        if accepted is None:
            unconfirmed.append(position)
    return True, released, unconfirmed


async def _throttle(req: ReadRequest, stale: Entry, leases: list[Any]) -> None:
    """After a failed load, re-store the stale value as fresh for a short while, so a
    failing origin is retried at that pace rather than on every call."""
    now = req.stack.clock()
    until = now + req.policy.fail_safe_throttle
    throttled = Entry(
        stale.value, stale.created_at, until, max(stale.stale_until, until), stale.compute_time
    )
    await store(req, throttled, leases, bump=False)


async def refresh(req: ReadRequest, use_lock: bool = True, seen: float | None = None) -> Any:
    """Recompute now, leases taken first.

    Background refreshes (stale-while-revalidate, XFetch) take the fill lock
    without waiting, so one process cluster-wide recomputes, and they first
    look whether a layer already holds a fresh entry newer than ``seen`` (the
    one that prompted them: another replica refreshed it meanwhile); then they
    only back-fill. An explicit refresh (``use_lock=False``) always recomputes.
    """
    stack = req.stack
    stack.start(req.counters)
    leases: list[Any] = [None] * len(stack.storage)
    now = stack.clock()
    for position in range(len(stack.storage)):
        stored, leases[position] = await _get(req, position)
        if seen is None or stored is None:
            continue
        entry = decode_entry(req, position, stored)
        if entry is not None and entry.created_at > seen and entry.fresh_until > now:
            await _backfill(req, entry, leases, position)
            return entry.value
    token: str | None = None
    if use_lock and stack.lock is not None and req.policy.lock:
        token = fill_token()
        got, lease = await _lock(req, token)
        if got is False:
            return None  # another process is refreshing this key right now
        if got:
            leases[stack.lock] = lease
        else:
            token = None
    await _missing_leases(req, leases)
    start = time.perf_counter()
    try:
        value = await _start_load(req, None, leases, token)
    except Exception as exc:
        if token is not None:
            await _unlock(req, token)
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        raise
    await fill(req, value, time.perf_counter() - start, leases, token)
    return value
