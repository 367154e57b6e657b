"""End to end: PostgreSQL 15 -> real Debezium engine -> tansu (Kafka protocol) -> decode.

One JVM per test session (JPype cannot restart it), so the engine fixture is
session-scoped and only this file starts it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import psycopg
import pytest

from cdc.debezium import ChangeEvent, Op, decode_record
from cdc.rules import Invalidation, Rules, TableRule
from cdc.source import DebeziumKafkaSource, DebeziumSettings, log4j_options
from scripts.kafka_service import TansuBroker
from scripts.services import PostgresServer, ServiceError

TOPIC = "e2e.public.items"
PRODUCTS_TOPIC = "e2e.public.products"
TENANTS = ["acme", "globex", "initech"]


@pytest.fixture(scope="session")
def e2e_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
    except ServiceError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc}", pytrace=False)
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE items (tenant_id text, id int, name text, "
                "PRIMARY KEY (tenant_id, id));"
                "INSERT INTO items VALUES ('acme', 1, 'first');"
                "CREATE TABLE products (tenant_id text, id int, name text, "
                "PRIMARY KEY (tenant_id, id));"
                "INSERT INTO products SELECT t, i, t || '-v1' FROM unnest("
                "ARRAY['acme', 'globex', 'initech']) t, generate_series(1, 2) i"
            )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def e2e_broker() -> Iterator[TansuBroker]:
    broker = TansuBroker()
    try:
        broker.start()
    except ServiceError as exc:
        pytest.fail(f"could not start the tansu broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def e2e_source(
    e2e_postgres: PostgresServer, e2e_broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DebeziumKafkaSource]:
    """The Debezium engine, running, with the snapshot already on Kafka."""
    tmp = tmp_path_factory.mktemp("debezium")
    snapshot_done = threading.Event()

    def delivered(topic: str, partition: int, offset: int, key: object, value: object) -> None:
        if topic == TOPIC:
            snapshot_done.set()

    # skipped_operations defaults to "none": Debezium then emits truncates.
    settings = DebeziumSettings(
        host=e2e_postgres.host,
        port=e2e_postgres.port,
        user="postgres",
        database="postgres",
        tables=["public.items", "public.products"],
        offsets_file=Path(tmp) / "offsets.dat",
        topic_prefix="e2e",
        slot_name="e2e",
        publication_name="e2e",
    )
    source = DebeziumKafkaSource(
        settings,
        {"bootstrap.servers": e2e_broker.bootstrap},
        on_delivered=delivered,
        jvm_opts=log4j_options(Path(tmp)),
    )
    source.start()
    try:
        if not snapshot_done.wait(60):
            pytest.fail(
                f"no snapshot record reached Kafka within 60 s (engine error: {source.error})"
            )
        yield source
    finally:
        source.stop()


@pytest.mark.slow
@pytest.mark.postgres
def test_update_arrives_on_kafka_and_decodes(
    e2e_postgres: PostgresServer, e2e_source: DebeziumKafkaSource, e2e_broker: TansuBroker
) -> None:
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": e2e_broker.bootstrap,
            "group.id": "e2e-test",
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
            "enable.auto.commit": False,
        }
    )
    try:
        # assign() all partitions (tansu auto-creates 4) instead of a group join: no rebalance wait.
        partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        consumer.assign(
            [
                confluent_kafka.TopicPartition(TOPIC, p, confluent_kafka.OFFSET_BEGINNING)
                for p in partitions
            ]
        )
        with psycopg.connect(e2e_postgres.dsn, autocommit=True) as conn:
            conn.execute("UPDATE items SET name = 'renamed' WHERE tenant_id = 'acme' AND id = 1")
        deadline = time.monotonic() + 30
        seen: list[ChangeEvent] = []
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            event = decode_record(
                msg.topic() or "",
                msg.key(),
                msg.value(),
                headers=msg.headers(),
                partition=msg.partition(),
                offset=msg.offset(),
            )
            assert isinstance(event, ChangeEvent)
            seen.append(event)
            if event.op is Op.UPDATE:
                break
        else:
            pytest.fail(f"no update event within 30 s; saw {[e.op for e in seen]}")
    finally:
        consumer.close()
    assert [e.op for e in seen].count(Op.READ) <= 1  # the snapshot row, if on the same partition
    assert event.table == "public.items"
    assert event.key == {"tenant_id": "acme", "id": 1}
    assert event.before is None  # default replica identity
    assert event.after == {"tenant_id": "acme", "id": 1, "name": "renamed"}
    assert not event.snapshot and event.tx_id is not None and event.lsn is not None
    rules = Rules([TableRule("public.items", "tenant_id", ["item:{id}"], ["shop"])])
    assert rules.invalidations(event) == {Invalidation("shop", "acme", "item:1")}


@pytest.mark.slow
def test_broker_stops_even_with_a_client_still_connected() -> None:
    """tansu ignores SIGTERM while a client is connected; stop() falls back to SIGKILL."""
    broker = TansuBroker(grace=0.2)
    try:
        broker.start()
    except ServiceError as exc:
        pytest.fail(f"could not start the tansu broker: {exc}", pytrace=False)
    process = broker._proc
    assert process is not None
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
        broker.stop()
    assert process.poll() is not None
    assert broker.log_path is None


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_truncate_through_the_real_engine_invalidates_the_table_for_every_tenant(
    e2e_postgres: PostgresServer,
    e2e_source: DebeziumKafkaSource,
    e2e_broker: TansuBroker,
    redis_url: str,
) -> None:
    """TRUNCATE public.products -> Debezium (op t, skipped.operations=none) -> tansu ->
    the worker -> every tenant's cached products are gone: the next reads go to the
    (now empty) table for all three tenants instead of serving the cached rows."""
    from cdc.worker import Worker, WorkerSettings
    from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
    from tieredcache.testing import wait_until

    app = TieredCache("shop", [MemoryLayer(), RedisLayer(url=redis_url)])
    loads: list[tuple[str, int]] = []

    @app.cached(ttl=600, tags=lambda product_id: [f"product:{product_id}", "table:public.products"])
    def product(product_id: int) -> str | None:
        tenant = app_tenant[0]
        loads.append((tenant, product_id))
        with psycopg.connect(e2e_postgres.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT name FROM products WHERE tenant_id = %s AND id = %s", (tenant, product_id)
            ).fetchone()
        return None if row is None else str(row[0])

    app_tenant = [""]

    def read_all() -> dict[tuple[str, int], str | None]:
        seen = {}
        for tenant in TENANTS:
            app_tenant[0] = tenant
            with tenant_scope(tenant):
                for product_id in (1, 2):
                    seen[(tenant, product_id)] = product(product_id)
        return seen

    rules = Rules(
        [TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])],
        message_prefix=None,
    )
    cache = TieredCache("shop", [RedisLayer(url=redis_url)], broadcast="publish")
    truncates: list[tuple[int, int]] = []

    class Watching(Worker):
        def _prepare(self, batch: list[object]) -> object:
            for msg in batch:
                value = msg.value()  # type: ignore[attr-defined]
                if value and b'"op":"t"' in value.replace(b" ", b""):
                    truncates.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]
            return super()._prepare(batch)  # type: ignore[arg-type]

    worker = Watching(
        WorkerSettings(
            bootstrap_servers=e2e_broker.bootstrap,
            topics=[PRODUCTS_TOPIC],
            group_id="e2e-truncate",
            dead_letter_topic=f"{PRODUCTS_TOPIC}.dlq",
        ),
        rules,
        [cache],
    )
    acked: list[tuple[int, int]] = []
    worker._on_storage_acked = lambda records: acked.extend((p, o) for _, p, o in records)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        app.connect(2.0)
        assert set(read_all().values()) == {f"{t}-v1" for t in TENANTS}
        assert len(loads) == 6
        assert set(read_all().values()) == {f"{t}-v1" for t in TENANTS}
        assert len(loads) == 6  # all six served from the cache
        with psycopg.connect(e2e_postgres.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE public.products")  # nothing else: only it can invalidate
        wait_until(
            lambda: bool(truncates) and truncates[0] in acked,
            timeout=60,
            message="the truncate record acknowledged by Redis and the broadcast",
        )
        assert read_all() == {(t, i): None for t in TENANTS for i in (1, 2)}
        assert len(loads) == 12  # every tenant's entries were loaded again
    finally:
        worker.stop()
        thread.join(30)
        cache.close()
        app.close()
