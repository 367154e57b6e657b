"""Writes: write-through, explicit sets and invalidation, over N layers.

Written once, as async; ``scripts/unasync.py`` generates ``_sync/write.py``.

- Write-through takes its leases *before* calling the writer. The write then
  stores the new value only if nothing invalidated or wrote the key since, and
  bumps the key's generation, which refuses every fill that began before it. A
  write whose lease was overtaken deletes the key instead: two writers racing
  leave either the later value or nothing, never the earlier one.
- An invalidation goes slowest storage layer first (once the shared layer has
  dropped a key, a reader here can no longer find the old value there to
  back-fill with), then to every replica, then to the invalidation-only layers
  (a CDN): a CDN purged before the replicas dropped their copies could refetch
  the old page from one of them. A layer that purges off the caller's path
  returns a pending purge per call: the result lists it as ``pending`` and can
  wait for its outcome (``InvalidationResult.wait_purges``); the call does not.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any

from ...entry import Entry
from ...keys import CacheKey, Tag
from ...layers.base import PendingPurge
from ...metrics import FIELDS, INVALIDATION
from ..request import ReadRequest, make_entry
from ..result import InvalidationResult, LayerFailure, failure_of
from ..stack import ALL_TENANTS, LayerGuard, LayerStack
from .calls import shared
from .read import _delete, _missing_leases, _start_load, store

__all__ = ["BROADCAST", "invalidate", "put", "write"]

BROADCAST = "broadcast"  # the name reported when the replicas could not be told


async def write(req: ReadRequest) -> Any:
    """Write-through: leases, then the writer (the store first), then every layer."""
    req.stack.start(req.counters)
    leases: list[Any] = [None] * len(req.stack.storage)
    await _missing_leases(req, leases)
    start = time.perf_counter()
    value = await _start_load(req, None, leases, None)
    entry = make_entry(req.policy, value, req.stack.clock(), time.perf_counter() - start)
    await _write_everywhere(req, entry, leases, conditional=True)
    await _publish(req.stack, (req.key,), ())
    return value


async def put(req: ReadRequest, value: Any) -> None:
    """Explicit set: store everywhere, refusing fills that began before it."""
    req.stack.start(req.counters)
    entry = make_entry(req.policy, value, req.stack.clock(), 0.0)
    leases: list[Any] = [None] * len(req.stack.storage)
    await _write_everywhere(req, entry, leases, conditional=False)
    await _publish(req.stack, (req.key,), ())


async def _write_everywhere(
    req: ReadRequest, entry: Entry | None, leases: list[Any], *, conditional: bool
) -> None:
    """A write's store step. Refused by a lease (another write or invalidation came
    after ours) or nothing to store: drop the key everywhere. A layer that did not
    confirm: try once more to drop the old value there; the others keep the new."""
    unconfirmed: list[int] = []
    if entry is None:
        refused = True
    else:
        stored, _, unconfirmed = await store(req, entry, leases, bump=True, conditional=conditional)
        refused = not stored
    doomed = range(len(req.stack.storage) - 1, -1, -1) if refused else unconfirmed
    for position in doomed:
        await _delete(req, position, force=True)


async def invalidate(
    stack: LayerStack,
    keys: Sequence[CacheKey],
    tags: Sequence[Tag],
    counters: list[int] | None = None,
    *,
    everywhere: Sequence[str] = (),
    only: Collection[str] | None = None,
) -> InvalidationResult:
    """Drop keys and tags from every layer and every replica.

    ``everywhere``: tag names invalidated for every tenant of the namespace, in
    O(1): recorded as an epoch (see ``LayerStack.epochs``) here, in the
    namespace-state layer and on every replica, and purged from invalidation-only
    layers as the tenant-less tag ``namespace:*:name``. ``only``: the names of the
    layers to reach (``"broadcast"`` for the replicas), to retry what failed.
    """
    failures: list[LayerFailure] = []
    errors: list[BaseException | None] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    all_tags = list(tags)
    if everywhere:
        now = stack.clock()
        epochs = dict.fromkeys(everywhere, now)
        stack.apply_epochs(epochs)  # this process first: it stops serving them at once
        guard = stack.state_guard
        if guard is not None and wanted(guard.name):
            recorded = await shared(
                guard,
                "(invalidate)",
                counters,
                None,
                "epochs",
                guard.layer.arecord_epochs,
                (stack.namespace, epochs),
                False,
                errors,
            )
            if not recorded:
                failures.append(failure_of(guard.name, errors[-1]))
        all_tags += [Tag(stack.namespace, ALL_TENANTS, name) for name in everywhere]
    for guard in reversed(stack.storage):
        if wanted(guard.name) and not await _invalidate_layer(guard, keys, tags, counters, errors):
            failures.append(failure_of(guard.name, errors[-1]))
    if wanted(BROADCAST) and not await _publish(stack, keys, all_tags, errors):
        failures.append(failure_of(BROADCAST, errors[-1]))
    purges: dict[str, list[PendingPurge]] = {}
    for guard in stack.purgers:
        if not wanted(guard.name):
            continue
        queued: list[PendingPurge] = []
        if not await _invalidate_layer(guard, keys, all_tags, counters, errors, queued):
            failures.append(failure_of(guard.name, errors[-1]))
        elif queued:
            purges[guard.name] = queued
    stack.forget(keys, tags)
    failed = list(dict.fromkeys(f.layer for f in failures))
    unsent = [BROADCAST] if stack.broadcast_disabled and wanted(BROADCAST) else []
    return InvalidationResult(failed, failures, unsent, purges)


async def _invalidate_layer(
    guard: LayerGuard,
    keys: Sequence[CacheKey],
    tags: Sequence[Tag],
    counters: list[int] | None,
    errors: list[BaseException | None],
    queued: list[PendingPurge] | None = None,
) -> bool:
    """Drop ``keys`` and ``tags`` from one layer -> whether it confirmed (or accepted).
    ``queued``: receives the pending purges an invalidation-only layer returns."""
    if not keys and not tags:
        return True
    if guard.local:
        ok = guard.call(
            "invalidate", "(invalidate)", counters, _drop_local, False, None, (guard, keys, tags)
        )
    else:
        ok = await shared(
            guard,
            "(invalidate)",
            counters,
            None,
            "invalidate",
            _drop,
            (guard, keys, tags, queued),
            False,
            errors,
        )
    if ok and counters is not None:
        counters[guard.index * FIELDS + INVALIDATION] += len(keys) + len(tags)
    return bool(ok)


def _drop_local(guard: LayerGuard, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
    if keys:
        guard.layer.delete(keys)
    if tags:
        guard.layer.delete_tags(tags)
    return True


async def _drop(
    guard: LayerGuard,
    keys: Sequence[CacheKey],
    tags: Sequence[Tag],
    queued: list[PendingPurge] | None,
) -> bool:
    layer = guard.layer
    done: list[PendingPurge | None] = []
    if keys:
        done.append(await layer.adelete(keys))
    if tags:
        done.append(await layer.adelete_tags(tags))
    if queued is not None:
        queued += [purge for purge in done if purge is not None]
    return True


async def _publish(
    stack: LayerStack,
    keys: Sequence[CacheKey],
    tags: Sequence[Tag],
    errors: list[BaseException | None] | None = None,
) -> bool:
    """Tell the other replicas to drop ``keys`` and ``tags`` -> whether it was sent."""
    guard = stack.broadcast_guard
    if guard is None or (not keys and not tags):
        return True
    ok = await shared(
        guard,
        "(api)",
        None,
        None,
        "publish",
        stack.broadcast.apublish,
        (keys, tags),
        False,
        errors,
    )
    return bool(ok)
