"""One call's request, and the rules the engine applies to entries (each written once).

A :class:`ReadRequest` is everything the engine needs about one call: its key
and tags, its policy, its loader and decoder, its counters, and the layer
stack it runs on. The engine's functions (``_async/read.py``,
``_async/write.py`` and their generated sync twins) take nothing else.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import secrets
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from ..entry import Entry
from ..errors import DecodeError
from ..keys import CacheKey, Tag
from ..metrics import FIELDS, REFRESHES
from ..policy import Policy
from ..serde import Decoder

if TYPE_CHECKING:
    from .stack import LayerStack

__all__ = [
    "FAILED",
    "MISSING",
    "SOFT_TIMEOUT",
    "ReadRequest",
    "Refused",
    "claim_refresh",
    "count",
    "decode_entry",
    "fill_token",
    "make_entry",
    "predates_epoch",
    "xfetch_band_start",
    "xfetch_due",
]

log = logging.getLogger("tieredcache")

MISSING: Any = object()  # "no value": an explicit get that missed
FAILED: Any = object()  # a layer call that failed or was skipped
SOFT_TIMEOUT: Any = object()  # a load that outlived its soft timeout (still running)


class Refused:
    """A load whose shared fill was refused by its lease: an invalidation landed
    while it ran. Its leader returns the value (its call began before the
    invalidation); callers that joined it may have begun after, so they read again."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class ReadRequest:
    """Everything the engine knows about one call."""

    __slots__ = (
        "alias",
        "answered",
        "answered_entry",
        "counters",
        "decode",
        "failed",
        "function",
        "key",
        "loader",
        "loader_base",
        "lock_token",
        "policy",
        "prelock",
        "refused",
        "stack",
        "stale_position",
        "tag_names",
        "tags",
    )

    def __init__(
        self,
        stack: LayerStack,
        key: CacheKey,
        tags: tuple[Tag, ...],
        *,
        policy: Policy,
        function: str,
        counters: list[int],
        loader: Callable[[], Any],
        decode: Decoder,
        alias: Hashable = None,
    ) -> None:
        self.stack = stack
        self.key = key
        self.tags = tags
        # The single-flight detaches in-flight loads by tag name on invalidation.
        self.tag_names: tuple[str, ...] = tuple(tag.full for tag in tags) if tags else ()
        self.alias = key.full if alias is None else alias
        self.policy = policy
        self.function = function
        self.counters = counters
        self.loader = loader
        self.decode = decode
        self.loader_base = stack.loader_base
        # Storage positions that failed during this request: skipped for the rest
        # of it (one timeout per request, not one per operation).
        self.failed: set[int] = set()
        # The fill-lock token held now, so that a cancelled call still releases it.
        self.lock_token: str | None = None
        # What the fused read-or-lock gave on a miss: (token, taken, lease).
        self.prelock: tuple[str, Any, Any] | None = None
        # Storage position of the stale entry this read may serve.
        self.stale_position = 0
        # The shared fill was refused by its lease (see Refused).
        self.refused = False
        # What answered the call, for a read that reports its outcome: the storage
        # position and entry of a hit or a stale read (-1: loaded, or coalesced).
        self.answered = -1
        self.answered_entry: Entry | None = None


def claim_refresh(req: ReadRequest) -> bool:
    """Whether the caller may start a background refresh of ``req``'s key (none is
    under way in this process); counted when it may."""
    if not req.stack.background.claim(req.key.full):
        return False
    req.counters[req.loader_base + REFRESHES] += 1
    return True


def predates_epoch(req: ReadRequest, entry: Entry) -> bool:
    """Whether ``entry``'s load began before an all-tenant invalidation of one of the
    request's tag names (see ``LayerStack.epochs``): such an entry is not served."""
    epochs = req.stack.epochs
    started = entry.created_at - entry.compute_time
    for tag in req.tags:
        at = epochs.get(tag.name)
        if at is not None and started <= at:
            return True
    return False


def predates_any_epoch(req: ReadRequest, entry: Entry) -> bool:
    """For a read that does not know the entry's tags (an explicit ``get``): whether
    its load began before the latest all-tenant invalidation of any tag name. Such
    an entry may carry that tag, so it is not served (wider, never stale)."""
    epochs = req.stack.epochs
    return bool(epochs) and entry.created_at - entry.compute_time <= max(epochs.values())


def count(req: ReadRequest, position: int, field: int) -> None:
    """Count ``field`` (HIT, MISS, ...) on the storage layer at ``position``."""
    req.counters[req.stack.storage[position].index * FIELDS + field] += 1


def decode_entry(req: ReadRequest, position: int, stored: Any) -> Entry | None:
    """The entry a storage layer returned; None (logged) if it cannot be decoded."""
    if req.stack.storage[position].local:
        entry: Entry = stored
        return entry
    try:
        return req.stack.codec.decode(req.key.full, stored, req.decode)
    except DecodeError as exc:
        log.warning("tieredcache dropped a bad entry (%s): %s", req.function, exc)
        return None


def make_entry(policy: Policy, value: Any, now: float, seconds: float) -> Entry | None:
    """The entry a load of ``value`` makes (None: not cached, e.g. negative_ttl=0)."""
    ttl = policy.ttl_for(value)
    if ttl <= 0:
        return None
    fresh_until = now + ttl
    return Entry(value, now, fresh_until, fresh_until + policy.stale_ttl, seconds)


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
