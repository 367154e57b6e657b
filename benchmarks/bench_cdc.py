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
from scripts.services import redis_server  # noqa: E402
from tieredcache import RedisLayer, TieredCache  # noqa: E402

TENANTS = [f"t{i:03d}" for i in range(50)]
CONSUMER = {"session.timeout.ms": 6000, "fetch.wait.max.ms": 10}


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


def cache(url: str) -> TieredCache:
    return TieredCache("shop", [RedisLayer(url=url)], broadcast="publish")


def settings(bootstrap: str, topic: str, group: str) -> WorkerSettings:
    return WorkerSettings(
        bootstrap_servers=bootstrap,
        topics=[topic],
        group_id=group,
        dead_letter_topic=f"{topic}.dlq",
        consumer=CONSUMER,
    )


class TimedWorker(Worker):
    """Records when the first batch, and each record, was handed to the worker."""

    first: float | None = None
    received: dict[tuple[int, int], float]

    def _process(self, batch: list[Any]) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.received = {}
        if len(self.received) < 100_000:
            for msg in batch:
                self.received[(msg.partition(), msg.offset())] = now
        super()._process(batch)


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


def worker_throughput(bootstrap: str, url: str, topic: str, events: int) -> float:
    count = [0]
    last = [0.0]

    def on_acked(records: list[tuple[str, int, int]]) -> None:
        count[0] += len(records)
        last[0] = time.perf_counter()
        if count[0] >= events:
            worker.stop()  # finish: commit and leave

    c = cache(url)
    worker = TimedWorker(
        settings(bootstrap, topic, "bench-worker"), rules(), [c], on_storage_acked=on_acked
    )
    worker.run()
    c.close()
    assert worker.first is not None and count[0] >= events, count
    return events / (last[0] - worker.first)


def naive_throughput(bootstrap: str, url: str, topic: str, events: int) -> float:
    c = cache(url)
    r = rules()
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-naive",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **CONSUMER,
        }
    )
    consumer.subscribe([topic])
    seen, first = 0, None
    try:
        while seen < events:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000, help="latency samples (>= 1000)")
    parser.add_argument("--throughput-events", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.events, args.throughput_events = 200, 2000
    with redis_server() as redis, TansuBroker() as broker:
        print(f"latency, {args.events} events ...", file=sys.stderr, flush=True)
        lat, own = latency(broker.bootstrap, redis.url, args.events)
        topic = "tput.public.products"
        print(f"filling {topic} with {args.throughput_events} events ...", file=sys.stderr)
        fill(broker.bootstrap, topic, args.throughput_events)
        print("worker throughput ...", file=sys.stderr, flush=True)
        worker_rate = worker_throughput(broker.bootstrap, redis.url, topic, args.throughput_events)
        print("naive consumer throughput ...", file=sys.stderr, flush=True)
        naive_rate = naive_throughput(broker.bootstrap, redis.url, topic, args.throughput_events)
    q = statistics.quantiles(lat, n=100)
    q_own = statistics.quantiles(own, n=100)
    m = peers.machine()
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}. Standalone Redis and the tansu broker (memory storage) on 127.0.0.1; "
        f"consumer `fetch.wait.max.ms=10`. Clocks: latency from the producer's `flush()` "
        f"returning (broker acknowledged) to `invalidate_many` ok for Redis + broadcast; "
        f"throughput from the first record handed to the contender to the last one "
        f"invalidated (and committed). Redis Cluster: not measured here."
    )
    table = peers.markdown_table(
        ["measure", "events", "result"],
        [
            ["worker path p50", str(len(lat)), f"{q[49]:.2f} ms"],
            ["worker path p99", str(len(lat)), f"{q[98]:.2f} ms"],
            [
                "of which in the worker (record handed over -> acked), p50",
                str(len(own)),
                f"{q_own[49]:.2f} ms",
            ],
            ["of which in the worker, p99", str(len(own)), f"{q_own[98]:.2f} ms"],
            ["worker, one process", str(args.throughput_events), f"{worker_rate:,.0f} events/s"],
            [
                "naive consumer (invalidate + commit per event)",
                str(args.throughput_events),
                f"{naive_rate:,.0f} events/s",
            ],
            ["ratio", "", f"{worker_rate / naive_rate:.1f}x"],
        ],
    )
    body = f"## CDC worker (`bench_cdc.py`)\n\n{header}\n\n{table}\n"
    print(body)
    if not args.no_write:
        peers.update_results("cdc", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
