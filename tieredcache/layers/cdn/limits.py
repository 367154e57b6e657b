"""Retry policy, token bucket and ``Retry-After`` parsing for the purgers (pure, clock injected)."""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ConfigurationError

__all__ = ["RetryPolicy", "TokenBucket", "retry_after_seconds"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded, jittered exponential backoff for faults; a wait budget for rate limits.

    The n-th retry waits ``d/2 + uniform(0, d/2)`` with ``d = min(max_delay,
    base_delay * 2**n)`` ("equal jitter": never zero, never in lockstep).

    >>> RetryPolicy(max_attempts=3).max_attempts
    3
    """

    max_attempts: int = 4
    base_delay: float = 0.1
    max_delay: float = 2.0
    total_timeout: float = 10.0
    rate_limit_wait: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be >= 1")

    def delay(self, retry: int, rand: float) -> float:
        ceiling: float = min(self.max_delay, self.base_delay * 2.0**retry)
        return ceiling / 2 + rand * ceiling / 2


class TokenBucket:
    """A client-side token bucket: ``capacity`` tokens, refilled at ``rate`` a second.

    ``reserve(cost)`` takes the tokens and returns 0.0, or takes nothing and
    returns the seconds until ``cost`` tokens will be there. ``wait_time`` asks the
    same without taking (a planner that lets the purger take them when it sends),
    ``available`` says what it holds. Thread-safe: one bucket is the one budget of
    a vendor account, whoever reads or spends it (the layer's drain, a CDC worker).

    >>> bucket = TokenBucket(capacity=2, rate=1.0, clock=lambda: 0.0)
    >>> bucket.reserve(2), bucket.reserve(1)
    (0.0, 1.0)
    """

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        if capacity <= 0 or rate <= 0:
            raise ConfigurationError("TokenBucket capacity and rate must be > 0")
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(capacity)
        self._at = clock()

    def _refill(self) -> float:
        # Caller holds the lock.
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def _short(self, cost: float) -> float:
        # Caller holds the lock. The epsilon absorbs float rounding: without it a
        # refill that lands a hair short asks for waits too small to move the clock.
        if cost > self.capacity:
            raise ConfigurationError(
                f"a request costing {cost} can never fit a bucket of {self.capacity}"
            )
        tokens = self._refill()
        return 0.0 if tokens + 1e-9 >= cost else (cost - tokens) / self.rate

    def reserve(self, cost: float) -> float:
        with self._lock:
            wait = self._short(cost)
            if wait == 0.0:
                self._tokens = max(0.0, self._tokens - cost)
            return wait

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` tokens are there (0.0: now); takes nothing."""
        with self._lock:
            return self._short(cost)

    def available(self) -> float:
        """The tokens it holds now."""
        with self._lock:
            return self._refill()

    def drain(self) -> None:
        """Empty it: the vendor refused (another client spends the same account)."""
        with self._lock:
            self._refill()
            self._tokens = 0.0


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return default
    try:
        seconds = float(value)
        return max(0.0, seconds)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())
