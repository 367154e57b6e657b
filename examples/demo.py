"""End-to-end demo: two replicas of a small product service under load.

    bash scripts/demo.sh                 # sets everything up, then runs this
    python -m examples.demo --seconds 5  # once set up

What it does: starts its own Redis on a free loopback port, fills a SQLite
"database" with products for three tenants, and runs two replicas of a service
(each: in-process layer + the shared Redis layer) under a Zipf load of async
requests, with 1% of requests updating a product and invalidating its tag.
It then checks that no replica serves a value older than the database, and
prints what the cache saved the database and the hit rates per layer and per
tenant, the last through ``tieredcache stats`` scraping the Prometheus
endpoint, as an operator would.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from scripts.services import redis_server
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="load duration")
    parser.add_argument("--workers", type=int, default=64, help="concurrent requests")
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
