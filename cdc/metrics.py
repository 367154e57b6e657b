"""Prometheus metrics of the CDC worker (``prometheus_client``), in a registry of their own.

Names (all prefixed ``tieredcache_cdc_``):

=====================================  ==========================================
``events_total{topic,kind}``           records consumed; kind = change, ignored,
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
``{side}``                             to the side's layers acknowledged
``paused``                             1 while partitions are paused for a retry
=====================================  ==========================================

Retries and ``blocked`` say *why* the lag grows: the worker never skips.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.commit_to_invalidated = Histogram(
            f"{p}_commit_to_invalidated_seconds",
            "Database commit (source.ts_ms) to all of a side's layers acknowledged",
            ["side"],
            buckets=_BUCKETS,
            registry=r,
        )
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
