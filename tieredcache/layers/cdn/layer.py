"""``CdnPurgeLayer``: the invalidate-only layer in front of a CDN purger.

``delete_tags`` and ``delete`` map tags and cache keys to surrogate keys with the
same encoding the response headers use (:mod:`.surrogate`), and queue them. The
queue is drained off the caller's path: a daemon thread for the sync methods, an
asyncio task (on the caller's loop) for the async ones. Keys queued while a purge
is in flight are merged and go out together in the next batch, so a burst of
invalidations costs a few purge requests, not one each.

Each call returns a :class:`~.ticket.PurgeTicket` that settles once all its keys
were sent; the engine hands it to the caller through
``InvalidationResult.wait_purges()``. Every batch also ends in a
:class:`~.ticket.PurgeOutcome` (purged / failed / rate_limited with
``retry_after``): ``flush()`` / ``aflush()`` wait for the queue to drain and
return the outcomes since the last flush; ``on_outcome`` sees each one as it
happens. A rate-limited or failed batch is not re-queued by the layer (a CDN
purge storm is the worst time to add retries): its outcome carries the keys not
purged, to hand back to :meth:`CdnPurgeLayer.purge_keys` when the caller decides.

``second_purge_after=s`` purges every purged key once more ``s`` seconds later:
the replica broadcast is never acknowledged, so a replica that had not yet
dropped its copy may have served it to the CDN after the first purge. A second
purge is merged with whatever is queued then, and never schedules a third.

Example::

    layer = CdnPurgeLayer(FastlyPurger("SERVICE", api_key="..."), name="fastly")
    layer.delete_tags([Tag("shop", "acme", "product:1")])
    for outcome in layer.flush():
        print(outcome.status, outcome.keys)
    layer.close()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ...errors import BackendError, ConfigurationError
from ...keys import CacheKey, Tag
from .base import Purger
from .errors import PurgeRateLimitedError
from .surrogate import cache_key_key, purge_keys
from .ticket import PurgeOutcome, PurgeTicket

__all__ = ["CdnPurgeLayer", "PurgeOutcome", "PurgeTicket"]

log = logging.getLogger("tieredcache.cdn")


@dataclass(slots=True)
class _Queued:
    """One queued key: asked for by callers (``first``) or only a due second purge."""

    first: bool = False
    tickets: list[PurgeTicket] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Batch:
    keys: tuple[str, ...]
    second: tuple[str, ...]  # keys no caller asked for again: only their second purge
    tickets: dict[PurgeTicket, int]  # ticket -> how many of its keys this batch carries


class CdnPurgeLayer:
    """An invalidation layer that purges a CDN through ``purger``, batching purges.

    ``second_purge_after``: seconds after which every purged key is purged again
    (None: never). ``clock`` times the second purges (injectable for tests; a
    ``flush`` re-reads it).

    >>> from tieredcache.layers.cdn import VarnishPurger
    >>> CdnPurgeLayer(VarnishPurger(["http://127.0.0.1:6081"]), name="edge").name
    'edge'
    """

    def __init__(
        self,
        purger: Purger,
        *,
        name: str = "cdn",
        soft: bool = False,
        max_batch: int = 1000,
        keep_outcomes: int = 1000,
        on_outcome: Callable[[PurgeOutcome], None] | None = None,
        second_purge_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if second_purge_after is not None and second_purge_after <= 0:
            raise ConfigurationError("CdnPurgeLayer.second_purge_after must be > 0 seconds")
        self.name = name
        self.purger = purger
        self.soft = soft
        self.second_purge_after = second_purge_after
        self._clock = clock
        self._max_batch = max_batch
        self._on_outcome = on_outcome
        self._cond = threading.Condition()
        self._pending: dict[str, _Queued] = {}  # ordered: queued keys merge
        self._later: deque[tuple[float, tuple[str, ...]]] = deque()  # (due, keys), due order
        self._inflight = 0
        self._outcomes: deque[PurgeOutcome] = deque(maxlen=keep_outcomes)
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"CdnPurgeLayer(name={self.name!r}, purger={self.purger!r})"

    # ---------------------------------------------------------------- contract

    def delete(self, keys: Sequence[CacheKey]) -> PurgeTicket:
        """Queue a purge of each cache key's own surrogate key."""
        return self.purge_keys([cache_key_key(self.purger.scheme, k) for k in keys])

    def delete_tags(self, tags: Sequence[Tag]) -> PurgeTicket:
        """Queue a purge of ``tags`` (and their tenants' overflow keys)."""
        return self.purge_keys(purge_keys(self.purger.scheme, tags))

    async def adelete(self, keys: Sequence[CacheKey]) -> PurgeTicket:
        """Async :meth:`delete`: queued for this loop's drain task."""
        return await self.apurge_keys([cache_key_key(self.purger.scheme, k) for k in keys])

    async def adelete_tags(self, tags: Sequence[Tag]) -> PurgeTicket:
        """Async :meth:`delete_tags`."""
        return await self.apurge_keys(purge_keys(self.purger.scheme, tags))

    def purge_keys(self, keys: Sequence[str]) -> PurgeTicket:
        """Queue raw surrogate keys (e.g. an outcome's keys, after ``retry_after``);
        the ticket settles once they were all sent."""
        ticket = self._enqueue(keys)
        if ticket.keys:
            self._ensure_thread()
        return ticket

    async def apurge_keys(self, keys: Sequence[str]) -> PurgeTicket:
        """Async :meth:`purge_keys`."""
        ticket = self._enqueue(keys)
        if ticket.keys:
            self._start_task()
        return ticket

    def flush(self, timeout: float | None = None) -> list[PurgeOutcome]:
        """Wait until every queued key was sent; return the outcomes since the last flush.

        Second purges due by now are queued first and waited for; later ones stay
        scheduled. Not from inside an event loop that has async purges queued: use
        :meth:`aflush`.
        """
        with self._cond:
            self._promote_due()
            start = bool(self._pending) and self._thread is None
            self._cond.notify_all()  # a worker waiting for a second purge re-reads the clock
        if start:
            self._ensure_thread()  # sends keys queued by async callers, too
        with self._cond:
            self._cond.wait_for(lambda: not self._pending and not self._inflight, timeout)
            return self._take_outcomes()

    async def aflush(self) -> list[PurgeOutcome]:
        """Async :meth:`flush`: waits for this loop's drain task."""
        while True:
            with self._cond:
                self._promote_due()
                if not self._pending and not self._inflight:
                    return self._take_outcomes()
                task = self._task
            if task is not None and not task.done():
                await task
            elif self._pending:
                self._start_task()
            else:
                await asyncio.sleep(0.005)  # a sync worker holds the batch in flight

    def close(self) -> None:
        """Send what is queued, and the second purges still scheduled (at once:
        earlier than asked, which beats never), stop the worker, close the purger."""
        self._begin_close()
        self.flush()
        thread = self._end_close()
        if thread is not None:
            thread.join()
        self.purger.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self._begin_close()
        await self.aflush()
        thread = self._end_close()
        if thread is not None:
            await asyncio.to_thread(thread.join)
        await self.purger.aclose()

    # ---------------------------------------------------------------- machinery

    def _enqueue(self, keys: Sequence[str]) -> PurgeTicket:
        ticket = PurgeTicket(self.name, tuple(dict.fromkeys(keys)))
        with self._cond:
            if self._closed:
                raise BackendError(self.name, "delete", "the layer is closed")
            for key in ticket.keys:
                queued = self._pending.get(key)
                if queued is None:
                    queued = self._pending[key] = _Queued()
                queued.first = True
                queued.tickets.append(ticket)
            self._cond.notify_all()  # the worker, whoever else waits on the lock
        return ticket

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._worker, name=f"tieredcache-cdn-{self.name}", daemon=True
                )
                self._thread.start()

    def _promote_due(self, everything: bool = False) -> None:
        # Caller holds the lock. A key already queued (asked for again) covers its
        # second purge: the merged send is a first purge with a second of its own.
        now = self._clock()
        while self._later and (everything or self._later[0][0] <= now):
            _, keys = self._later.popleft()
            for key in keys:
                self._pending.setdefault(key, _Queued())

    def _until_due(self) -> float | None:
        # Caller holds the lock.
        return max(0.0, self._later[0][0] - self._clock()) if self._later else None

    def _take(self) -> _Batch:
        # Caller holds the lock.
        keys = tuple(itertools.islice(self._pending, self._max_batch))
        second: list[str] = []
        tickets: dict[PurgeTicket, int] = {}
        for key in keys:
            queued = self._pending.pop(key)
            if not queued.first:
                second.append(key)
            for ticket in queued.tickets:
                tickets[ticket] = tickets.get(ticket, 0) + 1
        self._inflight += 1
        return _Batch(keys, tuple(second), tickets)

    def _take_outcomes(self) -> list[PurgeOutcome]:
        out = list(self._outcomes)
        self._outcomes.clear()
        return out

    def _begin_close(self) -> None:
        with self._cond:
            self._closing = True
            self._promote_due(everything=True)
            self._cond.notify_all()

    def _end_close(self) -> threading.Thread | None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return self._thread

    def _start_task(self) -> None:
        with self._cond:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._drain())

    def _arm_timer(self) -> None:
        # Caller holds the lock, on the drain task's loop. One timer per loop at a
        # time: it restarts the drain, which re-arms it for the next due purge.
        delay = self._until_due()
        loop = asyncio.get_running_loop()
        if delay is None or (self._timer is not None and self._timer[0] is loop):
            return
        self._timer = (loop, loop.call_later(delay, self._on_timer))

    def _on_timer(self) -> None:
        with self._cond:
            self._timer = None
        self._start_task()

    async def _drain(self) -> None:
        while True:
            with self._cond:
                self._promote_due()
                if not self._pending:
                    self._arm_timer()
                    return
                batch = self._take()
            try:
                result = await self.purger.apurge(batch.keys, soft=self.soft)
            except Exception as exc:
                self._record(batch, _failed(self.name, batch.keys, exc))
            else:
                self._record(batch, PurgeOutcome("purged", batch.keys, result=result))

    def _worker(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._promote_due()
                    if self._pending:
                        break
                    if self._closed:
                        self._thread = None
                        return
                    self._cond.wait(self._until_due())
                batch = self._take()
            try:
                result = self.purger.purge(batch.keys, soft=self.soft)
            except Exception as exc:
                self._record(batch, _failed(self.name, batch.keys, exc))
            else:
                self._record(batch, PurgeOutcome("purged", batch.keys, result=result))

    def _record(self, batch: _Batch, outcome: PurgeOutcome) -> None:
        if batch.second:
            outcome = replace(outcome, second_keys=batch.second)
        with self._cond:
            self._inflight -= 1
            self._outcomes.append(outcome)
            self._schedule_second(batch, outcome)
            # Tickets settle before a flush can return: flush() then wait_purges()
            # never sees a purge the flush already reported as pending.
            for ticket, count in batch.tickets.items():
                ticket._settle(outcome, count)
            self._cond.notify_all()
        if outcome.status != "purged":
            log.warning("%s: purge %s: %s", self.name, outcome.status, outcome.error)
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:  # a broken callback must not stop the drain
                log.exception("%s: on_outcome callback failed", self.name)

    def _schedule_second(self, batch: _Batch, outcome: PurgeOutcome) -> None:
        # Caller holds the lock. Only keys purged now, and not second purges themselves.
        if self.second_purge_after is None or outcome.status == "failed":
            return
        unsent = set(outcome.keys) if outcome.status == "rate_limited" else set()
        again = set(batch.second)
        keys = tuple(k for k in batch.keys if k not in unsent and k not in again)
        if not keys:
            return
        if self._closing:  # nothing waits for a closed layer's timers: send them now
            for key in keys:
                self._pending.setdefault(key, _Queued())
        else:
            self._later.append((self._clock() + self.second_purge_after, keys))


def _failed(layer: str, batch: tuple[str, ...], exc: Exception) -> PurgeOutcome:
    if isinstance(exc, PurgeRateLimitedError):
        return PurgeOutcome("rate_limited", exc.keys, retry_after=exc.retry_after, error=exc)
    if not isinstance(exc, BackendError):
        error = BackendError(layer, "purge", f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        exc = error
    return PurgeOutcome("failed", batch, error=exc)
