"""Execute flows: the sync runner with blocking calls, the async one with awaits.

Each operation is a few lines here; what to do lives in :mod:`tieredcache.flows`.
Layer calls go through :class:`~tieredcache.layercalls.LayerGuard`, which applies
the circuit breaker, counts errors and latency, and turns a failing layer into a
``None`` result; :mod:`tieredcache.layercalls` says what each operation calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .errors import BackendError, LoaderTimeoutError
from .flows import (
    MISSING,
    SOFT_TIMEOUT,
    Flow,
    Invalidate,
    Load,
    Pending,
    Publish,
    ReadRequest,
    Refresh,
    WaitFill,
    read_flow,
    unlock_flow,
)
from .layercalls import LOCKING, layer_call, prefetched, settle
from .metrics import FIELDS, INVALIDATION, LOAD_CALLS

if TYPE_CHECKING:
    from .cache import TieredCache

log = logging.getLogger("tieredcache")
_FAILED: Any = object()  # a layer call that failed or was skipped


class SyncRunner:
    """Runs flows with blocking I/O."""

    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache

    def run(self, flow: Flow, req: ReadRequest | None = None) -> Any:
        send: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    op = flow.send(send) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                send, error = None, None
                try:
                    send = self.dispatch(op, req)  # type: ignore[arg-type]
                except Exception as exc:  # the loader's exception goes back into the flow
                    error = exc
        except BaseException:
            flow.close()
            if req is not None and req.lock_token is not None:  # interrupted mid-flow
                self.run(unlock_flow(req), req)
            raise

    def _invalidate(self, op: Invalidate) -> bool:
        guard = self.cache.guards[op.layer]
        layer = guard.layer

        def drop() -> bool:
            if op.keys:
                layer.delete(op.keys)
            if op.tags:
                layer.delete_tags(op.tags)
            return True

        ok = guard.call("invalidate", "(invalidate)", op.counters, drop, False)
        if ok and op.counters is not None:
            op.counters[guard.index * FIELDS + INVALIDATION] += len(op.keys) + len(op.tags)
        return ok

    def dispatch(self, op: Any, req: ReadRequest) -> Any:
        cache = self.cache
        call = layer_call(cache, op, req, "")
        if call is not None:
            done = prefetched(op, req)
            if done is not MISSING:
                return done
            guard, name, method, args, default, pair = call
            failed = None if getattr(op, "force", False) else req.failed
            if type(op) in LOCKING:  # see AsyncRunner.run
                req.lock_token = op.token
            result = guard.call(name, req.function, req.counters, method, _FAILED, failed, args)
            if result is _FAILED:
                result = default
            elif pair:
                result = (result, None)
            return settle(op, req, guard, result)
        kind = type(op)
        if kind is Load:
            return self._load(op, req)
        if kind is WaitFill:
            return self._wait_fill(op, req)
        if kind is Refresh:
            cache.background.spawn_refresh(req, op.seen)
            return None
        if kind is Pending:
            return req.key.full in cache.background.pending
        if kind is Invalidate:
            return self._invalidate(op)
        if kind is Publish:
            return cache.replicas.publish(op.keys, op.tags)
        raise TypeError(f"unknown operation {op!r}")

    def _load(self, op: Load, req: ReadRequest) -> Any:
        req.counters[req.loader_base + LOAD_CALLS] += 1
        start = time.perf_counter()
        timeout = op.soft_timeout if op.soft_timeout is not None else op.hard_timeout
        if timeout is None:
            value = req.loader()
            return value, time.perf_counter() - start
        # A timeout needs the loader on another thread; it cannot be interrupted, so
        # past the timeout it keeps running and its result still fills the cache.
        future = self.cache.background.load_executor().submit(
            contextvars.copy_context().run, req.loader
        )
        try:
            value = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            if op.late is not None:
                late = op.late
                pending = self.cache.background.pending
                if op.soft_timeout is not None:
                    pending.add(req.key.full)

                def finish(done: concurrent.futures.Future[Any]) -> None:
                    try:
                        if not done.cancelled() and done.exception() is None:
                            seconds = time.perf_counter() - start
                            self.cache.sync_runner.run(late(done.result(), seconds), req)
                        else:  # the late load failed: its fill lock must not linger
                            self.cache.sync_runner.run(unlock_flow(req), req)
                    except Exception:
                        log.exception("tieredcache late fill of %s failed", req.key)
                    finally:
                        pending.discard(req.key.full)

                future.add_done_callback(finish)
            if op.soft_timeout is not None:
                return SOFT_TIMEOUT
            raise LoaderTimeoutError(req.function, req.key.full, timeout) from None
        return value, time.perf_counter() - start

    def _wait_fill(self, op: WaitFill, req: ReadRequest) -> None:
        cache = self.cache
        notifier = cache.notifier()
        guard = cache.guards[op.layer]
        layer = guard.layer
        if notifier is None:
            time.sleep(min(op.timeout, 0.05))  # no subscriber: a short, bounded pause
            return
        waiter = notifier.register(req.key.full)
        try:
            # Registered first, then checked: a release in between still wakes us.
            held = guard.call(
                "lock",
                req.function,
                req.counters,
                lambda: layer.watch_fill_lock(req.key, op.timeout),
                False,
                failed=req.failed,
            )
            if held:
                waiter.event.wait(op.timeout)
        finally:
            notifier.unregister(req.key.full, waiter)


class AsyncRunner:
    """Runs flows with awaitable I/O."""

    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache

    async def run(self, flow: Flow, req: ReadRequest | None = None) -> Any:
        cache = self.cache
        send: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    op = flow.send(send) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                send, error = None, None
                # Layer operations run here rather than in dispatch(): one coroutine
                # frame less on every await of a miss, and none for in-process layers.
                call = layer_call(cache, op, req, "a")  # type: ignore[arg-type]
                if call is None:
                    try:
                        if type(op) is Load:  # not through dispatch(): frames fewer
                            if op.soft_timeout is None and op.hard_timeout is None:
                                req.counters[req.loader_base + LOAD_CALLS] += 1  # type: ignore[union-attr]
                                start = time.perf_counter()
                                value = await req.loader()  # type: ignore[union-attr]
                                send = (value, time.perf_counter() - start)
                            else:
                                send = await self._timed_load(op, req)  # type: ignore[arg-type]
                            continue
                        send = await self.dispatch(op, req)  # type: ignore[arg-type]
                    except Exception as exc:  # the loader's exception goes back into the flow
                        error = exc
                    continue
                send = prefetched(op, req)  # type: ignore[arg-type]
                if send is not MISSING:
                    continue
                guard, name, method, args, result, pair = call
                failed = None if getattr(op, "force", False) else req.failed  # type: ignore[union-attr]
                if type(op) in LOCKING:
                    # Held from the moment the attempt may reach Redis: a caller cancelled
                    # while the reply is on its way still releases (compare-and-delete, so
                    # harmless if the lock was not taken); settle() corrects it.
                    req.lock_token = op.token  # type: ignore[union-attr]
                if not guard.skips(failed):
                    start = time.perf_counter()
                    try:
                        done = method(*args) if guard.local else await method(*args)
                    except BackendError as exc:
                        guard.errored(name, req.counters, failed, exc)  # type: ignore[union-attr]
                    else:
                        guard.succeeded(req.function, name, start)  # type: ignore[union-attr]
                        result = (done, None) if pair else done
                send = settle(op, req, guard, result)  # type: ignore[arg-type]
        except BaseException:
            flow.close()
            if req is not None and req.lock_token is not None:
                # Cancelled (a client went away) while holding the fill lock: release it
                # in a task of its own, since this one is being cancelled.
                self.cache.background.arun(unlock_flow(req), req)
                req.lock_token = None  # handed over: a caller up the stack does not again
            raise

    def read(self, req: ReadRequest) -> Coroutine[Any, Any, Any]:
        """The read flow of ``req`` run (what a single-flight leader awaits on a miss);
        a plain function returning the coroutine, so no frame of its own is kept."""
        return self.run(read_flow(req), req)

    async def _invalidate(self, op: Invalidate) -> bool:
        guard = self.cache.guards[op.layer]
        layer = guard.layer

        async def drop() -> bool:
            if op.keys:
                await layer.adelete(op.keys)
            if op.tags:
                await layer.adelete_tags(op.tags)
            return True

        ok: bool = await guard.acall("invalidate", "(invalidate)", op.counters, drop, False)
        if ok and op.counters is not None:
            op.counters[guard.index * FIELDS + INVALIDATION] += len(op.keys) + len(op.tags)
        return ok

    async def dispatch(self, op: Any, req: ReadRequest) -> Any:
        """The operations that are not a call on one layer (those run in :meth:`run`)."""
        cache = self.cache
        kind = type(op)
        if kind is WaitFill:
            return await self._wait_fill(op, req)
        if kind is Refresh:
            cache.background.spawn_arefresh(req, op.seen)
            return None
        if kind is Pending:
            return req.key.full in cache.background.pending
        if kind is Invalidate:
            return await self._invalidate(op)
        if kind is Publish:
            return await cache.replicas.apublish(op.keys, op.tags)
        raise TypeError(f"unknown operation {op!r}")

    async def _timed_load(self, op: Load, req: ReadRequest) -> Any:
        """A load with a soft or hard timeout (an untimed one is awaited in :meth:`run`;
        this closure's cells would otherwise be made for every load)."""
        req.counters[req.loader_base + LOAD_CALLS] += 1
        start = time.perf_counter()
        timeout = op.soft_timeout if op.soft_timeout is not None else op.hard_timeout
        assert timeout is not None
        task = asyncio.ensure_future(req.loader())
        try:
            value = await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.CancelledError:
            task.cancel()  # the caller went away: so does its load
            raise
        except TimeoutError:
            if op.soft_timeout is not None and op.late is not None:
                late = op.late
                pending = self.cache.background.pending
                pending.add(req.key.full)

                def finish(done: asyncio.Future[Any]) -> None:
                    if not done.cancelled() and done.exception() is None:
                        flow = late(done.result(), time.perf_counter() - start)
                    else:  # the late load failed: its fill lock must not linger
                        flow = unlock_flow(req)
                    self.cache.background.arun(flow, req, pending_key=req.key.full)

                task.add_done_callback(finish)
                if op.hard_timeout is not None:  # the late load is still bounded
                    loop = asyncio.get_running_loop()
                    loop.call_later(op.hard_timeout - op.soft_timeout, task.cancel)
                return SOFT_TIMEOUT
            task.cancel()  # past the hard timeout an async loader can be stopped
            raise LoaderTimeoutError(req.function, req.key.full, timeout) from None
        return value, time.perf_counter() - start

    async def _wait_fill(self, op: WaitFill, req: ReadRequest) -> None:
        cache = self.cache
        notifier = cache.notifier()
        guard = cache.guards[op.layer]
        layer = guard.layer
        if notifier is None:
            await asyncio.sleep(min(op.timeout, 0.05))
            return
        waiter, future = notifier.register_async(req.key.full)
        try:
            held = await guard.acall(
                "lock",
                req.function,
                req.counters,
                lambda: layer.awatch_fill_lock(req.key, op.timeout),
                False,
                failed=req.failed,
            )
            if held:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, op.timeout)
        finally:
            future.cancel()
            notifier.unregister(req.key.full, waiter)
