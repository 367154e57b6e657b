"""A circuit breaker per shared layer: stop hammering a dead backend, retry by itself.

Closed: calls go through; ``failure_threshold`` consecutive failures open it.
Open: calls are skipped (the cache falls through to the next layer or the
origin) until ``reset_timeout`` has passed. Half-open: one probe call goes
through; success closes the breaker, failure opens it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

from .errors import ConfigurationError

__all__ = ["CircuitBreaker"]

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Thread-safe breaker with an injectable ``timer`` (monotonic seconds).

    >>> breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5.0)
    >>> breaker.allow()
    True
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigurationError("failure_threshold must be at least 1")
        if reset_timeout <= 0:
            raise ConfigurationError("reset_timeout must be positive")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.timer = timer
        self.opened_count = 0
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._probing or self.timer() - self._opened_at >= self.reset_timeout:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go to the backend now."""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self.timer() - self._opened_at < self.reset_timeout:
                return False
            self._probing = True  # exactly one probe while half-open
            return True

    def abandon(self) -> None:
        """A call that was allowed ended with no verdict (cancelled, or a non-backend
        error): if it was the half-open probe, let the next call probe instead."""
        if self._probing:
            with self._lock:
                self._probing = False

    def success(self) -> None:
        if self._opened_at is None and not self._failures:
            return
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or (
                self._opened_at is None and self._failures >= self.failure_threshold
            ):
                if self._opened_at is None or self._probing:
                    self.opened_count += 1
                self._opened_at = self.timer()
                self._probing = False
