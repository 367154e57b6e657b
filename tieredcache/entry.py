"""A cached value and the times that govern it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Entry"]


@dataclass(slots=True)
class Entry:
    """A value with its timeline, in wall-clock seconds (shared across processes).

    ``fresh_until``: served as a hit before this. ``stale_until``: kept after
    ``fresh_until`` so it can be served stale (stale-while-revalidate,
    fail-safe) until this; the layers drop it then. ``compute_time``: how long
    the loader took, for XFetch early recomputation.
    """

    value: Any
    created_at: float
    fresh_until: float
    stale_until: float
    compute_time: float = 0.0
