"""Counters and latency histograms per layer, per function and per tenant.

The hot path only does list-item increments: each (function, tenant) pair
owns one flat list of counters, ``FIELDS`` per layer plus the loader's. Tenant
labels are bounded: past ``max_tenants`` distinct tenants, further tenants are
counted under ``"__other__"`` so a tenant-id flood cannot blow up memory or a
Prometheus server.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CacheStats", "LayerStats", "LoaderStats", "Metrics"]

OTHER_TENANTS = "__other__"
HIT, MISS, SET, INVALIDATION, ERROR, STALE = range(6)
FIELDS = 6
FIELD_NAMES = ("hits", "misses", "sets", "invalidations", "errors", "stale_hits")
# Loader counters, after the layers' block.
LOAD_CALLS, LOAD_ERRORS, LOAD_TIMEOUTS, LEASE_REJECTED, LOCK_WAITS, REFRESHES, COALESCED = range(7)
LOADER_FIELDS = 7
LOADER_NAMES = (
    "calls",
    "errors",
    "timeouts",
    "lease_rejections",
    "lock_waits",
    "early_refreshes",
    "coalesced",
)
LATENCY_BUCKETS = (
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Cumulative-bucket latency histogram (Prometheus layout)."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (0 when empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")


@dataclass(slots=True)
class LayerStats:
    """Counts of one layer over some slice (all, a function, a tenant)."""

    hits: int = 0
    misses: int = 0
    sets: int = 0
    invalidations: int = 0
    errors: int = 0
    stale_hits: int = 0
    evictions: int = 0
    latency_p50: float = 0.0
    latency_p99: float = 0.0

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(slots=True)
class LoaderStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    lease_rejections: int = 0
    lock_waits: int = 0
    early_refreshes: int = 0
    # Calls answered by a load another caller of the same key ran (single-flight):
    # with them, the first layer's hits + misses + coalesced = calls.
    coalesced: int = 0


@dataclass(slots=True)
class CacheStats:
    """A snapshot from :meth:`TieredCache.stats`.

    >>> stats = cache.stats()                       # doctest: +SKIP
    >>> stats.layers["memory"].hit_rate             # doctest: +SKIP
    0.93
    >>> stats.tenants["acme"]["redis"].hits         # doctest: +SKIP
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)
    functions: dict[str, dict[str, LayerStats]] = field(default_factory=dict)
    tenants: dict[str, dict[str, LayerStats]] = field(default_factory=dict)
    loader: LoaderStats = field(default_factory=LoaderStats)
    breakers: dict[str, str] = field(default_factory=dict)
    # Per backend (a layer, or "broadcast"): what its connections saw, e.g. the
    # Redis layer's timeouts and backlogged replies, the subscription's losses.
    backends: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Share of lookups answered by any layer rather than the loader."""
        lookups = sum(s.hits for s in self.layers.values()) + self.loader.calls
        hits = sum(s.hits for s in self.layers.values())
        return hits / lookups if lookups else 0.0


class Metrics:
    """The registry of one :class:`~tieredcache.TieredCache`."""

    def __init__(self, layer_names: Sequence[str], max_tenants: int = 100) -> None:
        self.layer_names = tuple(layer_names)
        self.width = len(self.layer_names) * FIELDS + LOADER_FIELDS
        self.loader_base = len(self.layer_names) * FIELDS
        self.max_tenants = max_tenants
        self._tenants: set[str] = set()
        self._by_function: dict[str, dict[str, list[int]]] = {}
        self._latency: dict[tuple[str, str, str], Histogram] = {}
        self._lock = threading.Lock()

    def counters(self, function: str, tenant: str) -> list[int]:
        """The counter list of (function, tenant); cache it per function for the hot path.

        Past ``max_tenants`` tenants, further tenants share the ``"__other__"`` list
        and are remembered nowhere here: every structure of this registry stays within
        ``max_tenants + 1`` entries per function however many tenant ids arrive."""
        per_tenant = self._by_function.get(function)
        if per_tenant is not None:
            found = per_tenant.get(tenant)
            if found is not None:
                return found
            if len(self._tenants) >= self.max_tenants and tenant not in self._tenants:
                found = per_tenant.get(OTHER_TENANTS)
                if found is not None:  # past the cap: the shared list, no lock taken
                    return found
        with self._lock:
            per_tenant = self._by_function.setdefault(function, {})
            label = tenant
            if tenant not in self._tenants:
                if len(self._tenants) >= self.max_tenants:
                    label = OTHER_TENANTS
                else:
                    self._tenants.add(tenant)
            counters = per_tenant.get(label)
            if counters is None:
                counters = per_tenant[label] = [0] * self.width
            return counters

    def histogram(self, layer: str, function: str, operation: str) -> Histogram:
        key = (layer, function, operation)
        found = self._latency.get(key)
        if found is None:
            with self._lock:
                found = self._latency.setdefault(key, Histogram())
        return found

    def rows(self) -> Iterator[tuple[str, str, list[int]]]:
        """(function, tenant label, counters), each label once."""
        for function, per_tenant in list(self._by_function.items()):
            yield from ((function, label, counters) for label, counters in list(per_tenant.items()))

    def latency_items(self) -> list[tuple[tuple[str, str, str], Histogram]]:
        return [
            (key, histogram) for key, histogram in list(self._latency.items()) if histogram.count
        ]

    def reset(self) -> None:
        with self._lock:
            self._by_function.clear()
            # Zeroed in place, not dropped: the layer guards hold on to them.
            for histogram in self._latency.values():
                histogram.counts = [0] * len(histogram.counts)
                histogram.sum = 0.0
                histogram.count = 0
            self._tenants.clear()

    def snapshot(self, evictions: Mapping[str, int], breakers: Mapping[str, str]) -> CacheStats:
        stats = CacheStats(breakers=dict(breakers))
        for name in self.layer_names:
            stats.layers[name] = LayerStats(evictions=evictions.get(name, 0))
        loader = stats.loader
        for function, tenant, counters in self.rows():
            for index, name in enumerate(self.layer_names):
                base = index * FIELDS
                values = counters[base : base + FIELDS]
                for target in (
                    stats.layers[name],
                    stats.functions.setdefault(function, {}).setdefault(name, LayerStats()),
                    stats.tenants.setdefault(tenant, {}).setdefault(name, LayerStats()),
                ):
                    for field_name, value in zip(FIELD_NAMES, values, strict=True):
                        setattr(target, field_name, getattr(target, field_name) + value)
            base = self.loader_base
            for offset, field_name in enumerate(LOADER_NAMES):
                setattr(loader, field_name, getattr(loader, field_name) + counters[base + offset])
        merged: dict[str, Histogram] = {}
        for (layer, _function, _operation), histogram in self.latency_items():
            into = merged.setdefault(layer, Histogram())
            into.counts = [a + b for a, b in zip(into.counts, histogram.counts, strict=True)]
            into.count += histogram.count
            into.sum += histogram.sum
        for layer, histogram in merged.items():
            if layer in stats.layers:
                stats.layers[layer].latency_p50 = histogram.quantile(0.5)
                stats.layers[layer].latency_p99 = histogram.quantile(0.99)
        return stats
