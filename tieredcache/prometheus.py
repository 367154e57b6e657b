"""Prometheus exposition of the cache metrics (needs ``tieredcache[metrics]``).

    from prometheus_client import REGISTRY
    REGISTRY.register(cache.prometheus_collector())

or, for a process without a metrics endpoint yet, ``serve_metrics(cache, port=9108)``.
Metric families (all labelled with ``namespace``):

- ``tieredcache_lookups_total{layer,function,tenant,result}``, result = hit | miss | stale
- ``tieredcache_sets_total``, ``tieredcache_invalidations_total``, ``tieredcache_errors_total``
  ``{layer,function,tenant}``
- ``tieredcache_loader_events_total{function,tenant,event}``, event = calls | errors |
  timeouts | lease_rejections | lock_waits | early_refreshes | coalesced
- ``tieredcache_evictions_total{layer}``, ``tieredcache_breaker_open{layer}``
- ``tieredcache_backend{backend,event}``: a Redis layer's timeouts and backlogged
  replies, the replica subscription's up/losses/resyncs/undecodable
- ``tieredcache_operation_seconds{layer,function,operation}`` (histogram)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from .errors import MissingExtraError
from .metrics import (
    ERROR,
    FIELDS,
    HIT,
    INVALIDATION,
    LATENCY_BUCKETS,
    LOADER_NAMES,
    MISS,
    SET,
    STALE,
    Metrics,
)

__all__ = ["MetricsSource", "PrometheusCollector", "serve_metrics"]


class MetricsSource(Protocol):
    """What the collector reads of a cache (``TieredCache`` is one)."""

    def metrics_source(
        self,
    ) -> tuple[
        str, Metrics, Mapping[str, int], Mapping[str, str], Mapping[str, Mapping[str, float]]
    ]:
        """(namespace, metrics, evictions per layer, breaker state per layer, backend
        counters per layer: timeouts, backlogged replies, subscription losses...)."""
        ...


def _prometheus() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise MissingExtraError("metrics", "prometheus-client") from exc
    return core


class PrometheusCollector:
    """A prometheus-client custom collector over one or more caches."""

    def __init__(self, caches: Sequence[MetricsSource]) -> None:
        self.caches = list(caches)
        _prometheus()

    def describe(self) -> list[Any]:
        return []  # no collection at registration time

    def collect(self) -> Iterator[Any]:
        core = _prometheus()
        layer_labels = ["namespace", "layer", "function", "tenant"]
        lookups = core.CounterMetricFamily(
            "tieredcache_lookups", "Cache lookups by result", labels=[*layer_labels, "result"]
        )
        sets = core.CounterMetricFamily("tieredcache_sets", "Entries stored", labels=layer_labels)
        invalidations = core.CounterMetricFamily(
            "tieredcache_invalidations", "Keys and tags invalidated", labels=layer_labels
        )
        errors = core.CounterMetricFamily(
            "tieredcache_errors",
            "Layer failures (timeouts, refused connections, bad entries)",
            labels=layer_labels,
        )
        loader = core.CounterMetricFamily(
            "tieredcache_loader_events",
            "Loader calls and their outcomes",
            labels=["namespace", "function", "tenant", "event"],
        )
        evictions = core.CounterMetricFamily(
            "tieredcache_evictions", "Entries evicted by size", labels=["namespace", "layer"]
        )
        breaker = core.GaugeMetricFamily(
            "tieredcache_breaker_open",
            "1 while a layer's circuit breaker is open",
            labels=["namespace", "layer"],
        )
        backend_events = core.GaugeMetricFamily(
            "tieredcache_backend",
            "What a backend's connections saw: timeouts, replies late because of the "
            "caller's own event loop (backlogged), subscription up/losses/resyncs",
            labels=["namespace", "backend", "event"],
        )
        latency = core.HistogramMetricFamily(
            "tieredcache_operation_seconds",
            "Layer operation latency",
            labels=["namespace", "layer", "function", "operation"],
        )
        for cache in self.caches:
            ns, metrics, layer_evictions, breakers, backends = cache.metrics_source()
            for backend, values in backends.items():
                for event, value in values.items():
                    backend_events.add_metric([ns, backend, event], value)
            for function, tenant, counters in metrics.rows():
                for index, layer in enumerate(metrics.layer_names):
                    base = index * FIELDS
                    labels = [ns, layer, function, tenant]
                    lookups.add_metric([*labels, "hit"], counters[base + HIT])
                    lookups.add_metric([*labels, "miss"], counters[base + MISS])
                    lookups.add_metric([*labels, "stale"], counters[base + STALE])
                    sets.add_metric(labels, counters[base + SET])
                    invalidations.add_metric(labels, counters[base + INVALIDATION])
                    errors.add_metric(labels, counters[base + ERROR])
                for offset, event in enumerate(LOADER_NAMES):
                    value = counters[metrics.loader_base + offset]
                    loader.add_metric([ns, function, tenant, event], value)
            for name, count in layer_evictions.items():
                evictions.add_metric([ns, name], count)
            for name, state in breakers.items():
                breaker.add_metric([ns, name], 0 if state == "closed" else 1)
            for (layer_name, function, operation), histogram in metrics.latency_items():
                cumulative, running = [], 0
                for bound, count in zip(
                    (*LATENCY_BUCKETS, float("inf")), histogram.counts, strict=True
                ):
                    running += count
                    cumulative.append((_bucket(bound), running))
                latency.add_metric(
                    [ns, layer_name, function, operation], cumulative, sum_value=histogram.sum
                )
        yield from (
            lookups,
            sets,
            invalidations,
            errors,
            loader,
            evictions,
            breaker,
            backend_events,
            latency,
        )


def _bucket(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def serve_metrics(*caches: MetricsSource, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` for ``caches`` on ``addr:port`` in a daemon thread; returns the server."""
    _prometheus()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PrometheusCollector(list(caches)))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
