"""Write-back journals, written once as async code and generated into sync.

Edit this file, then run ``python scripts/unasync.py``; CI checks that
``_sync/journal.py`` is up to date. redis-py errors are translated here, at the
edge, into :class:`~tieredcache.errors.WriteBackError`.

A journal is where a write-back write is acknowledged: an ordered, durable log
shared by writers (``append``) and flushers (``read``, ``ack``,
``dead_letter``). :class:`AsyncRedisStreamJournal` keeps one Redis Stream per
namespace, read by a consumer group of flushers. :mod:`tieredcache.writeback`
says how the pieces fit, and what each Redis persistence setting can lose.

Redis names, all in the hash slot of ``{namespace}`` so that one script can
touch several of them atomically, on Redis Cluster too::

    tc:wb:{shop}          the stream: one entry per acknowledged write
    tc:wb:{shop}:latest   hash: full cache key -> id of its newest unflushed write
    tc:wb:{shop}:dead     the dead-letter stream (reason, attempts, original fields)

The stream is never trimmed with MAXLEN: a trimmed entry would be an
acknowledged write lost. Flushed entries are deleted instead (XACK + XDEL), so
its length is the backlog; ``max_backlog`` refuses new writes past a limit.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol

from ...errors import ConfigurationError, MissingExtraError, WriteBackError
from ...keys import validate_namespace
from ..records import WriteRecord

__all__ = ["AsyncJournal", "AsyncRedisStreamJournal"]


def _redis() -> Any:
    """redis-py, imported when a journal first needs it (``import tieredcache`` loads
    no Redis client); the [redis] extra is optional: using the journal says so."""
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError as exc:
        raise MissingExtraError("redis", "redis") from exc
    return redis


# Append one write and remember it as the newest unflushed write of its key.
# KEYS: stream, latest   ARGV: full key, max backlog (0: none), field, value, ...
APPEND_LUA = """
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('XLEN', KEYS[1]) >= limit then
  return redis.error_reply('WBFULL write-back backlog is full')
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], ARGV[1], id)
return id
"""

# Flushed: acknowledge and delete the entries; forget a key's newest write if it is one of them.
# KEYS: stream, latest   ARGV: group, n, id x n, full key x n
ACK_LUA = """
local n = tonumber(ARGV[2])
local ids = {unpack(ARGV, 3, 2 + n)}
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
for i = 1, n do
  local key = ARGV[2 + n + i]
  if redis.call('HGET', KEYS[2], key) == ids[i] then redis.call('HDEL', KEYS[2], key) end
end
return n
"""

# Move one entry to the dead-letter stream. Returns 1 if it was its key's newest write.
# KEYS: stream, dead, latest   ARGV: group, id, full key, field, value, ...
DEAD_LETTER_LUA = """
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[3])
  return 1
end
return 0
"""

# The newest unflushed write of a key: {id, {field, value, ...}} or nil.
# KEYS: stream, latest   ARGV: full key
PENDING_LUA = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return false end
local entries = redis.call('XRANGE', KEYS[1], id, id)
if #entries == 0 then return false end
return entries[1]
"""

_HINTS = {
    "append": "the write was NOT acknowledged (it may still have been journaled; "
    "retrying it is safe, the later copy wins)",
    "read": "the flusher retries on its next round",
    "ack": "the batch was stored but stays pending; it is stored again (idempotently) later",
}


class AsyncJournal(Protocol):
    """Where a write-back write is acknowledged: an ordered, durable, shared log.

    Implement it to plug in another log (Kafka, a database table). Ids must
    sort in append order within the journal (``"<ms>-<seq>"``, as Redis Stream
    ids do): they are the records' versions. ``read`` hands each entry to one
    flusher at a time and hands it again, to any flusher, if it is not acked
    within the journal's claim timeout (at-least-once delivery).
    """

    async def append(self, record: WriteRecord) -> str:
        """Durably append ``record`` (its ``id`` is ignored); return the new id."""
        ...

    async def read(self, count: int, block: float = 0.0) -> list[WriteRecord]:
        """Up to ``count`` entries for this flusher: stale ones of crashed flushers
        first, then new ones, waiting up to ``block`` seconds if there are none."""
        ...

    async def touch(self, records: Sequence[WriteRecord]) -> None:
        """Keep ``records`` owned by this flusher (it is still retrying them)."""
        ...

    async def ack(self, records: Sequence[WriteRecord]) -> None:
        """``records`` reached the store: remove them from the journal."""
        ...

    async def dead_letter(self, record: WriteRecord, reason: str) -> bool:
        """Move ``record`` to the dead letters; True if it was its key's newest write."""
        ...

    async def pending(self, key: str) -> WriteRecord | None:
        """The newest write to the full cache ``key`` not flushed yet, if any."""
        ...

    async def close(self) -> None: ...


@contextmanager
def _translate(journal: AsyncRedisStreamJournal, operation: str) -> Iterator[None]:
    hint = _HINTS.get(operation, "")
    hint = f"; {hint}" if hint else ""
    try:
        yield
    except _redis().exceptions.ResponseError as exc:
        if "NOGROUP" in str(exc):  # the stream was lost (Redis without persistence restarted)
            journal.group_ready = False
        raise WriteBackError(
            f"write-back journal {journal.stream!r}: {operation} failed: {exc}{hint}"
        ) from exc
    except (_redis().exceptions.RedisError, OSError) as exc:
        raise WriteBackError(
            f"write-back journal {journal.stream!r}: {operation} failed: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(record: WriteRecord) -> list[str | bytes]:
    return [
        "t", record.tenant, "k", record.key, "r", record.reader,
        "s", record.serializer, "v", record.payload,
    ]  # fmt: skip


def _record(entry_id: Any, fields: Mapping[Any, Any], deliveries: int = 1) -> WriteRecord:
    def text(name: bytes) -> str:
        return _text(fields.get(name, b""))

    payload = fields.get(b"v", b"")
    return WriteRecord(
        id=_text(entry_id),
        tenant=text(b"t"),
        key=text(b"k"),
        reader=text(b"r"),
        serializer=text(b"s"),
        payload=payload if isinstance(payload, bytes) else str(payload).encode(),
        deliveries=deliveries,
    )


class AsyncRedisStreamJournal:
    """A write-back journal on a Redis Stream (standalone, or Cluster via ``client=``).

    >>> journal = AsyncRedisStreamJournal("shop", url="redis://127.0.0.1:6379/0")

    Flushers form the consumer group ``group``; each journal object is one
    consumer (``consumer`` defaults to host, pid and a random suffix). An entry
    a flusher took but did not ack for ``claim_idle`` seconds (its flusher
    crashed) is claimed by the next flusher that reads (XAUTOCLAIM); keep
    ``claim_idle`` above your slowest store call, since a flusher that is
    retrying renews its claim between attempts. Give each flusher its own
    journal object. Consumers idle for ``prune_idle`` seconds that hold no
    entries (flushers long gone) are removed from the group.

    Durability is Redis's: see "Loss window" in :mod:`tieredcache.writeback`.
    ``min_replicas`` makes ``append`` wait (WAIT, up to ``replica_timeout``)
    until that many replicas have the entry and fail otherwise.
    ``max_backlog`` refuses appends while that many writes are unflushed, so a
    stopped flusher shows up as failing writes rather than as unbounded memory.
    No connection is opened by the constructor.
    """

    def __init__(
        self,
        namespace: str,
        *,
        url: str | None = None,
        client: Any = None,
        key_prefix: str = "tc",
        group: str = "flushers",
        consumer: str | None = None,
        claim_idle: float = 30.0,
        max_backlog: int | None = None,
        prune_idle: float = 3600.0,
        min_replicas: int = 0,
        replica_timeout: float = 0.5,
        socket_timeout: float = 5.0,
        connect_timeout: float = 1.0,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisStreamJournal needs exactly one of url=, client=")
        if min(claim_idle, prune_idle, socket_timeout, connect_timeout) <= 0:
            raise ConfigurationError(
                "RedisStreamJournal claim_idle, prune_idle, socket_timeout and connect_timeout "
                "must be positive"
            )
        if max_backlog is not None and max_backlog <= 0:
            raise ConfigurationError(f"max_backlog must be positive, got {max_backlog}")
        self.namespace = validate_namespace(namespace)
        base = f"{key_prefix}:wb:{{{self.namespace}}}"
        self.stream = base
        self.latest_key = f"{base}:latest"
        self.dead_stream = f"{base}:dead"
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.claim_idle = claim_idle
        self.max_backlog = max_backlog
        self.prune_idle = prune_idle
        self._pruned_at = 0.0
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self.socket_timeout = socket_timeout
        self.group_ready = False
        self._cursor: Any = "0-0"
        self._owns_client = client is None
        if client is None:
            redis = _redis()
            from redis.asyncio import retry as redis_retry
            from redis.backoff import NoBackoff

            client = redis.asyncio.Redis.from_url(
                str(url),
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                # No silent resend: a resent append could be journaled twice.
                retry=redis_retry.Retry(NoBackoff(), 0),
            )
        self.client = client
        self._append = client.register_script(APPEND_LUA)
        self._ack = client.register_script(ACK_LUA)
        self._dead_letter = client.register_script(DEAD_LETTER_LUA)
        self._pending = client.register_script(PENDING_LUA)

    async def append(self, record: WriteRecord) -> str:
        args = [record.key, self.max_backlog or 0, *_fields(record)]
        with _translate(self, "append"):
            try:
                entry_id = await self._append(keys=[self.stream, self.latest_key], args=args)
            except _redis().exceptions.ResponseError as exc:
                if "WBFULL" not in str(exc):
                    raise
                raise WriteBackError(
                    f"write-back journal {self.stream!r} is full ({self.max_backlog} unflushed "
                    "writes): the write was NOT acknowledged; is a flusher running?"
                ) from exc
            replicas = self.min_replicas
            if replicas:
                timeout_ms = max(1, int(self.replica_timeout * 1000))
                replicas = await self.client.wait(self.min_replicas, timeout_ms)
        if replicas < self.min_replicas:
            raise WriteBackError(
                f"write-back journal {self.stream!r}: only {replicas} of {self.min_replicas} "
                f"replicas confirmed entry {_text(entry_id)} within {self.replica_timeout}s; "
                "the write was NOT acknowledged (a failover could lose it)"
            )
        return _text(entry_id)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (reading does it too)."""
        with _translate(self, "create group"):
            try:
                await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except _redis().exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.group_ready = True

    async def read(self, count: int, block: float = 0.0) -> list[WriteRecord]:
        if block >= self.socket_timeout:
            raise ConfigurationError(
                f"read block={block}s must be shorter than socket_timeout={self.socket_timeout}s"
            )
        if not self.group_ready:
            await self.ensure_group()
        records = await self._claim(count)
        if len(records) >= count:
            return records
        # Block only when there is nothing to hand back yet; 0 would mean forever.
        block_ms = None if records or block <= 0 else max(1, int(block * 1000))
        streams = {self.stream: ">"}
        with _translate(self, "read"):
            reply = await self.client.xreadgroup(
                self.group, self.consumer, streams, count=count - len(records), block=block_ms
            )
        for _stream, entries in reply or []:
            records.extend(_record(entry_id, fields) for entry_id, fields in entries)
        await self._prune()
        return records

    async def _prune(self) -> None:
        """Forget consumers idle for ``prune_idle`` that hold nothing (flushers long gone)."""
        now = time.monotonic()
        if now - self._pruned_at < self.prune_idle / 4:
            return
        self._pruned_at = now
        with _translate(self, "prune consumers"):
            consumers = await self.client.xinfo_consumers(self.stream, self.group)
            for consumer in consumers:
                name = _text(consumer["name"])
                gone = consumer["idle"] > self.prune_idle * 1000 and not consumer["pending"]
                if gone and name != self.consumer:
                    await self.client.xgroup_delconsumer(self.stream, self.group, name)

    async def _claim(self, count: int) -> list[WriteRecord]:
        """Take over entries idle longer than ``claim_idle`` (their flusher died)."""
        min_idle = int(self.claim_idle * 1000)
        with _translate(self, "claim"):
            reply = await self.client.xautoclaim(
                self.stream, self.group, self.consumer, min_idle, self._cursor, count=count
            )
            self._cursor = reply[0]
            entries = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
            if not entries:
                return []
            first, last = entries[0][0], entries[-1][0]
            details = await self.client.xpending_range(
                self.stream, self.group, first, last, 2 * len(entries) + 16, self.consumer
            )
        deliveries = {_text(d["message_id"]): int(d["times_delivered"]) for d in details}
        return [
            _record(entry_id, fields, deliveries.get(_text(entry_id), 2))
            for entry_id, fields in entries
        ]

    async def touch(self, records: Sequence[WriteRecord]) -> None:
        if records:
            ids = [record.id for record in records]
            claim = (self.stream, self.group, self.consumer, 0, ids)
            with _translate(self, "touch"):
                await self.client.xclaim(*claim, justid=True)

    async def ack(self, records: Sequence[WriteRecord]) -> None:
        if records:
            ids = [record.id for record in records]
            args = [self.group, len(ids), *ids, *(record.key for record in records)]
            with _translate(self, "ack"):
                await self._ack(keys=[self.stream, self.latest_key], args=args)

    async def dead_letter(self, record: WriteRecord, reason: str) -> bool:
        args: list[Any] = [self.group, record.id, record.key, "id", record.id]
        args += ["reason", reason, "attempts", record.attempts, "deliveries", record.deliveries]
        args += _fields(record)
        keys = [self.stream, self.dead_stream, self.latest_key]
        with _translate(self, "dead-letter"):
            newest = await self._dead_letter(keys=keys, args=args)
        return bool(newest)

    async def pending(self, key: str) -> WriteRecord | None:
        with _translate(self, "pending"):
            found = await self._pending(keys=[self.stream, self.latest_key], args=[key])
        if not found:
            return None
        entry_id, flat = found
        return _record(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    async def backlog(self) -> int:
        """How many acknowledged writes are not flushed yet (including in-flight ones)."""
        with _translate(self, "backlog"):
            return int(await self.client.xlen(self.stream))

    async def dead_letters(self, count: int = 100) -> list[WriteRecord]:
        """The oldest ``count`` dead letters; ``error`` holds the reason, ``id`` the original id."""
        with _translate(self, "dead letters"):
            entries = await self.client.xrange(self.dead_stream, count=count)
        letters = []
        for _dead_id, fields in entries:
            record = _record(fields.get(b"id", b""), fields, int(fields.get(b"deliveries", 1)))
            reason = _text(fields.get(b"reason", b""))
            letters.append(replace(record, error=reason, attempts=int(fields.get(b"attempts", 0))))
        return letters

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()
