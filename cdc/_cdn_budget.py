"""The CDN side's purge budget and escalation: never drop a purge, send fewer keys.

A CDN limits purges (Akamai: a bucket of 5,000 tags refilled at 500 a minute;
Cloudflare: a bucket of requests of up to 100 tags, per plan). The worker plans
each batch against what the layer's budget holds *now*, counted in surrogate keys.
One bucket is the truth, charged once per purge: when the layer's purger keeps
its own :class:`~tieredcache.layers.cdn.TokenBucket` (Cloudflare, Akamai), the
worker reads that one (:class:`PurgerBucket`: it plans and waits with it, the
purger takes the tokens as it sends, and the application's own purges through
the same purger count too); otherwise (Fastly) it keeps a :class:`KeyBucket`.

* fine: every tenant-scoped tag's key, plus each such tenant's overflow key
  (``namespace:tenant:~``, see :mod:`tieredcache.layers.cdn.surrogate`), plus the
  tenant-less keys the batch already holds;
* past the budget, escalate (greedily, the group that saves most keys first):
  many tags of one table become the tenant-less table key
  (``namespace:*:table:...``, what ``Invalidation(None, tags=(table_tag,))``
  purges; every entry built from a table carries its table tag), or many tags of
  one tenant become the tenant key (``namespace:tenant:*``, on every response of
  the tenant, overflowed ones included);
* if even the coarsest plan does not fit, it waits for the tokens: a purge is
  never dropped, only made coarser or later.

Escalation purges more than needed (a table for every tenant, or a whole
tenant): a burst of misses at the edge, which is the price of never serving a
stale page. :func:`plan` is pure; the worker sends its :class:`Unit` s.

>>> from cdc.rules import Invalidation
>>> invs = {Invalidation("shop", t, f"product:{i}") for t in "ab" for i in range(3)}
>>> tables = {inv: "table:public.products" for inv in invs}
>>> sorted(u.kind for u in plan(units_of(invs), tables, budget=100))
['overflow', 'overflow', 'tag', 'tag', 'tag', 'tag', 'tag', 'tag']
>>> [(u.kind, u.name) for u in plan(units_of(invs), tables, budget=2)]
[('table', 'table:public.products')]
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from cdc.rules import Invalidation

if TYPE_CHECKING:  # the CDN package needs httpx: imported where a CDN layer exists
    from tieredcache.layers.cdn.limits import TokenBucket

__all__ = [
    "VENDOR_BUDGETS",
    "CdnBudget",
    "KeyBucket",
    "PurgerBucket",
    "Unit",
    "cost",
    "plan",
    "surrogate_keys",
    "units_of",
]

#: Vendor -> (bucket size, refill per second), in surrogate keys. Cloudflare's
#: budget is per plan and in requests of up to 100 tags (see ``budget_for``);
#: Fastly publishes no purge-by-key limit beyond its API rate limit (taken as
#: 1,000 requests of 256 keys an hour, with a burst of 16 requests); Varnish has none.
VENDOR_BUDGETS: Final[Mapping[str, tuple[float, float] | None]] = {
    "akamai": (5000, 500 / 60),
    "fastly": (16 * 256, 1000 * 256 / 3600),
    "varnish": None,
}
_CLOUDFLARE_TAGS_PER_REQUEST: Final = 100

UnitKind = Literal["tag", "overflow", "table", "tenant"]


@dataclass(frozen=True, slots=True, order=True)
class Unit:
    """One surrogate key to purge: a tenant's tag, its overflow key, a tenant-less
    tag (a table key), or a tenant key. ``tenant`` is None for ``table``."""

    kind: UnitKind
    namespace: str
    tenant: str | None
    name: str = ""


@dataclass(frozen=True)
class CdnBudget:
    """A CDN layer's purge budget in surrogate keys: ``capacity``, refilled at ``rate``/s.

    ``shared``: the purger's own token bucket, when the budget is a view of it
    (:meth:`for_layer`); ``keys_per_token`` converts its tokens to keys. A budget
    given by hand (``Worker(cdn_budgets=...)``) is a bucket of the worker's own: a
    cap on what the worker spends, on top of any limit the purger keeps.

    >>> CdnBudget.for_vendor("akamai").capacity
    5000
    """

    capacity: float
    rate: float
    shared: TokenBucket | None = field(default=None, compare=False, repr=False)
    keys_per_token: float = 1.0

    @classmethod
    def for_vendor(cls, vendor: str, plan: str | None = None) -> CdnBudget | None:
        if vendor == "cloudflare":
            from tieredcache.layers.cdn import CLOUDFLARE_PLANS

            requests, per_second = CLOUDFLARE_PLANS[plan or "free"]
            return cls(
                requests * _CLOUDFLARE_TAGS_PER_REQUEST, per_second * _CLOUDFLARE_TAGS_PER_REQUEST
            )
        limits = VENDOR_BUDGETS.get(vendor)
        return None if limits is None else cls(*limits)

    @classmethod
    def for_layer(cls, layer: Any) -> CdnBudget | None:
        """The budget of a ``CdnPurgeLayer``: its purger's own token bucket if it keeps
        one (the one truth: charged once, by the purger), else its vendor's default,
        else None (unlimited)."""
        purger = getattr(layer, "purger", None)
        scheme = getattr(purger, "scheme", None)
        if scheme is None:
            return None
        shared = getattr(purger, "bucket", None)
        if shared is not None:
            per_token = float(getattr(purger, "keys_per_token", 1.0))
            return cls(shared.capacity * per_token, shared.rate * per_token, shared, per_token)
        return cls.for_vendor(scheme.vendor, getattr(purger, "plan", None))

    def bucket(self, clock: Callable[[], float] = time.monotonic) -> KeyBucket | PurgerBucket:
        """The bucket the worker plans with: a view of ``shared`` (which keeps its own
        clock), else a new :class:`KeyBucket` on ``clock``."""
        if self.shared is not None:
            return PurgerBucket(self.shared, self.keys_per_token)
        return KeyBucket(self.capacity, self.rate, clock)


def units_of(invalidations: Iterable[Invalidation]) -> set[Unit]:
    """The fine plan: each tag, each tenant's overflow key, each tenant-less tag."""
    units: set[Unit] = set()
    for inv in invalidations:
        if inv.tenant is None:
            units.add(Unit("table", inv.namespace, None, inv.tag))
        else:
            units.add(Unit("tag", inv.namespace, inv.tenant, inv.tag))
            units.add(Unit("overflow", inv.namespace, inv.tenant))
    return units


def cost(units: Collection[Unit]) -> int:
    """Surrogate keys the units purge (one each)."""
    return len(units)


def _normal(units: set[Unit]) -> set[Unit]:
    """Drop what a tenant key covers, and overflow keys of tenants with no tag left."""
    tenants = {(u.namespace, u.tenant) for u in units if u.kind == "tenant"}
    tagged = {(u.namespace, u.tenant) for u in units if u.kind == "tag"}
    return {
        u
        for u in units
        if u.kind in ("tenant", "table")
        or (
            (u.namespace, u.tenant) not in tenants
            and (u.kind == "tag" or (u.namespace, u.tenant) in tagged)
        )
    }


def plan(
    units: Collection[Unit],
    table_of: Mapping[Invalidation, str | None],
    budget: float | None,
    *,
    keep_overflow: Collection[tuple[str, str]] = (),
    tenant_keys: bool = True,
) -> list[Unit]:
    """``units`` escalated until they cost <= ``budget`` (or as far as escalation goes),
    tags first and overflow keys last (an overflow key must not go out before its
    tenant's tags: see :class:`Worker`). ``table_of`` names each tenant-scoped tag's
    table tag (absent or None: it can only escalate to its tenant key).
    ``keep_overflow``: tenants whose tags already went out; their overflow key is
    still due unless their tenant key goes. ``tenant_keys=False``: the layer cannot
    purge a tenant key (a layer reached only through ``invalidate_many``)."""
    pinned = {Unit("overflow", ns, t) for ns, t in keep_overflow}

    def normal(candidate: set[Unit]) -> set[Unit]:
        out = _normal(candidate | pinned)
        tenants = {(u.namespace, u.tenant) for u in out if u.kind == "tenant"}
        return out | {p for p in pinned if (p.namespace, p.tenant) not in tenants}

    current = normal(set(units))
    while budget is not None and cost(current) > budget:
        groups: dict[Unit, set[Unit]] = defaultdict(set)  # coarser key -> tags it covers
        for u in current:
            if u.kind != "tag":
                continue
            if tenant_keys:
                groups[Unit("tenant", u.namespace, u.tenant)].add(u)
            table = table_of.get(Invalidation(u.namespace, u.tenant, u.name))
            if table is not None:
                groups[Unit("table", u.namespace, None, table)].add(u)
        best: set[Unit] | None = None
        for coarse, group in sorted(groups.items()):
            candidate = normal((current - group) | {coarse})
            if best is None or cost(candidate) < cost(best):
                best = candidate
        if best is None or cost(best) >= cost(current):
            break  # as coarse as it gets: the caller waits for the tokens
        current = best
    return sorted(current, key=_send_order)


_ORDER: Final = {"table": 0, "tenant": 1, "tag": 2, "overflow": 3}


def _send_order(unit: Unit) -> tuple[int, Unit]:
    return _ORDER[unit.kind], unit


class KeyBucket:
    """A token bucket in surrogate keys that can say what it holds (clock injected).

    >>> b = KeyBucket(10, 1.0, clock=lambda: 0.0)
    >>> b.take(4), b.available(), b.take(7)
    (0.0, 6.0, 1.0)
    """

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._tokens = float(capacity)
        self._at = clock()

    def available(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self, n: float) -> float:
        """Take ``n`` tokens and return 0.0, or take none and return the seconds to wait."""
        n = min(n, self.capacity)
        if self.available() + 1e-9 >= n:
            self._tokens = max(0.0, self._tokens - n)
            return 0.0
        return (n - self._tokens) / self.rate

    def drain(self) -> None:
        """The vendor refused: its budget is tighter than ours (another client shares it)."""
        self.available()
        self._tokens = 0.0


class PurgerBucket:
    """A purger's token bucket seen in surrogate keys, with :class:`KeyBucket`'s methods.

    :meth:`take` only says whether the keys fit (and how long until they do): the
    purger takes the tokens when it sends the purge, so a purge costs its tokens
    once, not once here and once there.
    """

    def __init__(self, bucket: TokenBucket, keys_per_token: float = 1.0) -> None:
        self.shared = bucket
        self.keys_per_token = keys_per_token
        self.capacity = bucket.capacity * keys_per_token
        self.rate = bucket.rate * keys_per_token

    def available(self) -> float:
        return self.shared.available() * self.keys_per_token

    def take(self, n: float) -> float:
        """0.0 if ``n`` keys fit now, else the seconds until they do; takes nothing."""
        n = min(n, self.capacity)
        tokens = min(self.shared.capacity, math.ceil(n / self.keys_per_token - 1e-9))
        return self.shared.wait_time(tokens)

    def drain(self) -> None:
        """The vendor refused: its budget is tighter than ours (another client spends it)."""
        self.shared.drain()


def surrogate_keys(scheme: Any, units: Iterable[Unit]) -> dict[str, Unit]:
    """Each unit's surrogate key at ``scheme``'s vendor (the same encoding responses use)."""
    from tieredcache.keys import Tag
    from tieredcache.layers.cdn.surrogate import purge_keys, table_key, tag_key, tenant_key

    keys: dict[str, Unit] = {}
    for u in units:
        if u.kind == "tag":
            assert u.tenant is not None
            key = tag_key(scheme, Tag(u.namespace, u.tenant, u.name))
        elif u.kind == "overflow":
            assert u.tenant is not None
            key = purge_keys(scheme, [Tag(u.namespace, u.tenant, "x")])[-1]
        elif u.kind == "table":
            key = table_key(scheme, u.namespace, u.name)
        else:
            assert u.tenant is not None
            key = tenant_key(scheme, u.namespace, u.tenant)
        keys[key] = u
    return keys
