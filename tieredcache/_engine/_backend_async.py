"""What the async engine does its own way: single-flight, timed loads, fill waits,
background work. ``_backend_sync.py`` is its blocking twin, by hand: these are the
few places where the two differ in more than ``await`` (as httpcore keeps its
``_backends``). The engine (``_async/read.py``) calls only the names below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import LoaderTimeoutError
from ._async.calls import shared
from ._singleflight import AsyncSingleFlight
from .request import SOFT_TIMEOUT, ReadRequest, claim_refresh
from .stack import LayerGuard, LayerStack

__all__ = ["follow", "join", "load", "release_on_exit", "settle", "spawn_refresh", "wait_fill"]

log = logging.getLogger("tieredcache")
follow = AsyncSingleFlight.follow


def join(stack: LayerStack, key: str, tags: tuple[str, ...]) -> tuple[Any, bool]:
    return stack.async_flights.join(key, tags)


def settle(
    stack: LayerStack, key: str, flight: Any, result: Any = None, error: BaseException | None = None
) -> None:
    stack.async_flights.settle(key, flight, result, error)


def release_on_exit(
    req: ReadRequest, unlock: Callable[[ReadRequest, str], Coroutine[Any, Any, None]]
) -> None:
    """A call that ended holding the fill lock (cancelled: a client went away) releases
    it in a task of its own, since this one is being cancelled."""
    token = req.lock_token
    if token is not None:
        req.lock_token = None
        req.stack.background.task(unlock(req, token))


def spawn_refresh(
    req: ReadRequest,
    refresh: Callable[[ReadRequest, bool, float | None], Coroutine[Any, Any, Any]],
    seen: float | None,
) -> None:
    """Recompute ``req``'s key in a task, once at a time per key."""
    if not claim_refresh(req):
        return
    background = req.stack.background

    async def work() -> None:
        try:
            await refresh(req, True, seen)
        except Exception:
            log.exception("tieredcache refresh of %s failed", req.key)
        finally:
            background.unclaim(req.key.full)

    background.task(work())


async def load(
    req: ReadRequest,
    soft: float | None,
    hard: float | None,
    fill: Callable[..., Coroutine[Any, Any, None]],
    unlock: Callable[[ReadRequest, str], Coroutine[Any, Any, None]],
    leases: list[Any],
    token: str | None,
) -> Any:
    """The loader under a soft or hard timeout -> its value, or SOFT_TIMEOUT (the load
    goes on, and ``fill`` stores its value when it lands; a failed late load releases
    the fill lock). Past ``hard`` an async loader is cancelled."""
    start = time.perf_counter()
    timeout = soft if soft is not None else hard
    assert timeout is not None
    background = req.stack.background
    task = asyncio.ensure_future(req.loader())
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.CancelledError:
        task.cancel()  # the caller went away: so does its load
        raise
    except TimeoutError:
        if soft is None:
            task.cancel()
            raise LoaderTimeoutError(req.function, req.key.full, timeout) from None
        full = req.key.full
        background.pending.add(full)

        def finish(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                work = fill(req, done.result(), time.perf_counter() - start, leases, token)
            elif token is not None:
                work = unlock(req, token)
            else:
                background.pending.discard(full)
                return
            background.task(_then_discard(work, background.pending, full))

        task.add_done_callback(finish)
        if hard is not None:  # the late load is still bounded
            asyncio.get_running_loop().call_later(hard - soft, task.cancel)
        return SOFT_TIMEOUT


async def _then_discard(work: Coroutine[Any, Any, Any], pending: set[str], key: str) -> None:
    try:
        await work
    except Exception:
        log.exception("tieredcache late fill of %s failed", key)
    finally:
        pending.discard(key)


async def wait_fill(req: ReadRequest, guard: LayerGuard, timeout: float) -> None:
    """Wait until the fill lock of ``req``'s key is released (a pub/sub wake-up) or
    ``timeout`` passes; a short bounded pause without a subscriber."""
    notifier = req.stack.broadcast.notifier()
    if notifier is None:
        await asyncio.sleep(min(timeout, 0.05))
        return
    full = req.key.full
    waiter, future = notifier.register_async(full)
    try:
        # Registered first, then checked: a release in between still wakes us.
        held = await shared(
            guard,
            req.function,
            req.counters,
            req.failed,
            "lock",
            guard.layer.awatch_fill_lock,
            (req.key, timeout),
            False,
        )
        if held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
    finally:
        future.cancel()
        notifier.unregister(full, waiter)
