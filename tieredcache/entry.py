"""A cached value and the times that govern it."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Entry"]


class Entry(msgspec.Struct, gc=False):
    """A value with its timeline, in wall-clock seconds (shared across processes).

    ``fresh_until``: served as a hit before this. ``stale_until``: kept after
    ``fresh_until`` so it can be served stale (stale-while-revalidate,
    fail-safe) until this; the layers drop it then. ``compute_time``: how long
    the loader took, for XFetch early recomputation.

    Not tracked by the garbage collector (``gc=False``): an in-process layer
    holds one per entry, and every full collection would walk them all. An
    entry references its value and floats only, and nothing the cache hands out
    references an entry, so it cannot be part of a reference cycle.
    """

    value: Any
    created_at: float
    fresh_until: float
    stale_until: float
    compute_time: float = 0.0
