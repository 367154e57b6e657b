"""The benchmarks' one Redis helper (stdlib only: the peer venvs import it too).

- :func:`server` starts a local ``redis-server`` on a free port (``scripts.services``);
- :func:`command` sends one command on a raw socket, so the measurement's own
  commands go through no contender's client; :func:`info` and :func:`delta` turn two
  ``INFO all`` snapshots into what ran in between (commands, including the ones run
  inside Lua scripts; read events, i.e. round trips; connections);
- :func:`count_client` counts, inside a contender's process, the commands and socket
  writes its client sends (redis-py's sync or asyncio ``Connection``, which every
  contender uses, and tieredcache's own fast-path connections);
- :class:`Proxy` runs this file as a counting TCP proxy (``python _redis.py proxy
  LISTEN_PORT HOST PORT STATS_JSON``) that counts the same from outside the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def server() -> Any:
    """A ``scripts.services.RedisServer`` (a context manager) on a free 127.0.0.1 port."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.services import RedisServer

    return RedisServer()


# --------------------------------------------------------------------------- RESP


def encode(*args: str | bytes | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def command(host: str, port: int, *args: str | bytes | int, timeout: float = 10.0) -> Any:
    """One command on a fresh socket; the reply decoded (an error reply is raised)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(encode(*args))
        with sock.makefile("rb") as reader:
            return _reply(reader)


def _reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RuntimeError(f"Redis replied with an error: {body.decode(errors='replace')}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        return None if size < 0 else reader.read(size + 2)[:-2]
    if kind == b"*":
        size = int(body)
        return None if size < 0 else [_reply(reader) for _ in range(size)]
    raise ConnectionError(f"unexpected RESP reply {line[:40]!r}")


def flushall(host: str, port: int) -> None:
    command(host, port, "FLUSHALL")


def version(host: str, port: int) -> str:
    return str(info(host, port).get("redis_version", "unknown"))


def info(host: str, port: int) -> dict[str, Any]:
    """``INFO all`` as a dict; ``cmdstat_<name>`` -> (calls, usec), ``keys_db<n>`` -> keys."""
    text = command(host, port, "INFO", "all").decode(errors="replace")
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if not sep or line.startswith("#"):
            continue
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in val.split(","))
            out[key] = (int(fields["calls"]), int(fields["usec"]))
        elif key.startswith("db") and "keys=" in val:
            fields = dict(part.split("=", 1) for part in val.split(","))
            out[f"keys_{key}"] = int(fields["keys"])
        else:
            out[key] = val
    return out


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What Redis did between two :func:`info` snapshots, minus our own INFO and FLUSHALL.

    ``commands``: calls per command, including commands run inside Lua scripts;
    ``usec``: server time per command; ``reads``: ``total_reads_processed``, i.e.
    client -> server bursts (round trips; pipelined commands read together count once).
    """
    commands: dict[str, int] = {}
    usec: dict[str, int] = {}
    for key, (calls, spent) in ((k, v) for k, v in after.items() if k.startswith("cmdstat_")):
        if key in ("cmdstat_info", "cmdstat_flushall"):
            continue
        calls0, spent0 = before.get(key, (0, 0))
        if calls - calls0:
            commands[key[8:]] = calls - calls0
            usec[key[8:]] = spent - spent0
    return {
        "commands": commands,
        "usec": usec,
        "commands_total": sum(commands.values()),
        # The INFO that took ``after`` was read once; the one of ``before`` is not counted.
        "reads": int(after["total_reads_processed"]) - int(before["total_reads_processed"]) - 1,
        "connections": int(after["total_connections_received"])
        - int(before["total_connections_received"])
        - 1,
        "keys": sum(v for k, v in after.items() if k.startswith("keys_")),
    }


# --------------------------------------------------------------------------- client counts

# tieredcache's own connections (its fast path), which bypass redis-py: (module, class,
# the method that sends one command, the method that makes one socket write). The first
# that imports is counted; the report says when none did (the library moved them).
FAST_PATHS = {
    "async": [
        ("tieredcache.layers.redis.wire.multiplex", "MultiplexedConnection", "execute", "_write"),
        ("tieredcache.layers.multiplex", "MultiplexedConnection", "execute", "_write"),
    ],
    "sync": [
        ("tieredcache.layers.redis.wire.direct", "DirectConnections", "execute", "_round_trip"),
        ("tieredcache.layers.direct", "DirectConnections", "execute", "_round_trip"),
    ],
}


def count_client(mode: str) -> dict[str, Any]:
    """Count what this process's Redis clients send, from now on; returns the live counts.

    ``mode`` is ``"async"`` (redis-py's ``redis.asyncio`` connections) or ``"sync"``
    (``redis.Connection``; thread-safe). ``commands``: commands packed (each command of
    a pipeline counts; a Lua script call is one command); ``bursts``: socket writes of
    one command or one pipeline; ``by_name``; ``fast_path``: which tieredcache
    connection class was counted too, or None. A wrapper costs ~0.2 µs per command, the
    same for every contender.
    """
    counts: dict[str, Any] = {"commands": 0, "bursts": 0, "by_name": {}, "fast_path": None}
    by_name: dict[str, int] = counts["by_name"]
    depth = threading.local()

    def name_of(args: Any) -> str:
        first = args[0] if args else b"?"
        text = first.decode() if isinstance(first, bytes) else str(first)
        return text.split()[0].upper() if text.strip() else "?"

    if mode == "sync":  # threads: += on a shared dict is not atomic
        lock = threading.Lock()

        def add(args: Any) -> None:
            name = name_of(args)
            with lock:
                counts["commands"] += 1
                by_name[name] = by_name.get(name, 0) + 1

        def burst() -> None:
            with lock:
                counts["bursts"] += 1

    else:  # one event loop, one thread

        def add(args: Any) -> None:
            name = name_of(args)
            counts["commands"] += 1
            by_name[name] = by_name.get(name, 0) + 1

        def burst() -> None:
            counts["bursts"] += 1

    def patch(cls: Any, name: str, make: Callable[[Any], Any]) -> None:
        setattr(cls, name, make(getattr(cls, name)))

    def one(original: Any) -> Any:
        def pack_command(self: Any, *args: Any) -> Any:
            if not getattr(depth, "n", 0):
                add(args)
            return original(self, *args)

        return pack_command

    def sync_send_command(original: Any) -> Any:
        # redis-py's sync send_command packs with its packer, not with pack_command.
        def send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            outer = not getattr(depth, "n", 0)
            if outer:
                add(args)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth.n -= 1

        return send_command

    def many(original: Any) -> Any:
        def pack_commands(self: Any, commands: Any) -> Any:
            commands = list(commands)
            if not getattr(depth, "n", 0):
                for args in commands:
                    add(args)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(self, commands)
            finally:
                depth.n -= 1

        return pack_commands

    def sends(original: Any, asynchronous: bool) -> Any:
        if asynchronous:

            async def asend(self: Any, *args: Any, **kwargs: Any) -> Any:
                burst()
                return await original(self, *args, **kwargs)

            return asend

        def send(self: Any, *args: Any, **kwargs: Any) -> Any:
            burst()
            return original(self, *args, **kwargs)

        return send

    def command_of(original: Any) -> Any:
        def execute(self: Any, *args: Any) -> Any:
            add(args)
            return original(self, *args)

        return execute

    def write_of(original: Any) -> Any:
        def write(self: Any, *args: Any) -> Any:
            burst()
            return original(self, *args)

        return write

    try:
        if mode == "async":
            from redis.asyncio.connection import Connection
        else:
            from redis.connection import Connection  # type: ignore[assignment]
    except ImportError:
        Connection = None  # type: ignore[assignment,misc]
    if Connection is not None:
        patch(Connection, "pack_command", one)
        patch(Connection, "pack_commands", many)
        if mode == "sync":
            patch(Connection, "send_command", sync_send_command)
        patch(Connection, "send_packed_command", lambda o: sends(o, mode == "async"))
    for module, cls_name, execute, write in FAST_PATHS[mode]:
        cls = _find_class(module, cls_name)
        if cls is None or not hasattr(cls, execute) or not hasattr(cls, write):
            continue
        patch(cls, execute, command_of)
        patch(cls, write, write_of)
        counts["fast_path"] = f"{cls.__module__}.{cls_name}"
        break
    return counts


def _find_class(module: str, name: str) -> Any:
    """``module.name``, or a class of that name elsewhere under ``tieredcache.layers``
    (a source tree that moved its modules); None if there is none, or no tieredcache."""
    with contextlib.suppress(Exception):
        return getattr(importlib.import_module(module), name)
    try:
        import pkgutil

        layers = importlib.import_module("tieredcache.layers")
    except Exception:
        return None
    for found in pkgutil.walk_packages(layers.__path__, "tieredcache.layers."):
        with contextlib.suppress(Exception):  # an optional extra that is not installed
            cls = getattr(importlib.import_module(found.name), name, None)
            if isinstance(cls, type):
                return cls
    return None


# --------------------------------------------------------------------------- counting proxy


class RespCounter:
    """Counts top-level commands in a client's RESP stream, fed in arbitrary chunks
    (a command inside a Lua script is not a client command and is not counted)."""

    __slots__ = ("buf", "bulks", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.bulks = 0  # bulk strings still expected in the current command
        self.need = -1  # bytes (incl. CRLF) of the bulk body being read, or -1 for a header

    def feed(self, data: bytes) -> int:
        buf = self.buf
        buf += data
        pos = 0
        found = 0
        size = len(buf)
        while pos < size:
            if self.bulks == 0:  # expecting a new command
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                if buf[pos] == 0x2A:  # '*': an array of bulk strings
                    self.bulks = int(buf[pos + 1 : end])
                found += 1  # an inline command (no '*') is one line
                pos = end + 2
                self.need = -1
            elif self.need < 0:  # '$<len>' header of the next bulk string
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self.need = int(buf[pos + 1 : end]) + 2
                pos = end + 2
            else:
                if size - pos < self.need:
                    break
                pos += self.need
                self.need = -1
                self.bulks -= 1
        del buf[:pos]
        return found


class Proxy:
    """A counting TCP proxy in front of Redis, in a process of its own::

        with Proxy(host, port) as proxy:   # clients connect to 127.0.0.1:proxy.port
            ...
        proxy.counts()  # {"bursts", "commands", "connections", "bytes_in"}

    ``bursts``: reads that returned data from a client socket, i.e. the client's write
    bursts as the proxy saw them (TCP may split a large write in two); ``commands``:
    top-level RESP commands in that stream; ``connections``: clients accepted.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.stats = Path(tempfile.mkdtemp(prefix="redis-proxy-")) / "stats.json"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Proxy:
        host, port = self.upstream
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "proxy", str(self.port), host, str(port), str(self.stats)]
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return self

    def counts(self) -> dict[str, int]:
        return dict(json.loads(self.stats.read_text()))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _proxy_main(listen: int, host: str, port: int, stats: Path) -> None:
    counts = {"bursts": 0, "commands": 0, "connections": 0, "bytes_in": 0}

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        counter = RespCounter() if count else None
        try:
            while data := await reader.read(65536):
                if counter is not None:
                    counts["bursts"] += 1
                    counts["bytes_in"] += len(data)
                    counts["commands"] += counter.feed(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        counts["connections"] += 1
        try:
            sreader, swriter = await asyncio.open_connection(host, port)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, swriter, True), pump(sreader, cwriter, False))

    def dump() -> None:
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(stats)

    proxy = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    dump()
    async with proxy:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            dump()
    dump()


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "proxy":
        sys.exit("usage: python _redis.py proxy LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT STATS")
    listen_, host_, port_, stats_ = sys.argv[2:]
    asyncio.run(_proxy_main(int(listen_), host_, int(port_), Path(stats_)))
