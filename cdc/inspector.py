"""The coherence inspector (after Uber's Cache Inspector for CacheFront).

It follows the change topics in a consumer group of its own and, ``delay``
seconds after each event, checks the shared layer: an entry that still carries
one of the event's invalidated tags and was written (``Entry.created_at``)
before the event's database commit (``source.ts_ms``) is a *survivor*: the
worker missed it, or has not reached it yet if ``delay`` is shorter than the
worker's lag. The target is zero. Survivors are logged with their key and
counted in ``tieredcache_cdc_inspector_survivors_total``.

What it reads in Redis (see ``tieredcache/layers/redis/keyspace.py``): the tag
set ``{prefix}:{ns:tenant:bucket}:t:<tag>`` in every bucket, then each member
value's header (the ``EntryCodec`` header: magic, version, flags, created_at,
...). All-tenant invalidations are not inspected: they are an O(1) epoch
checked on every read, so there is no entry to survive them.

``tolerance`` absorbs clock skew between the database and the application
hosts: an entry created less than ``tolerance`` seconds before the commit is
not counted.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from cdc.debezium import ChangeEvent, EventDecodeError, decode_record
from cdc.rules import Invalidation, Rules, UnmappableEventError

__all__ = ["CoherenceInspector", "Survivor", "run_inspector"]

log = logging.getLogger("cdc.inspector")

# EntryCodec's header (tieredcache/serde.py): magic "TC", version, flags, created_at, ...
_HEADER = struct.Struct("<2sBBdddf")


@dataclass(frozen=True, slots=True)
class Survivor:
    """An entry written before the commit that invalidated it, still in the shared layer."""

    invalidation: Invalidation
    redis_key: str
    created_at: float
    commit_ts: float


class CoherenceInspector:
    """Checks one Redis (standalone or cluster client) for survivors of invalidations."""

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "tc",
        tenant_slots: int = 1,
        tolerance: float = 0.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.tenant_slots = tenant_slots
        self.tolerance = tolerance
        self.registry = registry if registry is not None else CollectorRegistry()
        self.survivors = Counter(
            "tieredcache_cdc_inspector_survivors",
            "Entries found carrying an invalidated tag, written before the event's commit",
            ["namespace"],
            registry=self.registry,
        )
        self.checked = Counter(
            "tieredcache_cdc_inspector_checked",
            "Tenant-scoped invalidations inspected",
            ["namespace"],
            registry=self.registry,
        )
        self.last_survivors = Gauge(
            "tieredcache_cdc_inspector_last_survivors",
            "Survivors found by the most recent check",
            registry=self.registry,
        )

    def check(self, invalidations: Iterable[Invalidation], commit_ts: float) -> list[Survivor]:
        """Survivors of ``invalidations`` committed at ``commit_ts`` (wall-clock seconds)."""
        found: list[Survivor] = []
        for inv in invalidations:
            if inv.tenant is None:
                continue  # an epoch, checked on every read: nothing can survive it
            self.checked.labels(inv.namespace).inc()
            for bucket in range(self.tenant_slots):
                slot = f"{self.key_prefix}:{{{inv.namespace}:{inv.tenant}:{bucket}}}"
                members = sorted(self.client.smembers(f"{slot}:t:{inv.tag}"))
                if not members:
                    continue
                values = self.client.mget(members)
                for name, data in zip(members, values, strict=True):
                    if data is None or len(data) < _HEADER.size:
                        continue
                    magic, _version, _flags, created, *_ = _HEADER.unpack_from(data)
                    if magic != b"TC":
                        continue
                    if created < commit_ts - self.tolerance:
                        key = name.decode() if isinstance(name, bytes) else str(name)
                        found.append(Survivor(inv, key, created, commit_ts))
        for survivor in found:
            self.survivors.labels(survivor.invalidation.namespace).inc()
            log.error(
                "survivor: %s (written %.3f, invalidated by a commit at %.3f) for %s",
                survivor.redis_key,
                survivor.created_at,
                survivor.commit_ts,
                survivor.invalidation,
            )
        self.last_survivors.set(len(found))
        return found


class InspectorLoop:
    """Consume the change topics and check each event ``delay`` seconds after it arrived."""

    def __init__(
        self,
        consumer: Any,
        rules: Rules,
        inspector: CoherenceInspector,
        *,
        delay: float,
        transaction_topic: str | None = None,
    ) -> None:
        self.consumer = consumer
        self.rules = rules
        self.inspector = inspector
        self.delay = delay
        self.transaction_topic = transaction_topic
        self._due: list[tuple[float, int, set[Invalidation], float]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self.total_survivors = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                self._schedule(msg)
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, invalidations, commit_ts = heapq.heappop(self._due)
                self.total_survivors += len(self.inspector.check(invalidations, commit_ts))

    def _schedule(self, msg: Any) -> None:
        try:
            event = decode_record(
                msg.topic(),
                msg.key(),
                msg.value(),
                headers=msg.headers(),
                transaction_topic=self.transaction_topic,
            )
            if not isinstance(event, ChangeEvent) or event.ts_ms is None:
                return
            invalidations = self.rules.invalidations(event)
        except (EventDecodeError, UnmappableEventError):
            return  # the worker dead-letters it and invalidates the whole table
        if invalidations:
            due = time.monotonic() + self.delay
            heapq.heappush(self._due, (due, next(self._seq), invalidations, event.ts_ms / 1000))


def run_inspector(config: Any, *, health_port: int | None = None) -> int:
    """``tieredcache-cdc inspect``: run until SIGTERM/SIGINT."""
    import signal

    import confluent_kafka
    import redis

    from cdc.health import HealthServer, WorkerStatus

    c = config.cache
    client: Any
    if c.redis_url is not None:
        client = redis.Redis.from_url(c.redis_url)
    else:
        nodes = [
            redis.cluster.ClusterNode(h, int(p))  # type: ignore[no-untyped-call]
            for h, p in (n.rsplit(":", 1) for n in c.cluster_nodes)
        ]
        client = redis.RedisCluster(startup_nodes=nodes)
    inspector = CoherenceInspector(
        client, key_prefix=c.key_prefix, tenant_slots=c.tenant_slots or (1 if c.redis_url else 16)
    )  # RedisLayer's default
    settings = config.worker
    consumer = confluent_kafka.Consumer(
        {
            **settings.consumer_config(),
            "group.id": config.inspector.group_id,
            "enable.auto.commit": True,
            "auto.offset.reset": config.inspector.start,
        }
    )
    consumer.subscribe(list(settings.topics))
    loop = InspectorLoop(
        consumer,
        config.rules,
        inspector,
        delay=config.inspector.delay,
        transaction_topic=settings.transaction_topic,
    )
    status = WorkerStatus(consuming=True)
    port = config.inspector.health_port if health_port is None else health_port
    health = HealthServer(status, inspector.registry, port=port).start()
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    try:
        loop.run()
    finally:
        consumer.close()
        health.stop()
        client.close()
    print(f"survivors: {loop.total_survivors}")
    return 0 if loop.total_survivors == 0 else 3
