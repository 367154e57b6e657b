"""The caching strategies as sans-I/O generators, written once for sync and async.

A flow yields operations (``Get``, ``Set``, ``Load``, ...) and receives their
results; :mod:`tieredcache.runners` executes them with blocking or awaitable
I/O (the pattern of httpx's ``Auth.auth_flow``). Layer failures never reach a
flow: the runner turns them into ``None`` results, counts them and trips the
layer's breaker, so a flow only decides *what* to do.

Orderings that matter, and why:

- Reads walk the storage layers fastest first and back-fill the faster layers
  with the remaining TTL. The lease of a faster layer is taken before a slower
  layer is read, so an invalidation that lands in between refuses the
  back-fill.
- Fills and writes go slowest first (shared layers, then the in-process one).
  If a shared layer refuses a fill because of an invalidation, the faster
  layers are not filled either: the shared layer's generations are the
  authority on what was invalidated across processes.
- Write-through takes its leases *before* calling the writer. The write then
  stores the new value only if nothing invalidated or wrote the key since, and
  bumps the key's generation, which refuses every fill that began before it. A
  write whose lease was overtaken deletes the key instead: two writers racing
  leave either the later value or nothing, never the earlier one.
"""

from .ops import (
    BROADCAST,
    MISSING,
    SOFT_TIMEOUT,
    Delete,
    Flow,
    Get,
    GetOrLock,
    Invalidate,
    Lease,
    Load,
    Lock,
    Op,
    Pending,
    Publish,
    ReadRequest,
    Refresh,
    Set,
    Unlock,
    WaitFill,
    make_entry,
    xfetch_band_start,
    xfetch_due,
)
from .read import fill_flow, load_and_fill, lookup_flow, read_flow, refresh_flow
from .write import invalidate_flow, set_flow, unlock_flow, write_flow

__all__ = [
    "BROADCAST",
    "MISSING",
    "SOFT_TIMEOUT",
    "Delete",
    "Flow",
    "Get",
    "GetOrLock",
    "Invalidate",
    "Lease",
    "Load",
    "Lock",
    "Op",
    "Pending",
    "Publish",
    "ReadRequest",
    "Refresh",
    "Set",
    "Unlock",
    "WaitFill",
    "fill_flow",
    "invalidate_flow",
    "load_and_fill",
    "lookup_flow",
    "make_entry",
    "read_flow",
    "refresh_flow",
    "set_flow",
    "unlock_flow",
    "write_flow",
    "xfetch_band_start",
    "xfetch_due",
]
