"""What an invalidation reached, and what a read found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import BackendError, BackendTimeoutError, BackendUnavailableError, RateLimitedError

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

    >>> result = cache.invalidate(tags=["product:42"])   # doctest: +SKIP
    >>> result.ok                                        # doctest: +SKIP
    True
    """

    failed: list[str] = field(default_factory=list)
    failures: list[LayerFailure] = field(default_factory=list)
    # Reached by nothing, on purpose: "broadcast" when the cache was built with
    # broadcast=False although a shared layer could carry it (other replicas were
    # not told; fine for one process, not for a CDC worker).
    unsent: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every layer that was tried confirmed it (see ``complete`` for the rest)."""
        return not self.failed

    @property
    def complete(self) -> bool:
        """Confirmed everywhere, the replicas included: nothing failed, nothing unsent."""
        return not self.failed and not self.unsent

    @property
    def retry_after(self) -> float | None:
        """The longest wait a rate-limited layer asked for, if any."""
        waits = [f.retry_after for f in self.failures if f.retry_after is not None]
        return max(waits) if waits else None

    def raise_for_failure(self) -> None:
        """Raise :class:`BackendError` if any layer missed the invalidation."""
        if self.failed:
            reasons = "; ".join(f"{f.layer}: {f.reason} {f.detail}".strip() for f in self.failures)
            raise BackendError(
                ",".join(self.failed), "invalidate", f"not confirmed ({reasons}); retry it"
            )


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    """What a read found: ``state`` is ``hit`` (a fresh entry), ``stale`` (an entry past
    its freshness, served while it is refreshed or because the load failed) or
    ``miss`` (loaded, or waited for another caller's load); ``layer`` names the layer
    that answered a hit or a stale read; ``age`` is the entry's age in seconds."""

    state: Literal["hit", "miss", "stale"]
    layer: str | None = None
    age: float = 0.0
