"""The CDC invalidator: a Kafka consumer-group member that turns Debezium change
events into cache invalidations on every layer and every replica, and never skips.

One loop, on one thread, per process (confluent-kafka is a blocking client):

1. **Read a batch**: wait for the first record (``poll``), then take what is
   already fetched (``consume(n, 0)``), so an idle partition costs no batch delay.
2. **Decode and map** each record (:func:`cdc.debezium.decode_record`,
   :meth:`cdc.rules.Rules.invalidations`), and coalesce: the batch's
   invalidations are one set of (namespace, tenant, tag).
3. **Dead letters**: a record that cannot be decoded or mapped is produced to the
   dead-letter topic with ``error``, ``topic``, ``partition`` and ``offset``
   headers, and the worker waits for the delivery reports before anything of the
   batch is committed (a dead-letter topic it cannot reach stops the worker:
   :class:`DeadLetterError`). Its table is invalidated for all tenants, as a
   fail-safe (every rule's table when the record does not say which).
4. **Storage side**: one ``invalidate_many`` per namespace with the storage
   layers and the replica broadcast. A layer that fails is retried, alone, with
   exponential backoff (or the layer's ``Retry-After``) while the assigned
   partitions are paused and ``poll()`` keeps the membership alive; the lag
   grows and ``tieredcache_cdc_blocked{layer,reason}`` says why. Nothing of a
   failed batch is committed and nothing after it is read.
5. **CDN side**: invalidation-only layers get the batch on a thread of their own,
   coalesced with whatever else is queued, within each layer's purge budget (a
   token bucket in surrogate keys, per vendor: :mod:`cdc._cdn_budget`). Past the
   budget the purge escalates (many tenants' tags of a table to the table key,
   many tags of a tenant to the tenant key) and waits for tokens only when even
   that does not fit; a 429 waits its ``Retry-After`` and re-plans what the vendor
   did not take. Nothing is dropped; a slow CDN never holds back Redis and the
   in-process layers. A ``CdnPurgeLayer`` is driven directly (``purge_keys``, then
   the returned ticket's outcome); another CDN layer through ``invalidate_many``,
   whose queued purges are settled (``wait_purges``) before they count.
6. **Commit** a partition's offset when both sides acknowledged everything
   before it (:mod:`cdc._progress`): the committed offset never passes the
   CDN's progress, and the CDN's never passes the storage side's.

Rebalance: commit on revoke what both sides acknowledged; on a *lost* assignment
commit nothing (another member may already own it). ``stop()`` (SIGTERM in the
CLI): finish the batch, commit, close (leaving the group).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cdc._cdn_budget import CdnBudget, Unit, plan, surrogate_keys, units_of
from cdc._progress import Progress, Stamp, TopicPartition
from cdc._target import CoreInvalidation, InvalidationTarget, split_layers, to_items
from cdc.debezium import ChangeEvent, EventDecodeError, Ignored, decode_record
from cdc.health import WorkerStatus
from cdc.metrics import WorkerMetrics
from cdc.rules import Invalidation, Rules, UnmappableEventError
from tieredcache.errors import ConfigurationError, MissingExtraError, TieredCacheError

__all__ = ["DeadLetterError", "Worker", "WorkerSettings"]

log = logging.getLogger("cdc.worker")

DEAD_LETTER_HEADERS = ("error", "topic", "partition", "offset")
_DEFAULT: Any = object()


class DeadLetterError(TieredCacheError):
    """The dead-letter topic did not confirm a record: the worker stops, uncommitted."""


@dataclass(frozen=True)
class WorkerSettings:
    """Kafka and loop settings (see :mod:`cdc.config` for the TOML form).

    ``topics``: names, or regular expressions starting with ``^``. ``consumer`` and
    ``producer`` are extra librdkafka properties (they win over the defaults).
    """

    bootstrap_servers: str
    topics: Sequence[str]
    group_id: str = "tieredcache-cdc"
    dead_letter_topic: str = "tieredcache-cdc.dead-letter"
    batch_size: int = 500
    poll_timeout: float = 0.1
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    lag_interval: float = 1.0
    dead_letter_timeout: float = 10.0
    cdn_timeout: float = 30.0
    settings_check_interval: float = 30.0
    shutdown_grace: float = 20.0
    heartbeat_prefix: str = "__debezium-heartbeat"
    transaction_topic: str | None = None
    consumer: Mapping[str, Any] = field(default_factory=dict)
    producer: Mapping[str, Any] = field(default_factory=dict)

    def consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 10,
            "topic.metadata.refresh.interval.ms": 5000,
            **self.consumer,
        }

    def producer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "acks": "all",
            "linger.ms": 1,
            "message.timeout.ms": int(self.dead_letter_timeout * 1000),
            **self.producer,
        }


@dataclass(slots=True)
class _Prepared:
    """A batch decoded and mapped: what to invalidate, and what to acknowledge after."""

    batch: list[Any]
    wanted: set[Invalidation]
    table_of: dict[Invalidation, str | None]
    stamp: Stamp
    ts_ms: list[int]  # source.ts_ms of the events that invalidated something
    dead: list[tuple[Any, Exception]]


@dataclass(slots=True)
class _InFlight:
    prepared: _Prepared
    by_ns: dict[str, set[Invalidation]]
    items: dict[str, list[Any]]
    pending: dict[str, list[str]]
    first: Future[dict[str, Any]] | None  # the first attempt, on the storage thread


@dataclass
class _CdnUnit:
    invalidations: set[Invalidation]
    stamp: Stamp
    ts_ms: list[int]
    table_of: dict[Invalidation, str | None] = field(default_factory=dict)


class Worker:
    """Consume Debezium topics and invalidate ``targets`` (one cache per namespace).

    >>> worker = Worker(settings, rules, [cache])        # doctest: +SKIP
    >>> worker.run()   # until worker.stop() (SIGTERM in the CLI)   # doctest: +SKIP
    """

    def __init__(
        self,
        settings: WorkerSettings,
        rules: Rules,
        targets: Sequence[InvalidationTarget],
        *,
        metrics: WorkerMetrics | None = None,
        status: WorkerStatus | None = None,
        clock: Callable[[], float] = time.time,
        on_storage_acked: Callable[[list[tuple[str, int, int]]], None] | None = None,
        cdn_budgets: Mapping[str, CdnBudget | None] | None = None,
        budget_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.targets = {t.namespace: t for t in targets}
        needed = {ns for r in rules.tables.values() for ns in r.namespaces}
        needed |= set(rules.message_namespaces)
        missing = needed - set(self.targets)
        if missing:
            raise ConfigurationError(
                f"the rules invalidate namespace(s) {sorted(missing)} but no cache was given "
                "for them; add one per namespace"
            )
        self._storage_layers: dict[str, list[str]] = {}
        self._cdn_layers: dict[str, list[str]] = {}
        for ns, target in self.targets.items():
            self._storage_layers[ns], self._cdn_layers[ns] = split_layers(target)
        self._has_cdn = any(self._cdn_layers.values())
        # One purge budget (a token bucket in surrogate keys) per CDN layer: the
        # vendor's default unless ``cdn_budgets`` names it (None: unlimited).
        self._cdn_buckets: dict[str, Any] = {}
        self._cdn_objects: dict[tuple[str, str], Any] = {}
        for ns, target in self.targets.items():
            for layer in target.layers:
                if layer.name not in self._cdn_layers[ns]:
                    continue
                self._cdn_objects[(ns, layer.name)] = layer
                if layer.name in self._cdn_buckets:
                    continue
                given = (cdn_budgets or {}).get(layer.name, _DEFAULT)
                budget = CdnBudget.for_layer(layer) if given is _DEFAULT else given
                if budget is not None:
                    self._cdn_buckets[layer.name] = budget.bucket(budget_clock)
        self.cdn_escalations: dict[str, int] = defaultdict(int)
        self.metrics = metrics or WorkerMetrics()
        self.status = status or WorkerStatus()
        self.clock = clock
        self.progress = Progress(cdn=self._has_cdn)
        self._on_storage_acked = on_storage_acked
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._carry: list[Any] = []
        self._storage_thread: ThreadPoolExecutor | None = None
        self._paused = False
        self._lag_stop = threading.Event()
        self._lag_thread: threading.Thread | None = None
        # The CDN side: a queue of batches and its own thread.
        self._cdn_cond = threading.Condition()
        self._cdn_queue: list[_CdnUnit] = []
        self._cdn_busy = False
        self._cdn_stop = False
        self._cdn_thread: threading.Thread | None = None
        self._all_tables = {r.table for r in rules.tables.values()}
        # The applications' published keyspace settings, checked again every
        # settings_check_interval (and before every retry while they disagree).
        self._settings_due: dict[str, float] = {}
        self._settings_problems: dict[str, list[str]] = {}

    # -- lifecycle ---------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the current batch, commit and leave (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume until :meth:`stop`; raises :class:`DeadLetterError` if the DLQ fails."""
        try:
            import confluent_kafka
        except ImportError as exc:  # pragma: no cover
            raise MissingExtraError("confluent-kafka", "kafka") from exc
        self._consumer = confluent_kafka.Consumer(self.settings.consumer_config())
        self._producer = confluent_kafka.Producer(self.settings.producer_config())
        if self._has_cdn:
            self._cdn_thread = threading.Thread(
                target=self._cdn_loop, name="tieredcache-cdc-cdn", daemon=True
            )
            self._cdn_thread.start()
        # Lag is read by a client of its own on a thread of its own: its broker round
        # trips (watermarks, committed offsets) never stall the consume loop.
        lag_client = confluent_kafka.Consumer(
            {"bootstrap.servers": self.settings.bootstrap_servers,
             "group.id": self.settings.group_id, "enable.auto.commit": False}
        )  # fmt: skip
        self._lag_thread = threading.Thread(
            target=self._lag_loop, args=(lag_client,), name="tieredcache-cdc-lag", daemon=True
        )
        self._lag_thread.start()
        try:
            self._consumer.subscribe(
                list(self.settings.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self.status.consuming = True
            self._storage_thread = ThreadPoolExecutor(1, "tieredcache-cdc-storage")
            # One batch in flight: while the storage layers work on batch N (Redis runs
            # its scripts, the thread waits for the reply), this thread reads what is
            # already fetched and decodes and maps it as batch N+1. N+1 goes out only
            # once N is acknowledged (or has been retried until it was), so the layers
            # still see the batches in order, and one at a time.
            inflight: _InFlight | None = None
            while not self._stop.is_set() or inflight is not None:
                self.status.beat()
                batch = [] if self._stop.is_set() else self._read_batch(wait=inflight is None)
                prepared = self._prepare(batch) if batch else None
                if inflight is not None:
                    finished = self._complete(inflight)
                    inflight = None
                    if not finished:
                        break  # stopping while a layer still fails: nothing of it commits
                if prepared is not None and not self._stop.is_set():
                    inflight = self._start(prepared)
                self._commit()
        finally:
            self.status.stopping = True
            self._shutdown()

    def _shutdown(self) -> None:
        consumer, self._consumer = self._consumer, None
        if self._storage_thread is not None:
            self._storage_thread.shutdown(wait=True)
            self._storage_thread = None
        self._lag_stop.set()
        if self._lag_thread is not None:
            self._lag_thread.join(5)
        try:
            if self._cdn_thread is not None:
                with self._cdn_cond:
                    self._cdn_stop = True
                    self._cdn_cond.notify_all()
                self._cdn_thread.join(self.settings.shutdown_grace)
            if consumer is not None:
                self._consumer = consumer
                self._commit()
                self._consumer = None
        finally:
            if consumer is not None:
                consumer.close()  # leaves the group; on_revoke commits nothing new
            if self._producer is not None:
                self._producer.flush(self.settings.dead_letter_timeout)
                self._producer = None

    # -- reading -----------------------------------------------------------------
    def _read_batch(self, wait: bool = True) -> list[Any]:
        """The records kept back by a pause, else up to ``batch_size`` records: the
        first waited for (``wait``: at most ``poll_timeout``), then what is fetched."""
        consumer = self._consumer
        batch, self._carry = self._carry, []
        if not batch and wait:
            first = consumer.poll(self.settings.poll_timeout)
            if first is None:
                return []
            batch = [first]
        more = self.settings.batch_size - len(batch)
        if more > 0:
            batch.extend(consumer.consume(more, 0))
        return [m for m in batch if self._usable(m)]

    def _usable(self, msg: Any) -> bool:
        error = msg.error()
        if error is not None:
            from confluent_kafka import KafkaError

            if error.code() == KafkaError._PARTITION_EOF:
                return False
            if error.fatal():
                raise TieredCacheError(f"Kafka consumer failed: {error}")
            log.warning("Kafka consumer: %s", error)
            return False
        return self.progress.owns((msg.topic(), msg.partition()))

    # -- one batch ------------------------------------------------------------------
    def _process(self, batch: list[Any]) -> bool:
        """Decode, map and invalidate ``batch`` (the loop of :meth:`run` without the
        overlap); False when stopping while a layer still fails."""
        return self._complete(self._start(self._prepare(batch)))

    def _prepare(self, batch: list[Any]) -> _Prepared:
        """Decode and map ``batch``, coalesce its invalidations, stamp its offsets."""
        # The hot loop of the worker: names are bound to locals, and per-event work is
        # one decode, one mapping and a few dict operations; metrics are per batch.
        wanted: set[Invalidation] = set()
        table_of: dict[Invalidation, str | None] = {}
        end_offsets: dict[TopicPartition, int] = {}
        oldest: dict[TopicPartition, int] = {}
        ts_list: list[int] = []
        dead: list[tuple[Any, Exception]] = []
        kinds: dict[tuple[str, str], int] = defaultdict(int)
        invalidations = self.rules.invalidations
        skips = self.rules.skips
        heartbeat_prefix = self.settings.heartbeat_prefix
        transaction_topic = self.settings.transaction_topic
        has_cdn = self._has_cdn
        for msg in batch:
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            tp = (topic, partition)
            if offset >= end_offsets.get(tp, 0):
                end_offsets[tp] = offset + 1
            event: ChangeEvent | Ignored | None = None
            try:
                event = decode_record(
                    topic,
                    msg.key(),
                    msg.value(),
                    headers=msg.headers(),
                    partition=partition,
                    offset=offset,
                    heartbeat_prefix=heartbeat_prefix,
                    transaction_topic=transaction_topic,
                )
                if isinstance(event, Ignored):
                    kinds[(topic, "ignored")] += 1
                    continue
                if skips(event):
                    # A snapshot read the rules skip: nothing was invalidated for it, so
                    # it is neither a latency sample nor lag (it commits with its batch).
                    kinds[(topic, "skipped")] += 1
                    continue
                found = invalidations(event)
                kinds[(topic, "change")] += 1
                if not found:
                    continue  # no rule for its table: nothing to wait for, nor to time
                wanted |= found
                if has_cdn:
                    rule = self.rules.tables.get(event.table) if event.table else None
                    table = rule.table_tag if rule is not None else None
                    for inv in found:  # a tag two tables produce escalates to neither
                        table_of[inv] = table if table_of.get(inv, table) == table else None
                ts = event.ts_ms
                if ts is not None:
                    ts_list.append(ts)
                    if ts < oldest.get(tp, ts + 1):
                        oldest[tp] = ts
            except (EventDecodeError, UnmappableEventError) as exc:
                kinds[(topic, "dead_letter")] += 1
                dead.append((msg, exc))
                table = event.table if isinstance(event, ChangeEvent) else None
                wanted |= self._fail_safe(topic, table)
        for (topic, kind), n in kinds.items():
            self.metrics.events.labels(topic, kind).inc(n)
        self.metrics.count_events(len(batch))
        # Stamped when read: a partition revoked (and maybe assigned again) before the
        # batch is acknowledged makes the acknowledgement stale, never a commit of
        # records this member did not process in order.
        stamp = self.progress.stamp(end_offsets, oldest)
        return _Prepared(batch, wanted, table_of, stamp, ts_list, dead)

    def _start(self, prepared: _Prepared) -> _InFlight:
        """Dead-letter what must be, then send the batch's first attempt to the storage
        layers on the storage thread (here, without one: outside :meth:`run`)."""
        if prepared.dead:
            self._dead_letter(prepared.dead)
        by_ns = _by_namespace(prepared.wanted)
        items = {ns: to_items(invs) for ns, invs in by_ns.items()}
        pending = {ns: list(self._storage_layers[ns]) for ns in by_ns}
        if self._storage_thread is None:
            return _InFlight(prepared, by_ns, items, pending, None)
        first = self._storage_thread.submit(self._attempt, items, pending)
        return _InFlight(prepared, by_ns, items, pending, first)

    def _attempt(
        self, items: Mapping[str, list[Any]], pending: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """One ``invalidate_many`` per namespace (on the storage thread); a namespace
        whose application settings disagree is left to :meth:`_apply`."""
        return {
            ns: self.targets[ns].invalidate_many(items[ns], layers=layers)
            for ns, layers in pending.items()
            if layers and items[ns] and not self._settings_disagree(ns)
        }

    def _settings_disagree(self, ns: str) -> list[str]:
        """What the application published for ``ns`` and this worker's cache disagree
        on (key prefix, tenant slots, lease protocol): invalidations would go to names
        nobody reads, or let stale fills through, while reporting success. Read every
        ``settings_check_interval`` seconds, and on every call while they disagree.
        Nothing published (a Redis restarted empty) is not a disagreement."""
        interval = self.settings.settings_check_interval
        check = getattr(self.targets[ns], "check_settings", None)
        if interval <= 0 or check is None:
            return []
        now = time.monotonic()
        if ns not in self._settings_problems and now < self._settings_due.get(ns, 0.0):
            return []
        self._settings_due[ns] = now + interval
        try:
            problems: list[str] = check(unpublished_ok=True)
        except TieredCacheError as exc:
            # Unreadable now (a timeout): the last verdict stands. A namespace held for
            # a disagreement stays held; one that agreed goes on, and its invalidation
            # says whether the layer is down.
            log.warning("namespace %r: settings not read: %s", ns, exc)
            return self._settings_problems.get(ns, [])
        if problems and ns not in self._settings_problems:
            for problem in problems:
                log.error("namespace %r: %s; not invalidating until it agrees", ns, problem)
        elif not problems and ns in self._settings_problems:
            log.warning("namespace %r: the application's settings agree again", ns)
        if problems:
            self._settings_problems[ns] = problems
        else:
            self._settings_problems.pop(ns, None)
        return problems

    def _complete(self, inflight: _InFlight) -> bool:
        """Wait for the first attempt, retry what failed, acknowledge; False when
        stopping while a layer still fails (nothing of the batch commits)."""
        prepared = inflight.prepared
        first = None if inflight.first is None else inflight.first.result()
        if not self._apply_storage(inflight.by_ns, inflight.pending, inflight.items, first):
            return False
        self.metrics.commit_to_invalidated.observe_since("storage", self.clock(), prepared.ts_ms)
        self.progress.storage_acked(prepared.stamp)
        if self._on_storage_acked is not None:
            batch = prepared.batch
            self._on_storage_acked([(m.topic(), m.partition(), m.offset()) for m in batch])
        if self._has_cdn:
            unit = _CdnUnit(prepared.wanted, prepared.stamp, prepared.ts_ms, prepared.table_of)
            with self._cdn_cond:
                self._cdn_queue.append(unit)
                self._cdn_cond.notify_all()
        return True

    def _fail_safe(self, topic: str, table: str | None) -> set[Invalidation]:
        """Invalidate the record's table for all tenants (every table if unknown)."""
        if table is None:
            tail = ".".join(topic.split(".")[-2:])
            table = tail if tail in self.rules.tables else None
        tables = [table] if table in self.rules.tables else sorted(self._all_tables)
        found: set[Invalidation] = set()
        for name in tables:
            rule = self.rules.tables[name]
            assert rule.table_tag is not None
            found |= {Invalidation(ns, None, rule.table_tag) for ns in rule.namespaces}
        return found

    def _dead_letter(self, dead: list[tuple[Any, Exception]]) -> None:
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        for msg, exc in dead:
            headers = [
                ("error", str(exc).encode()),
                ("topic", msg.topic().encode()),
                ("partition", str(msg.partition()).encode()),
                ("offset", str(msg.offset()).encode()),
            ]
            log.warning(
                "dead letter %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc
            )
            try:
                self._producer.produce(
                    self.settings.dead_letter_topic,
                    value=msg.value(),
                    key=msg.key(),
                    headers=headers,
                    on_delivery=delivered,
                )
            except (BufferError, Exception) as err:  # KafkaException, BufferError
                errors.append(str(err))
                break
        remaining = self._producer.flush(self.settings.dead_letter_timeout)
        if errors or remaining:
            why = errors[0] if errors else f"{remaining} record(s) not confirmed"
            raise DeadLetterError(
                f"the dead-letter topic {self.settings.dead_letter_topic!r} did not confirm "
                f"{len(dead)} record(s) ({why}); stopping without committing them"
            )
        for msg, _ in dead:
            self.metrics.dead_letters.labels(msg.topic()).inc()

    # -- invalidation with retries ----------------------------------------------------
    def _apply_storage(
        self,
        by_ns: dict[str, set[Invalidation]],
        pending: dict[str, list[str]],
        items: Mapping[str, list[Any]],
        first: Mapping[str, Any] | None,
    ) -> bool:
        try:
            return self._apply(by_ns, pending, "storage", self._wait_paused, items, first)
        finally:
            if self._paused:
                self._consumer.resume(self._consumer.assignment())
                self._paused = False
                self.metrics.paused.set(0)

    def _apply(
        self,
        by_ns: Mapping[str, set[Invalidation]],
        pending: dict[str, list[str]],
        side: str,
        wait: Callable[[float], bool],
        items: Mapping[str, list[Any]] | None = None,
        first: Mapping[str, Any] | None = None,
    ) -> bool:
        """Invalidate until every layer in ``pending`` acknowledged; False if told to stop.

        ``first``: the results of an attempt already made (per namespace), taken as
        this loop's first; ``items``: ``by_ns`` as the core's items, if already built.
        """
        if items is None:
            items = {ns: to_items(invs) for ns, invs in by_ns.items()}
        attempt = 0
        blocked: set[tuple[str, str]] = set()
        try:
            while True:
                retry_after = 0.0
                for ns in list(pending):
                    layers = pending[ns]
                    if not layers or not items[ns]:
                        del pending[ns]
                        continue
                    if first is not None and attempt == 0 and ns in first:
                        result = first[ns]
                    elif side == "storage" and self._settings_disagree(ns):
                        # Held like a failing layer: paused, retried, nothing committed.
                        self._failing("settings", "mismatch", blocked)
                        continue
                    else:
                        result = self.targets[ns].invalidate_many(items[ns], layers=layers)
                    failed = set(result.failed)
                    for layer in layers:
                        if layer not in failed:
                            self.metrics.invalidations.labels(layer).inc(len(by_ns[ns]))
                    for failure in getattr(result, "failures", ()):
                        self._failing(failure.layer, failure.reason, blocked)
                        if failure.retry_after:
                            retry_after = max(retry_after, failure.retry_after)
                    for layer in failed - {f.layer for f in getattr(result, "failures", ())}:
                        self.metrics.layer_failures.labels(layer, "error").inc()
                        self.status.failing[layer] = "error"
                    if failed:
                        pending[ns] = [layer for layer in layers if layer in failed]
                    else:
                        del pending[ns]
                if not pending:
                    return True
                attempt += 1
                self.metrics.retries.labels(side).inc()
                delay = min(
                    self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempt - 1)
                )
                log.warning(
                    "%s side: %s not acknowledged; retry %d in %.2f s",
                    side,
                    sorted({lay for ls in pending.values() for lay in ls}),
                    attempt,
                    max(delay, retry_after),
                )
                if not wait(max(delay, retry_after)):
                    return False
        finally:
            for key in blocked:
                self.metrics.blocked.labels(*key).set(0)
                self.status.failing.pop(key[0], None)

    def _failing(self, layer: str, reason: str, blocked: set[tuple[str, str]]) -> None:
        """Count a failure of ``layer`` and show it (``/readyz``, the blocked gauge,
        reset by :meth:`_apply` when the batch is through)."""
        self.metrics.layer_failures.labels(layer, reason).inc()
        self.status.failing[layer] = reason
        if (layer, reason) not in blocked:
            blocked.add((layer, reason))
            self.metrics.blocked.labels(layer, reason).set(1)

    def _wait_paused(self, delay: float) -> bool:
        """Pause the assignment and keep polling for ``delay``; False when stopping."""
        consumer = self._consumer
        if not self._paused:
            consumer.pause(consumer.assignment())
            self._paused = True
            self.metrics.paused.set(1)
        if self._stop.is_set():
            if self._stop_deadline is None:
                self._stop_deadline = time.monotonic() + self.settings.shutdown_grace
            if time.monotonic() >= self._stop_deadline:
                return False
        deadline = time.monotonic() + delay
        while True:
            self.status.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            msg = consumer.poll(min(left, 0.1))
            if msg is not None:
                # Fetched before the pause took effect (or from a new assignment):
                # keep it for the next batch, in order.
                self._carry.append(msg)
                consumer.pause(consumer.assignment())
            self._commit()

    # -- the CDN side -------------------------------------------------------------------
    def _cdn_loop(self) -> None:
        while True:
            with self._cdn_cond:
                while not self._cdn_queue and not self._cdn_stop:
                    self._cdn_cond.wait()
                if not self._cdn_queue:
                    return
                units, self._cdn_queue = self._cdn_queue, []
            if not self._cdn_batch(units):
                return

    def _cdn_batch(self, units: list[_CdnUnit]) -> bool:
        """Purge the queued batches (merged) from every CDN layer, within each layer's
        budget; acknowledge their offsets once every layer confirmed. False: stopping."""
        merged: set[Invalidation] = set()
        table_of: dict[Invalidation, str | None] = {}
        offsets: dict[TopicPartition, tuple[int, int]] = {}
        ts_list: list[int] = []
        for unit in units:  # FIFO: a later stamp of a partition supersedes an earlier
            merged |= unit.invalidations
            for inv, table in unit.table_of.items():
                table_of[inv] = table if table_of.get(inv, table) == table else None
            offsets.update(unit.stamp.offsets)
            ts_list.extend(unit.ts_ms)
        for ns, invs in sorted(_by_namespace(merged).items()):
            for name in self._cdn_layers.get(ns, ()):
                if not self._purge_layer(ns, name, invs, table_of):
                    return False
        self.metrics.commit_to_invalidated.observe_since("cdn", self.clock(), ts_list)
        self.progress.cdn_acked(Stamp(offsets))
        return True

    def _purge_layer(
        self,
        ns: str,
        name: str,
        invs: set[Invalidation],
        table_of: Mapping[Invalidation, str | None],
    ) -> bool:
        """Purge ``invs`` from one CDN layer until it confirmed every key or a coarser
        key covering it. Past the budget the plan escalates (:mod:`cdc._cdn_budget`); a
        rate-limited answer waits its ``Retry-After`` and re-plans what is left;
        nothing is dropped. False when stopping."""
        layer = self._cdn_objects[(ns, name)]
        bucket = self._cdn_buckets.get(name)
        direct = callable(getattr(layer, "purge_keys", None))
        todo: set[Unit] = units_of(invs)
        # Tenants some of whose tags went out: their overflow key is still due.
        pinned: set[tuple[str, str]] = set()
        attempt = 0
        blocked: tuple[str, str] | None = None
        # Without a configured budget, a 429 teaches one: what the vendor took last.
        learned: float | None = None
        try:
            while todo:
                budget = learned if bucket is None else bucket.available()
                units = plan(todo, table_of, budget, keep_overflow=pinned, tenant_keys=direct)
                if budget is not None and len(units) < len(todo):
                    self.cdn_escalations[name] += 1
                    log.warning(
                        "%s: %d keys past the purge budget (%.0f left): escalated to %d",
                        name, len(todo), budget, len(units),
                    )  # fmt: skip
                batch = units
                if bucket is not None:
                    need = min(len(units), int(bucket.capacity))
                    wait = bucket.take(need)
                    if wait > 0:  # not even the coarsest plan fits: wait for the tokens
                        todo = set(units)
                        if not self._wait_cdn(wait):
                            return False
                        continue
                    batch = units[:need]  # more than the whole bucket: in parts
                failure = self._send_cdn(ns, name, layer, batch, direct)
                left = set() if failure is None else failure[0]
                sent = set(batch) - left
                pinned |= {(u.namespace, u.tenant) for u in sent if u.kind == "tag" and u.tenant}
                done = (u for u in sent if u.kind in ("overflow", "tenant") and u.tenant)
                pinned -= {(u.namespace, u.tenant) for u in done}
                todo = (set(units) - sent) | left
                if not todo and pinned:  # pragma: no cover - plan() sends overflow keys last
                    todo = {Unit("overflow", n, t) for n, t in pinned}
                if failure is None:
                    continue
                _, reason, retry_after = failure
                attempt += 1
                self.metrics.retries.labels("cdn").inc()
                self.metrics.layer_failures.labels(name, reason).inc()
                self.status.failing[name] = reason
                if blocked != (name, reason):
                    if blocked is not None:
                        self.metrics.blocked.labels(*blocked).set(0)
                    blocked = (name, reason)
                    self.metrics.blocked.labels(*blocked).set(1)
                delay = min(
                    self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempt - 1)
                )
                if reason == "rate-limited":
                    learned = float(max(1, len(sent)))
                    if bucket is not None:
                        bucket.drain()  # the vendor's budget is tighter than ours
                    if retry_after is not None:
                        delay = retry_after  # not a fault: wait what it asks, no more
                log.warning(
                    "cdn side: %s %s, %d keys left; retry in %.2f s", name, reason, len(todo), delay
                )
                if not self._wait_cdn(delay):
                    return False
            return True
        finally:
            if blocked is not None:
                self.metrics.blocked.labels(*blocked).set(0)
                self.status.failing.pop(name, None)

    def _send_cdn(
        self, ns: str, name: str, layer: Any, units: list[Unit], direct: bool
    ) -> tuple[set[Unit], str, float | None] | None:
        """Send ``units``; None when all were confirmed, else (units left, reason, retry_after)."""
        timeout = self.settings.cdn_timeout
        if direct:
            # A CdnPurgeLayer queues and answers at once; the ticket of this call settles
            # once these keys went out, with the outcomes of the batches that carried
            # them: another caller's keys, or a delayed second purge that failed, are
            # not counted against ours.
            keys = surrogate_keys(layer.purger.scheme, units)
            ticket = layer.purge_keys(list(keys))
            if not ticket.wait(timeout):
                return set(units), "timeout", None  # sent again: purging twice is harmless
            if ticket.status == "purged":
                self.metrics.invalidations.labels(name).inc(len(units))
                return None
            left = {keys[k] for k in ticket.unpurged if k in keys} or set(units)
            self.metrics.invalidations.labels(name).inc(len(units) - len(left))
            if ticket.status == "rate_limited":
                return left, "rate-limited", ticket.retry_after
            return left, "error", None
        by_tenant: dict[str | None, list[str]] = defaultdict(list)
        for u in units:
            if u.kind == "tag" or u.kind == "table":
                by_tenant[u.tenant].append(u.name)
            elif u.kind == "tenant":  # pragma: no cover - plan() escalates to tenants only
                raise TieredCacheError(f"{name}: a tenant purge needs a CdnPurgeLayer")
        items = [CoreInvalidation(t, tags=tuple(sorted(tags))) for t, tags in by_tenant.items()]
        result = self.targets[ns].invalidate_many(items, layers=[name])
        # A purge the layer only queued counts as ok: settle it, then judge it.
        result = result.wait_purges(timeout)
        if result.ok and not result.pending:
            self.metrics.invalidations.labels(name).inc(len(units))
            return None
        failures = list(getattr(result, "failures", ()))
        reason = failures[0].reason if failures else ("timeout" if result.pending else "error")
        waits = [f.retry_after for f in failures if f.retry_after]
        return set(units), reason, (max(waits) if waits else None)

    def _wait_cdn(self, delay: float) -> bool:
        with self._cdn_cond:
            if self._cdn_stop and self._stop_deadline is None:
                self._stop_deadline = time.monotonic() + self.settings.shutdown_grace
            if self._cdn_stop and time.monotonic() >= (self._stop_deadline or 0):
                return False
            if self._cdn_stop and self._stop_deadline is not None:
                delay = min(delay, max(0.0, self._stop_deadline - time.monotonic()))
            self._cdn_cond.wait(delay)
        return True

    # -- commits, rebalance, lag -----------------------------------------------------------
    def _commit(self) -> None:
        ready = self.progress.committable()
        if not ready or self._consumer is None:
            return
        self._commit_offsets(self._consumer, ready)

    def _commit_offsets(self, consumer: Any, ready: Mapping[TopicPartition, int]) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as KafkaTP

        try:
            consumer.commit(
                offsets=[KafkaTP(t, p, o) for (t, p), o in ready.items()], asynchronous=False
            )
        except KafkaException as exc:
            log.warning("commit of %s failed (retried on the next turn): %s", dict(ready), exc)
            return
        self.progress.committed(ready)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.info("assigned %s", tps)
        self.progress.assign(tps)
        self.status.assigned = True  # even with none: the join completed (a standby)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        ready = self.progress.release(tps)
        log.info("revoked %s; committing %s", tps, ready)
        if ready:
            self._commit_offsets(consumer, ready)
        for topic, partition in tps:
            self.metrics.forget_partition(topic, partition)
        self.status.assigned = bool(self.progress.owned())  # a rebalance: until on_assign

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        log.warning("lost %s; committing nothing", tps)
        self.progress.release(tps)
        for topic, partition in tps:
            self.metrics.forget_partition(topic, partition)
        self.status.assigned = bool(self.progress.owned())

    def _lag_loop(self, client: Any) -> None:
        try:
            while not self._lag_stop.wait(self.settings.lag_interval):
                self._refresh_lag(client)
        finally:
            client.close()

    def _refresh_lag(self, client: Any) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as KafkaTP

        wall = self.clock()
        for (topic, partition), (_, _, committed, oldest) in self.progress.snapshot().items():
            try:
                low, high = client.get_watermark_offsets(
                    KafkaTP(topic, partition), timeout=0.5, cached=False
                )
                if committed is None:
                    (tp,) = client.committed([KafkaTP(topic, partition)], timeout=0.5)
                    committed = tp.offset if tp.offset >= 0 else low
                    self.progress.set_committed((topic, partition), committed)
            except KafkaException as exc:
                log.debug("lag of %s[%d] unknown: %s", topic, partition, exc)
                continue
            if not self.progress.owns((topic, partition)):
                continue  # revoked meanwhile: its gauges were removed
            label = (topic, str(partition))
            self.metrics.lag_messages.labels(*label).set(max(0, high - committed))
            age = 0.0 if oldest is None else max(0.0, wall - oldest / 1000)
            self.metrics.lag_seconds.labels(*label).set(age)


def _by_namespace(invalidations: set[Invalidation]) -> dict[str, set[Invalidation]]:
    by_ns: dict[str, set[Invalidation]] = defaultdict(set)
    for inv in invalidations:
        by_ns[inv.namespace].add(inv)
    return dict(by_ns)
