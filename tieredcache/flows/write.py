"""Writes: write-through, explicit sets, invalidation, and lock clean-up."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from ..entry import Entry
from ..keys import CacheKey, Tag
from .ops import (
    BROADCAST,
    Delete,
    Flow,
    Invalidate,
    Load,
    Op,
    Publish,
    ReadRequest,
    Unlock,
    make_entry,
)
from .read import missing_leases, store


def write_flow(req: ReadRequest) -> Flow:
    """Write-through: leases, then the writer (store first), then every layer in line."""
    leases: list[Any] = [None] * len(req.storage)
    yield from missing_leases(req, leases)
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
        stored, _, unconfirmed = yield from store(
            req, entry, leases, bump=True, conditional=conditional
        )
        refused = not stored
    doomed = range(len(req.storage) - 1, -1, -1) if refused else unconfirmed
    for position in doomed:
        yield Delete(position, force=True)


def unlock_flow(req: ReadRequest) -> Flow:
    """Release the fill lock the request holds now (cancellation, failed late load).

    The token is read at this call, not when the flow runs: the caller may clear
    ``req.lock_token`` once it has handed the release to this flow.
    """
    return _unlock(req.lock_layer, req.lock_token)


def _unlock(layer: int | None, token: str | None) -> Flow:
    if token is not None and layer is not None:
        yield Unlock(layer, token)


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
