"""End-to-end demo: a row changes in PostgreSQL, and every cache layer of two
application processes sees it.

    bash scripts/demo.sh                      # sets everything up, then runs this
    python -m examples.demo                   # once set up: the CDC chain
    python -m examples.demo --redis-only      # the two-replica Redis demo alone

The CDC chain (the default) starts, on free loopback ports, a throwaway
PostgreSQL (``wal_level=logical``), Redis, a Kafka-protocol broker (tansu), the
real Debezium engine publishing ``public.products`` to Kafka
(:mod:`cdc.source`), the CDC worker (``python -m cdc run``) and two application
processes (:mod:`examples.cdc_demo_app`: an in-process layer + Redis + the
replica broadcast). It warms every layer, then updates a row, moves one to
another category, one to another tenant, and deletes one; it measures, per
application, the time from the database commit to the first fresh read, runs
the coherence inspector, and exits non-zero on a stale read or a survivor.

``--redis-only`` runs two replicas of a product service (SQLite behind it,
three tenants, 64 concurrent async requests, Zipf-distributed products, 1%
writes that invalidate by hand) and prints the database load saved and the
per-layer, per-tenant hit rates through ``tieredcache stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from scripts.services import free_port, log_tail, redis_server, wait_until
from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.prometheus import serve_metrics

TENANTS = {"acme": 0.6, "globex": 0.3, "initech": 0.1}  # share of traffic
PRODUCTS = 5_000


class Product(msgspec.Struct):
    id: int
    name: str
    price_cents: int
    version: int


class Database:
    """SQLite with a 2 ms round trip, counting queries."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute(
            "CREATE TABLE products (tenant TEXT, id INT, name TEXT, price INT, version INT,"
            " PRIMARY KEY (tenant, id))"
        )
        rows = [
            (tenant, i, f"{tenant} product {i}", 100 + i, 1)
            for tenant in TENANTS
            for i in range(PRODUCTS)
        ]
        self.conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?, ?)", rows)
        self.queries = 0

    async def product(self, tenant: str, product_id: int) -> Product:
        self.queries += 1
        await asyncio.sleep(0.002)
        row = self.conn.execute(
            "SELECT id, name, price, version FROM products WHERE tenant = ? AND id = ?",
            (tenant, product_id),
        ).fetchone()
        return Product(*row)

    def update_price(self, tenant: str, product_id: int) -> None:
        self.conn.execute(
            "UPDATE products SET price = price + 1, version = version + 1"
            " WHERE tenant = ? AND id = ?",
            (tenant, product_id),
        )

    def version(self, tenant: str, product_id: int) -> int:
        row = self.conn.execute(
            "SELECT version FROM products WHERE tenant = ? AND id = ?", (tenant, product_id)
        ).fetchone()
        return int(row[0])


def make_replica(redis_url: str, db: Database) -> tuple[TieredCache, object]:
    cache = TieredCache(
        namespace="shop", layers=[MemoryLayer(maxsize=3_000), RedisLayer(url=redis_url)]
    )

    @cache.cached(ttl=300, tags=lambda product_id: [f"product:{product_id}"], name="get_product")
    async def get_product(product_id: int) -> Product:
        from tieredcache import current_tenant

        return await db.product(current_tenant() or "", product_id)

    return cache, get_product


def zipf_ids(rng: random.Random, count: int) -> list[int]:
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(PRODUCTS)]
    return rng.choices(range(PRODUCTS), weights=weights, k=count)


async def run_load(
    replicas: list[tuple[TieredCache, object]], db: Database, seconds: float, workers: int
) -> tuple[int, int, set[tuple[str, int]]]:
    rng = random.Random(42)
    ids = zipf_ids(rng, 200_000)
    tenants = rng.choices(list(TENANTS), weights=list(TENANTS.values()), k=len(ids))
    deadline = time.monotonic() + seconds
    requests = writes = 0
    updated: set[tuple[str, int]] = set()

    async def worker(index: int) -> None:
        nonlocal requests, writes
        position = index
        while time.monotonic() < deadline:
            position = (position + workers) % len(ids)
            tenant, product_id = tenants[position], ids[position]
            cache, get_product = replicas[position % len(replicas)]
            with tenant_scope(tenant):
                if position % 100 == 0:  # 1 % writes: update the row, invalidate its tag
                    db.update_price(tenant, product_id)
                    await cache.ainvalidate(tags=[f"product:{product_id}"])
                    updated.add((tenant, product_id))
                    writes += 1
                else:
                    await get_product(product_id)  # type: ignore[operator]
                    requests += 1

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return requests, writes, updated


async def verify(
    replicas: list[tuple[TieredCache, object]], db: Database, updated: set[tuple[str, int]]
) -> int:
    await asyncio.sleep(0.2)  # let the last broadcasts arrive
    stale = 0
    for tenant, product_id in sorted(updated)[:500]:
        for _cache, get_product in replicas:
            with tenant_scope(tenant):
                product = await get_product(product_id)  # type: ignore[operator]
            if product.version != db.version(tenant, product_id):
                stale += 1
    return stale


def redis_demo(args: argparse.Namespace) -> int:
    """Part 1 (``--redis-only``): two replicas under load, invalidating by hand."""
    with tempfile.TemporaryDirectory() as tmp, redis_server() as redis:
        print(f"redis: {redis.url} (started for this demo)")
        db = Database(Path(tmp) / "shop.db")
        replicas = [make_replica(redis.url, db) for _ in range(2)]
        for cache, _ in replicas:
            cache.connect()  # subscribe to invalidations before the load starts
        metrics_server = serve_metrics(replicas[0][0], port=0)
        metrics_url = f"http://127.0.0.1:{metrics_server.server_port}/metrics"

        async def scenario() -> tuple[int, int, set[tuple[str, int]], int, float]:
            started = time.perf_counter()
            requests, writes, updated = await run_load(replicas, db, args.seconds, args.workers)
            elapsed = time.perf_counter() - started
            stale = await verify(replicas, db, updated)
            for cache, _ in replicas:
                await cache.aclose()
            return requests, writes, updated, stale, elapsed

        requests, writes, updated, stale, elapsed = asyncio.run(scenario())
        print(
            f"\n{requests:,} reads and {writes:,} writes in {elapsed:.1f} s "
            f"({requests / elapsed:,.0f} reads/s) over 2 replicas, 3 tenants"
        )
        print(
            f"database queries: {db.queries:,} -> the cache absorbed "
            f"{1 - db.queries / max(requests, 1):.1%} of reads "
            f"({requests / max(db.queries, 1):.0f}x less database load)"
        )
        checked = min(len(updated), 500)
        print(f"stale reads after {len(updated):,} updates (checked {checked}): {stale}")
        for index, (cache, _) in enumerate(replicas, 1):
            stats = cache.stats()
            rates = ", ".join(
                f"{name} {layer.hit_rate:.1%} (p50 {layer.latency_p50 * 1e6:.0f} us)"
                for name, layer in stats.layers.items()
            )
            print(f"replica {index}: {rates}; loader calls {stats.loader.calls:,}")
        print(f"\n$ tieredcache stats {metrics_url} --by tenant   (replica 1)")
        cli = Path(sys.executable).with_name("tieredcache")
        subprocess.run([str(cli), "stats", metrics_url, "--by", "tenant"], check=True)
        metrics_server.shutdown()
        metrics_server.server_close()
        return 1 if stale else 0


# --------------------------------------------------------------------------- the CDC chain

ROOT = Path(__file__).resolve().parents[1]
CDC_TENANTS = ("acme", "globex", "initech")
CDC_PRODUCTS = 12
CDC_CATEGORIES = (1, 2, 3)
TOPIC_PREFIX = "demo"
INSPECTOR_DELAY = 1.0


def _category(product_id: int) -> int:
    return 1 + product_id % 3


#: (what, SQL, the items whose cached reads it changes)
CHANGES: list[tuple[str, str, list[tuple[str, str, int]]]] = [
    (
        "price update  acme/1",
        "UPDATE products SET price_cents = price_cents + 1, name = name || ' (sale)'"
        " WHERE tenant_id = 'acme' AND id = 1",
        [("product", "acme", 1)],
    ),
    (
        "category move acme/4: 2 -> 3",
        "UPDATE products SET category_id = 3 WHERE tenant_id = 'acme' AND id = 4",
        [("product", "acme", 4), ("category", "acme", 2), ("category", "acme", 3)],
    ),
    (
        "tenant move   globex/5 -> initech/50",
        "UPDATE products SET tenant_id = 'initech', id = 50 WHERE tenant_id = 'globex' AND id = 5",
        [
            ("product", "globex", 5),
            ("product", "initech", 50),
            ("category", "globex", _category(5)),
            ("category", "initech", _category(5)),
        ],
    ),
    (
        "delete        globex/7",
        "DELETE FROM products WHERE tenant_id = 'globex' AND id = 7",
        [("product", "globex", 7), ("category", "globex", _category(7))],
    ),
]


def _all_items() -> list[tuple[str, str, int]]:
    """Every product and category list, plus initech/50, absent until the tenant move."""
    items = [("product", t, i) for t in CDC_TENANTS for i in range(1, CDC_PRODUCTS + 1)]
    items.append(("product", "initech", 50))
    items += [("category", t, c) for t in CDC_TENANTS for c in CDC_CATEGORIES]
    return items


class AppProcess:
    """One application subprocess, driven by JSON lines on its stdin/stdout."""

    def __init__(self, name: str, redis_url: str, dsn: str, log: Path) -> None:
        self.name = name
        self.log = log
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.cdc_demo_app", "--redis", redis_url, "--dsn", dsn],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            cwd=ROOT, text=True,
        )  # fmt: skip

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise RuntimeError(
                f"{self.name} exited ({self.proc.returncode}):\n{log_tail(self.log)}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call({"op": "quit"})
                self.proc.wait(10)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class _CountingInspector:
    """Wraps :class:`cdc.inspector.CoherenceInspector` to count the events it checked."""

    def __init__(self, inspector: Any) -> None:
        self.inspector = inspector
        self.events = 0
        self.survivors: list[Any] = []

    def check(self, invalidations: Any, commit_ts: float) -> list[Any]:
        found: list[Any] = self.inspector.check(invalidations, commit_ts)
        self.events += 1
        self.survivors += found
        return found


def _worker_toml(dsn: str, bootstrap: str, redis_url: str, health_port: int) -> str:
    from examples.cdc_demo_app import rules_toml

    return (
        "[cdc]\n"
        f'dsn = "{dsn}"\n'
        'message_prefix = ""\n\n'
        "[kafka]\n"
        f'bootstrap_servers = "{bootstrap}"\n'
        f'topics = ["{TOPIC_PREFIX}.public.products"]\n'
        'group_id = "demo-cdc"\n'
        'dead_letter_topic = "demo-cdc.dead-letter"\n\n'
        "[cache]\n"
        f'redis_url = "{redis_url}"\n\n'
        "[worker]\n"
        f"health_port = {health_port}\n"
        "shutdown_grace = 5.0\n\n"
        "[inspector]\n"
        'group_id = "demo-inspector"\n'
        f"delay = {INSPECTOR_DELAY}\n\n" + rules_toml()
    )


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    if not wait_until(predicate, timeout):
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def _step(text: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:5.1f} s] {text}", flush=True)


def _worker_metrics(port: int) -> list[Any]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return list(text_string_to_metric_families(response.read().decode()))


def _skipped_events(port: int) -> float:
    """Records the worker consumed and skipped on purpose (snapshot reads)."""
    return sum(
        float(sample.value)
        for family in _worker_metrics(port)
        if family.name == "tieredcache_cdc_events"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("kind") == "skipped"
    )


def _commit_to_invalidated(port: int) -> tuple[float, float]:
    """(count, sum) of the worker's storage-side commit-to-invalidated histogram."""
    count = total = 0.0
    for family in _worker_metrics(port):
        if family.name == "tieredcache_cdc_commit_to_invalidated_seconds":
            for sample in family.samples:
                if sample.labels.get("side") == "storage":
                    if sample.name.endswith("_count"):
                        count = sample.value
                    elif sample.name.endswith("_sum"):
                        total = sample.value
    return count, total


def cdc_demo() -> int:
    """The whole chain; 0 when every read is fresh and the inspector finds no survivor."""
    import confluent_kafka
    import psycopg
    import redis as redis_py

    from cdc.config import load_config
    from cdc.inspector import CoherenceInspector, InspectorLoop
    from cdc.source import DebeziumKafkaSource, DebeziumSettings, log4j_options
    from examples.cdc_demo_app import SCHEMA, load_item
    from scripts.kafka_service import TansuBroker
    from scripts.services import PostgresServer

    started = time.perf_counter()
    topic = f"{TOPIC_PREFIX}.public.products"
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tieredcache-demo-")))
        # synchronous_commit on: logical decoding sends only flushed WAL, and with it
        # off a commit waits for the WAL writer (wal_writer_delay, 200 ms) to reach Debezium.
        pg = stack.enter_context(PostgresServer(settings={"synchronous_commit": "on"}))
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO products VALUES (%s, %s, %s, %s, %s)",
                    [
                        (t, i, _category(i), f"{t} product {i}", 100 * i)
                        for t in CDC_TENANTS
                        for i in range(1, CDC_PRODUCTS + 1)
                    ],
                )
        redis = stack.enter_context(redis_server())
        broker = stack.enter_context(TansuBroker())
        _step(f"postgres {pg.host}:{pg.port}, redis {redis.url}, tansu {broker.bootstrap}", started)

        # The applications start while the JVM does: they need only PostgreSQL and Redis.
        apps = [AppProcess(f"app{n}", redis.url, pg.dsn, tmp / f"app{n}.log") for n in (1, 2)]
        for app in apps:
            stack.callback(app.stop)

        snapshot_done = threading.Event()

        def delivered(topic_: str, partition: int, offset: int, key: object, value: object) -> None:
            if topic_ == topic:
                snapshot_done.set()

        source = DebeziumKafkaSource(
            DebeziumSettings(
                host=pg.host, port=pg.port, user="postgres", database="postgres",
                tables=["public.products"], offsets_file=tmp / "offsets.dat",
                topic_prefix=TOPIC_PREFIX, slot_name="demo", publication_name="demo",
                heartbeat_interval_ms=1000,
            ),
            {"bootstrap.servers": broker.bootstrap, "linger.ms": 0},
            on_delivered=delivered,
            jvm_opts=log4j_options(tmp, level="ERROR"),
        )  # fmt: skip
        source.start()
        stack.callback(source.stop)  # engine.close(), then the producer: before tansu stops
        for app in apps:
            app.receive()  # {"ready": true}: the broadcast subscription is up

        items = _all_items()
        for app in apps:  # app1 fills Redis, app2 fills its memory from Redis; then all hit
            app.call({"op": "read", "items": items})
        for app in apps:
            app.call({"op": "read", "items": items})
        _step(f"both apps warm: {len(items)} items each (products and category lists)", started)

        _wait_for(snapshot_done.wait, 60, "the Debezium snapshot to reach Kafka")
        _step(f"debezium: snapshot of public.products on topic {topic}", started)

        config_path = tmp / "cdc.toml"
        health_port = free_port()
        config_path.write_text(_worker_toml(pg.dsn, broker.bootstrap, redis.url, health_port))
        worker_log = tmp / "worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "cdc", "run", "--config", str(config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        worker_rc: list[int] = []

        def stop_worker() -> None:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)  # finish the batch, commit, leave the group
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            worker_rc.append(worker.returncode)

        stack.callback(stop_worker)

        # The inspector, in this process: its own group, from the beginning of the topic
        # (snapshot reads map to nothing), so joining late misses no event.
        config = load_config(config_path)
        redis_client = redis_py.Redis.from_url(redis.url)
        stack.callback(redis_client.close)
        counting = _CountingInspector(CoherenceInspector(redis_client, tenant_slots=1))
        consumer = confluent_kafka.Consumer(
            {
                **config.worker.consumer_config(),
                "group.id": config.inspector.group_id,
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topic])
        loop = InspectorLoop(
            consumer,
            config.rules,
            counting,  # type: ignore[arg-type]  # duck-typed: only check() is called
            delay=config.inspector.delay,
        )
        inspector_thread = threading.Thread(target=loop.run, name="inspector", daemon=True)
        inspector_thread.start()

        def stop_inspector() -> None:
            loop.stop()
            inspector_thread.join(10)
            consumer.close()

        stack.callback(stop_inspector)

        def worker_assigned() -> bool:
            if worker.poll() is not None:
                tail = log_tail(worker_log)
                raise RuntimeError(f"the worker exited ({worker.returncode}):\n{tail}")
            return "assigned [(" in worker_log.read_text(errors="replace")

        _wait_for(worker_assigned, 30, "the CDC worker to join its consumer group")
        snapshot_rows = len(CDC_TENANTS) * CDC_PRODUCTS
        _wait_for(
            lambda: _skipped_events(health_port) >= snapshot_rows,
            30,
            "the worker to pass the snapshot (skipped: the caches were filled after it)",
        )
        before = _commit_to_invalidated(health_port)
        _step("worker: `python -m cdc run` checked the rules, joined group demo-cdc", started)

        # The chain: commit, then both apps read until fresh; clock from COMMIT's return.
        latencies: dict[str, list[float]] = {app.name: [] for app in apps}
        print()
        with psycopg.connect(pg.dsn, autocommit=True) as db:
            for what, sql, changed in CHANGES:
                with db.transaction():
                    db.execute(sql)
                committed_at = time.time()
                expect = [load_item(db, item) for item in changed]
                for app in apps:
                    app.send({"op": "wait", "items": changed, "expect": expect, "timeout": 20})
                cells = []
                for app in apps:
                    answer = app.receive()
                    if not answer["fresh"]:
                        raise RuntimeError(f"{app.name} still stale 20 s after {what!r}: {answer}")
                    latency = answer["fresh_at"] - committed_at
                    latencies[app.name].append(latency)
                    cells.append(f"{app.name} {latency * 1e3:5.1f} ms")
                print(f"  {what:<38} commit -> fresh read: {', '.join(cells)}", flush=True)
            print()

            # Settled: every item, in both apps, against the database.
            truth = [load_item(db, item) for item in items]
        stale = 0
        for app in apps:
            values = app.call({"op": "read", "items": items})["values"]
            for item, got, want in zip(items, values, truth, strict=True):
                if got != want:
                    stale += 1
                    print(f"STALE in {app.name}: {item}: cached {got!r}, database {want!r}")
        _step(f"settled: {len(items)} items re-read in both apps, {stale} stale", started)

        _wait_for(lambda: counting.events >= len(CHANGES), 30, "the inspector's checks")
        time.sleep(INSPECTOR_DELAY + 0.5)  # any event still due (a tenant move is two)
        stop_inspector()
        _step(
            f"inspector: {counting.events} change events checked {INSPECTOR_DELAY:g} s after"
            f" arrival, survivors: {len(counting.survivors)}",
            started,
        )
        stats = [app.call({"op": "stats"}) for app in apps]
        after = _commit_to_invalidated(health_port)
        worker_histogram = (after[0] - before[0], after[1] - before[1])

    # Everything is stopped here: apps, worker, inspector, Debezium, tansu, Redis, PostgreSQL.
    rc = worker_rc[0] if worker_rc else None
    print("\nsummary")
    for app, s in zip(apps, stats, strict=True):
        layers = ", ".join(
            f"{name} {v['hits']:,} hits / {v['misses']:,} misses" for name, v in s["layers"].items()
        )
        print(f"  {app.name}: {s['reads']:,} reads; {layers}; database loads {s['loader_calls']}")
    every = sorted(x for values in latencies.values() for x in values)
    print(
        f"  commit -> fresh read in both apps ({len(every)} measurements): "
        f"min {every[0] * 1e3:.1f} ms, median {every[len(every) // 2] * 1e3:.1f} ms, "
        f"max {every[-1] * 1e3:.1f} ms"
    )
    count, total = worker_histogram
    if count:
        print(
            f"  worker: database commit (source.ts_ms) -> every layer invalidated:"
            f" mean {total / count * 1e3:.1f} ms over {count:g} change events"
        )
    print(f"  stale reads after the chain settled: {stale}")
    print(f"  inspector survivors: {len(counting.survivors)}")
    print(f"  worker exit code after SIGTERM: {rc}")
    print(f"  total {time.perf_counter() - started:.1f} s; everything stopped")
    return 1 if stale or counting.survivors or counting.events < len(CHANGES) or rc != 0 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-only", action="store_true", help="the two-replica Redis demo, without CDC"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="--redis-only: load duration")
    parser.add_argument("--workers", type=int, default=64, help="--redis-only: concurrent requests")
    args = parser.parse_args(argv)
    if args.redis_only:
        return redis_demo(args)
    return cdc_demo()


if __name__ == "__main__":
    sys.exit(main())
