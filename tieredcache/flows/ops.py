"""The operations a flow yields, the request it works on, and small shared helpers."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..entry import Entry
from ..errors import DecodeError
from ..keys import CacheKey, Tag
from ..metrics import FIELDS
from ..policy import Policy
from ..serde import Decoder, EntryCodec

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
class GetOrLock:
    """Read storage layer ``layer`` and, if the key is absent there, try its fill
    lock in the same round trip -> (stored or None, taken, lease), with taken and
    lease as for :class:`Lock` (both None when a value was found)."""

    layer: int
    token: str
    ttl: float


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
    | GetOrLock
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
    # Storage position whose read also tries the fill lock (GetOrLock), if any,
    # and what that attempt gave (token, taken, lease) for the load that follows.
    fused_read: int | None = None
    prelock: tuple[str, Any, Any] | None = None
    # Storage position of the stale entry this read may serve: its stale hit is
    # counted on that layer.
    stale_position: int = 0


def decode_entry(req: ReadRequest, position: int, stored: Any) -> Entry | None:
    if req.stores_objects[position]:
        entry: Entry = stored
        return entry
    try:
        return req.codec.decode(req.key.full, stored, req.decode)
    except DecodeError as exc:
        log.warning("tieredcache dropped a bad entry (%s): %s", req.function, exc)
        return None


def count(req: ReadRequest, position: int, field: int) -> None:
    req.counters[req.storage[position] * FIELDS + field] += 1


def xfetch_band_start(entry: Entry, beta: float) -> float:
    """When an in-process hit starts checking for an early refresh: inside this band
    before expiry XFetch may fire (P(-ln U > 10) = 4.5e-5); before it, never."""
    return entry.fresh_until - entry.compute_time * beta * 10


def xfetch_due(entry: Entry, now: float, beta: float) -> bool:
    """XFetch (Vattani et al.): refresh early with a probability that grows near expiry."""
    if beta <= 0 or entry.compute_time <= 0:
        return False
    return (
        now - entry.compute_time * beta * math.log(random.random() or 1e-300) >= entry.fresh_until
    )


MISSING: Any = object()


def make_entry(policy: Policy, value: Any, now: float, seconds: float) -> Entry | None:
    ttl = policy.ttl_for(value)
    if ttl <= 0:
        return None
    fresh_until = now + ttl
    return Entry(value, now, fresh_until, fresh_until + policy.stale_ttl, seconds)
