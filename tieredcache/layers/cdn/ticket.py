"""How a queued purge ends: :class:`PurgeOutcome` per batch, :class:`PurgeTicket` per call.

:class:`~.layer.CdnPurgeLayer` sends purges in batches that merge many callers'
keys. A batch ends in one :class:`PurgeOutcome`; the call that queued keys holds
a :class:`PurgeTicket` that settles once every one of its keys went out, with the
outcomes of the batches that carried them. The ticket is what the engine puts in
an :class:`~tieredcache.InvalidationResult` as a pending purge
(:class:`~tieredcache.layers.base.PendingPurge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ...errors import BackendError
from .model import PurgeResult

__all__ = ["PurgeOutcome", "PurgeTicket"]


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    """How one batch ended. ``keys`` are the batch's keys, or for ``rate_limited``
    the keys still to purge (send them again after ``retry_after`` seconds).
    ``second_keys``: the batch's keys sent as a delayed second purge (see
    ``CdnPurgeLayer(second_purge_after=...)``), not because a caller asked again."""

    status: Literal["purged", "failed", "rate_limited"]
    keys: tuple[str, ...]
    result: PurgeResult | None = None
    retry_after: float | None = None
    error: BackendError | None = None
    second_keys: tuple[str, ...] = ()

    @property
    def second(self) -> bool:
        """Only second purges were in this batch."""
        return bool(self.second_keys) and len(self.second_keys) == len(self.keys)


class PurgeTicket:
    """The purge of the keys one call queued; settles when all of them were sent.

    ``status`` is ``pending``, then ``purged``, ``rate_limited`` or ``failed``
    (rate-limited wins when both happened: a retry has to wait for it anyway);
    ``error`` is the failure's error, ``unpurged`` the keys to send again (to
    :meth:`~.layer.CdnPurgeLayer.purge_keys`). A delayed second purge of the keys
    is not part of the ticket: it ends when the first purge did.

    >>> ticket = PurgeTicket("cdn", ())   # nothing queued: settled at once
    >>> ticket.done(), ticket.status
    (True, 'purged')
    """

    __slots__ = ("_done", "_lock", "_outcomes", "_remaining", "_waiters", "keys", "layer")

    def __init__(self, layer: str, keys: tuple[str, ...]) -> None:
        self.layer = layer
        self.keys = keys
        self._lock = threading.Lock()
        self._remaining = len(keys)
        self._outcomes: list[PurgeOutcome] = []
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        if not keys:
            self._done.set()

    def __repr__(self) -> str:
        return f"PurgeTicket(layer={self.layer!r}, keys={len(self.keys)}, status={self.status!r})"

    # ---------------------------------------------------------------- reading

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def outcomes(self) -> tuple[PurgeOutcome, ...]:
        """The outcomes of the batches that carried this ticket's keys so far."""
        with self._lock:
            return tuple(self._outcomes)

    @property
    def status(self) -> Literal["pending", "purged", "failed", "rate_limited"]:
        if not self.done():
            return "pending"
        outcome = self._worst()
        return "purged" if outcome is None else outcome.status

    @property
    def error(self) -> BackendError | None:
        """None while pending or once purged; else the failure (a
        :class:`~.errors.PurgeRateLimitedError` carries ``retry_after``)."""
        if not self.done():
            return None
        outcome = self._worst()
        return None if outcome is None else outcome.error

    @property
    def retry_after(self) -> float | None:
        """How long a rate-limited purge asked to wait before it is sent again."""
        outcome = self._worst() if self.done() else None
        return None if outcome is None else outcome.retry_after

    @property
    def unpurged(self) -> tuple[str, ...]:
        """This ticket's keys that a failed or rate-limited batch did not purge."""
        mine = set(self.keys)
        left: dict[str, None] = {}
        for outcome in self.outcomes:
            if outcome.status != "purged":
                left.update(dict.fromkeys(k for k in outcome.keys if k in mine))
        return tuple(left)

    def _worst(self) -> PurgeOutcome | None:
        mine = set(self.keys)
        misses = [
            o for o in self.outcomes if o.status != "purged" and any(k in mine for k in o.keys)
        ]
        limited = [o for o in misses if o.status == "rate_limited"]
        if limited:
            return max(limited, key=lambda o: o.retry_after or 0.0)
        return misses[0] if misses else None

    # ---------------------------------------------------------------- waiting

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every key was sent (True) or ``timeout`` passed (False).

        Not on an event loop whose own drain task must send the keys: use
        :meth:`await_done` there.
        """
        return self._done.wait(timeout)

    async def await_done(self, timeout: float | None = None) -> bool:
        """Async :meth:`wait`: settles from the layer's thread or from a drain task."""
        if self._done.is_set():
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._done.is_set():
                return True
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
            return self._done.is_set()
        return True

    # ---------------------------------------------------------------- settling

    def _settle(self, outcome: PurgeOutcome, count: int) -> None:
        """A batch that carried ``count`` of this ticket's keys ended (the layer calls it)."""
        with self._lock:
            self._outcomes.append(outcome)
            self._remaining -= count
            if self._remaining > 0:
                return
            waiters, self._waiters = self._waiters, []
            self._done.set()
        _wake(waiters)


def _wake(waiters: Iterable[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    # Called from the layer's thread or from a drain task on any loop: hand the
    # result to each waiter's own loop.
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
