"""Record real Debezium envelopes into ``tests/cdc_recordings/`` (one JSON file per case).

Starts a throwaway PostgreSQL 15 and a tansu broker, runs the real Debezium
engine (``cdc.source.DebeziumKafkaSource``) twice in one JVM:

* ``plain``: ``converter.schemas.enable=false``, ``decimal.handling.mode=string``;
* ``schema``: schemas enabled, ``decimal.handling.mode=precise``, transaction metadata on;

and for each run performs the scripted changes below, saving every record Kafka
acknowledged as ``{"topic", "partition", "offset", "key", "value"}`` (strings or null).

    .venv/bin/python -m scripts.record_cdc_envelopes [--out tests/cdc_recordings]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from cdc.source import (
    DebeziumKafkaSource,
    DebeziumSettings,
    drop_replication_state,
    log4j_options,
)
from scripts.kafka_service import TansuBroker
from scripts.services import PostgresServer

OUT = Path(__file__).resolve().parent.parent / "tests" / "cdc_recordings"
MESSAGE = '{"tenant": "acme", "tags": ["product:1", "category:7"]}'

SCHEMA_SQL = """
DROP TABLE IF EXISTS products, categories;
CREATE TABLE products (
    tenant_id text NOT NULL,
    id integer NOT NULL,
    category_id integer,
    name text NOT NULL,
    price numeric(10, 2),
    ratio numeric,
    sku uuid,
    released date,
    created timestamp,
    updated_at timestamptz,
    description text,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE categories (
    tenant_id text NOT NULL,
    id integer NOT NULL,
    name text NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
ALTER TABLE categories REPLICA IDENTITY FULL;
ALTER TABLE products ALTER COLUMN description SET STORAGE EXTERNAL;
INSERT INTO categories VALUES ('acme', 7, 'tools');
INSERT INTO products (tenant_id, id, category_id, name, price)
    VALUES ('acme', 1, 7, 'hammer', 9.90);
"""
# A description large enough to be TOASTed (stored out of line, uncompressed): an
# update that does not touch it sends Debezium's "unavailable value" placeholder.
BIG = "x" * 3000

STEPS: list[tuple[str, str, tuple[Any, ...], int]] = [
    # (case name, SQL, parameters, records expected on data topics)
    (
        "insert",
        "INSERT INTO products VALUES ('acme', 2, 7, 'saw', 12.50, 0.125, "
        "'0b5e5f8a-3c4d-4e5f-8a9b-0c1d2e3f4a5b', '2024-01-31', '2024-01-31 10:00:00.123456', "
        "'2024-01-31 12:00:00+02', %s)",
        (BIG,),
        1,
    ),
    (
        "update_default_identity_toast",
        "UPDATE products SET name = 'big saw' WHERE tenant_id = 'acme' AND id = 2",
        (),
        1,
    ),
    (
        "update_replica_identity_full",
        "UPDATE categories SET name = 'hand tools' WHERE tenant_id = 'acme' AND id = 7",
        (),
        1,
    ),
    (
        "primary_key_change",
        "UPDATE products SET tenant_id = 'globex' WHERE tenant_id = 'acme' AND id = 2",
        (),
        3,
    ),
    ("delete", "DELETE FROM products WHERE tenant_id = 'acme' AND id = 1", (), 2),
    (
        "delete_replica_identity_full",
        "DELETE FROM categories WHERE tenant_id = 'acme' AND id = 7",
        (),
        2,
    ),
    ("truncate", "TRUNCATE categories", (), 1),
    ("logical_message", "SELECT pg_logical_emit_message(true, 'tieredcache', %s)", (MESSAGE,), 1),
]


class Recorder:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.records: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        record = {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": None if key is None else key.decode(),
            "value": None if value is None else value.decode(),
        }
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def data(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["topic"].startswith(self.prefix + ".")
                and not r["topic"].endswith(".transaction")]  # fmt: skip

    def wait_for(self, predicate: Any, what: str, timeout: float = 30.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.records), timeout):
                raise RuntimeError(f"timed out waiting for {what}; have {len(self.records)}")


def record_run(
    variant: str, dsn: str, pg: PostgresServer, broker: TansuBroker, out: Path, tmp: Path
) -> None:
    prefix = "tieredcache"
    settings = DebeziumSettings(
        host=pg.host, port=pg.port, user="postgres", database="postgres",
        tables=["public.products", "public.categories"],
        offsets_file=tmp / f"offsets-{variant}.dat", topic_prefix=prefix,
        slot_name=f"rec_{variant}", publication_name=f"rec_{variant}",
        schemas_enable=variant == "schema",
        decimal_handling_mode="precise" if variant == "schema" else "string",
        provide_transaction_metadata=variant == "schema",
        heartbeat_interval_ms=500,
    )  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
    recorder = Recorder(prefix)
    source = DebeziumKafkaSource(settings, {"bootstrap.servers": broker.bootstrap},
                                 on_delivered=recorder, jvm_opts=log4j_options(tmp))  # fmt: skip
    cases: dict[str, list[dict[str, Any]]] = {}
    with source:
        recorder.wait_for(lambda rs: len(recorder.data()) >= 2, "the snapshot (2 rows)")
        cases["snapshot_read"] = recorder.data()[:2]
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, sql, params, expected in STEPS:
                seen = len(recorder.data())
                conn.execute(sql, params)
                recorder.wait_for(lambda rs, n=seen + expected: len(recorder.data()) >= n, name)
                cases[name] = recorder.data()[seen : seen + expected]
        recorder.wait_for(
            lambda rs: any(r["topic"].startswith("__debezium-heartbeat") for r in rs), "heartbeat"
        )
        cases["heartbeat"] = [
            next(r for r in recorder.records if r["topic"].startswith("__debezium-heartbeat"))
        ]
        tx = [r for r in recorder.records if r["topic"] == f"{prefix}.transaction"]
        if tx:
            cases["transaction_metadata"] = tx[:2]
    drop_replication_state(dsn, settings)
    for name, records in cases.items():
        path = out / f"{variant}_{name}.json"
        path.write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {path.relative_to(out.parent.parent)} ({len(records)} records)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.record_cdc_envelopes")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--variant", choices=["plain", "schema"], action="append")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (
        PostgresServer() as pg,
        TansuBroker() as broker,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for variant in args.variant or ["plain", "schema"]:
            record_run(variant, pg.dsn, pg, broker, args.out, Path(tmp))
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
