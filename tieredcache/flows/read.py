"""Reads: walk the layers, load once under the fill lock, fill every layer."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ..entry import Entry
from ..errors import EncodeError
from ..metrics import (
    ERROR,
    HIT,
    LEASE_REJECTED,
    LOAD_ERRORS,
    LOAD_TIMEOUTS,
    LOCK_WAITS,
    MISS,
    STALE,
)
from .ops import (
    MISSING,
    SOFT_TIMEOUT,
    Delete,
    Flow,
    Get,
    GetOrLock,
    Lease,
    Load,
    Lock,
    Op,
    Pending,
    ReadRequest,
    Refresh,
    Set,
    Unlock,
    WaitFill,
    count,
    decode_entry,
    make_entry,
    xfetch_due,
)

# Fill-lock owner tokens: unique, not secret (a token only lets its holder release
# its own lock). A random per-process prefix and a counter cost a fraction of a
# urandom call; a forked child draws a new prefix.
_token_prefix = secrets.token_hex(8)
_token_counter = itertools.count()


def _new_token_prefix() -> None:
    global _token_prefix, _token_counter
    _token_prefix = secrets.token_hex(8)
    _token_counter = itertools.count()


os.register_at_fork(after_in_child=_new_token_prefix)


def fill_token() -> str:
    """A fill-lock owner token no other caller, thread or process holds."""
    return f"{_token_prefix}{next(_token_counter):x}"


def _walk(
    req: ReadRequest, leases: list[Any], fuse: bool = False
) -> Generator[Op, Any, tuple[bool, Any]]:
    """Read the layers fastest first -> (True, value) on a fresh hit, else (False, stale).

    ``fuse``: the read of the lock layer also tries the fill lock when the key is
    absent there (one round trip instead of two on a miss; a hit stays lock-free).
    """
    now = req.clock()
    stale: Entry | None = None
    last = len(req.storage) - 1
    fused = req.fused_read if fuse and req.policy.lock else None
    for position in range(len(req.storage)):
        if position == fused and stale is None:  # (a stale entry may be served: no lock)
            token = fill_token()
            stored, taken, lease = yield GetOrLock(position, token, req.policy.lock_ttl)
            if stored is None:
                req.prelock = (token, taken, lease)
        else:
            stored, leases[position] = yield Get(position)
        entry = None if stored is None else decode_entry(req, position, stored)
        if stored is not None and entry is None:
            # Undecodable or tampered: an error, a miss, and gone. (Shared layers take
            # their lease later, so the generation this delete bumps is included.)
            count(req, position, ERROR)
            yield Delete(position)
        if entry is not None and entry.fresh_until > now:
            count(req, position, HIT)
            yield from _backfill(req, entry, leases, position)
            if xfetch_due(entry, now, req.policy.early_refresh_beta):
                yield Refresh(entry.created_at)
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
            # A shared layer that a slower one may back-fill: its lease must predate
            # that slower read. (The usual [memory, redis] never gets here.)
            leases[position] = yield Lease(position)
    return False, stale


def lookup_flow(req: ReadRequest) -> Flow:
    """Explicit cache-aside read: the value, or MISSING; never loads."""
    hit, result = yield from _walk(req, [None] * len(req.storage))
    return result if hit else MISSING


def read_flow(req: ReadRequest) -> Flow:
    """Cache-aside / read-through read: layers, then a single load, then fills."""
    leases: list[Any] = [None] * len(req.storage)
    hit, result = yield from _walk(req, leases, fuse=True)
    if hit:
        return result
    return (yield from read_after_miss(req, leases, result))


def read_after_miss(req: ReadRequest, leases: list[Any], stale: Entry | None) -> Flow:
    """A read once no layer had a fresh entry: serve ``stale`` (the freshest stale
    entry met, if any) while it is refreshed, or load under the fill lock."""
    if stale is not None:
        if req.clock() < stale.fresh_until + req.policy.stale_while_revalidate:
            count(req, req.stale_position, STALE)
            yield Refresh(stale.created_at)
            return stale.value
        if (yield Pending()):
            # A load that outlived its soft timeout is still running: serve stale
            # until it lands rather than start another one.
            count(req, req.stale_position, STALE)
            return stale.value
    return (yield from load_and_fill(req, leases, stale))


def _backfill(req: ReadRequest, entry: Entry, leases: list[Any], found_at: int) -> Flow:
    stored_bytes: bytes | None = None
    for position in range(found_at - 1, -1, -1):
        if req.stores_objects[position]:
            stored: Any = entry
        else:
            if leases[position] is None:
                continue  # no lease from before the slower read: never back-fill blind
            if stored_bytes is None:
                stored_bytes = req.codec.encode(req.key.full, entry)
            stored = stored_bytes
        accepted = yield Set(position, stored, entry, leases[position])
        if accepted is False:
            req.counters[req.loader_base + LEASE_REJECTED] += 1
            return


def _late_fill(
    req: ReadRequest, leases: list[Any], token: str | None
) -> Callable[[Any, float], Flow]:
    def late(value: Any, seconds: float) -> Flow:
        return fill_flow(req, value, seconds, leases, token)

    return late


def load_and_fill(req: ReadRequest, leases: list[Any], stale: Entry | None) -> Flow:
    """Load under the fill lock (if any), then fill every layer; fail-safe on errors."""
    policy = req.policy
    token: str | None = None
    lock_layer = req.lock_layer
    if lock_layer is not None and policy.lock:
        position = req.storage.index(lock_layer)
        if req.prelock is not None:  # tried with the read (GetOrLock)
            (token, got, lease), req.prelock = req.prelock, None
        else:
            token = fill_token()
            got, lease = yield Lock(lock_layer, token, policy.lock_ttl)
        if got is False:
            req.counters[req.loader_base + LOCK_WAITS] += 1
            deadline = req.clock() + policy.lock_wait
            while got is False:
                remaining = deadline - req.clock()
                if remaining <= 0:
                    break
                yield WaitFill(lock_layer, remaining)
                # Read and, if still absent, lock in one step: a lock taken after a
                # separate read could follow the holder's fill, and load again.
                stored, got, lease = yield GetOrLock(position, token, policy.lock_ttl)
                if stored is None:
                    continue
                entry = decode_entry(req, position, stored)
                if entry is not None and entry.fresh_until > req.clock():
                    count(req, position, HIT)
                    yield from _backfill(req, entry, leases, position)
                    return entry.value
                got, lease = yield Lock(lock_layer, token, policy.lock_ttl)
            if got is False and stale is not None:
                count(req, req.stale_position, STALE)
                return stale.value
        if got:
            leases[position] = lease
        else:
            token = None  # the lock layer failed or the wait ran out: load without it
    yield from missing_leases(req, leases)

    soft = policy.soft_timeout if stale is not None else None

    # The fill of a load that outlives its soft timeout; none without a soft timeout
    # (a closure per miss would only keep objects alive for the collector to walk).
    late = None if soft is None else _late_fill(req, leases, token)
    try:
        loaded = yield Load(soft, policy.hard_timeout, late)
    except Exception as exc:
        if token is not None:
            yield Unlock(lock_layer, token)  # type: ignore[arg-type]
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        if stale is not None and stale.stale_until > req.clock():
            yield from _throttle(req, stale, leases)
            count(req, req.stale_position, STALE)
            return stale.value
        raise
    if loaded is SOFT_TIMEOUT:
        req.counters[req.loader_base + LOAD_TIMEOUTS] += 1
        count(req, req.stale_position, STALE)
        return stale.value  # type: ignore[union-attr]
    value, seconds = loaded
    yield from fill_flow(req, value, seconds, leases, token)
    return value


def fill_flow(
    req: ReadRequest, value: Any, seconds: float, leases: list[Any], token: str | None
) -> Flow:
    """Store a loaded value slowest layer first, then release the fill lock."""
    entry = make_entry(req.policy, value, req.clock(), seconds)
    released = False
    if entry is not None:
        _, released, _ = yield from store(req, entry, leases, bump=False, unlock=token)
    if token is not None and not released and req.lock_layer is not None:
        yield Unlock(req.lock_layer, token)


def missing_leases(req: ReadRequest, leases: list[Any]) -> Flow:
    """Take the leases not taken yet (shared layers without the fill lock)."""
    for position in range(len(req.storage)):
        if leases[position] is None:
            leases[position] = yield Lease(position)


def store(
    req: ReadRequest,
    entry: Entry,
    leases: Sequence[Any],
    *,
    bump: bool,
    unlock: str | None = None,
    conditional: bool = True,
) -> Generator[Op, Any, tuple[bool, bool, list[int]]]:
    """Set ``entry`` in every storage layer, slowest first.

    Returns (not refused by a lease, fill lock released, positions of the layers
    that failed to confirm the set). ``conditional``: a shared
    layer without a lease is skipped rather than written blind (its lease could
    not be taken, so a stale fill could not be refused); ``set_flow`` writes
    unconditionally. ``unlock`` releases the fill lock with the lock layer's set.
    """
    stored_bytes: bytes | None = None
    encodable = True
    released = False
    unconfirmed: list[int] = []
    for position in range(len(req.storage) - 1, -1, -1):
        if req.stores_objects[position]:
            stored: Any = entry
        else:
            if not encodable or (conditional and leases[position] is None):
                continue
            if stored_bytes is None:
                try:
                    stored_bytes = req.codec.encode(req.key.full, entry)
                except EncodeError:
                    # The value cannot be shared; it still serves this process.
                    encodable = False
                    count(req, position, ERROR)
                    continue
            stored = stored_bytes
        release = unlock if unlock and req.storage[position] == req.lock_layer else None
        accepted = yield Set(position, stored, entry, leases[position], bump, release)
        if release is not None and accepted is not None:
            released = True
        if accepted is False:
            req.counters[req.loader_base + LEASE_REJECTED] += 1
            return False, released, unconfirmed
        if accepted is None:
            unconfirmed.append(position)
    return True, released, unconfirmed


def _throttle(req: ReadRequest, stale: Entry, leases: list[Any]) -> Flow:
    """After a failed load, re-store the stale value as fresh for a short while."""
    now = req.clock()
    until = now + req.policy.fail_safe_throttle
    throttled = Entry(
        stale.value, stale.created_at, until, max(stale.stale_until, until), stale.compute_time
    )
    yield from store(req, throttled, leases, bump=False)


def refresh_flow(req: ReadRequest, use_lock: bool = True, seen: float | None = None) -> Flow:
    """Recompute now, leases taken first.

    Background refreshes (stale-while-revalidate, XFetch) take the fill lock
    without waiting, so one process cluster-wide recomputes, and they first
    look whether a layer already holds a fresh entry newer than ``seen`` (the
    one that prompted them: another replica refreshed it meanwhile); then they
    only back-fill. An explicit refresh (``use_lock=False``) always recomputes.
    """
    leases: list[Any] = [None] * len(req.storage)
    now = req.clock()
    for position in range(len(req.storage)):
        stored, leases[position] = yield Get(position)
        if seen is None or stored is None:
            continue
        entry = decode_entry(req, position, stored)
        if entry is not None and entry.created_at > seen and entry.fresh_until > now:
            yield from _backfill(req, entry, leases, position)
            return entry.value
    token: str | None = None
    if use_lock and req.lock_layer is not None and req.policy.lock:
        token = fill_token()
        got, lease = yield Lock(req.lock_layer, token, req.policy.lock_ttl)
        if got is False:
            return None  # another process is refreshing this key right now
        if got:
            leases[req.storage.index(req.lock_layer)] = lease
        else:
            token = None
    yield from missing_leases(req, leases)
    try:
        loaded = yield Load(None, req.policy.hard_timeout)
    except Exception as exc:
        if token is not None:
            yield Unlock(req.lock_layer, token)  # type: ignore[arg-type]
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        raise
    value, seconds = loaded
    yield from fill_flow(req, value, seconds, leases, token)
    return value
