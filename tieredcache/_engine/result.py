"""What an invalidation reached, and what a read found."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import BackendError, BackendTimeoutError, BackendUnavailableError, RateLimitedError
from ..layers.base import PendingPurge

__all__ = ["InvalidationResult", "LayerFailure", "ReadOutcome", "failure_of"]

FailureReason = Literal["timeout", "refused", "rate-limited", "breaker-open", "error"]


@dataclass(frozen=True, slots=True)
class LayerFailure:
    """One layer (or ``"broadcast"``) that did not confirm an invalidation, and why.

    ``reason``: ``timeout`` (no answer in time), ``refused`` (connection refused
    or lost), ``rate-limited`` (send it again after ``retry_after`` seconds: not a
    fault), ``breaker-open`` (not tried: the layer failed repeatedly just before),
    ``error`` (anything else the backend reported; ``detail`` says what).
    """

    layer: str
    reason: FailureReason
    retry_after: float | None = None
    detail: str = ""


def failure_of(layer: str, exc: BaseException | None) -> LayerFailure:
    """The failure a layer's exception stands for (None: not tried, breaker open)."""
    if exc is None:
        return LayerFailure(layer, "breaker-open", detail="circuit breaker open")
    if isinstance(exc, RateLimitedError):
        return LayerFailure(layer, "rate-limited", exc.retry_after, str(exc))
    if isinstance(exc, BackendTimeoutError):
        return LayerFailure(layer, "timeout", detail=str(exc))
    if isinstance(exc, BackendUnavailableError) or "refused" in str(exc).lower():
        return LayerFailure(layer, "refused", detail=str(exc))
    if isinstance(exc, BackendError) and "connect" in exc.operation:
        return LayerFailure(layer, "refused", detail=str(exc))
    return LayerFailure(layer, "error", detail=str(exc))


@dataclass(slots=True)
class InvalidationResult:
    """What an invalidation reached. ``failed`` names the layers that did not confirm it
    (``"broadcast"`` when the replicas could not be told); ``failures`` says why, per
    layer. Retry only those: ``cache.invalidate_many(items, layers=result.failed)``.

    An invalidation-only layer that purges off the caller's path (a
    ``CdnPurgeLayer``) is ``pending`` in the result the call returns: its purge was
    queued, its outcome is not known yet, and it is not in ``failed``. Wait for it
    with :meth:`wait_purges` (or ``await`` :meth:`await_purges`), which returns a
    settled result in which a failed or rate-limited purge is in ``failed`` and
    ``failures`` like any other layer's.

    >>> result = cache.invalidate(tags=["product:42"])   # doctest: +SKIP
    >>> result.ok, result.pending                        # doctest: +SKIP
    (True, ['fastly'])
    >>> result.wait_purges(timeout=5).failures           # doctest: +SKIP
    [LayerFailure(layer='fastly', reason='rate-limited', retry_after=2.0, ...)]
    """

    failed: list[str] = field(default_factory=list)
    failures: list[LayerFailure] = field(default_factory=list)
    # Reached by nothing, on purpose: "broadcast" when the cache was built with
    # broadcast=False although a shared layer could carry it (other replicas were
    # not told; fine for one process, not for a CDC worker).
    unsent: list[str] = field(default_factory=list)
    # Layer name -> its purges still under way (see ``pending``).
    purges: Mapping[str, Sequence[PendingPurge]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        """No layer reported a failure: every layer that was tried confirmed it or,
        for a ``pending`` one, accepted it (see ``complete``)."""
        return not self.failed

    @property
    def pending(self) -> list[str]:
        """The layers whose purge is queued but whose outcome is not in this result."""
        return list(self.purges)

    @property
    def complete(self) -> bool:
        """Confirmed everywhere, the replicas included: nothing failed, nothing unsent,
        nothing pending (so False for a CDN layer until :meth:`wait_purges`)."""
        return not self.failed and not self.unsent and not self.purges

    @property
    def retry_after(self) -> float | None:
        """The longest wait a rate-limited layer asked for, if any."""
        waits = [f.retry_after for f in self.failures if f.retry_after is not None]
        return max(waits) if waits else None

    def raise_for_failure(self) -> None:
        """Raise :class:`BackendError` if any layer missed the invalidation (a pending
        one has not missed it yet: settle it first with :meth:`wait_purges`)."""
        if self.failed:
            reasons = "; ".join(f"{f.layer}: {f.reason} {f.detail}".strip() for f in self.failures)
            raise BackendError(
                ",".join(self.failed), "invalidate", f"not confirmed ({reasons}); retry it"
            )

    def wait_purges(self, timeout: float | None = None) -> InvalidationResult:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the pending
        purges; return the settled result. A purge still under way at the deadline
        stays ``pending``; this result is left as it is.

        From sync code only (on an event loop, ``await`` :meth:`await_purges`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for purges in self.purges.values():
            for purge in purges:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                purge.wait(left)
        return self._settled()

    async def await_purges(self, timeout: float | None = None) -> InvalidationResult:
        """Async :meth:`wait_purges`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for purges in self.purges.values():
            for purge in purges:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await purge.await_done(left)
        return self._settled()

    def _settled(self) -> InvalidationResult:
        failures = list(self.failures)
        still: dict[str, Sequence[PendingPurge]] = {}
        for layer, purges in self.purges.items():
            if not all(p.done() for p in purges):
                still[layer] = purges
                continue
            failure = _purge_failure(layer, [p.error for p in purges])
            if failure is not None:
                failures.append(failure)
        failed = list(dict.fromkeys([*self.failed, *(f.layer for f in failures)]))
        return InvalidationResult(failed, failures, list(self.unsent), still)


def _purge_failure(layer: str, errors: Sequence[BaseException | None]) -> LayerFailure | None:
    """One layer's failure from its purges' errors: a rate limit first (the retry
    must wait for it anyway), the longest one; else the first error."""
    limited = [e for e in errors if isinstance(e, RateLimitedError)]
    if limited:
        return failure_of(layer, max(limited, key=lambda e: e.retry_after or 0.0))
    for error in errors:
        if error is not None:
            return failure_of(layer, error)
    return None


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    """What a read found: ``state`` is ``hit`` (a fresh entry), ``stale`` (an entry past
    its freshness, served while it is refreshed or because the load failed) or
    ``miss`` (loaded, or waited for another caller's load); ``layer`` names the layer
    that answered a hit or a stale read; ``age`` is the entry's age in seconds."""

    state: Literal["hit", "miss", "stale"]
    layer: str | None = None
    age: float = 0.0
