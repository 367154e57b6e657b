"""What the worker needs from a cache: one namespace's batch invalidation.

:class:`InvalidationTarget` is the narrow Protocol the worker is written against
(``TieredCache`` satisfies it); tests pass fakes. :func:`to_items` turns the
worker's coalesced ``cdc.rules.Invalidation`` s of one namespace into the core's
``tieredcache.Invalidation`` (one per tenant, ``tenant=None`` for all tenants).
:func:`split_layers` says which layer names are storage (reached first, with the
replica broadcast) and which are invalidation-only (a CDN, on its own progress).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

from cdc.rules import Invalidation

__all__ = ["CoreInvalidation", "InvalidationTarget", "LayerFailureLike", "split_layers", "to_items"]

from tieredcache import Invalidation as CoreInvalidation


class LayerFailureLike(Protocol):
    @property
    def layer(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def retry_after(self) -> float | None: ...


class ResultLike(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def failed(self) -> list[str]: ...

    @property
    def failures(self) -> Sequence[LayerFailureLike]: ...

    @property
    def pending(self) -> list[str]: ...

    def wait_purges(self, timeout: float | None = None) -> ResultLike:
        """The result with its queued purges settled (``ok`` counts a queued one)."""
        ...


class InvalidationTarget(Protocol):
    """One namespace's cache, as the worker uses it."""

    @property
    def namespace(self) -> str: ...

    @property
    def layers(self) -> Sequence[Any]: ...

    def invalidate_many(
        self, items: Iterable[Any], *, layers: Collection[str] | None = None
    ) -> ResultLike: ...


def to_items(invalidations: Iterable[Invalidation]) -> list[Any]:
    """Group one namespace's invalidations by tenant (``None`` first: all tenants)."""
    by_tenant: dict[str | None, set[str]] = defaultdict(set)
    for inv in invalidations:
        by_tenant[inv.tenant].add(inv.tag)
    order = sorted(by_tenant, key=lambda t: (t is not None, t or ""))
    return [CoreInvalidation(tenant, tags=tuple(sorted(by_tenant[tenant]))) for tenant in order]


def split_layers(target: InvalidationTarget) -> tuple[list[str], list[str]]:
    """(storage layer names + ``"broadcast"``, invalidation-only layer names)."""
    from tieredcache.layers.base import InProcessLayer, SharedLayer

    storage: list[str] = []
    cdn: list[str] = []
    for layer in target.layers:
        kind = getattr(layer, "cdc_role", None)  # fakes may say so directly
        if kind is None:
            kind = "storage" if isinstance(layer, (InProcessLayer, SharedLayer)) else "cdn"
        (storage if kind == "storage" else cdn).append(layer.name)
    return [*storage, "broadcast"], cdn
