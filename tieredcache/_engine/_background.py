"""Where a cache's work off the caller's path runs: thread pools and asyncio tasks.

Two pools: ``workers`` threads for background refreshes, and a pool of its own
for loaders run under a timeout, since a refresh may wait on such a load and
must not starve it. At most one refresh per key runs at a time (:meth:`claim`);
``pending`` holds the keys whose load outlived a soft timeout. What runs here
is decided by the engine's backends (``_backend_sync.py``, ``_backend_async.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any

__all__ = ["Background"]


class Background:
    """The thread pools and tasks of one cache."""

    def __init__(self, namespace: str, workers: int) -> None:
        self.namespace = namespace
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
                        self.workers, thread_name_prefix=f"tieredcache-{self.namespace}"
                    )
        return self._executor

    def load_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._load_executor is None:
            with self._lock:
                if self._load_executor is None:
                    self._load_executor = concurrent.futures.ThreadPoolExecutor(
                        32, thread_name_prefix=f"tieredcache-load-{self.namespace}"
                    )
        return self._load_executor

    def task(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task of the running loop, kept until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def claim(self, key: str) -> bool:
        """Whether the caller may refresh ``key`` now (no refresh of it under way)."""
        with self._lock:
            if key in self._refreshing:
                return False
            self._refreshing.add(key)
        return True

    def unclaim(self, key: str) -> None:
        self._refreshing.discard(key)

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
