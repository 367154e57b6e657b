"""The caching strategies as sans-I/O generators, written once for sync and async.

A flow yields operations (``Get``, ``Set``, ``Load``, ...) and receives their
results; :mod:`tieredcache.runners` executes them with blocking or awaitable
I/O (the pattern of httpx's ``Auth.auth_flow``). Layer failures never reach a
flow: the runner turns them into ``None`` results, counts them and trips the
layer's breaker, so a flow only decides *what* to do.

Orderings that matter, and why:

- Reads walk the storage layers fastest first and back-fill the faster layers
  with the remaining TTL. The lease of a faster layer is taken before a slower
  layer is read, so an invalidation that lands in between refuses the
  back-fill.
- Fills and writes go slowest first (shared layers, then the in-process one).
  If a shared layer refuses a fill because of an invalidation, the faster
  layers are not filled either: the shared layer's generations are the
  authority on what was invalidated across processes.
- Write-through takes its leases *before* calling the writer. The write then
  stores the new value only if nothing invalidated or wrote the key since, and
  bumps the key's generation, which refuses every fill that began before it. A
  write whose lease was overtaken deletes the key instead: two writers racing
  leave either the later value or nothing, never the earlier one.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .entry import Entry
from .errors import DecodeError, EncodeError
from .keys import CacheKey, Tag
from .metrics import (
    ERROR,
    FIELDS,
    HIT,
    LEASE_REJECTED,
    LOAD_ERRORS,
    LOAD_TIMEOUTS,
    LOCK_WAITS,
    MISS,
    STALE,
)
from .policy import Policy
from .serde import Decoder, EntryCodec

__all__ = ["Flow", "ReadRequest"]

log = logging.getLogger("tieredcache")

# -- operations ------------------------------------------------------------------


@dataclass(slots=True)
class Get:
    """Read ``key`` from storage layer ``layer`` -> (stored value or None, lease).

    In-process layers hand out their lease with the read (it is free); shared
    layers return ``None`` as the lease, so that a hit costs one plain GET: their
    lease comes with the fill lock, or from a ``Lease``, before the loader runs.
    """

    layer: int


@dataclass(slots=True)
class Lease:
    """Take the fill lease of storage layer ``layer`` -> lease, or None if it failed."""

    layer: int


@dataclass(slots=True)
class Set:
    """Store in layer ``layer`` -> True, False (lease refused) or None (layer failed).

    ``unlock``: the fill-lock token to release in the same round trip.
    """

    layer: int
    stored: Any
    entry: Entry
    lease: Any
    bump: bool = False
    unlock: str | None = None


@dataclass(slots=True)
class Delete:
    """Invalidate the request's key in layer ``layer``. ``force``: even if that layer
    already failed this request (a write must not leave the old value behind)."""

    layer: int
    force: bool = False


@dataclass(slots=True)
class Load:
    """Call the loader -> (value, seconds) or SOFT_TIMEOUT; raises what the loader raised.

    On a soft timeout the loader keeps running and ``late`` (a flow factory)
    is run in the background with its result.
    """

    soft_timeout: float | None
    hard_timeout: float | None
    late: Callable[[Any, float], Flow] | None = None


@dataclass(slots=True)
class Lock:
    """Try to take the fill lock in layer ``layer`` -> (taken, lease): taken is True,
    False (held by another) or None (the layer failed); the lease comes with it."""

    layer: int
    token: str
    ttl: float


@dataclass(slots=True)
class Unlock:
    layer: int
    token: str


@dataclass(slots=True)
class WaitFill:
    """Wait until the fill lock is released (pub/sub wake-up) or ``timeout`` passes."""

    layer: int
    timeout: float


@dataclass(slots=True)
class Refresh:
    """Recompute the key in the background (one refresher per key).

    ``seen``: ``created_at`` of the entry that prompted it; the refresh is
    skipped if a layer already holds a newer fresh entry by the time it runs.
    """

    seen: float


@dataclass(slots=True)
class Pending:
    """Whether a background load of this key (refresh or late fill) is under way -> bool."""


@dataclass(slots=True)
class Invalidate:
    """Drop ``keys`` and ``tags`` from layer ``layer`` (any layer, CDN included) -> ok."""

    layer: int
    keys: Sequence[CacheKey]
    tags: Sequence[Tag]
    counters: list[int] | None = None


@dataclass(slots=True)
class Publish:
    """Tell the other replicas to drop ``keys`` and ``tags`` from their in-process layers -> ok."""

    keys: Sequence[CacheKey]
    tags: Sequence[Tag]


Op = (
    Get
    | Lease
    | Set
    | Delete
    | Load
    | Lock
    | Unlock
    | WaitFill
    | Refresh
    | Pending
    | Invalidate
    | Publish
)
Flow = Generator[Op, Any, Any]
SOFT_TIMEOUT: Any = object()
BROADCAST = -1  # the position reported when the replica broadcast failed


@dataclass(slots=True)
class ReadRequest:
    """Everything a flow needs to know about one call."""

    key: CacheKey
    tags: tuple[Tag, ...]
    alias: Hashable
    policy: Policy
    function: str
    counters: list[int]
    loader: Callable[[], Any]
    decode: Decoder
    codec: EntryCodec
    clock: Callable[[], float]
    # Positions of the storage layers in the cache's layer list, fastest first,
    # and whether each keeps objects (memory) or bytes (shared).
    storage: Sequence[int]
    stores_objects: Sequence[bool]
    lock_layer: int | None
    loader_base: int
    # Layers that failed during this request: skipped for the rest of it.
    failed: set[int] = field(default_factory=set)
    # Reads done before the flow started (the shared-hit shortcut): position -> Get result.
    prefetched: dict[int, Any] | None = None
    # The fill-lock token this request holds (kept by the runner), so that a
    # cancelled request or a failed late load can still release it.
    lock_token: str | None = None


def _decode(req: ReadRequest, position: int, stored: Any) -> Entry | None:
    if req.stores_objects[position]:
        entry: Entry = stored
        return entry
    try:
        return req.codec.decode(req.key.full, stored, req.decode)
    except DecodeError as exc:
        log.warning("tieredcache dropped a bad entry (%s): %s", req.function, exc)
        return None


def _count(req: ReadRequest, position: int, field: int) -> None:
    req.counters[req.storage[position] * FIELDS + field] += 1


def xfetch_due(entry: Entry, now: float, beta: float) -> bool:
    """XFetch (Vattani et al.): refresh early with a probability that grows near expiry."""
    if beta <= 0 or entry.compute_time <= 0:
        return False
    return (
        now - entry.compute_time * beta * math.log(random.random() or 1e-300) >= entry.fresh_until
    )


MISSING: Any = object()


def _walk(req: ReadRequest, leases: list[Any]) -> Generator[Op, Any, tuple[bool, Any]]:
    """Read the layers fastest first -> (True, value) on a fresh hit, else (False, stale)."""
    now = req.clock()
    stale: Entry | None = None
    last = len(req.storage) - 1
    for position in range(len(req.storage)):
        stored, leases[position] = yield Get(position)
        entry = None if stored is None else _decode(req, position, stored)
        if stored is not None and entry is None:
            # Undecodable or tampered: an error, a miss, and gone. (Shared layers take
            # their lease later, so the generation this delete bumps is included.)
            _count(req, position, ERROR)
            yield Delete(position)
        if entry is not None and entry.fresh_until > now:
            _count(req, position, HIT)
            yield from _backfill(req, entry, leases, position)
            if xfetch_due(entry, now, req.policy.early_refresh_beta):
                yield Refresh(entry.created_at)
            return True, entry.value
        _count(req, position, MISS)
        if (
            entry is not None
            and entry.stale_until > now
            and (stale is None or entry.fresh_until > stale.fresh_until)
        ):
            stale = entry
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
    hit, result = yield from _walk(req, leases)
    if hit:
        return result
    stale: Entry | None = result
    if stale is not None:
        if req.clock() < stale.fresh_until + req.policy.stale_while_revalidate:
            _count(req, 0, STALE)
            yield Refresh(stale.created_at)
            return stale.value
        if (yield Pending()):
            # A load that outlived its soft timeout is still running: serve stale
            # until it lands rather than start another one.
            _count(req, 0, STALE)
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


def load_and_fill(req: ReadRequest, leases: list[Any], stale: Entry | None) -> Flow:
    """Load under the fill lock (if any), then fill every layer; fail-safe on errors."""
    policy = req.policy
    token: str | None = None
    lock_layer = req.lock_layer
    if lock_layer is not None and policy.lock:
        token = secrets.token_hex(12)
        position = req.storage.index(lock_layer)
        got, lease = yield Lock(lock_layer, token, policy.lock_ttl)
        if got is False:
            req.counters[req.loader_base + LOCK_WAITS] += 1
            deadline = req.clock() + policy.lock_wait
            while got is False:
                remaining = deadline - req.clock()
                if remaining <= 0:
                    break
                yield WaitFill(lock_layer, remaining)
                stored, _ = yield Get(position)
                entry = None if stored is None else _decode(req, position, stored)
                if entry is not None and entry.fresh_until > req.clock():
                    _count(req, position, HIT)
                    yield from _backfill(req, entry, leases, position)
                    return entry.value
                got, lease = yield Lock(lock_layer, token, policy.lock_ttl)
            if got is False and stale is not None:
                _count(req, 0, STALE)
                return stale.value
        if got:
            leases[position] = lease
        else:
            token = None  # the lock layer failed or the wait ran out: load without it
    yield from _missing_leases(req, leases)

    soft = policy.soft_timeout if stale is not None else None

    def late(value: Any, seconds: float) -> Flow:
        return fill_flow(req, value, seconds, leases, token)

    try:
        loaded = yield Load(soft, policy.hard_timeout, late)
    except Exception as exc:
        if token is not None:
            yield Unlock(lock_layer, token)  # type: ignore[arg-type]
        failure = LOAD_TIMEOUTS if isinstance(exc, TimeoutError) else LOAD_ERRORS
        req.counters[req.loader_base + failure] += 1
        if stale is not None and stale.stale_until > req.clock():
            yield from _throttle(req, stale, leases)
            _count(req, 0, STALE)
            return stale.value
        raise
    if loaded is SOFT_TIMEOUT:
        req.counters[req.loader_base + LOAD_TIMEOUTS] += 1
        _count(req, 0, STALE)
        return stale.value  # type: ignore[union-attr]
    value, seconds = loaded
    yield from fill_flow(req, value, seconds, leases, token)
    return value


def make_entry(policy: Policy, value: Any, now: float, seconds: float) -> Entry | None:
    ttl = policy.ttl_for(value)
    if ttl <= 0:
        return None
    fresh_until = now + ttl
    return Entry(value, now, fresh_until, fresh_until + policy.stale_ttl, seconds)


def fill_flow(
    req: ReadRequest, value: Any, seconds: float, leases: list[Any], token: str | None
) -> Flow:
    """Store a loaded value slowest layer first, then release the fill lock."""
    entry = make_entry(req.policy, value, req.clock(), seconds)
    released = False
    if entry is not None:
        _, released, _ = yield from _store(req, entry, leases, bump=False, unlock=token)
    if token is not None and not released and req.lock_layer is not None:
        yield Unlock(req.lock_layer, token)


def _missing_leases(req: ReadRequest, leases: list[Any]) -> Flow:
    """Take the leases not taken yet (shared layers without the fill lock)."""
    for position in range(len(req.storage)):
        if leases[position] is None:
            leases[position] = yield Lease(position)


def _store(
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
                    _count(req, position, ERROR)
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
    yield from _store(req, throttled, leases, bump=False)


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
        entry = _decode(req, position, stored)
        if entry is not None and entry.created_at > seen and entry.fresh_until > now:
            yield from _backfill(req, entry, leases, position)
            return entry.value
    token: str | None = None
    if use_lock and req.lock_layer is not None and req.policy.lock:
        token = secrets.token_hex(12)
        got, lease = yield Lock(req.lock_layer, token, req.policy.lock_ttl)
        if got is False:
            return None  # another process is refreshing this key right now
        if got:
            leases[req.storage.index(req.lock_layer)] = lease
        else:
            token = None
    yield from _missing_leases(req, leases)
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


def write_flow(req: ReadRequest) -> Flow:
    """Write-through: leases, then the writer (store first), then every layer in line."""
    leases: list[Any] = [None] * len(req.storage)
    yield from _missing_leases(req, leases)
    loaded = yield Load(None, None)
    value, seconds = loaded
    entry = make_entry(req.policy, value, req.clock(), seconds)
    yield from _write_everywhere(req, entry, leases, conditional=True)
    yield Publish((req.key,), ())
    return value


def _write_everywhere(
    req: ReadRequest, entry: Entry | None, leases: list[Any], *, conditional: bool
) -> Flow:
    """A write's store step. Refused by a lease (another write or invalidation came
    after ours) or nothing to store: drop the key everywhere. A layer that did not
    confirm: try once more to drop the old value there; the others keep the new."""
    unconfirmed: list[int] = []
    if entry is None:
        refused = True
    else:
        stored, _, unconfirmed = yield from _store(
            req, entry, leases, bump=True, conditional=conditional
        )
        refused = not stored
    doomed = range(len(req.storage) - 1, -1, -1) if refused else unconfirmed
    for position in doomed:
        yield Delete(position, force=True)


def unlock_flow(req: ReadRequest) -> Flow:
    """Release the fill lock the request still holds (cancellation, failed late load)."""
    if req.lock_token is not None and req.lock_layer is not None:
        yield Unlock(req.lock_layer, req.lock_token)


def set_flow(req: ReadRequest, value: Any) -> Flow:
    """Explicit set: store everywhere, refusing fills that began before it."""
    entry = make_entry(req.policy, value, req.clock(), 0.0)
    yield from _write_everywhere(req, entry, [None] * len(req.storage), conditional=False)
    yield Publish((req.key,), ())


def invalidate_flow(
    layer_count: int,
    keys: Sequence[CacheKey],
    tags: Sequence[Tag],
    counters: list[int] | None = None,
) -> Generator[Op, Any, list[int]]:
    """Drop keys and tags from every layer, slowest first, then from every replica.

    Slowest first: once the shared layer has dropped a key, a reader in this
    process can no longer find the old value there to back-fill the faster
    layer with. Returns the positions of the layers that failed.
    """
    failed = []
    for layer in range(layer_count - 1, -1, -1):
        ok = yield Invalidate(layer, keys, tags, counters)
        if not ok:
            failed.append(layer)
    if not (yield Publish(keys, tags)):
        failed.append(BROADCAST)
    return failed
