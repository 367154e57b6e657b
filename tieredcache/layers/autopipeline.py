"""Automatic pipelining for the async Redis client: concurrent commands share a round trip.

Under a burst (hundreds of tasks missing their L1 at once) every GET and every
script call would otherwise take its own connection, its own socket write and
its own read: redis-py's asyncio client spends ~50-70 µs of CPU on each. Here a
command issued while another is already on its way is queued instead, and
everything queued during one turn of the event loop leaves together as one
pipeline (``transaction=False``: no MULTI, each command keeps its own result or
error). A lone command, the common case without load, is sent at once: the
wrapper adds nothing to it but a counter.

Only the commands of the read and fill paths are batched: ``GET`` and
``EVALSHA`` (the lock, fill and release scripts). Every other attribute is the
wrapped client's own. On Redis Cluster the pipeline groups the commands by node.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:  # the C packer: redis-py's asyncio connection packs in Python (~0.5 µs an argument)
    from hiredis import pack_command
except ImportError:  # pragma: no cover - hiredis comes with the redis extra
    pack_command = None

__all__ = ["AutoPipeline"]

Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Wraps an async redis-py client (``Redis`` or ``RedisCluster``) of one event loop.

    ``max_batch`` bounds the commands of one pipeline; a larger queue leaves as
    several pipelines at once, on as many connections.
    """

    def __init__(self, client: Any, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.client = client
        self.max_batch = max_batch
        self.batches = 0  # pipelines sent, for tests and benchmarks
        self.batched = 0  # commands that left in one of them
        self._queue: list[Queued] = []
        self._busy = 0  # commands and pipelines on their way
        self._loading: dict[Any, asyncio.Future[Any]] = {}
        # Standalone Redis: one connection of the client's own pool carries a batch.
        # A cluster client has no single pool: its pipeline groups commands by node.
        self._pool = None if hasattr(client, "nodes_manager") else client.connection_pool

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
            loading.add_done_callback(lambda _: self._loading.pop(script, None))
        return await asyncio.shield(loading)

    async def get(self, name: str) -> Any:
        return await self._execute("GET", name)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._execute("EVALSHA", sha, numkeys, *keys_and_args)

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
            if self._pool is not None:
                results = await self._send_on_connection(chunk)
            else:
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

    async def _send_on_connection(self, chunk: list[Queued]) -> list[Any]:
        """Write the batch in one go on one pooled connection, then read its replies.

        What redis-py's pipeline does, minus its Python packing and bookkeeping. An
        error reply is that command's result; any other error (timeout, reset)
        drops the connection, whose stream position is then unknown.
        """
        pool = self._pool
        assert pool is not None
        connection = await pool.get_connection()
        try:
            if pack_command is not None:
                packed: Any = b"".join([pack_command(args) for args, _ in chunk])
            else:  # pragma: no cover
                packed = connection.pack_commands([args for args, _ in chunk])
            await connection.send_packed_command(packed, check_health=False)
            results: list[Any] = []
            # One deadline for the batch's replies, not a timer per reply.
            try:
                async with asyncio.timeout(connection.socket_timeout):
                    for _ in chunk:
                        try:
                            results.append(await connection.read_response(timeout=math.inf))
                        except ResponseError as exc:
                            results.append(exc)
            except TimeoutError:
                raise RedisTimeoutError(f"Timeout reading from {connection.host}") from None
            return results
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)


class BatchedScript:
    """A Lua script whose EVALSHA goes through the auto-pipeline (redis-py's own
    script object would re-check its client's type on every call)."""

    def __init__(self, pipeline: AutoPipeline, script: str) -> None:
        self.pipeline = pipeline
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._direct = AsyncScript(pipeline.client, script)

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        if client is not None:  # an explicit pipeline of the caller's
            return await self._direct(keys, args, client)
        try:
            return await self.pipeline.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a flushed or failed-over server: load it, once for all
            self.sha = await self.pipeline.script_load(self.script)
            return await self.pipeline.evalsha(self.sha, len(keys), *keys, *args)
