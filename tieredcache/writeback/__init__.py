"""Write-back: a write is acknowledged once journaled, the cache shows it at once,
and a flusher drains the journal to your store in batches.

    wb = WriteBack(cache, journal=RedisStreamJournal("shop", url=REDIS_URL), store=save_rows)

    @cache.cached(ttl=60)
    @wb.pending_first                      # a miss sees writes not flushed yet
    def get_product(product_id: int) -> dict[str, Any]: ...

    save = wb.writer(get_product)          # save(value, *get_product_args) -> journal id
    with tenant_scope("acme"):
        save({"id": 1, "price": 3}, 1)     # acknowledged: journaled, then cached
    with wb.flusher(batch_size=100).start():   # a thread; stop() (or the with) drains
        ...

How a write travels
-------------------
1. ``save(value, *args)`` encodes ``value`` with the cache's codec (signed when
   the cache has signing secrets) and appends it to the journal. When that
   returns, the write is acknowledged; if it raises :class:`WriteBackError`
   the write was not (and the key is dropped from the cache, since a timed-out
   append may still have landed).
2. The cache is set at once, through the reader's ``put``: every layer, under
   the key and the reader's argument alias, with the reader's whole policy
   (``ttl``, ``stale_ttl``, ``negative_ttl``); replicas drop their copies and
   fills in flight lose. Two writers racing on one key can reach the cache in
   the opposite order from the journal; so the writer then checks that its
   write is still the key's newest unflushed one, and drops the key from the
   cache if not.
3. A flusher reads a batch (first the entries of flushers that crashed, idle
   for the journal's ``claim_idle``), coalesces writes to the same key (the
   last one wins; the survivors keep journal order) and calls
   ``store(records)``. On success it acks: the entries leave the journal. On
   failure it retries with exponential backoff and jitter, up to
   ``max_attempts`` calls; then it stores each record alone, once, so that one
   bad record does not sink the batch. A record that still fails goes to the
   dead-letter stream with the reason (and its key leaves the cache unless a
   newer write is pending); the flusher carries on.
4. ``stop(drain=True)`` (or leaving the ``with``) flushes what is left.

Delivery is at least once: a flusher killed after the store committed but
before the ack leaves its batch to be claimed and stored again. ``store`` must
be idempotent; ``WriteRecord.version`` (journal order) makes that one guard::

    INSERT INTO product (tenant, id, doc, version) VALUES (%s, %s, %s, %s)
    ON CONFLICT (tenant, id) DO UPDATE SET doc = EXCLUDED.doc, version = EXCLUDED.version
    WHERE product.version < EXCLUDED.version

and every acknowledged write then takes effect exactly once (a redelivered or
superseded write changes nothing).

Reading your writes: ``@wb.pending_first`` under ``@cache.cached`` makes a
miss (eviction, TTL) return the key's newest unflushed write instead of the
older row the store still has; ``writer()`` insists on it unless you pass
``read_your_writes=False``.

Loss window
-----------
A write is acknowledged when ``save()`` returns: the journal has it. From then
on it is lost only if the journal loses it before a flusher has stored it; the
flusher deletes an entry only after ``store()`` returned, so ``store()`` must
have committed by then. For the Redis Stream journal it depends on Redis
persistence:

* No persistence (``save ""``, ``appendonly no``): a restart or crash of Redis
  loses every acknowledged write not yet flushed: the flusher's lag, usually
  one batch (milliseconds), but everything written while the store was down or
  no flusher ran. With RDB snapshots only (``save 60 1000``): the unflushed
  writes made since the last completed snapshot.
* ``appendonly yes`` + ``appendfsync everysec``: Redis normally writes the AOF
  to the kernel before it replies, so a crash of the Redis process alone loses
  nothing, and an OS crash or power loss loses up to about 1 s of
  acknowledged writes. While the disk is slow, Redis postpones that write for
  up to 2 s; a crash of Redis then loses up to about 2 s too.
* ``appendonly yes`` + ``appendfsync always``: Redis writes and fsyncs the AOF
  before it sends the replies, so an acknowledged write survives a crash of
  Redis or of the machine (on a disk that honours fsync). No loss window, at
  the price of an fsync per append (concurrent appends share one).
* Replication is asynchronous whatever the fsync setting: on a failover, the
  writes the promoted replica had not received are lost (usually well under a
  second of writes; more during a network partition). ``min_replicas=N`` makes
  each append wait (``WAIT``) for N replicas and raise instead of
  acknowledging without them; that narrows the window, but ``WAIT`` does not
  make Redis strongly consistent.

``tests/test_writeback.py::test_sigkilled_writer_loses_no_acknowledged_write``
shows the ``always`` case: the writing process (with its flusher, mid-batch)
and then Redis are SIGKILLed; after a restart every acknowledged write is in
PostgreSQL exactly once in effect. If the journal does lose a write, the cache
may show a value the store never gets, until it expires or is invalidated.
"""

from __future__ import annotations

from ._async.journal import AsyncJournal, AsyncRedisStreamJournal
from ._sync.journal import Journal, RedisStreamJournal
from .aio import AsyncFlusher, AsyncWriteBack
from .records import FlushReport, WriteRecord
from .sync import Flusher, WriteBack

__all__ = [
    "AsyncFlusher",
    "AsyncJournal",
    "AsyncRedisStreamJournal",
    "AsyncWriteBack",
    "FlushReport",
    "Flusher",
    "Journal",
    "RedisStreamJournal",
    "WriteBack",
    "WriteRecord",
]
