"""The worker's logic without Kafka: progress bookkeeping, retries of failed layers only,
coalescing, fail-safe mapping, the CDN's own progress, health and configuration."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdc._progress import Progress
from cdc._target import split_layers, to_items
from cdc.config import load_config
from cdc.health import HealthServer
from cdc.rules import Invalidation, Rules, TableRule
from cdc.worker import Worker, WorkerSettings
from tieredcache.errors import BackendError, ConfigurationError

TP = ("shop.public.products", 0)


# --------------------------------------------------------------------------- fakes


@dataclass
class Failure:
    layer: str
    reason: str
    retry_after: float | None = None
    detail: str = ""


@dataclass
class Result:
    failures: list[Failure] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [f.layer for f in self.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def pending(self) -> list[str]:
        return []

    def wait_purges(self, timeout: float | None = None) -> Result:
        return self


@dataclass
class Layer:
    name: str
    cdc_role: str


class FakeCache:
    """Records calls; ``fail[layer]`` is how many more calls that layer fails."""

    def __init__(self, namespace: str = "shop", cdn: bool = False) -> None:
        self.namespace = namespace
        self.layers: Sequence[Any] = [Layer("memory", "storage"), Layer("redis", "storage")]
        if cdn:
            self.layers = [*self.layers, Layer("cdn", "cdn")]
        self.fail: dict[str, tuple[int, str, float | None]] = {}
        self.calls: list[tuple[list[Any], list[str]]] = []

    def invalidate_many(
        self, items: Iterable[Any], *, layers: Collection[str] | None = None
    ) -> Result:
        names = list(layers or ())
        self.calls.append((list(items), names))
        failures = []
        for name in names:
            count, reason, retry_after = self.fail.get(name, (0, "", None))
            if count > 0:
                self.fail[name] = (count - 1, reason, retry_after)
                failures.append(Failure(name, reason, retry_after))
        return Result(failures)


def rules() -> Rules:
    return Rules(
        [
            TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"]),
            TableRule("public.categories", "tenant_id", ["category:{id}"], ["shop"]),
        ],
        message_prefix=None,
    )


def worker(cache: FakeCache, **overrides: Any) -> Worker:
    values: dict[str, Any] = {
        "bootstrap_servers": "127.0.0.1:1",
        "topics": ["t"],
        "backoff_initial": 0.01,
        "backoff_max": 0.04,
    }
    values.update(overrides)
    return Worker(WorkerSettings(**values), rules(), [cache])  # type: ignore[list-item]


# --------------------------------------------------------------------------- progress


def test_commit_waits_for_both_sides_and_never_passes_the_cdn() -> None:
    progress = Progress(cdn=True)
    progress.assign([TP])
    first = progress.stamp({TP: 10}, {TP: 1000})
    second = progress.stamp({TP: 20}, {TP: 2000})
    progress.storage_acked(first)
    progress.storage_acked(second)
    assert progress.committable() == {}  # the CDN confirmed nothing yet
    progress.cdn_acked(first)
    assert progress.committable() == {TP: 10}
    progress.committed({TP: 10})
    assert progress.snapshot()[TP] == (20, 10, 10, 2000)  # oldest uncommitted event: 2000
    assert progress.committable() == {}


def test_without_a_cdn_the_storage_ack_is_enough() -> None:
    progress = Progress(cdn=False)
    progress.assign([TP])
    progress.storage_acked(progress.stamp({TP: 5}, {}))
    assert progress.committable() == {TP: 5}


def test_an_ack_from_before_a_revoke_is_ignored() -> None:
    """A batch read under an old assignment must not move the new assignment's commit."""
    progress = Progress(cdn=False)
    progress.assign([TP])
    stale = progress.stamp({TP: 50}, {})
    assert progress.release([TP]) == {}
    progress.assign([TP])  # assigned again: reading restarts at the committed offset
    progress.storage_acked(stale)
    assert progress.committable() == {}


def test_revoke_returns_what_may_still_be_committed() -> None:
    progress = Progress(cdn=False)
    progress.assign([TP])
    progress.storage_acked(progress.stamp({TP: 7}, {}))
    assert progress.release([TP]) == {TP: 7}
    assert not progress.owns(TP)


# --------------------------------------------------------------------------- applying


def test_invalidations_are_grouped_per_tenant_with_all_tenants_first() -> None:
    items = to_items(
        {
            Invalidation("shop", "b", "x:1"),
            Invalidation("shop", "a", "x:2"),
            Invalidation("shop", "a", "x:1"),
            Invalidation("shop", None, "table:t"),
        }
    )
    assert [(i.tenant, tuple(i.tags)) for i in items] == [
        (None, ("table:t",)),
        ("a", ("x:1", "x:2")),
        ("b", ("x:1",)),
    ]


def test_layers_split_into_storage_with_broadcast_and_cdn() -> None:
    assert split_layers(FakeCache(cdn=True)) == (["memory", "redis", "broadcast"], ["cdn"])  # type: ignore[arg-type]


def test_only_the_failed_layer_is_retried_with_backoff() -> None:
    cache = FakeCache()
    cache.fail["redis"] = (2, "refused", None)
    w = worker(cache)
    waits: list[float] = []
    wanted = {"shop": {Invalidation("shop", "acme", "product:1")}}
    assert w._apply(
        wanted,
        {"shop": ["memory", "redis", "broadcast"]},
        "storage",
        lambda d: waits.append(d) or True,
    )
    assert [names for _, names in cache.calls] == [
        ["memory", "redis", "broadcast"],
        ["redis"],
        ["redis"],
    ]
    assert waits == [0.01, 0.02]
    reg = w.metrics.registry
    assert reg.get_sample_value("tieredcache_cdc_retries_total", {"side": "storage"}) == 2
    assert (
        reg.get_sample_value(
            "tieredcache_cdc_layer_failures_total", {"layer": "redis", "reason": "refused"}
        )
        == 2
    )
    assert (
        reg.get_sample_value("tieredcache_cdc_blocked", {"layer": "redis", "reason": "refused"})
        == 0
    )
    assert reg.get_sample_value("tieredcache_cdc_invalidations_total", {"layer": "redis"}) == 1
    assert w.status.failing == {}


def test_retry_after_from_a_rate_limited_layer_is_honoured() -> None:
    cache = FakeCache(cdn=True)
    cache.fail["cdn"] = (1, "rate-limited", 0.7)
    w = worker(cache)
    waits: list[float] = []
    w._apply(
        {"shop": {Invalidation("shop", "acme", "product:1")}},
        {"shop": ["cdn"]},
        "cdn",
        lambda d: waits.append(d) or True,
    )
    assert waits == [0.7]


def test_a_stop_while_a_layer_fails_gives_up_the_batch() -> None:
    """Told to stop, the worker leaves the batch uncommitted instead of waiting forever."""
    cache = FakeCache()
    cache.fail["redis"] = (1000, "timeout", None)
    w = worker(cache)
    blocked: list[bool] = []

    def wait(delay: float) -> bool:
        blocked.append(w.status.ready()[0])
        return len(blocked) < 3

    assert not w._apply(
        {"shop": {Invalidation("shop", "a", "p:1")}}, {"shop": ["redis"]}, "storage", wait
    )
    assert blocked == [False, False, False]  # /readyz said why while it waited
    assert w.status.ready() == (False, "starting")


def test_a_dead_letter_invalidates_its_table_or_every_table() -> None:
    w = worker(FakeCache())
    assert w._fail_safe("shop.public.products", None) == {
        Invalidation("shop", None, "table:public.products")
    }
    assert w._fail_safe("unknown-topic", None) == {
        Invalidation("shop", None, "table:public.products"),
        Invalidation("shop", None, "table:public.categories"),
    }


def test_every_namespace_of_the_rules_needs_a_cache() -> None:
    with pytest.raises(ConfigurationError, match="shop"):
        worker(FakeCache(namespace="other"))


# --------------------------------------------------------------------------- health, config


def test_health_endpoints_report_liveness_readiness_and_metrics() -> None:
    w = worker(FakeCache())
    server = HealthServer(w.status, w.metrics.registry, host="127.0.0.1", port=0).start()
    base = f"http://127.0.0.1:{server.port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert get("/healthz") == (200, "ok\n")
        assert get("/readyz") == (503, "starting\n")
        w.status.consuming = True
        assert get("/readyz") == (503, "waiting for a partition assignment\n")
        w.status.assigned = True
        assert get("/readyz") == (200, "ok\n")
        w.status.failing["redis"] = "refused"
        assert get("/readyz") == (503, "failing: redis: refused\n")
        w.status.last_loop -= 3600
        assert get("/healthz")[0] == 503
        assert "tieredcache_cdc_events_per_second" in get("/metrics")[1]
    finally:
        server.stop()


def test_config_file_loads_kafka_cache_and_worker_sections(tmp_path: Path) -> None:
    path = tmp_path / "cdc.toml"
    path.write_text("""
[kafka]
bootstrap_servers = "${BROKER}"
topics = ["shop.public.products"]
consumer = { "session.timeout.ms" = 6000 }
[cache]
redis_url = "redis://localhost:6379/0"
[worker]
batch_size = 10
health_port = 9999
[tables."public.products"]
tenant_column = "tenant_id"
tags = ["product:{id}"]
namespaces = ["shop"]
""")
    config = load_config(path, env={"BROKER": "k:9092"})
    assert config.worker.bootstrap_servers == "k:9092"
    assert config.worker.batch_size == 10
    assert config.worker.consumer_config()["session.timeout.ms"] == 6000
    assert config.health_port == 9999
    path.write_text(path.read_text().replace("batch_size", "batch_sise"))
    with pytest.raises(ConfigurationError, match=r"\[worker\] unknown field\(s\) batch_sise"):
        load_config(path, env={"BROKER": "k:9092"})


class FailingProducer:
    """A producer whose delivery reports all fail (an unreachable dead-letter topic)."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.callbacks.append(kwargs["on_delivery"])

    def flush(self, timeout: float) -> int:
        for callback in self.callbacks:
            callback("Local: Message timed out", None)
        return 0


class Msg:
    def topic(self) -> str:
        return "shop.public.products"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"garbage"


def test_an_unconfirmed_dead_letter_stops_the_worker() -> None:
    from cdc.worker import DeadLetterError

    w = worker(FakeCache())
    w._producer = FailingProducer()
    with pytest.raises(DeadLetterError, match=r"did not confirm 1 record.*Message timed out"):
        w._dead_letter([(Msg(), ValueError("bad"))])
    assert (
        w.metrics.registry.get_sample_value(
            "tieredcache_cdc_dead_letters_total", {"topic": "shop.public.products"}
        )
        is None
    )


# --------------------------------------------------------------------------- readiness


@dataclass
class Part:
    topic: str
    partition: int


def test_ready_only_once_the_group_assigned_partitions_and_not_during_a_rebalance() -> None:
    """Connected is not ready: /readyz waits for on_assign; a revoke of everything makes
    it not ready again until the next assignment."""
    w = worker(FakeCache())
    w.status.consuming = True  # subscribed, the group join still running
    assert w.status.ready() == (False, "waiting for a partition assignment")
    w._on_assign(None, [Part("t", 0), Part("t", 1)])
    assert w.status.ready() == (True, "ok")
    w._on_revoke(None, [Part("t", 0)])  # an incremental revoke keeps partition 1
    assert w.status.ready() == (True, "ok")
    w._on_revoke(None, [Part("t", 1)])
    assert w.status.ready() == (False, "waiting for a partition assignment")
    w._on_assign(None, [Part("t", 1)])
    w._on_lost(None, [Part("t", 1)])
    assert w.status.ready()[0] is False


def test_an_empty_assignment_after_the_join_is_ready() -> None:
    """More members than partitions: the join completed and gave this one none. It is a
    ready standby (it takes partitions over on a rebalance), not a starting worker."""
    w = worker(FakeCache())
    w.status.consuming = True
    w._on_assign(None, [])
    assert w.status.ready() == (True, "ok")


# --------------------------------------------------------------------------- batch timing


class Rec:
    """A consumed record, as confluent-kafka hands it over."""

    def __init__(self, offset: int, value: dict[str, Any] | None) -> None:
        self._offset = offset
        self._value = None if value is None else json.dumps(value).encode()

    def topic(self) -> str:
        return TP[0]

    def partition(self) -> int:
        return TP[1]

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b'{"tenant_id": "acme", "id": 1}'

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> None:
        return None


def _change(op: str, ts_ms: int, snapshot: str = "false") -> dict[str, Any]:
    row = {"tenant_id": "acme", "id": 1}
    source = {"schema": "public", "table": "products", "ts_ms": ts_ms, "snapshot": snapshot}
    return {"op": op, "before": None, "after": row, "source": source}


def test_skipped_snapshot_reads_are_not_timed_as_invalidated_nor_counted_as_lag() -> None:
    """Snapshot rows (op r, skipped by default) invalidate nothing: the commit-to-
    invalidated histogram and the lag's oldest event time only see real changes."""
    cache = FakeCache()
    w = worker(cache)
    w.clock = lambda: 1_000.0
    w.progress.assign([TP])
    batch = [
        Rec(0, _change("r", 10_000, "true")),  # 990 s old: would dominate both figures
        Rec(1, _change("r", 10_000, "last")),
        Rec(2, _change("u", 999_500)),  # 0.5 s before the clock
        Rec(3, None),  # a tombstone
    ]
    prepared = w._prepare(batch)
    assert prepared.ts_ms == [999_500]
    assert w.progress.snapshot()[TP][3] == 999_500  # the lag's oldest uncommitted event
    assert w._process(batch)
    reg = w.metrics.registry
    name = "tieredcache_cdc_commit_to_invalidated_seconds"
    assert reg.get_sample_value(f"{name}_count", {"side": "storage"}) == 1
    assert reg.get_sample_value(f"{name}_sum", {"side": "storage"}) == pytest.approx(0.5)
    assert reg.get_sample_value(f"{name}_bucket", {"side": "storage", "le": "0.25"}) == 0
    assert reg.get_sample_value(f"{name}_bucket", {"side": "storage", "le": "0.5"}) == 1
    events = "tieredcache_cdc_events_total"  # the batch was prepared twice: counts doubled
    assert reg.get_sample_value(events, {"topic": TP[0], "kind": "skipped"}) == 4
    assert reg.get_sample_value(events, {"topic": TP[0], "kind": "change"}) == 2
    assert reg.get_sample_value(events, {"topic": TP[0], "kind": "ignored"}) == 2


def test_with_include_snapshot_a_snapshot_read_is_an_invalidation_and_timed() -> None:
    cache = FakeCache()
    w = Worker(
        WorkerSettings(bootstrap_servers="127.0.0.1:1", topics=["t"]),
        Rules(
            [TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])],
            message_prefix=None,
            include_snapshot=True,
        ),
        [cache],  # type: ignore[list-item]
    )
    w.progress.assign([TP])
    prepared = w._prepare([Rec(0, _change("r", 5_000, "true"))])
    assert prepared.ts_ms == [5_000]
    assert prepared.wanted == {Invalidation("shop", "acme", "product:1")}


class DriftingCache(FakeCache):
    """A cache whose application's published settings disagree for the first
    ``disagree`` checks."""

    def __init__(self, disagree: int, unreadable: Sequence[int] = ()) -> None:
        super().__init__()
        self.disagree = disagree
        self.unreadable = set(unreadable)  # the checks (0-based) that time out
        self.checks: list[bool] = []

    def check_settings(self, *, unpublished_ok: bool = False) -> list[str]:
        self.checks.append(unpublished_ok)
        if len(self.checks) - 1 in self.unreadable:
            raise BackendError("redis", "check_settings", "timed out")
        if self.disagree > 0:
            self.disagree -= 1
            return ["layer 'redis': tenant_slots is '1' here but '4' in the application"]
        return []


def test_a_settings_disagreement_holds_the_batch_until_it_agrees_again() -> None:
    """An application redeployed with other settings: the worker invalidates nothing
    (it would go to names nobody reads), says why on /readyz and in the metrics, and
    retries, re-reading the settings each time, until they agree; then the batch goes."""
    cache = DriftingCache(disagree=2)
    w = worker(cache)
    seen: list[tuple[bool, str]] = []

    def wait(delay: float) -> bool:
        seen.append(w.status.ready())
        return True

    w.status.consuming = w.status.assigned = True
    wanted = {"shop": {Invalidation("shop", "acme", "product:1")}}
    assert w._apply(wanted, {"shop": ["memory", "redis"]}, "storage", wait)
    assert cache.checks == [True, True, True]  # read again on every retry, unknown ok
    assert [names for _, names in cache.calls] == [["memory", "redis"]]  # once, at the end
    assert seen == [(False, "failing: settings: mismatch")] * 2
    reg = w.metrics.registry
    labels = {"layer": "settings", "reason": "mismatch"}
    assert reg.get_sample_value("tieredcache_cdc_layer_failures_total", labels) == 2
    assert reg.get_sample_value("tieredcache_cdc_blocked", labels) == 0
    assert w.status.ready() == (True, "ok")
    # Agreeing now, the settings are not read again before the interval has passed.
    assert w._apply(wanted, {"shop": ["memory", "redis"]}, "storage", wait)
    assert cache.checks == [True, True, True]


def test_the_settings_check_can_be_turned_off() -> None:
    cache = DriftingCache(disagree=5)
    w = worker(cache, settings_check_interval=0)
    wanted = {"shop": {Invalidation("shop", "acme", "product:1")}}
    assert w._apply(wanted, {"shop": ["redis"]}, "storage", lambda d: True)
    assert cache.checks == [] and len(cache.calls) == 1


def test_the_first_attempt_leaves_a_disagreeing_namespace_to_the_retry_loop() -> None:
    cache = DriftingCache(disagree=1)
    w = worker(cache)
    items = {"shop": to_items({Invalidation("shop", "acme", "product:1")})}
    assert w._attempt(items, {"shop": ["redis"]}) == {}
    assert cache.calls == []


def test_a_settings_read_that_fails_while_held_keeps_the_batch_held() -> None:
    """A timeout reading the settings is no verdict: a namespace held for a
    disagreement stays held (it is not invalidated under the wrong settings)."""
    cache = DriftingCache(disagree=2, unreadable=[1])
    w = worker(cache)
    wanted = {"shop": {Invalidation("shop", "acme", "product:1")}}
    assert w._apply(wanted, {"shop": ["redis"]}, "storage", lambda d: True)
    # disagree, unreadable (still held), disagree, agree: then the batch goes, once
    assert len(cache.checks) == 4
    assert len(cache.calls) == 1
    reg = w.metrics.registry
    labels = {"layer": "settings", "reason": "mismatch"}
    assert reg.get_sample_value("tieredcache_cdc_layer_failures_total", labels) == 3
