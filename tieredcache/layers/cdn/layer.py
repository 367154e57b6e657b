"""``CdnPurgeLayer``: the invalidate-only layer in front of a CDN purger.

``delete_tags`` and ``delete`` map tags and cache keys to surrogate keys with the
same encoding the response headers use (:mod:`.surrogate`), and queue them. The
queue is drained off the caller's path: a daemon thread for the sync methods, an
asyncio task (on the caller's loop) for the async ones. Keys queued while a purge
is in flight are merged and go out together in the next batch, so a burst of
invalidations costs a few purge requests, not one each.

Every batch ends in a :class:`PurgeOutcome` (purged / failed / rate_limited with
``retry_after``): ``flush()`` / ``aflush()`` wait for the queue to drain and
return the outcomes since the last flush; ``on_outcome`` sees each one as it
happens. A rate-limited or failed batch is not re-queued by the layer (a CDN
purge storm is the worst time to add retries): its outcome carries the keys not
purged, to hand back to :meth:`CdnPurgeLayer.purge_keys` when the caller decides.

Example::

    layer = CdnPurgeLayer(FastlyPurger("SERVICE", api_key="..."), name="fastly")
    layer.delete_tags([Tag("shop", "acme", "product:1")])
    for outcome in layer.flush():
        print(outcome.status, outcome.keys)
    layer.close()
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ...errors import BackendError
from ...keys import CacheKey, Tag
from .base import Purger
from .errors import PurgeRateLimitedError
from .model import PurgeResult
from .surrogate import cache_key_key, purge_keys

__all__ = ["CdnPurgeLayer", "PurgeOutcome"]

log = logging.getLogger("tieredcache.cdn")


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    """How one batch ended. ``keys`` are the batch's keys, or for ``rate_limited``
    the keys still to purge (send them again after ``retry_after`` seconds)."""

    status: Literal["purged", "failed", "rate_limited"]
    keys: tuple[str, ...]
    result: PurgeResult | None = None
    retry_after: float | None = None
    error: BackendError | None = None


class CdnPurgeLayer:
    """An invalidation layer that purges a CDN through ``purger``, batching purges.

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
    ) -> None:
        self.name = name
        self.purger = purger
        self.soft = soft
        self._max_batch = max_batch
        self._on_outcome = on_outcome
        self._cond = threading.Condition()
        self._pending: dict[str, None] = {}  # an ordered set: queued keys merge
        self._inflight = 0
        self._outcomes: deque[PurgeOutcome] = deque(maxlen=keep_outcomes)
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"CdnPurgeLayer(name={self.name!r}, purger={self.purger!r})"

    # ---------------------------------------------------------------- contract

    def delete(self, keys: Sequence[CacheKey]) -> None:
        """Queue a purge of each cache key's own surrogate key."""
        self.purge_keys([cache_key_key(self.purger.scheme, k) for k in keys])

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        """Queue a purge of ``tags`` (and their tenants' overflow keys)."""
        self.purge_keys(purge_keys(self.purger.scheme, tags))

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        """Async :meth:`delete`: queued for this loop's drain task."""
        await self.apurge_keys([cache_key_key(self.purger.scheme, k) for k in keys])

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        """Async :meth:`delete_tags`."""
        await self.apurge_keys(purge_keys(self.purger.scheme, tags))

    def purge_keys(self, keys: Sequence[str]) -> None:
        """Queue raw surrogate keys (e.g. an outcome's keys, after ``retry_after``)."""
        if self._enqueue(keys) and self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._worker, name=f"tieredcache-cdn-{self.name}", daemon=True
                    )
                    self._thread.start()

    async def apurge_keys(self, keys: Sequence[str]) -> None:
        """Async :meth:`purge_keys`."""
        if self._enqueue(keys):
            self._start_task()

    def flush(self, timeout: float | None = None) -> list[PurgeOutcome]:
        """Wait until every queued key was sent; return the outcomes since the last flush.

        Not from inside an event loop that has async purges queued: use :meth:`aflush`.
        """
        with self._cond:
            idle_worker = bool(self._pending) and self._thread is None
        if idle_worker:
            self.purge_keys(())  # starts the worker for keys queued by async callers
        with self._cond:
            self._cond.wait_for(lambda: not self._pending and not self._inflight, timeout)
            return self._take_outcomes()

    async def aflush(self) -> list[PurgeOutcome]:
        """Async :meth:`flush`: waits for this loop's drain task."""
        while True:
            with self._cond:
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
        """Send what is queued, stop the worker and close the purger."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.purger.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        await self.aflush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        await self.purger.aclose()

    # ---------------------------------------------------------------- machinery

    def _enqueue(self, keys: Sequence[str]) -> bool:
        with self._cond:
            if self._closed:
                raise BackendError(self.name, "delete", "the layer is closed")
            for key in keys:
                self._pending[key] = None
            self._cond.notify()
            return bool(self._pending)

    def _take(self) -> tuple[str, ...]:
        # Caller holds the lock.
        batch = tuple(list(self._pending)[: self._max_batch])
        for key in batch:
            del self._pending[key]
        self._inflight += 1
        return batch

    def _take_outcomes(self) -> list[PurgeOutcome]:
        out = list(self._outcomes)
        self._outcomes.clear()
        return out

    def _start_task(self) -> None:
        with self._cond:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    return
                batch = self._take()
            try:
                result = await self.purger.apurge(batch, soft=self.soft)
            except Exception as exc:
                self._record(_failed(self.name, batch, exc))
            else:
                self._record(PurgeOutcome("purged", batch, result=result))

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    self._thread = None
                    return
                batch = self._take()
            try:
                result = self.purger.purge(batch, soft=self.soft)
            except Exception as exc:
                self._record(_failed(self.name, batch, exc))
            else:
                self._record(PurgeOutcome("purged", batch, result=result))

    def _record(self, outcome: PurgeOutcome) -> None:
        with self._cond:
            self._inflight -= 1
            self._outcomes.append(outcome)
            self._cond.notify_all()
        if outcome.status != "purged":
            log.warning("%s: purge %s: %s", self.name, outcome.status, outcome.error)
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:  # a broken callback must not stop the drain
                log.exception("%s: on_outcome callback failed", self.name)


def _failed(layer: str, batch: tuple[str, ...], exc: Exception) -> PurgeOutcome:
    if isinstance(exc, PurgeRateLimitedError):
        return PurgeOutcome("rate_limited", exc.keys, retry_after=exc.retry_after, error=exc)
    if not isinstance(exc, BackendError):
        error = BackendError(layer, "purge", f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        exc = error
    return PurgeOutcome("failed", batch, error=exc)
