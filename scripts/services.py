"""Start real Redis, Redis Cluster and PostgreSQL servers on free 127.0.0.1 ports.

Used by ``tests/conftest.py``, the demo and manual runs; stdlib only (testcontainers
is imported lazily, only on the Docker path).

Two ways to get a Redis:

* local processes (``RedisServer``, ``RedisClusterServer``) of the ``redis-server``
  binary, installed with ``apt-get`` on demand when we are root;
* containers (``DockerRedisServer``, ``DockerRedisClusterServer``) through
  testcontainers, when a Docker engine answers.

The factories ``redis_server()`` and ``redis_cluster()`` pick one: Docker when
``docker_available()`` and testcontainers is importable, else local processes.
``TIEREDCACHE_USE_DOCKER=1`` / ``=0`` forces the choice. PostgreSQL always runs
as a local process (``PostgresServer``).

Every start failure raises ``ServiceError`` carrying the reason and the tail of
the server's log, so a test that needs the service fails with that reason
instead of being skipped.

Example::

    from scripts.services import RedisServer, redis_command

    with RedisServer() as server:
        assert redis_command(server.host, server.port, "PING") == "PONG"
        print(server.url)  # redis://127.0.0.1:41234/0

Command line (prints the URL or DSN, stops on Ctrl-C or SIGTERM)::

    python -m scripts.services redis|cluster|postgres
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self, TypeAlias

__all__ = [
    "DockerRedisClusterServer",
    "DockerRedisServer",
    "PostgresServer",
    "RedisClusterService",
    "RedisClusterServer",
    "RedisReplyError",
    "RedisServer",
    "RedisService",
    "ServiceError",
    "docker_available",
    "ensure_installed",
    "flushall",
    "free_port",
    "main",
    "redis_cluster",
    "redis_command",
    "redis_server",
]

LOCALHOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
PG_BIN_DIR = Path(os.environ.get("TIEREDCACHE_PG_BIN", "/usr/lib/postgresql/15/bin"))
_LOG_TAIL_LINES = 30


# --------------------------------------------------------------------------- errors


class ServiceError(RuntimeError):
    """A service could not be installed, started or reached; the message says why."""


class RedisReplyError(ServiceError):
    """Redis answered a command with an error reply (``-ERR ...``, ``-LOADING ...``)."""


class _PortInUseError(ServiceError):
    """The server could not bind its port (another process took it after free_port())."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0); another process may still take it before
    the server binds, so the local servers retry on "address in use" when the port
    was not chosen by the caller.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports (sockets held open together, so no repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((LOCALHOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _text_tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@functools.cache
def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def docker_available() -> bool:
    """Tell whether containers can be used: a ``docker`` client whose ``docker info`` succeeds.

    ``TIEREDCACHE_USE_DOCKER=1`` or ``=0`` forces the answer; otherwise the probe
    runs once per process (5 s timeout) and its result is cached.
    """
    forced = os.environ.get("TIEREDCACHE_USE_DOCKER", "").strip().lower()
    if forced in {"1", "true", "yes"}:
        return True
    if forced in {"0", "false", "no"}:
        return False
    return _docker_engine_answers()


def _use_docker() -> bool:
    """Docker when available; testcontainers must also be importable unless forced."""
    if not docker_available():
        return False
    forced = os.environ.get("TIEREDCACHE_USE_DOCKER", "").strip() != ""
    # Forced: let the missing testcontainers surface as a ServiceError naming the extra.
    return forced or importlib.util.find_spec("testcontainers") is not None


_apt_lock = threading.Lock()
_apt_updated = False


def _is_root() -> bool:
    return os.geteuid() == 0


def _run_apt(args: Sequence[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", *args]
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"{shlex.join(command)} failed: {exc}") from exc
    if result.returncode != 0:
        raise ServiceError(
            f"{shlex.join(command)} exited with {result.returncode}:\n"
            f"{_text_tail(result.stdout + result.stderr)}"
        )


def ensure_installed(binary: str, apt_package: str) -> str:
    """Return the path of ``binary``, installing ``apt_package`` first if it is missing.

    ``binary`` is a name looked up on ``PATH`` or an absolute path. Installing needs
    root (``apt-get update`` runs once per process, then ``apt-get install -y``);
    otherwise a ``ServiceError`` names the package and the command to run.

    >>> ensure_installed("redis-server", "redis-server")  # doctest: +SKIP
    '/usr/bin/redis-server'
    """

    def locate() -> str | None:
        if os.sep in binary:
            return binary if os.access(binary, os.X_OK) else None
        return shutil.which(binary)

    found = locate()
    if found is not None:
        return found
    if not _is_root() or shutil.which("apt-get") is None:
        raise ServiceError(
            f"{binary} is not installed. Install it with: "
            f"sudo apt-get update && sudo apt-get install -y {apt_package} "
            "(or run scripts/bootstrap.sh as root)"
        )
    global _apt_updated
    with _apt_lock:
        if not _apt_updated:
            _run_apt(["update", "-qq"])
            _apt_updated = True
        _run_apt(["install", "-y", "-qq", "--no-install-recommends", apt_package])
    found = locate()
    if found is None:
        raise ServiceError(f"apt-get installed {apt_package} but {binary} is still missing")
    return found


# --------------------------------------------------------------------------- RESP

RespValue: TypeAlias = "str | bytes | int | list[RespValue] | None"


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: IO[bytes]) -> RespValue:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection in the middle of a reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("Redis closed the connection in the middle of a reply")
        return data[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ServiceError(f"unexpected RESP reply line {line!r}")


def redis_command(
    host: str, port: int, *args: str | bytes | int, timeout: float = 2.0
) -> RespValue:
    """Send one command over a fresh socket and return the decoded reply.

    No redis-py needed: simple strings come back as ``str``, bulk strings as
    ``bytes``, integers as ``int``. Error replies raise ``RedisReplyError``;
    connection problems raise ``OSError``.

    >>> redis_command("127.0.0.1", 6379, "PING")  # doctest: +SKIP
    'PONG'
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_encode_command(args))
        with sock.makefile("rb") as reader:
            return _read_reply(reader)


def flushall(host: str, port: int) -> None:
    """Delete every key on one Redis node (all databases), synchronously."""
    redis_command(host, port, "FLUSHALL", "SYNC", timeout=10.0)


def _pings(host: str, port: int) -> bool:
    try:
        return redis_command(host, port, "PING", timeout=0.5) == "PONG"
    except (OSError, ServiceError):  # not listening yet, or -LOADING while replaying the AOF
        return False


def _cluster_problem(nodes: Sequence[tuple[str, int]]) -> str | None:
    """Return why the cluster is not ready yet, or None when every node agrees it is."""
    for host, port in nodes:
        try:
            raw = redis_command(host, port, "CLUSTER", "INFO", timeout=1.0)
        except (OSError, ServiceError) as exc:
            return f"{host}:{port}: CLUSTER INFO failed: {exc}"
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        info = dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)
        if info.get("cluster_state") != "ok":
            return f"{host}:{port}: cluster_state:{info.get('cluster_state')}"
        if info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS):
            return f"{host}:{port}: cluster_slots_assigned:{info.get('cluster_slots_assigned')}"
        if info.get("cluster_known_nodes") != str(len(nodes)):
            return f"{host}:{port}: cluster_known_nodes:{info.get('cluster_known_nodes')}"
    return None


# --------------------------------------------------------------------------- protocols


class RedisService(Protocol):
    """What the tests need from a standalone Redis, local process or container."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def url(self) -> str: ...
    def start(self) -> Self: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class RedisClusterService(Protocol):
    """What the tests need from a Redis Cluster, local processes or a container."""

    @property
    def nodes(self) -> list[tuple[str, int]]: ...
    @property
    def url(self) -> str: ...
    def start(self) -> Self: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _Service:
    """Context-manager plumbing and the at-exit safety net shared by every server."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _register(self) -> None:
        _LIVE[id(self)] = self

    def _unregister(self) -> None:
        _LIVE.pop(id(self), None)


# Servers still running at interpreter exit (a test run aborted before teardown)
# are stopped here, so no redis-server or postgres outlives the run.
_LIVE: dict[int, _Service] = {}


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            service.stop()


# --------------------------------------------------------------------------- local Redis


class RedisServer(_Service):
    """A ``redis-server`` process on 127.0.0.1, no persistence unless ``extra_args`` ask.

    ``extra_args`` come last and so override the defaults, e.g.
    ``["--appendonly", "yes", "--appendfsync", "always"]`` makes data survive
    ``kill()`` + ``restart()``. Logs and data live in ``workdir`` (a temporary
    directory removed by ``stop()`` unless the caller gave one).

    >>> with RedisServer() as server:  # doctest: +SKIP
    ...     server.kill()
    ...     server.restart()  # same port, answers PING again
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._extra_args = list(extra_args)
        self._given_workdir = workdir
        self._workdir = workdir
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self._port}/0"

    @property
    def workdir(self) -> Path | None:
        """Directory holding ``redis.log`` and any RDB/AOF files (None before start)."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers PING; no-op if already running."""
        if self.running:
            return self
        binary = ensure_installed("redis-server", "redis-server")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="tieredcache-redis-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._register()
        attempts = 1 if self._port_fixed else 3
        try:
            for attempt in range(attempts):
                try:
                    self._launch(binary)
                    return self
                except _PortInUseError:
                    if attempt == attempts - 1:
                        raise
                    self._port = free_port()
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def _command(self, binary: str) -> list[str]:
        assert self._workdir is not None
        return [
            binary,
            "--bind", LOCALHOST,
            "--port", str(self._port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
            "--daemonize", "no",
            *self._extra_args,
        ]  # fmt: skip

    def _launch(self, binary: str) -> None:
        log_path = self.log_path
        assert log_path is not None
        with log_path.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server.
            self._process = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self._process

        def ready() -> bool:
            return process.poll() is not None or _pings(LOCALHOST, self._port)

        answered = _wait_until(ready, self._start_timeout)
        if answered and process.poll() is None:
            return
        self._terminate(signal.SIGKILL)
        tail = _log_tail(log_path)
        reason = (
            f"exited with code {process.returncode}"
            if answered
            else f"did not answer PING within {self._start_timeout:.0f} s"
        )
        error = _PortInUseError if "Address already in use" in tail else ServiceError
        raise error(
            f"redis-server on {LOCALHOST}:{self._port} {reason}.\n"
            f"command: {shlex.join(self._command(binary))}\nlog tail ({log_path}):\n{tail}"
        )

    def _terminate(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        """SIGTERM the server, wait for it, and remove a temporary workdir."""
        self._terminate(signal.SIGTERM)
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = self._given_workdir
        self._unregister()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait; the workdir is kept for ``restart()``."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, keeping the workdir.

        With persistence enabled in ``extra_args`` the data survives; with the
        defaults the restarted server is empty.
        """
        self._terminate(signal.SIGTERM)
        if id(self) not in _LIVE:  # never started, or stopped: a plain start
            self.start()
            return
        self._launch(ensure_installed("redis-server", "redis-server"))


class RedisClusterServer(_Service):
    """A Redis Cluster of ``masters`` local ``redis-server`` processes, no replicas.

    All 16384 slots are assigned and every node reports ``cluster_state:ok``
    before ``start()`` returns.

    >>> with RedisClusterServer() as cluster:  # doctest: +SKIP
    ...     cluster.nodes  # [('127.0.0.1', 40001), ('127.0.0.1', 40002), ...]
    """

    def __init__(self, masters: int = 3, *, start_timeout: float = 30.0) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self._masters = masters
        self._start_timeout = start_timeout
        self._basedir: Path | None = None
        self._servers: list[RedisServer] = []

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master, in creation order."""
        return [(server.host, server.port) for server in self._servers]

    @property
    def url(self) -> str:
        if not self._servers:
            raise ServiceError("the cluster is not started")
        return self._servers[0].url

    def start(self) -> Self:
        if self._servers:
            return self
        cli = ensure_installed("redis-cli", "redis-tools")
        self._basedir = Path(tempfile.mkdtemp(prefix="tieredcache-cluster-"))
        self._register()
        try:
            ports = _free_ports(2 * self._masters)
            for index in range(self._masters):
                # Explicit --cluster-port: the default bus port is port + 10000,
                # which does not exist for the high ports free_port() may return.
                server = RedisServer(
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000",
                        "--cluster-port", str(ports[self._masters + index]),
                    ],
                    workdir=self._basedir / f"node-{index}",
                    start_timeout=self._start_timeout,
                )  # fmt: skip
                self._servers.append(server)
                server.start()
            self._create(cli)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, cli: str) -> None:
        command = [cli, "--cluster", "create"]
        command += [f"{host}:{port}" for host, port in self.nodes]
        command += ["--cluster-yes"]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self._start_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{shlex.join(command)} timed out:\n{self._logs()}") from exc
        if result.returncode != 0:
            raise ServiceError(
                f"{shlex.join(command)} exited with {result.returncode}:\n"
                f"{_text_tail(result.stdout + result.stderr)}\n{self._logs()}"
            )
        problem: list[str | None] = [None]

        def ready() -> bool:
            problem[0] = _cluster_problem(self.nodes)
            return problem[0] is None

        if not _wait_until(ready, self._start_timeout, interval=0.05):
            raise ServiceError(
                f"Redis Cluster not ready within {self._start_timeout:.0f} s: {problem[0]}\n"
                f"{self._logs()}"
            )

    def _logs(self) -> str:
        return "\n".join(
            f"log tail of node {server.port}:\n{_log_tail(server.log_path, 10)}"
            for server in self._servers
        )

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers = []
        if self._basedir is not None:
            shutil.rmtree(self._basedir, ignore_errors=True)
            self._basedir = None
        self._unregister()


# --------------------------------------------------------------------------- PostgreSQL


def _ensure_postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--no-create-home"]
    command += ["--shell", "/usr/sbin/nologin", "postgres"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServiceError(f"{shlex.join(command)} failed: {result.stderr.strip()}")
    return pwd.getpwnam("postgres")


class PostgresServer(_Service):
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1, trust auth, logical WAL.

    Runs ``initdb`` and ``pg_ctl`` as the ``postgres`` user when we are root
    (PostgreSQL refuses to run as root). ``settings`` adds ``name = value`` lines
    to ``postgresql.conf``.

    >>> with PostgresServer() as pg:  # doctest: +SKIP
    ...     psycopg.connect(pg.dsn).execute("SELECT 1")
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        bin_dir: Path = PG_BIN_DIR,
        start_timeout: float = 30.0,
    ) -> None:
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._settings = dict(settings or {})
        self._bin_dir = bin_dir
        self._start_timeout = start_timeout
        self._basedir: Path | None = None
        self._started = False

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self._port}/postgres"

    @property
    def log_path(self) -> Path | None:
        return None if self._basedir is None else self._basedir / "postgres.log"

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if _is_root() else command

    def _run(self, command: list[str], what: str) -> None:
        assert self._basedir is not None
        try:
            result = subprocess.run(
                self._as_owner(command),
                cwd=self._basedir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self._start_timeout + 10,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"PostgreSQL {what} timed out.\nlog tail:\n{_log_tail(self.log_path)}"
            ) from exc
        if result.returncode != 0:
            error = ServiceError
            tail = _log_tail(self.log_path)
            if "Address already in use" in tail or "could not bind" in tail:
                error = _PortInUseError
            raise error(
                f"PostgreSQL {what} failed (exit {result.returncode}): {shlex.join(command)}\n"
                f"{_text_tail(result.stdout + result.stderr, 20)}\n"
                f"log tail ({self.log_path}):\n{tail}"
            )

    def start(self) -> Self:
        """initdb a fresh cluster, start it, and wait until it accepts TCP connections."""
        if self._started:
            return self
        initdb = ensure_installed(str(self._bin_dir / "initdb"), "postgresql-15")
        self._basedir = Path(tempfile.mkdtemp(prefix="tieredcache-pg-"))
        self._register()
        try:
            if _is_root():
                owner = _ensure_postgres_user()
                os.chown(self._basedir, owner.pw_uid, owner.pw_gid)
            data = self._basedir / "data"
            self._run(
                [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync",
                 "-E", "UTF8", "--no-locale"],
                "initdb",
            )  # fmt: skip
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self._basedir}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "wal_level": "logical",
                "max_replication_slots": "8",
                "max_wal_senders": "8",
                **self._settings,
            }
            # Appending as root keeps the file's owner (postgres).
            with (data / "postgresql.conf").open("a") as conf:
                conf.write("\n# tieredcache test server\n")
                conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
            attempts = 1 if self._port_fixed else 3
            for attempt in range(attempts):
                try:
                    self._pg_ctl_start(data)
                    break
                except _PortInUseError:
                    if attempt == attempts - 1:
                        raise
                    self._port = free_port()
        except BaseException:
            self.stop()
            raise
        return self

    def _pg_ctl_start(self, data: Path) -> None:
        assert self.log_path is not None
        pg_ctl = str(self._bin_dir / "pg_ctl")
        self._run(
            [pg_ctl, "-D", str(data), "-l", str(self.log_path), "-w",
             "-t", str(int(self._start_timeout)), "-o", f"-p {self._port}", "start"],
            "start",
        )  # fmt: skip
        self._started = True
        if not _wait_until(lambda: _tcp_accepts(LOCALHOST, self._port), self._start_timeout):
            raise ServiceError(
                f"PostgreSQL on {LOCALHOST}:{self._port} does not accept TCP connections.\n"
                f"log tail:\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """Fast shutdown (disconnects clients), then remove the data directory."""
        if self._started and self._basedir is not None:
            self._started = False
            data = str(self._basedir / "data")
            with contextlib.suppress(ServiceError):
                self._run([str(self._bin_dir / "pg_ctl"), "-D", data, "-m", "fast", "stop"], "stop")
        if self._basedir is not None:
            shutil.rmtree(self._basedir, ignore_errors=True)
            self._basedir = None
        self._unregister()


# --------------------------------------------------------------------------- Docker


def _testcontainers(module: str) -> Any:
    try:
        with warnings.catch_warnings():
            # testcontainers >= 4.14 moved modules to testcontainers.community and warns
            # on the old paths; pytest runs with filterwarnings=error.
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except ImportError as exc:
        raise ServiceError(
            f"cannot import {module} ({exc}); install it with: "
            "pip install 'tieredcache[testcontainers]', or set TIEREDCACHE_USE_DOCKER=0"
        ) from exc


def _redis_container_class() -> Any:
    try:
        return _testcontainers("testcontainers.community.redis").RedisContainer
    except ServiceError:
        return _testcontainers("testcontainers.redis").RedisContainer


def _start_container(build: Callable[[], Any], image: str) -> Any:
    """Build and start a testcontainers container; any failure becomes a ServiceError."""
    container = None
    try:
        container = build()
        container.start()
    except ServiceError:
        raise
    except Exception as exc:  # docker.errors.*, requests errors, wait-strategy timeouts
        if container is not None:
            with contextlib.suppress(Exception):
                container.stop()
        raise ServiceError(
            f"could not start a {image} container ({type(exc).__name__}: {exc}). Is the "
            "Docker engine running? TIEREDCACHE_USE_DOCKER=0 uses local processes instead."
        ) from exc
    return container


def _container_logs(container: Any) -> str:
    try:
        stdout, stderr = container.get_logs()
    except Exception as exc:  # the container may already be gone
        return f"(no container logs: {exc})"
    return _text_tail((stdout + stderr).decode(errors="replace"))


class DockerRedisServer(_Service):
    """``RedisServer`` in a ``redis:7`` container (testcontainers), same interface.

    The container port is bound to a fixed host port so that ``restart()`` keeps it.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        image: str = "redis:7",
        start_timeout: float = 60.0,
    ) -> None:
        self._host_port = port if port is not None else free_port()
        self._extra_args = list(extra_args)
        self._workdir = workdir
        self._image = image
        self._start_timeout = start_timeout
        self._container: Any = None
        self._host = LOCALHOST
        self._port = self._host_port

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self._host}:{self._port}/0"

    def start(self) -> Self:
        if self._container is not None:
            return self

        def build() -> Any:
            container = _redis_container_class()(self._image)
            container.with_bind_ports(6379, self._host_port)
            container.with_command(
                ["redis-server", "--save", "", "--appendonly", "no", *self._extra_args]
            )
            if self._workdir is not None:
                self._workdir.mkdir(parents=True, exist_ok=True)
                container.with_volume_mapping(str(self._workdir), "/data", "rw")
            return container

        self._register()
        try:
            self._container = _start_container(build, self._image)
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        # Host and port come from testcontainers: inside a container they can be the
        # bridge address and the container port rather than 127.0.0.1 and the bound port.
        host = str(self._container.get_container_host_ip())
        self._host = LOCALHOST if host == "localhost" else host
        self._port = int(self._container.get_exposed_port(6379))
        if not _wait_until(lambda: _pings(self._host, self._port), self._start_timeout):
            raise ServiceError(
                f"redis container at {self._host}:{self._port} did not answer PING within "
                f"{self._start_timeout:.0f} s.\nlog tail:\n{_container_logs(self._container)}"
            )

    def _wrapped(self) -> Any:
        if self._container is None:
            raise ServiceError("the Redis container is not started")
        return self._container.get_wrapped_container()

    def stop(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        self._unregister()

    def kill(self) -> None:
        """SIGKILL the container's redis-server (the container stays, stopped)."""
        wrapped = self._wrapped()
        wrapped.kill()
        wrapped.wait(timeout=30)

    def restart(self) -> None:
        """``docker restart`` (SIGTERM, then start); the container filesystem persists."""
        self._wrapped().restart(timeout=10)
        self._wait()


def _cluster_script(ports: Sequence[int], bus_ports: Sequence[int]) -> str:
    lines = ["set -e"]
    for port, bus in zip(ports, bus_ports, strict=True):
        lines.append(
            f"mkdir -p /data/{port} && redis-server --port {port} --cluster-port {bus} "
            "--bind 0.0.0.0 --protected-mode no --cluster-enabled yes "
            "--cluster-config-file nodes.conf --cluster-node-timeout 2000 "
            f"--cluster-announce-ip 127.0.0.1 --save '' --appendonly no --dir /data/{port} "
            f"--daemonize yes --logfile /data/{port}/redis.log"
        )
    for port in ports:
        lines.append(f"until redis-cli -p {port} ping >/dev/null 2>&1; do sleep 0.1; done")
    addresses = " ".join(f"127.0.0.1:{port}" for port in ports)
    lines.append(f"redis-cli --cluster create {addresses} --cluster-yes")
    logs = " ".join(f"/data/{port}/redis.log" for port in ports)
    lines.append(f"exec tail -n +1 -F {logs}")
    return "\n".join(lines)


class DockerRedisClusterServer(_Service):
    """``RedisClusterServer`` as one ``redis:7`` container running every master.

    Why one container: cluster nodes tell clients where slots live. All masters
    run in one network namespace, talk over 127.0.0.1, announce 127.0.0.1, and
    listen on the same port numbers that are bound on the host, so the announced
    ``127.0.0.1:port`` works from the host as well. This needs a Docker engine
    on this machine; for a remote engine ``start()`` raises ``ServiceError``
    (set ``TIEREDCACHE_USE_DOCKER=0`` for local processes).
    """

    def __init__(
        self, masters: int = 3, *, image: str = "redis:7", start_timeout: float = 60.0
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self._masters = masters
        self._image = image
        self._start_timeout = start_timeout
        self._container: Any = None
        self._ports: list[int] = []

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(LOCALHOST, port) for port in self._ports]

    @property
    def url(self) -> str:
        if not self._ports:
            raise ServiceError("the cluster is not started")
        return f"redis://{LOCALHOST}:{self._ports[0]}/0"

    def start(self) -> Self:
        if self._container is not None:
            return self
        core = _testcontainers("testcontainers.core.container")
        # Bus ports are used inside the container only; they just have to be distinct.
        all_ports = _free_ports(2 * self._masters)
        ports, bus_ports = all_ports[: self._masters], all_ports[self._masters :]

        def build() -> Any:
            container = core.DockerContainer(self._image)
            container.with_command(["sh", "-c", _cluster_script(ports, bus_ports)])
            for port in ports:
                container.with_bind_ports(port, port)
            return container

        self._register()
        try:
            self._container = container = _start_container(build, self._image)
            self._ports = ports
            host = str(container.get_container_host_ip())
            if host not in {"localhost", LOCALHOST, "::1"}:
                raise ServiceError(
                    f"the Docker engine is at {host}, not on this machine; cluster nodes "
                    "announce 127.0.0.1. Set TIEREDCACHE_USE_DOCKER=0 to use local processes."
                )
            problem: list[str | None] = [None]

            def ready() -> bool:
                problem[0] = _cluster_problem(self.nodes)
                return problem[0] is None

            if not _wait_until(ready, self._start_timeout, interval=0.1):
                raise ServiceError(
                    f"Redis Cluster container not ready within {self._start_timeout:.0f} s: "
                    f"{problem[0]}\nlog tail:\n{_container_logs(container)}"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        self._ports = []
        self._unregister()


# --------------------------------------------------------------------------- factories


def redis_server(
    port: int | None = None, *, extra_args: Sequence[str] = (), workdir: Path | None = None
) -> RedisService:
    """Return an unstarted Redis: a container when Docker is usable, else a local process."""
    if _use_docker():
        return DockerRedisServer(port, extra_args=extra_args, workdir=workdir)
    return RedisServer(port, extra_args=extra_args, workdir=workdir)


def redis_cluster(masters: int = 3) -> RedisClusterService:
    """Return an unstarted Redis Cluster: a container when Docker is usable, else processes."""
    if _use_docker():
        return DockerRedisClusterServer(masters)
    return RedisClusterServer(masters)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Start one service, print its URL or DSN, and stop it on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.services", description="Run a throwaway service on 127.0.0.1."
    )
    parser.add_argument("service", choices=["redis", "cluster", "postgres"])
    parser.add_argument("--port", type=int, default=None, help="redis/postgres port")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    service: RedisService | RedisClusterService | PostgresServer
    try:
        if args.service == "redis":
            service = redis_server(args.port).start()
            print(service.url, flush=True)
        elif args.service == "cluster":
            service = redis_cluster().start()
            print(service.url, flush=True)
            nodes = " ".join(f"{host}:{port}" for host, port in service.nodes)
            print(f"# nodes: {nodes}", file=sys.stderr)
        else:
            service = PostgresServer(args.port).start()
            print(service.dsn, flush=True)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("# running; Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
