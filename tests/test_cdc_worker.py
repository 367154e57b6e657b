"""The CDC worker end to end: tansu (Kafka protocol) -> worker -> real Redis -> the application.

The application is a ``@cache.cached(tags=...)`` function over a dict that plays
the database; the test changes a "row", produces the Debezium envelope the real
engine would (the shapes of ``tests/cdc_recordings/``), and checks that the next
read sees the new row. Offsets are checked through the consumer group's
committed offsets, as KEDA sees them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import TopicPartition

from cdc.rules import Rules, TableRule
from cdc.worker import Worker, WorkerSettings
from scripts.kafka_service import TansuBroker
from scripts.services import RedisService, ServiceError
from tieredcache import MemoryLayer, RedisLayer, TieredCache
from tieredcache.testing import wait_until

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = Path(__file__).parent / "cdc_recordings"
TABLE_TAG = "table:public.products"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    broker = TansuBroker()
    try:
        broker.start()
    except ServiceError as exc:
        pytest.fail(f"could not start the tansu broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic() -> str:
    return f"t{uuid.uuid4().hex[:10]}.public.products"


def rules() -> Rules:
    return Rules(
        [TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])],
        message_prefix=None,
    )


def settings(broker: TansuBroker, topic: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap,
        "topics": [topic],
        "group_id": f"g-{topic}",
        "dead_letter_topic": f"{topic}.dlq",
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "lag_interval": 0.2,
        "shutdown_grace": 5.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def worker_cache(redis_url: str) -> TieredCache:
    """The worker's cache: Redis only, publish-only broadcast (no subscriber thread)."""
    return TieredCache("shop", [RedisLayer(url=redis_url)], broadcast="publish", breaker_reset=0.2)


class App:
    """The application: a cached reader over a dict that plays the database."""

    def __init__(self, redis_url: str, *, memory: bool = True) -> None:
        self.db: dict[tuple[str, int], str] = {}
        layers: list[Any] = [MemoryLayer()] if memory else []
        layers.append(RedisLayer(url=redis_url))
        self.cache = TieredCache("shop", layers)
        self.loads = 0

        @self.cache.cached(
            ttl=600, tags=lambda tenant, product_id: [f"product:{product_id}", TABLE_TAG]
        )
        def get_product(tenant: str, product_id: int) -> str:
            self.loads += 1
            return self.db[(tenant, product_id)]

        self.get_product = get_product
        self.cache.connect(2.0)

    def close(self) -> None:
        self.cache.close()


def envelope(tenant: str, product_id: int, name: str, *, op: str = "u") -> tuple[bytes, bytes]:
    """A Debezium update as the engine writes it with schemas disabled."""
    key = json.dumps({"tenant_id": tenant, "id": product_id}).encode()
    row = {"tenant_id": tenant, "id": product_id, "name": name}
    value = {
        "before": None,
        "after": row,
        "source": {
            "version": "3.6.3.Final",
            "connector": "postgresql",
            "name": "t",
            "ts_ms": int(time.time() * 1000),
            "snapshot": "false",
            "db": "app",
            "schema": "public",
            "table": "products",
            "txId": 1,
            "lsn": 1,
        },
        "op": op,
        "ts_ms": int(time.time() * 1000),
    }
    return key, json.dumps(value).encode()


#: Offsets after the last record each test produced, per topic and partition, from the
#: delivery reports. (tansu 0.6 reports a high watermark that counts produce
#: *batches*, not records, so it cannot say where a topic ends.)
_ENDS: dict[str, dict[int, int]] = {}


def produce(
    broker: TansuBroker,
    topic: str,
    records: list[tuple[bytes | None, bytes | None]],
    *,
    one_by_one: bool = False,
) -> None:
    ends = _ENDS.setdefault(topic, {})

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 1})
    try:
        for key, value in records:
            producer.produce(topic, key=key, value=value, on_delivery=delivered)
            if one_by_one:
                producer.flush(10)
        assert producer.flush(10) == 0, "the broker did not confirm every record"
    finally:
        del producer


def end_offsets(broker: TansuBroker, topic: str) -> dict[int, int]:
    """Every partition of ``topic`` with the end offset of what the test produced."""
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": "probe"}
    )
    try:
        parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
    finally:
        consumer.close()
    return {p: _ENDS.get(topic, {}).get(p, 0) for p in parts}


def committed(broker: TansuBroker, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    consumer = confluent_kafka.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=5)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        consumer.close()


def all_committed(broker: TansuBroker, group: str, topic: str) -> Callable[[], bool]:
    def check() -> bool:
        ends = end_offsets(broker, topic)
        return committed(broker, group, topic, list(ends)) == ends

    return check


class Running:
    """A Worker on a thread; ``stop()`` is what SIGTERM does in the CLI."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the worker did not stop within 20 s"
        if self.error is not None:
            raise self.error


def sample(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- tests


def test_update_reaches_every_layer_and_the_next_read_sees_it(
    broker: TansuBroker, topic: str, redis_url: str
) -> None:
    """Decode -> map -> invalidate Redis and the replica's in-process layer -> commit."""
    app = App(redis_url)
    wcache = worker_cache(redis_url)
    try:
        app.db[("acme", 1)] = "v1"
        app.db[("globex", 1)] = "g1"
        assert app.get_product("acme", 1) == "v1"
        assert app.get_product("globex", 1) == "g1"
        app.db[("acme", 1)] = "v2"
        assert app.get_product("acme", 1) == "v1"  # cached: the database change is unseen
        running = Running(Worker(settings(broker, topic), rules(), [wcache]))
        try:
            produce(broker, topic, [envelope("acme", 1, "v2"), (envelope("acme", 1, "")[0], None)])
            wait_until(
                lambda: app.get_product("acme", 1) == "v2",
                timeout=20,
                message="the replica read the new row",
            )
            assert app.get_product("globex", 1) == "g1"  # another tenant's entry is untouched
            wait_until(
                all_committed(broker, f"g-{topic}", topic),
                timeout=10,
                message="every partition committed up to its end",
            )
            worker = running.worker
            assert sample(worker, "tieredcache_cdc_events_total", topic=topic, kind="change") == 1
            assert sample(worker, "tieredcache_cdc_events_total", topic=topic, kind="ignored") == 1
            assert sample(worker, "tieredcache_cdc_invalidations_total", layer="redis") >= 1
            assert (
                sample(
                    worker, "tieredcache_cdc_commit_to_invalidated_seconds_count", side="storage"
                )
                == 1
            )
        finally:
            running.stop()
    finally:
        wcache.close()
        app.close()


def test_malformed_records_go_to_the_dead_letter_topic_and_the_worker_keeps_going(
    broker: TansuBroker, topic: str, redis_url: str
) -> None:
    """Headers name error/topic/partition/offset; the table is invalidated for all tenants."""
    app = App(redis_url, memory=False)
    wcache = worker_cache(redis_url)
    try:
        app.db[("acme", 1)], app.db[("globex", 9)] = "a1", "g9"
        app.get_product("acme", 1), app.get_product("globex", 9)
        app.db[("acme", 1)], app.db[("globex", 9)] = "a2", "g10"
        produce(
            broker,
            topic,
            [
                (b'{"id": 1}', b"\x00not json"),
                (b'{"id": 2}', b'{"op": "u", "source": {"table": "products"}}'),
            ],
        )
        running = Running(Worker(settings(broker, topic), rules(), [wcache]))
        try:
            # Fail-safe: the whole table, every tenant, although no row could be read.
            wait_until(
                lambda: app.get_product("globex", 9) == "g10",
                timeout=20,
                message="the table was invalidated for all tenants",
            )
            assert app.get_product("acme", 1) == "a2"
            app.db[("acme", 1)] = "a3"
            produce(broker, topic, [envelope("acme", 1, "a3")])
            wait_until(
                lambda: app.get_product("acme", 1) == "a3",
                timeout=20,
                message="a valid record after the dead letters was applied",
            )
            wait_until(all_committed(broker, f"g-{topic}", topic), timeout=10)
            assert sample(running.worker, "tieredcache_cdc_dead_letters_total", topic=topic) == 2
        finally:
            running.stop()
        letters = read_all(broker, f"{topic}.dlq", expect=2)
        by_value = {m.value(): dict(m.headers()) for m in letters}
        headers = by_value[b"\x00not json"]
        assert headers["topic"] == topic.encode()
        assert int(headers["partition"]) in end_offsets(broker, topic)
        assert int(headers["offset"]) >= 0
        assert b"not valid JSON" in headers["error"]
        assert (
            b"no 'before'" in by_value[b'{"op": "u", "source": {"table": "products"}}']["error"]
            or b"after" in by_value[b'{"op": "u", "source": {"table": "products"}}']["error"]
        )
    finally:
        wcache.close()
        app.close()


def read_all(broker: TansuBroker, topic: str, expect: int) -> list[Any]:
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": "reader", "fetch.wait.max.ms": 10}
    )
    try:
        parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        found: list[Any] = []
        deadline = time.monotonic() + 10
        while len(found) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                found.append(msg)
        assert len(found) == expect, f"{len(found)} dead letters on {topic}, expected {expect}"
        return found
    finally:
        consumer.close()


@pytest.mark.parametrize(
    "fresh_redis_server", [["--appendonly", "yes", "--appendfsync", "always"]], indirect=True
)
def test_redis_down_holds_the_commit_then_everything_is_applied(
    broker: TansuBroker, topic: str, fresh_redis_server: RedisService
) -> None:
    """No commit and growing lag while Redis is down; applied and committed after it returns."""
    url = fresh_redis_server.url
    app = App(url, memory=False)
    wcache = worker_cache(url)
    group = f"g-{topic}"
    try:
        for i in range(5):
            app.db[("acme", i)] = f"old{i}"
            app.get_product("acme", i)
        produce(broker, topic, [envelope("acme", 99, "warm-up")])  # creates the topic
        running = Running(Worker(settings(broker, topic), rules(), [wcache]))
        worker = running.worker
        try:
            wait_until(all_committed(broker, group, topic), timeout=20, message="warm-up committed")
            before = committed(broker, group, topic, list(end_offsets(broker, topic)))
            fresh_redis_server.stop()
            for i in range(5):
                app.db[("acme", i)] = f"new{i}"
            produce(
                broker, topic, [envelope("acme", i, f"new{i}") for i in range(5)], one_by_one=True
            )
            wait_until(
                lambda: sample(worker, "tieredcache_cdc_retries_total", side="storage") >= 3,
                timeout=10,
                message="the worker retries the failing layer",
            )
            wait_until(
                lambda: (
                    sum(
                        worker.metrics.registry.get_sample_value(
                            "tieredcache_cdc_lag_messages", {"topic": topic, "partition": str(p)}
                        )
                        or 0
                        for p in before
                    )
                    >= 5
                ),
                timeout=10,
                message="lag shows the held records",
            )
            assert sample(worker, "tieredcache_cdc_paused") == 1
            assert not worker.status.ready()[0] and "redis" in worker.status.ready()[1]
            assert any(
                s.labels.get("layer") == "redis" and s.value == 1
                for m in worker.metrics.registry.collect()
                if m.name == "tieredcache_cdc_blocked"
                for s in m.samples
            ), "the blocked gauge names the failing layer"
            assert committed(broker, group, topic, list(before)) == before  # nothing committed
            fresh_redis_server.start()
            wait_until(
                all_committed(broker, group, topic),
                timeout=20,
                message="committed after Redis came back",
            )
            assert [app.get_product("acme", i) for i in range(5)] == [f"new{i}" for i in range(5)]
            assert sample(worker, "tieredcache_cdc_paused") == 0
        finally:
            running.stop()
    finally:
        wcache.close()
        app.close()


def _config_file(tmp_path: Path, broker: TansuBroker, topic: str, redis_url: str) -> Path:
    path = tmp_path / "cdc.toml"
    path.write_text(f"""
[cdc]
message_prefix = ""

[kafka]
bootstrap_servers = "{broker.bootstrap}"
topics = ["{topic}"]
group_id = "g-{topic}"
dead_letter_topic = "{topic}.dlq"
consumer = {{ "session.timeout.ms" = 6000, "fetch.wait.max.ms" = 10 }}

[cache]
redis_url = "{redis_url}"

[worker]
batch_size = 50
health_port = 0

[tables."public.products"]
tenant_column = "tenant_id"
tags = ["product:{{id}}"]
namespaces = ["shop"]
""")
    return path


def _start_cli_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cdc", "run", "--config", str(config), "--skip-check"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_kill_minus_9_mid_batch_and_restart_misses_nothing(
    broker: TansuBroker, topic: str, redis_url: str, tmp_path: Path
) -> None:
    """A subprocess worker killed while records stream in; its successor applies the rest."""
    app = App(redis_url, memory=False)
    tenants, ids = ("acme", "globex", "initech"), range(40)
    keys = [(t, i) for t in tenants for i in ids]
    try:
        for t, i in keys:
            app.db[(t, i)] = "v0"
            app.get_product(t, i)
        config = _config_file(tmp_path, broker, topic, redis_url)
        log = tmp_path / "worker.log"
        produce(broker, topic, [envelope("acme", 999, "warm-up")])
        first = _start_cli_worker(config, log)
        group = f"g-{topic}"
        try:
            wait_until(
                all_committed(broker, group, topic),
                timeout=30,
                message="the first worker joined and committed",
            )
            for version in range(1, 6):
                records = []
                for t, i in keys:
                    app.db[(t, i)] = f"v{version}"
                    records.append(envelope(t, i, f"v{version}"))
                produce(broker, topic, records)
                if version == 2:
                    first.send_signal(signal.SIGKILL)  # mid-stream: batches in flight
        finally:
            first.kill()
            first.wait(10)
        second = _start_cli_worker(config, log)
        try:
            wait_until(
                all_committed(broker, group, topic),
                timeout=40,
                message=f"the restarted worker caught up (log: {log})",
            )
            stale = [(t, i) for t, i in keys if app.get_product(t, i) != app.db[(t, i)]]
            assert stale == [], f"{len(stale)} keys still serve an old row: {stale[:5]}"
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0, log.read_text()[-2000:]
    finally:
        app.close()


@pytest.mark.slow
def test_two_workers_and_rebalances_miss_nothing(
    broker: TansuBroker, topic: str, redis_url: str
) -> None:
    """A second member joins, then the first leaves (SIGTERM path): every change applied."""
    app = App(redis_url, memory=False)
    caches = [worker_cache(redis_url) for _ in range(2)]
    keys = [(t, i) for t in ("acme", "globex") for i in range(30)]
    group = f"g-{topic}"

    def write(version: int) -> None:
        records = []
        for t, i in keys:
            app.db[(t, i)] = f"v{version}"
            records.append(envelope(t, i, f"v{version}"))
        produce(broker, topic, records)

    try:
        for t, i in keys:
            app.db[(t, i)] = "v0"
            app.get_product(t, i)
        write(1)
        a = Running(Worker(settings(broker, topic, batch_size=20), rules(), [caches[0]]))
        b: Running | None = None
        try:
            wait_until(all_committed(broker, group, topic), timeout=20, message="A committed")
            b = Running(Worker(settings(broker, topic, batch_size=20), rules(), [caches[1]]))
            for version in (2, 3, 4):
                write(version)
                time.sleep(0.5)  # spread the writes over the rebalance that B's join starts
            wait_until(lambda: b.worker.progress.owned(), timeout=20, message="B got partitions")
            a.stop()
            write(5)
            wait_until(all_committed(broker, group, topic), timeout=20, message="B committed all")
            stale = [(t, i) for t, i in keys if app.get_product(t, i) != app.db[(t, i)]]
            assert stale == [], f"{len(stale)} keys still serve an old row: {stale[:5]}"
        finally:
            if a.thread.is_alive():
                a.stop()
            if b is not None:
                b.stop()
    finally:
        for cache in caches:
            cache.close()
        app.close()


def test_the_inspector_finds_a_survivor_until_the_worker_invalidates_it(
    broker: TansuBroker, topic: str, redis_url: str
) -> None:
    """An entry written before the commit is a survivor; after the worker ran, none is left."""
    import redis as redis_py

    from cdc.inspector import CoherenceInspector, InspectorLoop

    app = App(redis_url, memory=False)
    wcache = worker_cache(redis_url)
    client = redis_py.Redis.from_url(redis_url)
    try:
        app.db[("acme", 1)] = "v1"
        app.get_product("acme", 1)
        time.sleep(0.01)  # the commit comes strictly after the fill
        app.db[("acme", 1)] = "v2"
        inspector = CoherenceInspector(client)
        (inv,) = [i for i in rules().invalidations(_decoded(*envelope("acme", 1, "v2")))]
        survivors = inspector.check([inv], time.time())
        assert [s.invalidation for s in survivors] == [inv]  # no worker yet
        consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": broker.bootstrap,
                "group.id": f"i-{topic}",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "fetch.wait.max.ms": 10,
            }
        )
        consumer.subscribe([topic])
        loop = InspectorLoop(consumer, rules(), CoherenceInspector(client), delay=1.0)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        produce(broker, topic, [envelope("acme", 999, "creates the topic")])
        running = Running(Worker(settings(broker, topic), rules(), [wcache]))
        try:
            wait_until(lambda: running.worker.progress.owned(), timeout=20, message="worker joined")
            produce(broker, topic, [envelope("acme", 1, "v2")])
            wait_until(
                lambda: (
                    loop.inspector.registry.get_sample_value(
                        "tieredcache_cdc_inspector_checked_total", {"namespace": "shop"}
                    )
                    == 2
                ),
                timeout=20,
                message="the inspector checked the event",
            )
            assert loop.total_survivors == 0
            assert app.get_product("acme", 1) == "v2"
        finally:
            running.stop()
            loop.stop()
            thread.join(5)
            consumer.close()
    finally:
        client.close()
        wcache.close()
        app.close()


def _decoded(key: bytes, value: bytes) -> Any:
    from cdc.debezium import decode_record

    return decode_record("x.public.products", key, value)


@pytest.mark.postgres
def test_check_command_names_every_problem_then_passes(
    broker: TansuBroker,
    topic: str,
    redis_url: str,
    postgres_server: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tieredcache-cdc check``: exit 1 with one line per problem, 0 once all agree."""
    import psycopg

    from cdc.cli import main

    schema = f"chk_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.products "
            "(tenant_id text, id int, name text, PRIMARY KEY (tenant_id, id))"
        )
    config = _config_file(tmp_path, broker, topic, redis_url)
    text = config.read_text().replace("public.products", f"{schema}.products")
    text = text.replace(
        'message_prefix = ""', f'message_prefix = ""\ndsn = "{postgres_server.dsn}"'
    )
    config.write_text(text.replace('tags = ["product:{id}"]', 'tags = ["product:{id}", "c:{cat}"]'))
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{schema}.products: tag template 'c:{{cat}}' uses column 'cat'" in err
    assert "no application published keyspace settings" in err
    topic = topic.replace("public.products", f"{schema}.products")  # as the config now says
    assert f"topic '{topic}' does not exist" in err
    # Fix all three: the template, the application's settings, the topic.
    config.write_text(text)
    app = App(redis_url, memory=False)
    try:
        app.db[("acme", 1)] = "v1"
        app.get_product("acme", 1)
        produce(broker, topic, [envelope("acme", 1, "v1")])
        assert main(["check", "--config", str(config)]) == 0, capsys.readouterr().err
    finally:
        app.close()


class FlakyCdn:
    """An invalidation-only layer (a CDN purger) that refuses while ``down`` is set."""

    name = "cdn"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.purged: list[str] = []

    def delete(self, keys: Any) -> None:
        self._purge([k.full for k in keys])

    def delete_tags(self, tags: Any) -> None:
        self._purge([t.full for t in tags])

    def _purge(self, names: list[str]) -> None:
        from tieredcache.errors import BackendError

        if self.down.is_set():
            raise BackendError("cdn", "purge", "503 from the purge API")
        self.purged.extend(names)

    async def adelete(self, keys: Any) -> None:
        self.delete(keys)

    async def adelete_tags(self, tags: Any) -> None:
        self.delete_tags(tags)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_a_failing_cdn_holds_the_commit_but_not_redis(
    broker: TansuBroker, topic: str, redis_url: str
) -> None:
    """The CDN's own progress: Redis is invalidated at once, the commit waits for the CDN."""
    app = App(redis_url, memory=False)
    cdn = FlakyCdn()
    wcache = TieredCache(
        "shop", [RedisLayer(url=redis_url), cdn], broadcast="publish", breaker_reset=0.2
    )
    group = f"g-{topic}"
    try:
        app.db[("acme", 1)] = "v1"
        app.get_product("acme", 1)
        produce(broker, topic, [envelope("acme", 999, "creates the topic")])
        running = Running(Worker(settings(broker, topic), rules(), [wcache]))
        worker = running.worker
        try:
            wait_until(all_committed(broker, group, topic), timeout=20, message="warm-up committed")
            before = committed(broker, group, topic, list(end_offsets(broker, topic)))
            cdn.down.set()
            app.db[("acme", 1)] = "v2"
            produce(broker, topic, [envelope("acme", 1, "v2")])
            wait_until(
                lambda: app.get_product("acme", 1) == "v2",
                timeout=20,
                message="Redis invalidated while the CDN refuses",
            )
            wait_until(
                lambda: sample(worker, "tieredcache_cdc_retries_total", side="cdn") >= 2,
                timeout=10,
                message="the CDN side retries",
            )
            assert sample(worker, "tieredcache_cdc_paused") == 0  # Kafka is not paused for it
            assert committed(broker, group, topic, list(before)) == before
            cdn.down.clear()
            wait_until(
                all_committed(broker, group, topic),
                timeout=20,
                message="committed once the CDN confirmed",
            )
            assert any(name.endswith("product:1") for name in cdn.purged), cdn.purged
        finally:
            running.stop()
    finally:
        wcache.close()
        app.close()
