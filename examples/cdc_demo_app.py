"""One application process of the CDC demo (``examples/demo.py`` starts two).

    python -m examples.cdc_demo_app --redis redis://... --dsn postgresql://...

A product service over PostgreSQL ``public.products`` with an in-process layer
and the shared Redis layer (and so the replica broadcast). The tags of its
cached functions are rendered from the same :class:`TagTemplate` objects that
the demo writes into the CDC worker's rules (:func:`rules_toml`), so the two
cannot drift apart.

It takes one JSON command per line on stdin and answers one JSON line on
stdout: ``read`` (items), ``wait`` (read until the items equal the expected
values; answers the wall-clock time of the first fresh read), ``stats``,
``quit``. An item is ``["product", tenant, id]`` or ``["category", tenant, id]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from tieredcache import MemoryLayer, RedisLayer, TieredCache
from tieredcache.tags import TagTemplate

NAMESPACE = "shop"
TABLE = "public.products"
TABLE_TAG = f"table:{TABLE}"
PRODUCT = TagTemplate("product:{id}")
CATEGORY = TagTemplate("category:{category_id}")

SCHEMA = """
CREATE TABLE products (
    tenant_id   text    NOT NULL,
    id          integer NOT NULL,
    category_id integer NOT NULL,
    name        text    NOT NULL,
    price_cents integer NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
-- Full old rows in every update and delete: a row that moves to another
-- category invalidates the category it left, not only the one it joined.
ALTER TABLE products REPLICA IDENTITY FULL;
"""

Item = tuple[str, str, int]


def rules_toml() -> str:
    """The ``[tables]`` part of the worker's TOML, from the templates above."""
    tags = ", ".join(json.dumps(t.template) for t in (PRODUCT, CATEGORY))
    return (
        f'[tables."{TABLE}"]\n'
        'tenant_column = "tenant_id"\n'
        f"tags = [{tags}]\n"
        f'namespaces = ["{NAMESPACE}"]\n'
        'replica_identity = "full"\n'
        f'table_tag = "{TABLE_TAG}"\n'
    )


def load_product(
    conn: psycopg.Connection[Any], tenant: str, product_id: int
) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT tenant_id, id, category_id, name, price_cents FROM products"
        " WHERE tenant_id = %s AND id = %s",
        (tenant, product_id),
    ).fetchone()
    if row is None:
        return None
    return dict(zip(("tenant_id", "id", "category_id", "name", "price_cents"), row, strict=True))


def load_category(conn: psycopg.Connection[Any], tenant: str, category_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT id FROM products WHERE tenant_id = %s AND category_id = %s ORDER BY id",
        (tenant, category_id),
    ).fetchall()
    return [r[0] for r in rows]


def load_item(conn: psycopg.Connection[Any], item: Item) -> Any:
    """What the database says now (the demo's reference for freshness)."""
    kind, tenant, ident = item
    if kind == "product":
        return load_product(conn, tenant, ident)
    return load_category(conn, tenant, ident)


class App:
    """The cached reads; ``reads`` counts calls of the cached functions."""

    def __init__(self, redis_url: str, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.cache = TieredCache(
            NAMESPACE, [MemoryLayer(maxsize=10_000), RedisLayer(url=redis_url)]
        )
        self.reads = 0
        conn = self.conn

        @self.cache.cached(
            ttl=300,
            tags=lambda tenant, product_id: [PRODUCT.render({"id": product_id}), TABLE_TAG],
            name="get_product",
        )
        def get_product(tenant: str, product_id: int) -> dict[str, Any] | None:
            return load_product(conn, tenant, product_id)

        @self.cache.cached(
            ttl=300,
            tags=lambda tenant, category_id: [
                CATEGORY.render({"category_id": category_id}),
                TABLE_TAG,
            ],
            name="list_category",
        )
        def list_category(tenant: str, category_id: int) -> list[int]:
            return load_category(conn, tenant, category_id)

        self._readers: dict[str, Callable[[str, int], Any]] = {
            "product": get_product,
            "category": list_category,
        }
        if not self.cache.connect(5.0):
            raise SystemExit("the replica broadcast subscription did not come up within 5 s")

    def read(self, items: list[Item]) -> list[Any]:
        self.reads += len(items)
        # JSON round trip: cached values compare equal to the database's as the demo sees them.
        values: list[Any] = json.loads(json.dumps([self._readers[k](t, i) for k, t, i in items]))
        return values

    def wait(self, items: list[Item], expect: list[Any], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        rounds = 0
        while True:
            values = self.read(items)
            rounds += 1
            if values == expect:
                return {"fresh": True, "fresh_at": time.time(), "rounds": rounds}
            if time.monotonic() >= deadline:
                return {"fresh": False, "values": values, "rounds": rounds}
            time.sleep(0.001)

    def stats(self) -> dict[str, Any]:
        stats = self.cache.stats()
        return {
            "reads": self.reads,
            "loader_calls": stats.loader.calls,
            "layers": {
                name: {"hits": layer.hits, "misses": layer.misses}
                for name, layer in stats.layers.items()
            },
        }

    def close(self) -> None:
        self.cache.close()
        self.conn.close()


def serve(app: App) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        items: list[Item] = [(k, t, int(i)) for k, t, i in command.get("items", ())]
        if op == "read":
            answer: Any = {"values": app.read(items)}
        elif op == "wait":
            answer = app.wait(items, command["expect"], command["timeout"])
        elif op == "stats":
            answer = app.stats()
        elif op == "quit":
            print(json.dumps({"bye": True}), flush=True)
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--dsn", required=True)
    args = parser.parse_args(argv)
    app = App(args.redis, args.dsn)
    try:
        print(json.dumps({"ready": True}), flush=True)
        serve(app)
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
