"""Write-back end to end: writes acknowledged by a Redis Stream journal, served from the
cache at once, and flushed to SQLite in batches by a background flusher.

    python -m examples.write_back                        # starts its own Redis
    python -m examples.write_back redis://127.0.0.1:6379/0

The Redis it starts runs with ``appendfsync always``: an acknowledged write then
survives a crash of Redis too (see "Loss window" in ``tieredcache.writeback``).
The SQLite upsert is guarded by the record's version, so a batch delivered twice
(a flusher killed between commit and ack) changes nothing the second time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
from collections.abc import Iterator
from typing import Any

from scripts.services import redis_server
from tieredcache import MemoryLayer, RedisLayer, TieredCache, current_tenant, tenant_scope
from tieredcache.writeback import RedisStreamJournal, WriteBack, WriteRecord

UPSERT = """
INSERT INTO product (tenant, id, price, version) VALUES (?, ?, ?, ?)
ON CONFLICT (tenant, id) DO UPDATE SET price = excluded.price, version = excluded.version
WHERE excluded.version > product.version
"""


class Database:
    """SQLite shared by the request thread and the flusher thread."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        self.conn.execute(
            "CREATE TABLE product (tenant TEXT, id INT, price INT, version INT,"
            " PRIMARY KEY (tenant, id))"
        )
        self.lock = threading.Lock()
        self.batches = 0

    def price(self, tenant: str, product_id: int) -> int | None:
        with self.lock:
            row = self.conn.execute(
                "SELECT price FROM product WHERE tenant = ? AND id = ?", (tenant, product_id)
            ).fetchone()
        return None if row is None else int(row[0])

    def save_batch(self, records: list[WriteRecord]) -> None:
        """The write-back store: one transaction per batch, idempotent by version."""
        rows = [(r.tenant, r.value["id"], r.value["price"], r.version) for r in records]
        with self.lock, self.conn:
            self.conn.executemany(UPSERT, rows)
            self.batches += 1


@contextlib.contextmanager
def redis_url(argv: list[str]) -> Iterator[str]:
    if argv:
        yield argv[0]
        return
    with redis_server(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server.url


def main(argv: list[str]) -> None:
    db = Database()
    with redis_url(argv) as url:
        cache = TieredCache("shop", [MemoryLayer(), RedisLayer(url=url)])
        journal = RedisStreamJournal("shop", url=url)
        wb = WriteBack(cache, journal=journal, store=db.save_batch)

        @cache.cached(ttl=60, tags=lambda product_id: [f"product:{product_id}"])
        @wb.pending_first  # a miss sees writes the flusher has not stored yet
        def get_product(product_id: int) -> dict[str, Any]:
            return {"id": product_id, "price": db.price(current_tenant() or "", product_id)}

        save_product = wb.writer(get_product)  # save_product(value, product_id) -> journal id

        with tenant_scope("acme"):
            for price in (100, 110, 120):  # three acknowledged writes, no database round trip
                entry_id = save_product({"id": 1, "price": price}, 1)
            print(f"acknowledged {entry_id}; cache: {get_product(1)}")
            print(f"database before the flush: {db.price('acme', 1)}")
            cache.invalidate(tags=["product:1"])  # an eviction: the journal still answers
            print(f"after an eviction: {get_product(1)}")
            for product_id in range(2, 202):
                save_product({"id": product_id, "price": product_id}, product_id)
        print(f"journal backlog: {journal.backlog()} writes")
        # A service runs `with wb.flusher().start():` around its lifetime (a thread,
        # drained when the block ends); here one drain shows the batches.
        report = wb.flusher(batch_size=100).drain()
        print(
            f"flushed {report.stored} rows in {db.batches} batches "
            f"({report.coalesced} writes coalesced); database: {db.price('acme', 1)}"
        )
        wb.close()
        cache.close()


if __name__ == "__main__":
    main(sys.argv[1:])
