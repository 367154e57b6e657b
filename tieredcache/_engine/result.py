"""What an invalidation reached."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BackendError

__all__ = ["InvalidationResult"]


@dataclass(slots=True)
class InvalidationResult:
    """What an invalidation reached. ``failed`` names the layers that did not confirm it
    (``"broadcast"`` when the replicas could not be told).

    >>> result = cache.invalidate(tags=["product:42"])   # doctest: +SKIP
    >>> result.ok                                        # doctest: +SKIP
    True
    """

    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failure(self) -> None:
        """Raise :class:`BackendError` if any layer missed the invalidation."""
        if self.failed:
            raise BackendError(",".join(self.failed), "invalidate", "not confirmed; retry it")
