"""Metrics: Prometheus exposition and the ``tieredcache stats`` command."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.cli import aggregate, main
from tieredcache.prometheus import PrometheusCollector, serve_metrics


def _exercised_cache(redis_url: str) -> TieredCache:
    cache = TieredCache("metrics", [MemoryLayer(), RedisLayer(url=redis_url)])

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        return item

    for tenant, calls in (("acme", 5), ("globex", 2)):
        with tenant_scope(tenant):
            for _ in range(calls):
                price(1)  # one miss in each layer, then memory hits
    return cache


def _samples(cache: TieredCache) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(PrometheusCollector([cache]))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.redis
def test_prometheus_exposes_lookups_per_layer_function_and_tenant(redis_url: str) -> None:
    cache = _exercised_cache(redis_url)
    samples = _samples(cache)

    def lookups(layer: str, tenant: str, result: str) -> float:
        labels = {"namespace": "metrics", "layer": layer, "function": "price", "tenant": tenant}
        key = ("tieredcache_lookups_total", tuple(sorted({**labels, "result": result}.items())))
        return samples[key]

    assert lookups("memory", "acme", "hit") == 4
    assert lookups("memory", "acme", "miss") == 1
    assert lookups("redis", "acme", "miss") == 1
    assert lookups("memory", "globex", "hit") == 1
    calls = (
        "tieredcache_loader_events_total",
        (("event", "calls"), ("function", "price"), ("namespace", "metrics"), ("tenant", "acme")),
    )
    assert samples[calls] == 1
    breaker = ("tieredcache_breaker_open", (("layer", "redis"), ("namespace", "metrics")))
    assert samples[breaker] == 0
    assert any(name == "tieredcache_operation_seconds_count" for name, _ in samples)
    cache.close()


@pytest.mark.redis
def test_stats_command_prints_hit_rates_from_a_metrics_endpoint(redis_url: str) -> None:
    cache = _exercised_cache(redis_url)
    server = serve_metrics(cache, port=0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            rows = aggregate(response.read().decode(), "tenant")
        memory_acme = next(r for r in rows if r["layer"] == "memory" and r.get("tenant") == "acme")
        assert memory_acme["hits"] == 4
        assert memory_acme["hit_rate"] == pytest.approx(0.8)
        result = subprocess.run(
            [sys.executable, "-m", "tieredcache.cli", "stats", url, "--by", "tenant"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        lines = result.stdout.splitlines()
        assert lines[0].split()[:3] == ["namespace", "layer", "tenant"]
        assert any(
            line.split()[:3] == ["metrics", "memory", "acme"] and "80.0%" in line for line in lines
        )
    finally:
        server.shutdown()
        server.server_close()
        cache.close()


def test_stats_command_names_an_unreachable_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "http://127.0.0.1:9/metrics", "--timeout", "0.5"]) == 2
    assert "cannot read http://127.0.0.1:9/metrics" in capsys.readouterr().err


def test_tenant_labels_are_bounded() -> None:
    cache = TieredCache("metrics", [MemoryLayer()], max_tenants=2)

    @cache.cached(ttl=60, name="price")
    def price(item: int) -> int:
        return item

    for tenant in ("t1", "t2", "t3", "t4"):
        with tenant_scope(tenant):
            price(1)
    assert set(cache.stats().tenants) == {"t1", "t2", "__other__"}
    assert cache.stats().tenants["__other__"]["memory"].misses == 2


@pytest.mark.redis
def test_stats_and_prometheus_show_what_the_backends_saw(redis_url: str) -> None:
    """stats().backends: the Redis fast path's timeouts and backlogged replies and the
    replica subscription's state, also exported as tieredcache_backend."""
    from prometheus_client import CollectorRegistry, generate_latest

    cache = TieredCache("health", [MemoryLayer(), RedisLayer(url=redis_url)])
    assert cache.connect()
    backends = cache.stats().backends
    assert backends["redis"]["timeouts"] == 0 and backends["redis"]["backlogged"] == 0
    assert backends["broadcast"]["up"] == 1.0
    registry = CollectorRegistry()
    registry.register(cache.prometheus_collector())
    text = generate_latest(registry).decode()
    assert 'tieredcache_backend{backend="broadcast",event="up",namespace="health"} 1.0' in text
    cache.close()


def test_latency_after_a_metrics_reset_is_still_recorded(redis_url: str) -> None:
    """The layer guards keep their histograms between calls; a reset zeroes them in
    place, so latency recorded after it is seen, and nothing from before it."""
    cache = TieredCache("reset", [MemoryLayer(maxsize=10), RedisLayer(url=redis_url)])
    try:

        @cache.cached(ttl=60, name="f")
        def f(n: int) -> int:
            return n

        name = "f"
        with tenant_scope("acme"):
            f(1)
            before = {key: h.count for key, h in cache._metrics.latency_items()}
            assert before[("redis", name, "set")] == 1
            cache._metrics.reset()
            assert cache._metrics.latency_items() == []
            f(2)
        after = {key: h.count for key, h in cache._metrics.latency_items()}
        assert after[("redis", name, "set")] == 1
        assert after[("redis", name, "get")] == 1
    finally:
        cache.close()
