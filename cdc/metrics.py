"""Prometheus metrics of the CDC worker (``prometheus_client``), in a registry of their own.

Names (all prefixed ``tieredcache_cdc_``):

=====================================  ==========================================
``events_total{topic,kind}``           records consumed; kind = change, ignored,
                                       skipped (snapshot reads the rules skip),
                                       dead_letter (``rate()`` gives events/s)
``events_per_second``                  the same, averaged over the last ~5 s
``invalidations_total{layer}``         invalidations a layer acknowledged
``layer_failures_total{layer,reason}`` failed attempts (timeout, refused, ...)
``retries_total{side}``                retries of a batch (storage or cdn)
``blocked{layer,reason}``              1 while that layer holds partitions back
``dead_letters_total{topic}``          records sent to the dead-letter topic
``lag_messages{topic,partition}``      high watermark minus committed offset
``lag_seconds{topic,partition}``       now minus ``source.ts_ms`` of the oldest
                                       consumed, uncommitted event (0 if none)
``commit_to_invalidated_seconds``      histogram, database commit (``source.ts_ms``)
``{side}``                             to the side's layers acknowledged; only
                                       events that invalidated (not skipped
                                       snapshot reads, heartbeats, tombstones)
``paused``                             1 while partitions are paused for a retry
=====================================  ==========================================

Retries and ``blocked`` say *why* the lag grows: the worker never skips.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["WorkerMetrics"]

_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    """The worker's metrics; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "tieredcache_cdc"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.events = Counter(f"{p}_events", "Records consumed", ["topic", "kind"], registry=r)
        self.events_per_second = Gauge(
            f"{p}_events_per_second", "Records consumed per second (last ~5 s)", registry=r
        )
        self.invalidations = Counter(
            f"{p}_invalidations", "Invalidations acknowledged per layer", ["layer"], registry=r
        )
        self.layer_failures = Counter(
            f"{p}_layer_failures", "Failed invalidation attempts", ["layer", "reason"], registry=r
        )
        self.retries = Counter(f"{p}_retries", "Batch retries", ["side"], registry=r)
        self.blocked = Gauge(
            f"{p}_blocked",
            "1 while a failing layer holds partitions back",
            ["layer", "reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Records sent to the dead-letter topic", ["topic"], registry=r
        )
        self.lag_messages = Gauge(
            f"{p}_lag_messages",
            "High watermark minus committed offset",
            ["topic", "partition"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            f"{p}_lag_seconds",
            "Now minus source.ts_ms of the oldest uncommitted event",
            ["topic", "partition"],
            registry=r,
        )
        self.commit_to_invalidated = BatchHistogram(
            f"{p}_commit_to_invalidated_seconds",
            "Database commit (source.ts_ms) to all of a side's layers acknowledged",
            "side",
            _BUCKETS,
        )
        r.register(self.commit_to_invalidated)
        self.paused = Gauge(f"{p}_paused", "1 while partitions are paused", registry=r)
        self._window: deque[tuple[float, int]] = deque()

    def count_events(self, n: int, now: float | None = None) -> None:
        """Feed the events/s gauge (the counters are incremented per topic elsewhere)."""
        now = time.monotonic() if now is None else now
        self._window.append((now, n))
        while self._window and self._window[0][0] < now - 5.0:
            self._window.popleft()
        span = max(now - self._window[0][0], 1.0)
        self.events_per_second.set(sum(k for _, k in self._window) / span)

    def forget_partition(self, topic: str, partition: int) -> None:
        for gauge in (self.lag_messages, self.lag_seconds):
            with contextlib.suppress(KeyError):
                gauge.remove(topic, str(partition))


class BatchHistogram(Collector):
    """A Prometheus histogram with one label, fed a whole batch at a time.

    ``prometheus_client.Histogram.observe`` takes one value and a lock per call:
    a few microseconds an event, as much as decoding it. Here a batch's values are
    sorted into buckets with ``bisect`` and added under one lock.

    >>> h = BatchHistogram("lat_seconds", "Latency", "side", (0.01, 0.1))
    >>> h.observe_since("storage", 10.0, [9_995, 9_950, 9_000])
    >>> h.counts("storage")
    ([1, 1, 1], 1.055)
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Iterable[float]):
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # per label value: per bucket, +Inf last
        self._sums: dict[str, float] = {}

    def observe_since(self, value: str, now: float, ts_ms: Iterable[int]) -> None:
        """Observe ``now - ts / 1000`` (at least 0) for each epoch-ms ``ts``."""
        now_ms = now * 1000
        bounds = [b * 1000 for b in self.bounds]
        where = bisect.bisect_left
        added = [0] * (len(bounds) + 1)
        total = 0.0
        for ts in ts_ms:
            ms = now_ms - ts
            if ms < 0:
                ms = 0.0
            added[where(bounds, ms)] += 1
            total += ms
        with self._lock:
            counts = self._counts.setdefault(value, [0] * (len(bounds) + 1))
            for i, n in enumerate(added):
                counts[i] += n
            self._sums[value] = self._sums.get(value, 0.0) + total / 1000

    def counts(self, value: str) -> tuple[list[int], float]:
        """(per-bucket counts, +Inf last, not cumulative; sum of observations)."""
        with self._lock:
            counts = list(self._counts.get(value, [0] * (len(self.bounds) + 1)))
            return counts, round(self._sums.get(value, 0.0), 9)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            items = [(v, list(c), self._sums[v]) for v, c in sorted(self._counts.items())]
        for value, counts, total in items:
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip([*self.bounds, float("inf")], counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            family.add_metric([value], buckets, total)
        yield family
