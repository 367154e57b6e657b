"""Blocking Redis sockets for the sync read and fill commands: one per thread.

redis-py's sync client checks a connection out of its pool, checks the socket,
and records its observability metrics on every command: ~10 µs of Python around
a ~20 µs loopback round trip. The commands of the cache's hot path, ``GET``
(a shared hit) and ``EVALSHA`` (read-or-lock, lock, fill, release), go through
:class:`DirectClient` instead: each thread writes them on a socket of its own
(packed by hiredis) and parses the reply with hiredis. Every other command
(invalidations, MGET, pub/sub, the write-back journal) stays on redis-py.

Only for standalone Redis over TCP or a Unix socket (AUTH and SELECT are
sent when the socket opens); TLS and custom connection classes keep redis-py
for everything. A timeout or socket error closes that thread's socket and is
raised as redis-py's ``TimeoutError`` / ``ConnectionError``; the next command
opens a new one. After ``fork()`` a child never reuses its parent's sockets.

The sockets are blocking, with the timeout enforced by the kernel
(``SO_RCVTIMEO`` / ``SO_SNDTIMEO``) rather than by Python's ``settimeout``: a
Python-level timeout makes every ``send`` and ``recv`` a ``poll`` first, and
each of those system calls releases and retakes the GIL. Under many threads
every release is a context switch, so this halves them per round trip.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.exceptions

__all__ = ["DirectClient", "connection_params"]

pack: Any = hiredis.pack_command  # its stub types the command as a 1-tuple

try:  # redis-py's mapping of error replies to exception classes (NOSCRIPT, LOADING...)
    from redis._parsers.base import BaseParser

    parse_error: Any = BaseParser.parse_error
except ImportError:  # pragma: no cover - older or newer redis-py layouts
    parse_error = redis.exceptions.ResponseError


# Bumped in a forked child: a socket opened before the fork belongs to the parent.
# (A counter read per command instead of an ``os.getpid()`` system call.)
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class ReplyError(Exception):
    """What hiredis hands back for an error reply (turned into redis-py's class)."""


def connection_params(client: Any, asynchronous: bool) -> dict[str, Any] | None:
    """How to reach the server of a standalone, plain-socket redis-py client, or None
    (a cluster, TLS, or a connection class we do not know)."""
    if asynchronous:
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection
    else:
        from redis.connection import (  # type: ignore[assignment]
            Connection,
            UnixDomainSocketConnection,
        )
    pool = getattr(client, "connection_pool", None)
    if pool is None or hasattr(client, "nodes_manager"):
        return None
    if pool.connection_class not in (Connection, UnixDomainSocketConnection):
        return None
    kwargs = pool.connection_kwargs
    if kwargs.get("credential_provider") is not None:
        return None  # credentials fetched per connection (IAM tokens...): redis-py's job
    timeout = kwargs.get("socket_timeout") or 5.0
    unix = pool.connection_class is UnixDomainSocketConnection
    return {
        "host": kwargs.get("host", "localhost"),
        "port": int(kwargs.get("port", 6379)),
        "path": kwargs.get("path") if unix else None,
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
        "db": int(kwargs.get("db") or 0),
        "timeout": timeout,
        "connect_timeout": kwargs.get("socket_connect_timeout") or timeout,
    }


def handshake(username: str | None, password: str | None, db: int) -> list[tuple[Any, ...]]:
    """The commands a new connection sends first: AUTH, SELECT."""
    commands: list[tuple[Any, ...]] = []
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if db:
        commands.append(("SELECT", db))
    return commands


class _Socket:
    __slots__ = ("__weakref__", "generation", "pid", "reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.pid = os.getpid()
        self.generation = _fork_generation
        # A layer that was never closed: its threads' sockets close quietly when
        # collected (or at exit), as redis-py's connections do, instead of warning.
        weakref.finalize(self, sock.close)


class DirectConnections:
    """One blocking socket per thread to one Redis server."""

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
    ) -> None:
        self.address = path or f"{host}:{port}"
        self._target: Any = path if path is not None else (host, port)
        self._family = socket.AF_UNIX if path is not None else socket.AF_INET
        self._handshake = handshake(username, password, db)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        # Weak: a thread that ended drops its socket, whose finalizer closes it.
        self._open: weakref.WeakSet[_Socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply (an error reply is raised)."""
        conn: _Socket | None = getattr(self._local, "conn", None)
        if conn is None or conn.generation != _fork_generation:
            conn = self._connect()
        try:
            reply = self._round_trip(conn, pack(args))
        except BaseException:
            self._drop(conn)
            raise
        if isinstance(reply, ReplyError):
            raise parse_error(str(reply))
        return reply

    def _round_trip(self, conn: _Socket, packed: bytes) -> Any:
        sock, reader = conn.sock, conn.reader
        try:
            sock.sendall(packed)
            reply = reader.gets()
            while reply is False:
                data = sock.recv(65536)
                if not data:
                    raise redis.exceptions.ConnectionError(
                        f"Redis at {self.address} closed the connection"
                    )
                reader.feed(data)
                reply = reader.gets()
        except TimeoutError:
            raise redis.exceptions.TimeoutError(f"Timeout reading from {self.address}") from None
        except OSError as exc:
            if exc.errno in _WOULD_BLOCK:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
                raise redis.exceptions.TimeoutError(f"Timeout talking to {self.address}") from None
            raise redis.exceptions.ConnectionError(
                f"Error talking to {self.address}: {exc}"
            ) from exc
        except hiredis.ProtocolError as exc:
            raise redis.exceptions.ConnectionError(f"protocol error: {exc}") from exc
        return reply

    def _connect(self) -> _Socket:
        if self._closed:
            raise redis.exceptions.ConnectionError("connection closed")
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self._target)
            if self._family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._kernel_timeouts(sock)
        except TimeoutError:
            sock.close()
            raise redis.exceptions.TimeoutError(f"Timeout connecting to {self.address}") from None
        except OSError as exc:
            sock.close()
            raise redis.exceptions.ConnectionError(
                f"Error connecting to {self.address}: {exc or 'timed out'}"
            ) from exc
        conn = _Socket(sock)
        try:
            for command in self._handshake:
                reply = self._round_trip(conn, pack(command))
                if isinstance(reply, ReplyError):
                    raise parse_error(str(reply))
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._open.add(conn)
        self._local.conn = conn
        return conn

    def _kernel_timeouts(self, sock: socket.socket) -> None:
        """Blocking mode, the timeout kept by the kernel (see the module docstring)."""
        try:
            timeval = _timeval(self.timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except (OSError, AttributeError, struct.error):  # no SO_*TIMEO here: poll first
            sock.settimeout(self.timeout)
        else:
            sock.settimeout(None)

    def _drop(self, conn: _Socket) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._open.discard(conn)
        if conn.pid == os.getpid():  # a parent's socket is left to the parent
            conn.sock.close()

    def close(self) -> None:
        """Close every thread's socket; later commands fail."""
        self._closed = True
        with self._lock:
            sockets, self._open = list(self._open), weakref.WeakSet()
        for conn in sockets:
            if conn.pid == os.getpid():
                conn.sock.close()


class DirectScript:
    """A Lua script whose EVALSHA goes through :class:`DirectClient`."""

    def __init__(self, client: DirectClient, script: str) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._pipelined = client.client.register_script(script)
        self.connections = client.connections  # the hot path: no DirectClient frame

    def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        if client is not None:  # an explicit pipeline of the caller's
            return self._pipelined(keys, args, client)
        try:
            return self.connections.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a flushed or failed-over server
            self.sha = self.client.client.script_load(self.script)
            return self.connections.execute("EVALSHA", self.sha, len(keys), *keys, *args)


class DirectClient:
    """Wraps a sync redis-py client: GET and EVALSHA on per-thread sockets, the rest
    on the client itself."""

    def __init__(self, client: Any, params: dict[str, Any]) -> None:
        self.client = client
        self.connections = DirectConnections(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def register_script(self, script: str) -> DirectScript:
        return DirectScript(self, script)

    def get(self, name: str) -> Any:
        return self.connections.execute("GET", name)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.connections.execute("EVALSHA", sha, numkeys, *keys_and_args)

    def close(self) -> None:
        self.connections.close()
        self.client.close()
