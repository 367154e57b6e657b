"""The writing process of the write-back crash test; the test SIGKILLs it mid-stream.

    python tests/writeback_worker.py REDIS_URL DSN WRITES PAUSE

The main thread saves item ``i = 0, 1, ...`` (one key per item) through a
WriteBack and prints ``ack <journal id> <i>`` once each write is acknowledged.
A flusher thread stores batches in PostgreSQL; after each commit it prints
``stored <count>`` and sleeps PAUSE seconds before it acks, so a kill in that
window leaves a committed batch unacknowledged in the journal (it will be
delivered, and stored, again).

The store (``PgStore``) is also what the test's recovery flusher uses.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.writeback import RedisStreamJournal, WriteBack, WriteRecord

NAMESPACE = "wbcrash"
TENANT = "acme"
SCHEMA = """
CREATE TABLE wb_item (
    tenant text NOT NULL,
    id bigint NOT NULL,
    n bigint NOT NULL,
    version bigint NOT NULL,
    applied integer NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE wb_call (version bigint PRIMARY KEY, calls integer NOT NULL)
"""
# Exactly once in effect: a row only moves forward in journal order, so a write
# delivered twice (or older than the row) changes nothing; `applied` counts changes.
UPSERT = """
INSERT INTO wb_item (tenant, id, n, version) VALUES (%s, %s, %s, %s)
ON CONFLICT (tenant, id) DO UPDATE
SET n = EXCLUDED.n, version = EXCLUDED.version, applied = wb_item.applied + 1
WHERE wb_item.version < EXCLUDED.version
"""
# Every committed delivery of a version, applied or not.
COUNT_CALL = """
INSERT INTO wb_call (version, calls) VALUES (%s, 1)
ON CONFLICT (version) DO UPDATE SET calls = wb_call.calls + 1
"""


class PgStore:
    """An idempotent batch store: one transaction per batch, guarded upserts."""

    def __init__(
        self, dsn: str, after_commit: Callable[[list[WriteRecord]], None] | None = None
    ) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.after_commit = after_commit

    def __call__(self, records: list[WriteRecord]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            for record in records:
                value = record.value
                cur.execute(UPSERT, (record.tenant, value["id"], value["n"], record.version))
                cur.execute(COUNT_CALL, (record.version,))
        if self.after_commit is not None:
            self.after_commit(records)

    def close(self) -> None:
        self.conn.close()


_out = threading.Lock()


def emit(line: str) -> None:
    with _out:  # one write per line: the two threads' lines never interleave
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main() -> None:
    url, dsn, writes, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    cache = TieredCache(NAMESPACE, [MemoryLayer(), RedisLayer(url=url)])

    def committed(records: list[WriteRecord]) -> None:
        emit(f"stored {len(records)}")
        time.sleep(pause)

    store = PgStore(dsn, after_commit=committed)
    wb = WriteBack(cache, journal=RedisStreamJournal(NAMESPACE, url=url), store=store)

    @cache.cached(ttl=300, name="item")
    @wb.pending_first
    def get_item(item_id: int) -> dict[str, Any]:
        return {"id": item_id, "n": -1}

    save = wb.writer(get_item)
    wb.flusher(batch_size=100, block=0.05).start()  # never stopped: the test kills us
    with tenant_scope(TENANT):
        for i in range(writes):
            entry_id = save({"id": i, "n": i}, i)
            emit(f"ack {entry_id} {i}")
    emit("done")
    time.sleep(3600)


if __name__ == "__main__":
    main()
