"""What the sync engine does its own way; the blocking twin of ``_backend_async.py``
(see there). Loads under a timeout run on the cache's load pool: a thread cannot
be interrupted, so past the timeout the load goes on and still fills the layers.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import LoaderTimeoutError
from ._singleflight import SingleFlight
from ._sync.calls import shared
from .request import SOFT_TIMEOUT, ReadRequest, claim_refresh
from .stack import LayerGuard, LayerStack

__all__ = ["follow", "join", "load", "release_on_exit", "settle", "spawn_refresh", "wait_fill"]

log = logging.getLogger("tieredcache")
follow = SingleFlight.follow


def join(stack: LayerStack, key: str, tags: tuple[str, ...]) -> tuple[Any, bool]:
    return stack.flights.join(key, tags)


def settle(
    stack: LayerStack, key: str, flight: Any, result: Any = None, error: BaseException | None = None
) -> None:
    stack.flights.settle(key, flight, result, error)


def release_on_exit(req: ReadRequest, unlock: Callable[[ReadRequest, str], None]) -> None:
    """A call interrupted while holding the fill lock releases it."""
    token = req.lock_token
    if token is not None:
        req.lock_token = None
        unlock(req, token)


def spawn_refresh(
    req: ReadRequest,
    refresh: Callable[[ReadRequest, bool, float | None], Any],
    seen: float | None,
) -> None:
    """Recompute ``req``'s key on a background thread, once at a time per key."""
    if not claim_refresh(req):
        return
    background = req.stack.background

    def work() -> None:
        try:
            refresh(req, True, seen)
        except Exception:
            log.exception("tieredcache refresh of %s failed", req.key)
        finally:
            background.unclaim(req.key.full)

    background.executor().submit(contextvars.copy_context().run, work)


def load(
    req: ReadRequest,
    soft: float | None,
    hard: float | None,
    fill: Callable[..., None],
    unlock: Callable[[ReadRequest, str], None],
    leases: list[Any],
    token: str | None,
) -> Any:
    """The loader under a soft or hard timeout -> its value, or SOFT_TIMEOUT."""
    start = time.perf_counter()
    timeout = soft if soft is not None else hard
    assert timeout is not None
    background = req.stack.background
    future = background.load_executor().submit(contextvars.copy_context().run, req.loader)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        if soft is None:
            raise LoaderTimeoutError(req.function, req.key.full, timeout) from None
        full = req.key.full
        background.pending.add(full)

        def finish(done: concurrent.futures.Future[Any]) -> None:
            try:
                if not done.cancelled() and done.exception() is None:
                    fill(req, done.result(), time.perf_counter() - start, leases, token)
                elif token is not None:  # the late load failed: its lock must not linger
                    unlock(req, token)
            except Exception:
                log.exception("tieredcache late fill of %s failed", req.key)
            finally:
                background.pending.discard(full)

        future.add_done_callback(finish)
        return SOFT_TIMEOUT


def wait_fill(req: ReadRequest, guard: LayerGuard, timeout: float) -> None:
    """Wait until the fill lock of ``req``'s key is released or ``timeout`` passes."""
    notifier = req.stack.broadcast.notifier()
    if notifier is None:
        time.sleep(min(timeout, 0.05))  # no subscriber: a short, bounded pause
        return
    full = req.key.full
    waiter = notifier.register(full)
    try:
        # Registered first, then checked: a release in between still wakes us.
        held = shared(
            guard,
            req.function,
            req.counters,
            req.failed,
            "lock",
            guard.layer.watch_fill_lock,
            (req.key, timeout),
            False,
        )
        if held:
            waiter.event.wait(timeout)
    finally:
        notifier.unregister(full, waiter)
