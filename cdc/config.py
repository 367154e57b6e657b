"""The worker's TOML file: the rules (:mod:`cdc._toml`) plus Kafka, cache and worker settings.

Format (``${NAME}`` is replaced from the environment, as in the rules)::

    [kafka]
    bootstrap_servers = "kafka:9092"
    topics = ["shop.public.products"]         # or ["^shop\\\\.public\\\\..*"]
    group_id = "tieredcache-cdc"
    dead_letter_topic = "tieredcache-cdc.dead-letter"
    transaction_topic = "shop.transaction"     # optional
    consumer = { "session.timeout.ms" = 6000 } # optional librdkafka properties
    producer = {}

    [cache]                                    # the application's shared layer
    redis_url = "redis://${REDIS_HOST}:6379/0" # or cluster_nodes = ["h1:7000", ...]
    key_prefix = "tc"
    tenant_slots = 0                           # optional, as the application's

    [worker]
    batch_size = 500
    backoff_max = 5.0
    settings_check_interval = 30.0             # re-read the app's settings (0: never)
    shutdown_grace = 20.0
    health_port = 9464                         # /healthz /readyz /metrics

    [inspector]
    group_id = "tieredcache-cdc-inspector"
    delay = 2.0
    health_port = 9465

    [cdc] ...  [tables."public.products"] ...  # see cdc/_toml.py

An invalidation-only layer (a CDN purger) is added from Python:
``build_caches(config, extra_layers=[purger])``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdc._toml import RulesFileError, _substitute, load_rules
from cdc.rules import Rules
from cdc.worker import WorkerSettings

if TYPE_CHECKING:
    from tieredcache import TieredCache

__all__ = ["CacheSettings", "CdcConfig", "InspectorSettings", "build_caches", "load_config"]


@dataclass(frozen=True)
class CacheSettings:
    redis_url: str | None = None
    cluster_nodes: Sequence[str] = ()
    key_prefix: str = "tc"
    tenant_slots: int | None = None


@dataclass(frozen=True)
class InspectorSettings:
    group_id: str = "tieredcache-cdc-inspector"
    delay: float = 2.0
    health_port: int = 9465
    # Where a new inspector group starts: "latest" checks changes from now on;
    # "earliest" also checks what the topic still holds (a first run, a demo).
    start: str = "latest"


@dataclass(frozen=True)
class CdcConfig:
    rules: Rules
    worker: WorkerSettings
    cache: CacheSettings
    inspector: InspectorSettings = field(default_factory=InspectorSettings)
    health_port: int = 9464


_WORKER_KEYS = {f.name for f in fields(WorkerSettings)} - {
    "bootstrap_servers",
    "topics",
    "group_id",
    "dead_letter_topic",
    "transaction_topic",
    "consumer",
    "producer",
}
_KAFKA_KEYS = {
    "bootstrap_servers",
    "topics",
    "group_id",
    "dead_letter_topic",
    "transaction_topic",
    "consumer",
    "producer",
    "heartbeat_prefix",
}


def _section(data: Mapping[str, Any], name: str, allowed: set[str], file: Path) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise RulesFileError(f"{file}: [{name}] must be a table")
    unknown = set(section) - allowed
    if unknown:
        raise RulesFileError(
            f"{file}: [{name}] unknown field(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(allowed))}"
        )
    return dict(section)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> CdcConfig:
    """Read the whole worker configuration; every error names the file and field."""
    file = Path(path)
    environment = os.environ if env is None else env
    rules = load_rules(file, env=environment)  # reports unreadable files and bad rules
    data = _substitute(tomllib.loads(file.read_text()), environment, str(file))
    kafka = _section(data, "kafka", _KAFKA_KEYS, file)
    for required in ("bootstrap_servers", "topics"):
        if required not in kafka:
            raise RulesFileError(f"{file}: [kafka] field {required!r} is required")
    if not isinstance(kafka["topics"], list) or not kafka["topics"]:
        raise RulesFileError(f"{file}: [kafka] topics must be a non-empty list")
    worker = _section(data, "worker", _WORKER_KEYS | {"health_port"}, file)
    health_port = int(worker.pop("health_port", 9464))
    cache = _section(data, "cache", {f.name for f in fields(CacheSettings)}, file)
    if ("redis_url" in cache) == bool(cache.get("cluster_nodes")):
        raise RulesFileError(f"{file}: [cache] needs exactly one of redis_url, cluster_nodes")
    inspector = _section(data, "inspector", {f.name for f in fields(InspectorSettings)}, file)
    try:
        settings = WorkerSettings(**kafka, **worker)
    except TypeError as exc:
        raise RulesFileError(f"{file}: [kafka]/[worker]: {exc}") from None
    return CdcConfig(
        rules=rules,
        worker=settings,
        cache=CacheSettings(**cache),
        inspector=InspectorSettings(**inspector),
        health_port=health_port,
    )


def namespaces(rules: Rules) -> list[str]:
    """Every namespace the rules invalidate."""
    found = {ns for rule in rules.tables.values() for ns in rule.namespaces}
    return sorted(found | set(rules.message_namespaces))


def build_caches(config: CdcConfig, extra_layers: Sequence[Any] = ()) -> list[TieredCache]:
    """One publish-only ``TieredCache`` per namespace on the configured Redis.

    Publish-only: the worker sends the replica broadcast and runs no subscriber.
    ``extra_layers`` (a CDN purger, ...) are shared by every namespace's cache.
    """
    from tieredcache import RedisLayer, TieredCache

    caches: list[TieredCache] = []
    c = config.cache
    for ns in namespaces(config.rules):
        if c.redis_url is not None:
            redis = RedisLayer(
                url=c.redis_url, key_prefix=c.key_prefix, tenant_slots=c.tenant_slots
            )
        else:
            nodes = [(h, int(p)) for h, p in (n.rsplit(":", 1) for n in c.cluster_nodes)]
            redis = RedisLayer(
                cluster_nodes=nodes, key_prefix=c.key_prefix, tenant_slots=c.tenant_slots
            )
        # A short breaker reset: the worker retries a failed layer itself, with backoff.
        caches.append(
            TieredCache(ns, [redis, *extra_layers], broadcast="publish", breaker_reset=1.0)
        )
    return caches
