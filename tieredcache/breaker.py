"""A circuit breaker per shared layer: stop hammering a dead backend, retry by itself.

Closed: calls go through; ``failure_threshold`` consecutive failures open it.
Open: calls are skipped (the cache falls through to the next layer or the
origin) until ``reset_timeout`` has passed. Half-open: one probe call goes
through; success closes the breaker, failure opens it again.

The probe is a ticket (:meth:`CircuitBreaker.admit`), and every way out of the
call must settle it: :meth:`~CircuitBreaker.success`,
:meth:`~CircuitBreaker.failure`, or :meth:`~CircuitBreaker.abandon` when the
call ended without a verdict on the backend (cancelled, or an error that is not
the backend's). A probe nobody settles (a caller that forgot, a task that was
garbage-collected) expires after ``reset_timeout``: the next call becomes the
probe, so a lost probe can delay recovery by one reset period, never forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Literal

from .errors import ConfigurationError

__all__ = ["CLOSED_TICKET", "CircuitBreaker"]

State = Literal["closed", "open", "half-open"]

#: The ticket of a call admitted while the breaker is closed (not a probe).
CLOSED_TICKET: Final = 0


class CircuitBreaker:
    """Thread-safe breaker with an injectable ``timer`` (monotonic seconds).

    >>> breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5.0)
    >>> ticket = breaker.admit()   # None: skip the call
    >>> ticket
    0
    >>> breaker.success(ticket)    # or failure(ticket), or abandon(ticket)
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
        # The probe in flight while half-open: when it was handed out, and its ticket.
        self._probe_since: float | None = None
        self._ticket = CLOSED_TICKET
        self._lock = threading.Lock()
        # Closed with no failure counted: the hot path's one check (read without the
        # lock, as the state is; a stale read costs one call to admit/success).
        self.clean = True

    @property
    def state(self) -> State:
        opened_at = self._opened_at
        if opened_at is None:
            return "closed"
        now = self.timer()
        probe_since = self._probe_since
        if probe_since is not None and now - probe_since < self.reset_timeout:
            return "half-open"  # a probe is out
        if now - opened_at >= self.reset_timeout:
            return "half-open"  # the next call probes
        return "open"

    def admit(self) -> int | None:
        """Whether a call may go to the backend now: ``None`` to skip it, else its
        ticket (:data:`CLOSED_TICKET` while closed; a positive ticket for the one
        half-open probe). Hand the ticket to whichever of :meth:`success`,
        :meth:`failure` or :meth:`abandon` ends the call."""
        if self._opened_at is None:
            return CLOSED_TICKET
        with self._lock:
            if self._opened_at is None:
                return CLOSED_TICKET
            now = self.timer()
            if self._probe_since is not None:
                if now - self._probe_since < self.reset_timeout:
                    return None  # exactly one probe at a time
                # That probe was never settled: it is lost, and this call probes instead.
            elif now - self._opened_at < self.reset_timeout:
                return None
            self._probe_since = now
            self._ticket += 1
            return self._ticket

    def allow(self) -> bool:
        """Whether a call may go to the backend now (:meth:`admit` without the ticket;
        a probe admitted this way is settled by success/failure, or expires)."""
        return self.admit() is not None

    def success(self, ticket: int | None = None) -> None:
        """The call reached the backend: close the breaker."""
        if self._opened_at is None and not self._failures:
            return
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_since = None
            self.clean = True

    def failure(self, ticket: int | None = None) -> None:
        """The backend failed the call: count it; open (again) if it was the probe or
        the threshold is reached."""
        with self._lock:
            self._failures += 1
            self.clean = False
            probing = self._probe_since is not None
            if probing or (self._opened_at is None and self._failures >= self.failure_threshold):
                if self._opened_at is None or probing:
                    self.opened_count += 1
                self._opened_at = self.timer()
                self._probe_since = None

    def abandon(self, ticket: int | None) -> None:
        """The call admitted with ``ticket`` ended without a verdict on the backend
        (cancelled, or failed for a reason of its own): if it was the probe, the next
        call probes at once. Any other ticket (closed, or an expired probe's) is a no-op."""
        if not ticket:
            return
        with self._lock:
            if ticket == self._ticket and self._probe_since is not None:
                self._probe_since = None
