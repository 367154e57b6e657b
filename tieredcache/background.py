"""Work a cache does off the caller's path: refreshes, late fills, timed loads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from typing import TYPE_CHECKING, Any

from .flows import Flow, ReadRequest, refresh_flow
from .metrics import REFRESHES

if TYPE_CHECKING:
    from .cache import TieredCache

__all__ = ["Background"]

log = logging.getLogger("tieredcache")


class Background:
    """The thread pools and tasks of one cache.

    Two pools: ``workers`` threads for background refreshes, and a pool of its
    own for loaders run under a timeout, since a refresh waits on such a load
    and must not starve it. At most one refresh per key runs at a time;
    ``pending`` holds the keys whose load outlived a soft timeout.
    """

    def __init__(self, cache: TieredCache, workers: int) -> None:
        self.cache = cache
        self.workers = workers
        self.pending: set[str] = set()
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._load_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        self.workers, thread_name_prefix=f"tieredcache-{self.cache.namespace}"
                    )
        return self._executor

    def load_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._load_executor is None:
            with self._lock:
                if self._load_executor is None:
                    self._load_executor = concurrent.futures.ThreadPoolExecutor(
                        32, thread_name_prefix=f"tieredcache-load-{self.cache.namespace}"
                    )
        return self._load_executor

    def _task(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def arun(self, flow: Flow, req: ReadRequest, pending_key: str | None = None) -> None:
        """Run a flow as a task (async callers); ``pending_key`` leaves ``pending`` after."""

        async def work() -> None:
            try:
                await self.cache.async_runner.run(flow, req)
            except Exception:
                log.exception("tieredcache background work for %s failed", req.key)
            finally:
                if pending_key is not None:
                    self.pending.discard(pending_key)

        self._task(work())

    def _claim(self, req: ReadRequest) -> bool:
        with self._lock:
            if req.key.full in self._refreshing:
                return False
            self._refreshing.add(req.key.full)
        req.counters[req.loader_base + REFRESHES] += 1
        return True

    def spawn_refresh(self, req: ReadRequest, seen: float | None = None) -> None:
        """Recompute ``req``'s key on a thread, once (stale-while-revalidate, XFetch)."""
        if not self._claim(req):
            return

        def work() -> None:
            try:
                self.cache.sync_runner.run(refresh_flow(req, seen=seen), req)
            except Exception:
                log.exception("tieredcache refresh of %s failed", req.key)
            finally:
                self._refreshing.discard(req.key.full)

        self.executor().submit(contextvars.copy_context().run, work)

    def spawn_arefresh(self, req: ReadRequest, seen: float | None = None) -> None:
        """Recompute ``req``'s key in a task, once."""
        if not self._claim(req):
            return

        async def work() -> None:
            try:
                await self.cache.async_runner.run(refresh_flow(req, seen=seen), req)
            except Exception:
                log.exception("tieredcache refresh of %s failed", req.key)
            finally:
                self._refreshing.discard(req.key.full)

        self._task(work())

    async def acancel(self) -> None:
        """Cancel this loop's background tasks and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Finish the refreshes under way and drop the pools."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._load_executor is not None:
            self._load_executor.shutdown(wait=False, cancel_futures=True)
            self._load_executor = None
