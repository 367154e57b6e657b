"""Per-function caching policy: TTLs, stale windows, early refresh, stampede and timeouts."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .errors import ConfigurationError

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """How one cached function behaves. Every duration is in seconds.

    - ``ttl``: how long a value is fresh.
    - ``stale_ttl``: how long past ``ttl`` a value is kept to be served when the
      loader fails or times out (fail-safe).
    - ``stale_while_revalidate``: within this long past ``ttl`` a stale value is
      served at once while one refresher, cluster-wide, recomputes it.
    - ``early_refresh_beta``: XFetch; a hit may trigger a background refresh
      shortly before expiry, the more likely the longer the last computation
      took. 0 turns it off; 1 is the paper's recommendation.
    - ``negative_ttl``: TTL for ``None`` results (defaults to ``ttl``; 0 means
      ``None`` is not cached).
    - ``lock``: take a per-key Redis lock around a fill so one process loads;
      ``lock_ttl`` bounds how long it is held, ``lock_wait`` how long others
      wait for the fill before serving stale or loading themselves.
    - ``soft_timeout``: past it, serve a stale value if there is one and let the
      loader finish in the background. ``hard_timeout``: stop waiting; serve
      stale or raise :class:`~tieredcache.errors.LoaderTimeoutError`.
    - ``fail_safe_throttle``: after a failed load served stale, the stale value
      is treated as fresh for this long, so a failing origin is retried at
      that pace instead of on every call.
    """

    ttl: float
    stale_ttl: float = 0.0
    stale_while_revalidate: float = 0.0
    early_refresh_beta: float = 1.0
    negative_ttl: float | None = None
    lock: bool = True
    lock_ttl: float = 30.0
    lock_wait: float = 5.0
    soft_timeout: float | None = None
    hard_timeout: float | None = None
    fail_safe_throttle: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ConfigurationError(f"{f.name} must be a non-negative number, got {value!r}")
        if self.ttl <= 0:
            raise ConfigurationError(f"ttl must be positive, got {self.ttl!r}")
        if self.stale_while_revalidate > self.stale_ttl:
            object.__setattr__(self, "stale_ttl", self.stale_while_revalidate)
        if self.lock_ttl <= 0 or self.lock_wait <= 0:
            raise ConfigurationError("lock_ttl and lock_wait must be positive")
        soft, hard = self.soft_timeout, self.hard_timeout
        if soft is not None and hard is not None and soft > hard:
            raise ConfigurationError("soft_timeout must not exceed hard_timeout")

    def ttl_for(self, value: object) -> float:
        if value is None and self.negative_ttl is not None:
            return self.negative_ttl
        return self.ttl
