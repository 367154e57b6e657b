"""One Redis connection shared by every task of an event loop: requests are pipelined.

Redis answers the commands of one connection in the order it received them, so
a single connection can carry the requests of many tasks at once: each request
appends its command to the socket and a future to a FIFO; replies are parsed
(hiredis) as they arrive and resolve the futures in order, from the protocol's
``data_received`` callback, without a reader task in between. A request made
while the connection is idle is written at once; the ones made while replies
are outstanding are gathered and written together at the next turn of the event
loop, or as soon as ``max_batch`` of them wait. Under load this turns hundreds
of tasks' commands into a handful of socket writes and reads, with one task
wake-up per request (the asyncio client of redis-py takes a pooled connection,
writes, and reads under a timeout context for every command: ~50-70 µs each).

Deadlines measure the server, not this process: a reply still missing
``timeout`` seconds after its command was written fails every outstanding
request with ``redis.exceptions.TimeoutError`` and drops the connection (where
the stream stands is then unknown) only if the server has also shown no sign of
life for ``timeout``: no bytes received, none waiting unread on the socket, and
no progress in sending what this side had buffered. A busy event loop (10,000
tasks) reads replies late, after their deadline, although Redis answered in
microseconds; a timeout then would open the breaker and make every caller load
again. Such late reads are counted (``backlogged``), as is the loop's lateness in
running the deadline check (``lag_max``); ``timeouts`` counts real ones. A lost
connection fails its outstanding requests with ``ConnectionError``; the next
request connects again. Nothing is retried here (the cache's breaker decides),
with one exception: an EVALSHA answered NOSCRIPT (a flushed or failed-over
server) is sent again as EVAL with the script's text, for the same future, so
that a script call can be the future itself rather than a coroutine around it.

Only RESP2 over TCP or a Unix socket, with AUTH and SELECT; TLS connections use
redis-py's pipelines instead (see :mod:`tieredcache.layers.autopipeline`).
"""

from __future__ import annotations

import asyncio
import collections
import select
import time
from typing import Any

import hiredis
import redis.exceptions

from .direct import ReplyError, handshake, pack, parse_error

__all__ = ["MultiplexedConnection"]


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: MultiplexedConnection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        # The packed commands of ``waiting``, in step with it: bytes, which the garbage
        # collector does not track; read only to send an EVALSHA again after NOSCRIPT.
        self.sent: collections.deque[bytes] = collections.deque()
        self.deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self.answered = 0  # replies received, to match against the deadlines' marks
        self.closed = False
        # The last time the server showed life (bytes read, bytes found waiting unread,
        # or our write buffer drained), and the write buffer's size when last looked at.
        self.alive_at = 0.0
        self.unsent = 0
        self.late_mark = -1  # the mark of the last write counted in ``backlogged``
        self._poll: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.alive_at = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def unread(self) -> bool:
        """Whether the server's bytes (or its hang-up) wait on the socket, unread by
        this event loop yet."""
        poll = self._poll
        if poll is None:
            return False
        try:
            return bool(poll.poll(0))
        except OSError:
            return False

    def progressed(self, now: float) -> bool:
        """Whether the server showed life since the last look: bytes arrived or wait
        unread, or it took some of what this side had left to send."""
        transport = self.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        drained = unsent < self.unsent
        self.unsent = unsent
        if drained or self.unread():
            self.alive_at = now
            return True
        return False

    def data_received(self, data: bytes) -> None:
        self.alive_at = time.monotonic()
        reader = self.reader
        reader.feed(data)
        waiting, sent = self.waiting, self.sent
        while waiting:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(redis.exceptions.ConnectionError(f"protocol error: {exc}"))
                return
            if reply is False:
                break
            future = waiting.popleft()
            command = sent.popleft()
            self.answered += 1
            if future.done():
                continue  # its caller was cancelled; the reply is consumed all the same
            if isinstance(reply, ReplyError):
                message = str(reply)
                if message.startswith("NOSCRIPT"):
                    try:
                        if self.owner._send_as_eval(command, future):
                            continue
                    except Exception as exc:  # never leave a caller without an answer
                        future.set_exception(exc)
                        continue
                future.set_exception(parse_error(message))
            else:
                future.set_result(reply)
        if not waiting:
            self.deadlines.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._poll = None
        reason = f": {exc}" if exc else ""
        self.fail(redis.exceptions.ConnectionError(f"Redis closed the connection{reason}"))
        self.owner._lost(self)

    def fail(self, error: Exception) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        self.sent.clear()
        self.deadlines.clear()

    def abort(self, error: Exception) -> None:
        self.closed = True
        self._poll = None
        self.fail(error)
        if self.transport is not None:
            self.transport.abort()
        self.owner._lost(self)


class MultiplexedConnection:
    """Pipelines the requests of every task of one event loop over one connection.

    ``connect_kwargs``: ``host``/``port`` or ``path``, and optionally
    ``username``, ``password``, ``db`` (redis-py's connection keyword names).
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
        max_batch: int = 256,
    ) -> None:
        self.address = path or f"{host}:{port}"
        self._host, self._port, self._path = host, port, path
        self._handshake = handshake(username, password, int(db or 0))
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_batch = max_batch
        self.writes = 0  # socket writes, for tests and benchmarks
        self.commands = 0
        self.resent = 0  # EVALSHAs sent again as EVAL after NOSCRIPT
        # Deadline accounting (see the module docstring): real timeouts; writes whose
        # deadline passed while the server was still answering (replies read late by a
        # busy event loop: its own backlog); the most the deadline check ran late.
        self.timeouts = 0
        self.backlogged = 0
        self.lag_max = 0.0
        self._protocol: _Protocol | None = None
        self._connecting = False
        self._connect_task: asyncio.Task[None] | None = None
        self._buffer: list[bytes] = []
        self._buffered: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Lua scripts by SHA1: an EVALSHA that meets NOSCRIPT (a flushed or failed-over
        # server) is sent again as EVAL with the script, which also caches it there.
        self.scripts: dict[str, bytes] = {}

    # -- requests -------------------------------------------------------------
    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; the future resolves to its reply (or raises its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(redis.exceptions.ConnectionError("connection closed"))
            return future
        packed = pack(args)
        self.commands += 1
        self._submit(loop, packed, future)
        return future

    def _submit(
        self, loop: asyncio.AbstractEventLoop, packed: bytes, future: asyncio.Future[Any]
    ) -> None:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            self._buffer.append(packed)
            self._buffered.append(future)
            self._ensure_connecting(loop)
            return
        if not protocol.waiting and not self._buffer:  # idle: no reason to wait
            self._write(protocol, [packed], [future])
            return
        self._buffer.append(packed)
        self._buffered.append(future)
        if len(self._buffer) >= self.max_batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _send_as_eval(self, command: bytes, future: asyncio.Future[Any]) -> bool:
        """Send ``command`` (an EVALSHA that got NOSCRIPT) again as EVAL, for the same
        future; False if it is not an EVALSHA of a known script."""
        head = command.find(b"\r\n") + 2  # "*<count>\r\n"
        name = b"$7\r\nEVALSHA\r\n$40\r\n"
        if command[head : head + len(name)].upper() != name:
            return False
        sha_at = head + len(name)
        script = self.scripts.get(command[sha_at : sha_at + 40].decode("ascii", "replace"))
        if script is None or self._closed:
            return False
        self.resent += 1
        evaluated = b"%s$4\r\nEVAL\r\n$%d\r\n%s\r\n%s" % (
            command[:head],
            len(script),
            script,
            command[sha_at + 42 :],
        )
        self._submit(asyncio.get_running_loop(), evaluated, future)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._buffer:
            return
        protocol = self._protocol
        if protocol is None or protocol.closed:
            self._ensure_connecting(asyncio.get_running_loop())  # it sends them once up
            return
        buffer, futures = self._buffer, self._buffered
        self._buffer, self._buffered = [], []
        if any(future.done() for future in futures):
            # Callers cancelled before their command left: it does not leave at all (a
            # lock attempt of a caller that went away would otherwise take the lock).
            kept = [(cmd, fut) for cmd, fut in zip(buffer, futures, strict=True) if not fut.done()]
            if not kept:
                return
            buffer, futures = [cmd for cmd, _ in kept], [fut for _, fut in kept]
        self._write(protocol, buffer, futures)

    def _write(self, protocol: _Protocol, packed: list[bytes], futures: list[Any]) -> None:
        assert protocol.transport is not None
        protocol.waiting.extend(futures)
        protocol.sent.extend(packed)
        protocol.transport.write(b"".join(packed) if len(packed) > 1 else packed[0])
        protocol.unsent = protocol.transport.get_write_buffer_size()
        self.writes += 1
        mark = protocol.answered + len(protocol.waiting)
        protocol.deadlines.append((time.monotonic() + self.timeout, mark))
        if self._timer is None:
            self._arm(protocol, self.timeout)

    # -- deadlines -----------------------------------------------------------
    def _arm(self, protocol: _Protocol, delay: float) -> None:
        loop = asyncio.get_running_loop()
        delay = max(delay, 0.0)
        self._timer = loop.call_later(delay, self._check, protocol, time.monotonic() + delay)

    def _check(self, protocol: _Protocol, scheduled: float = 0.0) -> None:
        self._timer = None
        if protocol.closed:
            return
        now = time.monotonic()
        lag = now - scheduled if scheduled else 0.0
        if lag > self.lag_max:
            self.lag_max = lag
        deadlines = protocol.deadlines
        while deadlines and deadlines[0][1] <= protocol.answered:
            deadlines.popleft()  # those writes are fully answered
        if not deadlines:
            return
        written_due = deadlines[0][0]
        if written_due > now:
            self._arm(protocol, written_due - now)
            return
        # The oldest unanswered write is past its deadline. Its reply may be on its way
        # all the same, read late by a busy event loop: the server has time until
        # ``timeout`` after it last showed life.
        due = protocol.alive_at + self.timeout
        if due <= now:
            if not protocol.progressed(now):
                self.timeouts += 1
                protocol.abort(
                    redis.exceptions.TimeoutError(
                        f"Timeout reading from {self.address}: no reply from the server "
                        f"for {now - protocol.alive_at:.3f} s (socket_timeout {self.timeout} s; "
                        f"this event loop ran the check {lag:.3f} s late)"
                    )
                )
                return
            due = now + self.timeout
        if deadlines[0][1] != protocol.late_mark:  # counted once per overdue write
            protocol.late_mark = deadlines[0][1]
            self.backlogged += 1
        self._arm(protocol, due - now)

    # -- connection -------------------------------------------------------------
    def _ensure_connecting(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._connecting and not self._closed:
            self._connecting = True
            # Referenced until it ends: the loop itself keeps only a weak reference.
            self._connect_task = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            protocol = await asyncio.wait_for(self._open(loop), self.connect_timeout)
        except BaseException as exc:
            self._connecting = False
            error: BaseException
            if isinstance(exc, TimeoutError):
                error = redis.exceptions.TimeoutError(f"Timeout connecting to {self.address}")
            elif isinstance(exc, OSError):
                error = redis.exceptions.ConnectionError(
                    f"Error connecting to {self.address}: {exc}"
                )
            elif isinstance(exc, Exception):
                error = exc  # AUTH or SELECT refused
            else:  # cancelled: the loop is closing
                error = redis.exceptions.ConnectionError(f"connecting to {self.address} stopped")
            self._fail_buffered(error)
            if not isinstance(exc, Exception):
                raise
            return
        self._connecting = False
        if self._closed:  # closed while connecting: this connection is not kept
            protocol.closed = True
            if protocol.transport is not None:
                protocol.transport.close()
            self._fail_buffered(redis.exceptions.ConnectionError("connection closed"))
            return
        if protocol.closed:  # the server hung up at once (maxclients, say)
            self._fail_buffered(
                redis.exceptions.ConnectionError(f"{self.address} closed the connection")
            )
            return
        self._protocol = protocol
        self._flush()

    def _fail_buffered(self, error: BaseException) -> None:
        futures, self._buffer, self._buffered = self._buffered, [], []
        for future in futures:
            if not future.done():
                future.set_exception(error)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        def factory() -> _Protocol:
            return _Protocol(self)

        if self._path is not None:
            _, protocol = await loop.create_unix_connection(factory, self._path)
        else:
            _, protocol = await loop.create_connection(factory, self._host, self._port)
        # AUTH/SELECT must succeed before anything else goes. The scripts are loaded
        # up front too (a first EVALSHA would otherwise meet NOSCRIPT and go again
        # behind later commands), without waiting: Redis runs a connection's commands
        # in order, and a refused SCRIPT LOAD only leaves that script to NOSCRIPT.
        commands = [*self._handshake, *(("SCRIPT", "LOAD", s) for s in self.scripts.values())]
        if commands:
            futures = [loop.create_future() for _ in commands]
            for future in futures:
                future.add_done_callback(_retrieved)  # none is left unretrieved
            self._write(protocol, [pack(cmd) for cmd in commands], futures)
            required = futures[: len(self._handshake)]
            try:
                if required:
                    await asyncio.gather(*required)
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.close()
                raise
        return protocol

    def _lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:  # written nowhere yet: they go out on the next connection
            self._ensure_connecting(asyncio.get_running_loop())

    async def aclose(self) -> None:
        self._closed = True
        error = redis.exceptions.ConnectionError("connection closed")
        self._fail_buffered(error)
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.closed = True
            protocol.fail(error)
            protocol.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
