"""Throwaway Redis, Redis Cluster and PostgreSQL servers on free 127.0.0.1 ports.

Used by ``tests/conftest.py``, the examples, the benchmarks and manual runs. It
installs nothing: system packages come from ``scripts/bootstrap.sh`` alone, and a
missing binary is a ``ServiceError`` that says so. A server that cannot start
raises ``ServiceError`` with its command and log tail; the fixtures turn that
into a test failure, never a skip.

Why not pytest-redis / pytest-postgresql (both tried): pytest-redis cannot pass
``--save ""``, so a restarted server reloads its RDB file (the tests rely on a
restarted server being empty); it takes no extra arguments (AOF with
``appendfsync always``, cluster mode) and gives only session-scoped servers.
pytest-postgresql runs ``pg_ctl`` as the calling user, which PostgreSQL
refuses when that is root, as in CI. So this module keeps what is particular
to the project: the local Redis Cluster, kill/restart with or without
persistence, PostgreSQL with logical WAL run as ``postgres``.

Local processes by default; containers (``scripts/docker_services.py``,
testcontainers) when a Docker engine answers or ``TIEREDCACHE_USE_DOCKER=1``.

Extension points for other services (``scripts/varnish_service.py``,
``scripts/kafka_service.py``): subclass ``ProcessService`` (set ``name``,
``binary``, ``package``; write ``command()``, and ``ready()`` if a TCP accept is
not enough; ``prepare()`` for one-time set-up), and use ``require``,
``free_port``/``free_ports``, ``wait_until``, ``log_tail`` and ``ServiceError``.

Example::

    with RedisServer(extra_args=["--appendonly", "yes"]) as server:
        print(server.url)  # redis://127.0.0.1:41234/0
        server.kill()
        server.restart()  # same port; the AOF brings the data back

Command line (prints the URL or DSN, stops on Ctrl-C or SIGTERM)::

    python -m scripts.services redis|cluster|postgres
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

__all__ = [
    "CLUSTER_SLOTS",
    "PostgresServer",
    "ProcessService",
    "RedisClusterServer",
    "RedisClusterService",
    "RedisServer",
    "RedisService",
    "Service",
    "ServiceError",
    "cluster_problem",
    "flushall",
    "free_port",
    "free_ports",
    "log_tail",
    "main",
    "pings",
    "redis_cluster",
    "redis_server",
    "require",
    "wait_until",
]

LOCALHOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
PG_BIN_DIR = Path(os.environ.get("TIEREDCACHE_PG_BIN", "/usr/lib/postgresql/15/bin"))


class ServiceError(RuntimeError):
    """A service could not be found, started or reached; the message says why."""


class PortInUseError(ServiceError):
    """The server could not bind its port (another process took it after free_port())."""


# --------------------------------------------------------------------------- helpers


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    Another process may still take one before the server binds it, which is why
    ``ProcessService`` retries on "address in use" when it chose the port itself.
    """
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((LOCALHOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """Return one TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def log_tail(source: Path | str | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (a ``Path``) or of captured output (a ``str``)."""
    if isinstance(source, Path):
        if not source.exists():
            return "(no log)"
        source = source.read_text(errors="replace")
    text = "\n".join((source or "").rstrip().splitlines()[-lines:])
    return text or "(empty)"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` s pass (False).

    Not tieredcache.testing.wait_until: the benchmarks start servers from here
    without importing the package they measure.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def require(binary: str, package: str) -> str:
    """Return the path of ``binary`` (a name on PATH or an absolute path).

    Nothing is installed here: a missing binary raises ``ServiceError`` naming
    the Debian package that ``scripts/bootstrap.sh`` installs.
    """
    found = binary if os.access(binary, os.X_OK) else shutil.which(binary)
    if found is None:
        raise ServiceError(
            f"{binary} is not installed (Debian package {package}). Run scripts/bootstrap.sh "
            f"as root, or: sudo apt-get install -y {package}"
        )
    return found


def _redis(host: str, port: int, timeout: float = 1.0) -> Any:
    import redis  # lazily: importing this module needs no third-party package

    return redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


def pings(host: str, port: int) -> bool:
    """Whether Redis answers PING (False while it is not listening or still -LOADING)."""
    import redis

    try:
        with _redis(host, port, 0.5) as client:
            return bool(client.ping())
    except (OSError, redis.RedisError):
        return False


def flushall(host: str, port: int) -> None:
    """Delete every key on one Redis node (all databases), synchronously."""
    with _redis(host, port, 10.0) as client:
        client.execute_command("FLUSHALL", "SYNC")


def cluster_problem(nodes: Sequence[tuple[str, int]]) -> str | None:
    """Return why the cluster is not ready yet, or None when every node agrees it is."""
    import redis

    for host, port in nodes:
        try:
            with _redis(host, port) as client:
                info = client.cluster("INFO")
        except (OSError, redis.RedisError) as exc:
            return f"{host}:{port}: CLUSTER INFO failed: {exc}"
        want = {"cluster_state": "ok", "cluster_slots_assigned": CLUSTER_SLOTS}
        want["cluster_known_nodes"] = len(nodes)
        for field, value in want.items():
            if str(info.get(field)) != str(value):
                return f"{host}:{port}: {field}:{info.get(field)}"
    return None


# --------------------------------------------------------------------------- base classes


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
    def __exit__(self, *exc_info: object) -> None: ...


class RedisClusterService(Protocol):
    """What the tests need from a Redis Cluster, local processes or a container."""

    @property
    def nodes(self) -> list[tuple[str, int]]: ...
    @property
    def url(self) -> str: ...
    def start(self) -> Self: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...


# Services still running at interpreter exit (a run aborted before teardown) are
# stopped then, so no redis-server or postgres outlives the run.
_LIVE: dict[int, Service] = {}


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            service.stop()


class Service:
    """Base of every service: ``with`` starts and stops it; ``stop()`` runs at exit too.

    A subclass writes ``start()`` (calling ``_register()`` before it launches
    anything) and ``stop()`` (idempotent, calling ``_unregister()``).
    """

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _register(self) -> None:
        _LIVE[id(self)] = self

    def _unregister(self) -> None:
        _LIVE.pop(id(self), None)


class ProcessService(Service):
    """One long-running process listening on ``port``, its output in ``workdir/<name>.log``.

    A subclass sets ``name``, ``binary`` and ``package`` and writes ``command()``;
    ``ready()`` defaults to "accepts TCP on the port", ``prepare()`` (run once,
    before the first launch) to nothing. As root the process runs as ``user``
    when one is set (PostgreSQL refuses root). A process that exits before it is
    ready, or is not ready within ``start_timeout`` s, raises ``ServiceError``
    with the command and log tail; "Address already in use" is retried on a new
    port when the port was chosen here. ``workdir`` is a temporary directory,
    removed by ``stop()``, unless the caller gave one.
    """

    name: ClassVar[str] = "service"
    binary: ClassVar[str] = ""
    package: ClassVar[str] = ""
    user: ClassVar[str | None] = None
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self, port: int | None = None, *, workdir: Path | None = None, start_timeout: float = 10.0
    ) -> None:
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._given_workdir = self._workdir = workdir
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def command(self, binary: str) -> list[str]:
        raise NotImplementedError

    def prepare(self, binary: str) -> None:
        """One-time set-up in ``workdir`` before the first launch (e.g. initdb)."""

    def ready(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, self._port), 0.5):
            return True
        return False

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def workdir(self) -> Path | None:
        """Directory holding the log and any data files (None before start)."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _run_as(self) -> dict[str, Any]:
        """``subprocess`` arguments that drop root for ``user`` (nothing when not root)."""
        if self.user is None or os.geteuid() != 0:
            return {}
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            raise ServiceError(
                f"no user {self.user!r} to run {self.name}; run scripts/bootstrap.sh"
            ) from None
        return {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid}

    def start(self) -> Self:
        """Start the process and wait until ``ready()``; no-op if it is running."""
        if self.running:
            return self
        binary = require(self.binary, self.package)
        self._register()
        try:
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix=f"tieredcache-{self.name}-"))
            self._workdir.mkdir(parents=True, exist_ok=True)
            if (run_as := self._run_as()) and self._given_workdir is None:
                os.chown(self._workdir, pwd.getpwnam(run_as["user"]).pw_uid, run_as["group"])
            self.prepare(binary)
            for attempt in range(1 if self._port_fixed else 3):
                try:
                    self._launch(binary)
                    return self
                except PortInUseError:
                    if self._port_fixed or attempt == 2:
                        raise
                    self._port = free_port()
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def _launch(self, binary: str) -> None:
        log_path = self.log_path
        assert log_path is not None
        command = self.command(binary)
        with log_path.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server.
            self._process = process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,
                **self._run_as(),
            )
        answered = wait_until(
            lambda: process.poll() is not None or self.ready(), self._start_timeout
        )
        if answered and process.poll() is None:
            return
        self._terminate(signal.SIGKILL)
        tail = log_tail(log_path)
        reason = (
            f"exited with code {process.returncode}"
            if answered
            else f"was not ready within {self._start_timeout:g} s"
        )
        error = PortInUseError if "Address already in use" in tail else ServiceError
        raise error(
            f"{self.name} on {LOCALHOST}:{self._port} {reason}.\n"
            f"command: {shlex.join(command)}\nlog tail ({log_path}):\n{tail}"
        )

    def _terminate(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        """Stop the process (``stop_signal``), wait, and remove a temporary workdir."""
        self._terminate(self.stop_signal)
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = self._given_workdir
        self._unregister()

    def kill(self) -> None:
        """SIGKILL the process (a crash) and wait; the workdir is kept for ``restart()``."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, keeping the workdir."""
        self._terminate(self.stop_signal)
        if id(self) not in _LIVE:  # never started, or stopped: a plain start
            self.start()
            return
        self._launch(require(self.binary, self.package))


# --------------------------------------------------------------------------- local Redis


class RedisServer(ProcessService):
    """A ``redis-server`` process on 127.0.0.1, with no persistence unless asked.

    ``extra_args`` come last and so override the defaults, e.g.
    ``["--appendonly", "yes", "--appendfsync", "always"]`` makes data survive
    ``kill()`` + ``restart()``; with the defaults a restarted server is empty.
    """

    name = "redis"
    binary = "redis-server"
    package = "redis-server"

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(port, workdir=workdir, start_timeout=start_timeout)
        self._extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self._port}/0"

    def command(self, binary: str) -> list[str]:
        return [
            binary, "--bind", LOCALHOST, "--port", str(self._port), "--save", "",
            "--appendonly", "no", "--dir", str(self._workdir), "--daemonize", "no",
            *self._extra_args,
        ]  # fmt: skip

    def ready(self) -> bool:
        return pings(LOCALHOST, self._port)


class RedisClusterServer(Service):
    """A Redis Cluster of ``masters`` local ``redis-server`` processes, no replicas.

    All 16384 slots are assigned and every node reports ``cluster_state:ok``
    before ``start()`` returns.
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
        cli = require("redis-cli", "redis-tools")
        self._basedir = Path(tempfile.mkdtemp(prefix="tieredcache-cluster-"))
        self._register()
        try:
            # Explicit bus ports: the default (port + 10000) does not exist for high ports.
            ports = free_ports(2 * self._masters)
            for index in range(self._masters):
                bus = ports[self._masters + index]
                server = RedisServer(
                    extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-node-timeout", "2000", "--cluster-port", str(bus)],
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
        command = [cli, "--cluster", "create", *(f"{h}:{p}" for h, p in self.nodes)]
        command.append("--cluster-yes")
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
                f"{log_tail(result.stdout + result.stderr)}\n{self._logs()}"
            )
        problem: list[str | None] = [None]

        def ready() -> bool:
            problem[0] = cluster_problem(self.nodes)
            return problem[0] is None

        if not wait_until(ready, self._start_timeout, interval=0.05):
            raise ServiceError(
                f"Redis Cluster not ready within {self._start_timeout:g} s: {problem[0]}\n"
                f"{self._logs()}"
            )

    def _logs(self) -> str:
        return "\n".join(
            f"log tail of node {server.port}:\n{log_tail(server.log_path, 10)}"
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


class PostgresServer(ProcessService):
    """A throwaway PostgreSQL 15 on 127.0.0.1: trust auth, logical WAL, no fsync.

    ``initdb`` and ``postgres`` run as the ``postgres`` user when we are root
    (the postgresql-15 package that bootstrap installs creates it). ``settings``
    are extra ``-c name=value`` server settings.

    >>> with PostgresServer() as pg:  # doctest: +SKIP
    ...     psycopg.connect(pg.dsn).execute("SELECT 1")
    """

    name = "postgres"
    binary = str(PG_BIN_DIR / "postgres")
    package = "postgresql-15"
    user = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnects clients instead of waiting

    def __init__(
        self,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(port, start_timeout=start_timeout)
        self._settings = dict(settings or {})

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{LOCALHOST}:{self._port}/postgres"

    def prepare(self, binary: str) -> None:
        assert self._workdir is not None
        command = [str(Path(binary).with_name("initdb")), "-D", str(self._workdir / "data")]
        command += ["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--no-locale"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, **self._run_as()
        )
        if result.returncode != 0:
            output = log_tail(result.stdout + result.stderr)
            raise ServiceError(f"{shlex.join(command)} failed ({result.returncode}):\n{output}")

    def ready(self) -> bool:
        # A TCP accept is too early: "the database system is starting up".
        isready = [str(PG_BIN_DIR / "pg_isready"), "-q", "-h", LOCALHOST, "-p", str(self._port)]
        return subprocess.run(isready, timeout=5, check=False).returncode == 0

    def command(self, binary: str) -> list[str]:
        assert self._workdir is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self._port),
            "unix_socket_directories": str(self._workdir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "logical",
            "max_replication_slots": "8",
            "max_wal_senders": "8",
            **self._settings,
        }
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        return [binary, "-D", str(self._workdir / "data"), *options]


# --------------------------------------------------------------------------- factories


def redis_server(
    port: int | None = None, *, extra_args: Sequence[str] = (), workdir: Path | None = None
) -> RedisService:
    """Return an unstarted Redis: a container when Docker is usable, else a local process."""
    from scripts import docker_services

    if docker_services.use_docker():
        return docker_services.DockerRedisServer(port, extra_args=extra_args, workdir=workdir)
    return RedisServer(port, extra_args=extra_args, workdir=workdir)


def redis_cluster(masters: int = 3) -> RedisClusterService:
    """Return an unstarted Redis Cluster: a container when Docker is usable, else processes."""
    from scripts import docker_services

    if docker_services.use_docker():
        return docker_services.DockerRedisClusterServer(masters)
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
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service: RedisService | RedisClusterService | PostgresServer
    try:
        if args.service == "redis":
            service = redis_server(args.port).start()
            print(service.url, flush=True)
        elif args.service == "cluster":
            service = redis_cluster().start()
            print(service.url, flush=True)
            print("# nodes: " + " ".join(f"{h}:{p}" for h, p in service.nodes), file=sys.stderr)
        else:
            service = PostgresServer(args.port).start()
            print(service.dsn, flush=True)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("# running; Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
