"""Errors of the CDN purge layer.

``PurgeRateLimitedError`` is a :class:`~tieredcache.errors.RateLimitedError`: the
vendor (or our client-side token bucket) refused the purge for now. It is not a
fault: the purge is idempotent and can be sent again after ``retry_after`` seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import RateLimitedError

__all__ = ["PurgeRateLimitedError"]


class PurgeRateLimitedError(RateLimitedError):
    """A purge was rate limited; send ``keys`` again after ``retry_after`` seconds.

    >>> err = PurgeRateLimitedError("cdn", "purge", 2.5, ["shop:acme:p"])
    >>> err.retry_after
    2.5
    """

    def __init__(self, layer: str, operation: str, retry_after: float, keys: Sequence[str]) -> None:
        super().__init__(
            layer,
            operation,
            f"rate limited: {len(keys)} keys not purged, retry after {retry_after:.3g}s",
            retry_after,
        )
        self.keys = tuple(keys)
