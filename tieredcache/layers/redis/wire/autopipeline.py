"""Automatic pipelining for the async Redis client: concurrent commands share a round trip.

Under a burst (hundreds of tasks missing their L1 at once) every GET and every
script call would otherwise take its own pooled connection, its own socket write
and its own read: redis-py's asyncio client spends ~50-70 µs of CPU on each.
Here the commands of the read and fill paths, ``GET`` and ``EVALSHA`` (the
read-or-lock, lock, fill and release scripts), go another way:

- standalone Redis over TCP or a Unix socket: a
  :class:`~tieredcache.layers.multiplex.MultiplexedConnection`, one connection
  that carries every task's commands, written together while replies are
  outstanding and answered in order (its docstring says how);
- Redis Cluster, or TLS: a command issued while another is on its way waits for
  the next turn of the event loop and leaves with the others as one redis-py
  pipeline (``transaction=False``: each command keeps its own result or error),
  which on a cluster groups them by node. A lone command is sent at once.

``MGET`` (a fill's lease) and ``PUBLISH`` also take the multiplexed connection
when there is one. Every other attribute is the wrapped client's own:
invalidations, subscriptions and the write-back journal use redis-py's pool.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .direct import connection_params
from .multiplex import MultiplexedConnection

__all__ = ["AutoPipeline"]

Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Wraps an async redis-py client (``Redis`` or ``RedisCluster``) of one event loop.

    ``max_batch`` bounds the commands of one write; a larger queue leaves as
    several. ``multiplex=False`` keeps redis-py's pipelines even where a
    multiplexed connection could be used.
    """

    def __init__(self, client: Any, *, max_batch: int = 256, multiplex: bool = True) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.client = client
        self.max_batch = max_batch
        self.batches = 0  # pipelines sent, for tests and benchmarks
        self.batched = 0  # commands that left in one of them
        self._queue: list[Queued] = []
        self._busy = 0  # commands and pipelines on their way
        self._loading: dict[Any, asyncio.Future[Any]] = {}
        self.multiplexed = _multiplexed_for(client, max_batch) if multiplex else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def register_script(self, script: str) -> BatchedScript:
        return BatchedScript(self, script)

    async def script_load(self, script: Any) -> Any:
        # After a SCRIPT FLUSH or a failover every queued EVALSHA of a batch gets
        # NOSCRIPT at once: one SCRIPT LOAD serves them all.
        loading = self._loading.get(script)
        if loading is None:
            loading = asyncio.ensure_future(self.client.script_load(script))
            self._loading[script] = loading
            loading.add_done_callback(lambda done: self._loaded(script, done))
        return await asyncio.shield(loading)

    def _loaded(self, script: Any, done: asyncio.Future[Any]) -> None:
        self._loading.pop(script, None)
        if not done.cancelled():
            done.exception()  # retrieved here: its awaiters may all have gone away

    def get(self, name: str) -> Awaitable[Any]:
        if self.multiplexed is not None:
            return self.multiplexed.execute("GET", name)
        return self._execute("GET", name)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]:
        if self.multiplexed is not None:
            return self.multiplexed.execute("EVALSHA", sha, numkeys, *keys_and_args)
        return self._execute("EVALSHA", sha, numkeys, *keys_and_args)

    def mget(self, keys: Any, *args: Any) -> Awaitable[Any]:
        """MGET (a fill's lease): on the multiplexed connection when there is one, so
        that it shares the deadline that measures the server (redis-py's own read
        timeout also counts the time its task waits in a busy event loop)."""
        if self.multiplexed is not None:
            names = [keys] if isinstance(keys, str | bytes) else list(keys)
            return self.multiplexed.execute("MGET", *names, *args)
        pending: Awaitable[Any] = self.client.mget(keys, *args)
        return pending

    def publish(self, channel: Any, message: Any) -> Awaitable[Any]:
        """PUBLISH (fill wake-ups, replica invalidations): as :meth:`mget`."""
        if self.multiplexed is not None:
            return self.multiplexed.execute("PUBLISH", channel, message)
        pending: Awaitable[Any] = self.client.publish(channel, message)
        return pending

    async def aclose(self) -> None:
        if self.multiplexed is not None:
            await self.multiplexed.aclose()
        await self.client.aclose()

    async def _execute(self, *args: Any) -> Any:
        if not self._busy:
            self._busy += 1
            try:
                return await self.client.execute_command(*args)
            finally:
                self._busy -= 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._queue:
            # Runs on the next turn of the loop: it takes what the tasks that run on
            # this turn queue meanwhile.
            self._busy += 1
            asyncio.get_running_loop().create_task(self._flush())
        self._queue.append((args, future))
        return await future

    async def _flush(self) -> None:
        queued, self._queue = self._queue, []
        queued = [item for item in queued if not item[1].done()]  # drop cancelled callers
        try:
            size = self.max_batch
            chunks = [queued[i : i + size] for i in range(0, len(queued), size)]
            if len(chunks) > 1:
                await asyncio.gather(*(self._send(chunk) for chunk in chunks))
            elif chunks:
                await self._send(chunks[0])
        finally:
            self._busy -= 1

    async def _send(self, chunk: list[Queued]) -> None:
        self.batches += 1
        self.batched += len(chunk)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for args, _ in chunk:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every caller gets the error
            for _, future in chunk:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): so are the callers
            for _, future in chunk:
                future.cancel()
            raise
        for (_, future), result in zip(chunk, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _multiplexed_for(client: Any, max_batch: int) -> MultiplexedConnection | None:
    """A multiplexed connection to the server of a standalone, plain-socket client."""
    params = connection_params(client, asynchronous=True)
    return None if params is None else MultiplexedConnection(**params, max_batch=max_batch)


class BatchedScript:
    """A Lua script whose EVALSHA goes through the auto-pipeline (redis-py's own
    script object would re-check its client's type on every call)."""

    def __init__(self, pipeline: AutoPipeline, script: str) -> None:
        self.pipeline = pipeline
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._direct = AsyncScript(pipeline.client, script)
        if pipeline.multiplexed is not None:
            pipeline.multiplexed.scripts[self.sha] = script.encode()

    def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Awaitable[Any]:
        """The reply, to await: on the multiplexed connection its future itself (that
        connection answers NOSCRIPT by sending the script), so no coroutine per call."""
        if client is not None:  # an explicit pipeline of the caller's
            return self._direct(keys, args, client)
        multiplexed = self.pipeline.multiplexed
        if multiplexed is not None:
            return multiplexed.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        return self._pipelined(keys, args)

    async def _pipelined(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self.pipeline.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a flushed or failed-over server: load it, once for all
            self.sha = await self.pipeline.script_load(self.script)
            return await self.pipeline.evalsha(self.sha, len(keys), *keys, *args)
