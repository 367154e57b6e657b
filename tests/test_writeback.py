"""Write-back: acknowledged in a durable journal, cached at once, flushed in batches,
retried, dead-lettered, claimed after a crash, and never lost to a SIGKILL."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scripts.services import PostgresServer, RedisService, free_port
from tests.writeback_worker import NAMESPACE as CRASH_NAMESPACE
from tests.writeback_worker import SCHEMA, TENANT, PgStore
from tieredcache import (
    ConfigurationError,
    MemoryLayer,
    RedisLayer,
    TieredCache,
    WriteBackError,
    tenant_scope,
)
from tieredcache.testing import wait_until
from tieredcache.writeback import (
    AsyncRedisStreamJournal,
    AsyncWriteBack,
    RedisStreamJournal,
    WriteBack,
    WriteRecord,
)

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "wb"
AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]


class Store:
    """Records every batch it is given; ``fail`` decides whether a call raises."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, Any]]] = []
        self.fail: Callable[[list[WriteRecord]], Exception | None] = lambda records: None

    def __call__(self, records: list[WriteRecord]) -> None:
        self.calls.append([(r.body, r.value) for r in records])
        error = self.fail(records)
        if error is not None:
            raise error


@pytest.fixture
def cache(redis_url: str) -> Iterator[TieredCache]:
    built = TieredCache(NAMESPACE, [MemoryLayer(), RedisLayer(url=redis_url)])
    yield built
    built.close()


@pytest.fixture
def journals(redis_url: str) -> Iterator[Callable[..., RedisStreamJournal]]:
    """Journal factory (each one a flusher of its own); all closed after the test."""
    made: list[RedisStreamJournal] = []

    def make(**options: Any) -> RedisStreamJournal:
        journal = RedisStreamJournal(NAMESPACE, url=options.pop("url", redis_url), **options)
        made.append(journal)
        return journal

    yield make
    for journal in made:
        journal.close()


@pytest.fixture
def journal(journals: Callable[..., RedisStreamJournal]) -> RedisStreamJournal:
    return journals(claim_idle=0.2)


def _product(cache: TieredCache, wb: WriteBack) -> tuple[Any, list[int]]:
    loads: list[int] = []

    @cache.cached(ttl=60, tags=lambda pid: [f"product:{pid}"], name="product")
    @wb.pending_first
    def get_product(pid: int) -> dict[str, int]:
        loads.append(pid)
        return {"id": pid, "price": 0}  # the store's (old) row

    return get_product, loads


def _setup(
    cache: TieredCache, journal: RedisStreamJournal, store: Store
) -> tuple[WriteBack, Any, Any, list[int]]:
    wb = WriteBack(cache, journal=journal, store=store)
    get_product, loads = _product(cache, wb)
    return wb, get_product, wb.writer(get_product), loads


def _key(get_product: Any, pid: int) -> str:
    with tenant_scope("acme"):
        return str(get_product.key(pid).body)


def test_acknowledged_write_is_served_from_the_cache_at_once(
    cache: TieredCache, journal: RedisStreamJournal, redis_url: str
) -> None:
    """save() returns once journaled; this and every other process then read the new value."""
    store = Store()
    _, get_product, save, loads = _setup(cache, journal, store)
    with tenant_scope("acme"):
        assert get_product(1) == {"id": 1, "price": 0}
        entry_id = save({"id": 1, "price": 3}, 1)
        assert get_product(1) == {"id": 1, "price": 3}
    assert loads == [1] and store.calls == []
    assert journal.backlog() == 1
    pending = journal.pending(f"{NAMESPACE}:acme:{_key(get_product, 1)}")
    assert pending is not None and pending.id == entry_id

    other = TieredCache(NAMESPACE, [MemoryLayer(), RedisLayer(url=redis_url)])
    try:
        other_get = other.cached(ttl=60, name="product")(lambda pid: {"never": "loaded"})
        with tenant_scope("acme"):
            assert other_get(1) == {"id": 1, "price": 3}
        with tenant_scope("globex"):  # another tenant's key: untouched
            assert other_get(1) == {"never": "loaded"}
    finally:
        other.close()


def test_a_miss_before_the_flush_reads_the_pending_write(
    cache: TieredCache, journal: RedisStreamJournal
) -> None:
    """An evicted entry is not reloaded from the stale store while its write is journaled."""
    store = Store()
    wb, get_product, save, loads = _setup(cache, journal, store)
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)
        cache.invalidate([_key(get_product, 1)])
        assert get_product(1) == {"id": 1, "price": 3}
        assert loads == []
        assert wb.flusher().run_once().stored == 1
        cache.invalidate([_key(get_product, 1)])
        assert get_product(1) == {"id": 1, "price": 0}  # from the (fake) store now
        assert loads == [1]


def test_flusher_coalesces_writes_per_key_and_keeps_journal_order(
    cache: TieredCache, journal: RedisStreamJournal
) -> None:
    """Within a batch the last write per key wins; survivors reach the store in journal order."""
    store = Store()
    wb, _, save, _ = _setup(cache, journal, store)
    with tenant_scope("acme"):
        for pid, price in [(1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (4, 1), (4, 2), (5, 1)]:
            save({"id": pid, "price": price}, pid)
    flusher = wb.flusher(batch_size=6)
    first = flusher.run_once()
    second = flusher.run_once()
    assert (first.read, first.stored, first.coalesced) == (6, 4, 2)
    assert (second.read, second.stored, second.coalesced) == (2, 2, 0)
    seen = [[(body.rsplit(":", 1)[-1], value["price"]) for body, value in c] for c in store.calls]
    assert seen == [[("i1", 2), ("i3", 1), ("i2", 2), ("i4", 1)], [("i4", 2), ("i5", 1)]]
    assert journal.backlog() == 0 and flusher.run_once().read == 0


def test_store_failures_are_retried_with_backoff_then_succeed(
    cache: TieredCache, journal: RedisStreamJournal
) -> None:
    """Two failures, two jittered exponential pauses, then one successful store; no loss."""
    store = Store()
    failures = [OSError("db down"), OSError("db down")]
    store.fail = lambda records: failures.pop(0) if failures else None
    wb, _, save, _ = _setup(cache, journal, store)
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)
    pauses: list[float] = []
    flusher = wb.flusher(backoff=0.1, sleep=pauses.append, jitter=lambda: 0.5)
    report = flusher.run_once()
    assert pauses == pytest.approx([0.075, 0.15])  # d/2 + 0.5 * d/2, d = 0.1, 0.2
    assert (report.retries, report.stored, report.dead) == (2, 1, [])
    assert len(store.calls) == 3 and journal.backlog() == 0


def test_a_write_that_keeps_failing_is_dead_lettered_and_the_flusher_carries_on(
    cache: TieredCache, journal: RedisStreamJournal
) -> None:
    """After max_attempts the batch is split; the bad record goes to the dead letters with
    the reason, the good ones are stored, the bad key leaves the cache, later writes flush."""
    store = Store()
    store.fail = lambda records: (
        ValueError("price must be positive") if any(r.value["price"] < 0 for r in records) else None
    )
    wb, get_product, save, _ = _setup(cache, journal, store)
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)
        bad_id = save({"id": 2, "price": -1}, 2)
        save({"id": 3, "price": 4}, 3)
        assert get_product(2) == {"id": 2, "price": -1}
    flusher = wb.flusher(max_attempts=3, sleep=lambda seconds: None)
    report = flusher.run_once()
    assert (report.read, report.stored, report.retries) == (3, 2, 2)
    assert [(r.id, r.attempts) for r in report.dead] == [(bad_id, 4)]
    assert len(store.calls) == 3 + 3  # the batch 3 times, then each record alone
    [letter] = journal.dead_letters()
    assert (letter.id, letter.attempts, letter.body) == (bad_id, 4, _key(get_product, 2))
    assert letter.error == "store failed 4 times: ValueError: price must be positive"
    assert wb.decode(letter) == {"id": 2, "price": -1}  # the dead letter keeps the value
    assert journal.backlog() == 0
    with tenant_scope("acme"):
        assert get_product(2) == {"id": 2, "price": 0}  # not the value the store refused
        save({"id": 4, "price": 5}, 4)
    assert flusher.run_once().stored == 1


def test_stop_drains_the_journal(cache: TieredCache, journal: RedisStreamJournal) -> None:
    """Graceful shutdown: every write journaled before stop() reaches the store."""
    store = Store()
    wb, _, save, _ = _setup(cache, journal, store)
    with tenant_scope("acme"):
        for pid in range(300):
            save({"id": pid, "price": pid}, pid)
    flusher = wb.flusher(batch_size=50, block=0.05).start()
    flusher.stop(drain=True, timeout=10)
    stored = sorted(value["id"] for call in store.calls for _, value in call)
    assert stored == list(range(300))
    assert journal.backlog() == 0


async def test_async_write_back_round_trip_and_graceful_stop(redis_url: str) -> None:
    """The async twin: awaitable save, pending-first miss, task flusher drained on stop."""
    cache = TieredCache(NAMESPACE, [MemoryLayer(), RedisLayer(url=redis_url)])
    journal = AsyncRedisStreamJournal(NAMESPACE, url=redis_url)
    stored: list[tuple[int, int]] = []

    async def store(records: list[WriteRecord]) -> None:
        stored.extend((r.value["id"], r.value["price"]) for r in records)

    wb = AsyncWriteBack(cache, journal=journal, store=store)

    @cache.cached(ttl=60, name="product")
    @wb.pending_first
    async def get_product(pid: int) -> dict[str, int]:
        return {"id": pid, "price": 0}

    save = wb.writer(get_product)
    try:
        with tenant_scope("acme"):
            for pid in range(40):
                await save({"id": pid, "price": pid + 100}, pid)
            assert await get_product(7) == {"id": 7, "price": 107}
            await cache.ainvalidate([get_product.key(8)])
            assert await get_product(8) == {"id": 8, "price": 108}  # from the journal
        flusher = wb.flusher(block=0.05).start()
        await flusher.stop(drain=True)
        assert sorted(stored) == [(pid, pid + 100) for pid in range(40)]
        assert await journal.backlog() == 0
    finally:
        await wb.aclose()
        await cache.aclose()


class Crash(BaseException):
    """A flusher dying in the middle of a store call (not an error it could handle)."""


def test_a_second_flusher_claims_a_crashed_flushers_entries(
    cache: TieredCache, journals: Callable[..., RedisStreamJournal]
) -> None:
    """Entries taken by a flusher that died are claimed by another once idle (XAUTOCLAIM)."""
    crashing, store = Store(), Store()
    crashing.fail = lambda records: Crash()
    first = WriteBack(cache, journal=journals(claim_idle=0.2), store=crashing)
    get_product, _ = _product(cache, first)
    save = first.writer(get_product)
    with tenant_scope("acme"):
        for pid in range(3):
            save({"id": pid, "price": pid}, pid)
    with pytest.raises(Crash):
        first.flusher().run_once()
    journal = journals(claim_idle=0.2, prune_idle=0.2)
    second = WriteBack(cache, journal=journal, store=store)
    flusher = second.flusher()
    assert flusher.run_once().read == 0  # still owned by the dead flusher
    time.sleep(0.3)  # claim_idle is measured by Redis on its own clock: the wait is the test
    report = flusher.run_once()
    assert (report.read, report.stored) == (3, 3)
    assert [[value["id"] for _, value in call] for call in store.calls] == [[0, 1, 2]]
    assert journal.backlog() == 0
    # The dead flusher, idle and empty-handed now, is dropped from the consumer group.
    consumers = journal.client.xinfo_consumers(journal.stream, journal.group)
    assert [c["name"].decode() for c in consumers] == [journal.consumer]


def test_an_entry_that_crashes_every_flusher_is_dead_lettered(
    cache: TieredCache, journals: Callable[..., RedisStreamJournal]
) -> None:
    """A poison entry is handed out at most max_deliveries times, then dead-lettered."""
    crashing = Store()
    crashing.fail = lambda records: Crash()
    wb = WriteBack(cache, journal=journals(claim_idle=0.05), store=crashing)
    get_product, _ = _product(cache, wb)
    with tenant_scope("acme"):
        entry_id = wb.writer(get_product)({"id": 1, "price": 1}, 1)
    for _ in range(2):
        with pytest.raises(Crash):
            wb.flusher(max_deliveries=2).run_once()
        time.sleep(0.1)  # past claim_idle on Redis's clock, so the next flusher may claim it
    last = WriteBack(cache, journal=journals(claim_idle=0.05), store=Store())
    report = last.flusher(max_deliveries=2).run_once()
    assert [(r.id, r.deliveries) for r in report.dead] == [(entry_id, 3)]
    assert "handed out 3 times" in (report.dead[0].error or "")
    assert last.journal.backlog() == 0


def test_concurrent_writers_never_leave_the_older_value_cached(
    cache: TieredCache, journal: RedisStreamJournal
) -> None:
    """Journaled A then B, but cached B then A: the writer of A sees B is newer and drops A."""

    class Interleave:
        def __init__(self) -> None:
            self.inner: Callable[[], object] | None = None

        def __getattr__(self, name: str) -> Any:
            return getattr(journal, name)

        def append(self, record: WriteRecord) -> str:
            entry_id = journal.append(record)
            if self.inner is not None:  # B is journaled and cached before A is cached
                inner, self.inner = self.inner, None
                inner()
            return entry_id

    racing = Interleave()
    wb = WriteBack(cache, journal=racing, store=Store())  # type: ignore[arg-type]
    get_product, _ = _product(cache, wb)
    save = wb.writer(get_product)
    with tenant_scope("acme"):
        racing.inner = lambda: save({"id": 1, "price": 2}, 1)
        save({"id": 1, "price": 1}, 1)
        assert get_product(1) == {"id": 1, "price": 2}


def test_a_full_journal_refuses_the_write(
    cache: TieredCache, journals: Callable[..., RedisStreamJournal]
) -> None:
    """Past max_backlog unflushed writes, save() raises WriteBackError and changes nothing."""
    journal = journals(max_backlog=2)
    wb = WriteBack(cache, journal=journal, store=Store())
    get_product, _ = _product(cache, wb)
    save = wb.writer(get_product)
    with tenant_scope("acme"):
        save({"id": 1, "price": 1}, 1)
        save({"id": 2, "price": 1}, 2)
        assert get_product(3) == {"id": 3, "price": 0}
        with pytest.raises(WriteBackError, match="is full"):
            save({"id": 3, "price": 9}, 3)
        assert get_product(3) == {"id": 3, "price": 0}
    assert journal.backlog() == 2


def test_too_few_replicas_is_not_acknowledged_but_reads_stay_consistent(
    cache: TieredCache, journals: Callable[..., RedisStreamJournal]
) -> None:
    """min_replicas unmet: WriteBackError (a failover could lose the write); the entry is on
    the primary, so readers and the store see it, not the value it replaced."""
    journal = journals(min_replicas=1, replica_timeout=0.05)
    store = Store()
    wb = WriteBack(cache, journal=journal, store=store)
    get_product, _ = _product(cache, wb)
    save = wb.writer(get_product)
    with tenant_scope("acme"):
        assert get_product(3) == {"id": 3, "price": 0}
        with pytest.raises(WriteBackError, match="only 0 of 1 replicas"):
            save({"id": 3, "price": 9}, 3)
        assert get_product(3) == {"id": 3, "price": 9}  # the cached old value was dropped
    assert wb.flusher().run_once().stored == 1
    assert store.calls == [[(_key(get_product, 3), {"id": 3, "price": 9})]]


def test_an_unreachable_journal_fails_the_write_with_the_redis_error(
    cache: TieredCache, journals: Callable[..., RedisStreamJournal]
) -> None:
    """Redis errors are translated at the edge, chained, and name the stream."""
    wb = WriteBack(cache, journal=journals(url=f"redis://127.0.0.1:{free_port()}/0"), store=Store())
    get_product, _ = _product(cache, wb)
    save = wb.writer(get_product)
    with tenant_scope("acme"), pytest.raises(WriteBackError, match="NOT acknowledged") as info:
        save({"id": 1, "price": 1}, 1)
    assert "tc:wb:{wb}" in str(info.value) and info.value.__cause__ is not None


def test_misconfiguration_is_refused(
    cache: TieredCache, journal: RedisStreamJournal, redis_url: str
) -> None:
    """A writer without pending_first, or a journal of another namespace, is a config error."""
    wb = WriteBack(cache, journal=journal, store=Store())

    @cache.cached(ttl=60)
    def plain(pid: int) -> int:
        return pid

    with pytest.raises(ConfigurationError, match="pending_first"):
        wb.writer(plain)
    wb.writer(plain, read_your_writes=False)
    other = RedisStreamJournal("elsewhere", url=redis_url)
    with pytest.raises(ConfigurationError, match="namespace"):
        WriteBack(cache, journal=other, store=Store())
    other.close()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("fresh_redis_server", [AOF_ALWAYS], indirect=True)
def test_sigkilled_writer_loses_no_acknowledged_write(
    fresh_redis_server: RedisService, postgres_server: PostgresServer
) -> None:
    """SIGKILL the writing process (and its flusher, mid-batch) and then Redis; after a
    restart every acknowledged write is in PostgreSQL exactly once in effect."""
    url, dsn = fresh_redis_server.url, postgres_server.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wb_item, wb_call")
        conn.execute(SCHEMA)
    worker = ROOT / "tests" / "writeback_worker.py"
    proc = subprocess.Popen(
        [sys.executable, str(worker), url, dsn, "1000000", "1.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    acked: dict[str, int] = {}

    def take(line: str) -> None:
        if line.startswith("ack "):
            _, entry_id, item = line.split()
            acked[entry_id] = int(item)

    try:
        deadline = time.monotonic() + 30
        while True:  # kill right after a commit, while that batch is still unacked
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"the worker exited early:\n{proc.communicate()[1]}")
            take(line)
            if line.startswith("stored ") and len(acked) >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    reader.join(10)
    while (line := lines.get_nowait()) is not None:
        take(line)
    for pipe in (proc.stdout, proc.stderr):
        assert pipe is not None
        pipe.close()
    assert "done" not in acked and len(acked) >= 300

    fresh_redis_server.kill()  # Redis crashes too: the AOF, fsynced per write, keeps the journal
    fresh_redis_server.restart()

    cache = TieredCache(CRASH_NAMESPACE, [MemoryLayer()])
    journal = RedisStreamJournal(CRASH_NAMESPACE, url=url, claim_idle=0.3)
    store = PgStore(dsn)
    try:
        flusher = WriteBack(cache, journal=journal, store=store).flusher(batch_size=500)
        dead: list[WriteRecord] = []

        def drained() -> bool:
            if journal.backlog():
                dead.extend(flusher.run_once(block=0.1).dead)
            return journal.backlog() == 0

        wait_until(drained, timeout=20, interval=0, message="the journal drained")
        assert journal.backlog() == 0 and dead == []
    finally:
        store.close()
        journal.close()
        cache.close()

    with psycopg.connect(dsn) as conn:
        rows = {
            item: (n, version, applied)
            for item, n, version, applied in conn.execute(
                "SELECT id, n, version, applied FROM wb_item WHERE tenant = %s", (TENANT,)
            )
        }
        max_calls = conn.execute("SELECT max(calls) FROM wb_call").fetchone()
    for entry_id, item in acked.items():
        ms, seq = entry_id.split("-")
        version = int(ms) << 20 | int(seq)  # WriteRecord.version
        assert rows.get(item) == (item, version, 1), f"acknowledged write {entry_id} (item {item})"
    # At most one more: journaled, but killed before it printed its ack.
    assert len(rows) - len(acked) in (0, 1)
    # The batch committed before the kill was delivered again, and changed nothing.
    assert max_calls is not None and max_calls[0] >= 2


@pytest.mark.cluster
def test_the_journal_works_on_redis_cluster(redis_cluster_nodes: list[tuple[str, int]]) -> None:
    """Write-back on Redis Cluster: the stream, its dead letters and the newest-write
    index share the namespace's hash tag, so the journal's scripts run there too."""
    from redis.cluster import ClusterNode, RedisCluster

    clients: list[RedisCluster] = []

    def client() -> RedisCluster:
        made = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster_nodes])
        clients.append(made)  # the journals do not close a client they were given
        return made

    cache = TieredCache(NAMESPACE, [MemoryLayer(), RedisLayer(cluster_nodes=redis_cluster_nodes)])
    crashing = Store()
    crashing.fail = lambda records: Crash()
    first = WriteBack(
        cache,
        journal=RedisStreamJournal(NAMESPACE, client=client(), claim_idle=0.2),
        store=crashing,
    )
    get_product, _ = _product(cache, first)
    save = first.writer(get_product)
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)
        save({"id": 1, "price": 4}, 1)  # coalesced with the first: the newest wins
        bad_id = save({"id": 2, "price": -1}, 2)
        assert get_product(1) == {"id": 1, "price": 4}
    with pytest.raises(Crash):
        first.flusher().run_once()  # takes the entries, then dies
    store = Store()
    store.fail = lambda records: (
        ValueError("price must be positive") if any(r.value["price"] < 0 for r in records) else None
    )
    journal = RedisStreamJournal(NAMESPACE, client=client(), claim_idle=0.2)
    second = WriteBack(cache, journal=journal, store=store)
    time.sleep(0.3)  # the dead flusher's entries go idle past claim_idle on Redis's clock
    report = second.flusher(max_attempts=1, sleep=lambda seconds: None).run_once()
    assert report.read == 3 and [r.id for r in report.dead] == [bad_id]
    accepted = [
        [(value["id"], value["price"]) for _, value in call]
        for call in store.calls
        if all(value["price"] >= 0 for _, value in call)
    ]
    assert accepted == [[(1, 4)]]  # the two writes of 1 coalesced; 2 refused alone
    [letter] = journal.dead_letters()
    assert letter.id == bad_id and "price must be positive" in letter.error
    assert journal.backlog() == 0
    for made in clients:
        made.close()
    cache.close()
