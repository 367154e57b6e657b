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
                "INSERT INTO items VALUES ('acme', 1, 'first')"
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

    settings = DebeziumSettings(
        host=e2e_postgres.host,
        port=e2e_postgres.port,
        user="postgres",
        database="postgres",
        tables=["public.items"],
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
