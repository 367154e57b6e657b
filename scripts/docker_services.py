"""The Docker path of ``scripts.services``: Redis and Redis Cluster in containers.

``scripts.services.redis_server()`` and ``redis_cluster()`` use these classes when
``docker_available()`` and testcontainers is importable (``pip install
'tieredcache[testcontainers]'``); ``TIEREDCACHE_USE_DOCKER=1`` / ``=0`` forces the
choice. Same interface as the local ``RedisServer`` / ``RedisClusterServer``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from scripts.services import (
    LOCALHOST,
    Service,
    ServiceError,
    cluster_problem,
    free_port,
    free_ports,
    log_tail,
    pings,
    wait_until,
)

__all__ = ["DockerRedisClusterServer", "DockerRedisServer", "docker_available", "use_docker"]


@functools.cache
def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def docker_available() -> bool:
    """Whether containers can be used: a ``docker`` client whose ``docker info`` succeeds.

    ``TIEREDCACHE_USE_DOCKER=1`` or ``=0`` forces the answer; otherwise the probe
    runs once per process (5 s timeout).
    """
    forced = os.environ.get("TIEREDCACHE_USE_DOCKER", "").strip().lower()
    if forced in {"1", "true", "yes"}:
        return True
    if forced in {"0", "false", "no"}:
        return False
    return _docker_engine_answers()


def use_docker() -> bool:
    """Docker when available; testcontainers must also be importable unless forced."""
    if not docker_available():
        return False
    forced = os.environ.get("TIEREDCACHE_USE_DOCKER", "").strip() != ""
    # Forced: let a missing testcontainers surface as a ServiceError naming the extra.
    return forced or importlib.util.find_spec("testcontainers") is not None


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
    return log_tail((stdout + stderr).decode(errors="replace"))


class _Container(Service):
    """A testcontainers container, stopped (and so removed) by ``stop()``."""

    _container: Any = None

    def stop(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        self._unregister()


class DockerRedisServer(_Container):
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
        self._host, self._port = LOCALHOST, port if port is not None else free_port()
        self._host_port = self._port
        self._extra_args = list(extra_args)
        self._workdir = workdir
        self._image = image
        self._start_timeout = start_timeout

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
            try:
                module = _testcontainers("testcontainers.community.redis")
            except ServiceError:
                module = _testcontainers("testcontainers.redis")
            container = module.RedisContainer(self._image)
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
        # Inside a container, testcontainers may give the bridge address and the
        # container port rather than 127.0.0.1 and the bound port.
        host = str(self._container.get_container_host_ip())
        self._host = LOCALHOST if host == "localhost" else host
        self._port = int(self._container.get_exposed_port(6379))
        if not wait_until(lambda: pings(self._host, self._port), self._start_timeout):
            raise ServiceError(
                f"redis container at {self._host}:{self._port} did not answer PING within "
                f"{self._start_timeout:g} s.\nlog tail:\n{_container_logs(self._container)}"
            )

    def _wrapped(self) -> Any:
        if self._container is None:
            raise ServiceError("the Redis container is not started")
        return self._container.get_wrapped_container()

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
    lines += [
        f"until redis-cli -p {port} ping >/dev/null 2>&1; do sleep 0.1; done" for port in ports
    ]
    lines.append(
        f"redis-cli --cluster create {' '.join(f'127.0.0.1:{p}' for p in ports)} --cluster-yes"
    )
    lines.append(f"exec tail -n +1 -F {' '.join(f'/data/{p}/redis.log' for p in ports)}")
    return "\n".join(lines)


class DockerRedisClusterServer(_Container):
    """``RedisClusterServer`` as one ``redis:7`` container running every master.

    Why one container: cluster nodes tell clients where slots live. All masters
    run in one network namespace, announce 127.0.0.1, and listen on the port
    numbers that are bound on the host, so the announced ``127.0.0.1:port``
    works from the host as well. This needs a Docker engine on this machine.
    """

    def __init__(
        self, masters: int = 3, *, image: str = "redis:7", start_timeout: float = 60.0
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self._masters = masters
        self._image = image
        self._start_timeout = start_timeout
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
        all_ports = free_ports(2 * self._masters)  # bus ports only need to be distinct
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
                problem[0] = cluster_problem(self.nodes)
                return problem[0] is None

            if not wait_until(ready, self._start_timeout, interval=0.1):
                raise ServiceError(
                    f"Redis Cluster container not ready within {self._start_timeout:g} s: "
                    f"{problem[0]}\nlog tail:\n{_container_logs(container)}"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        super().stop()
        self._ports = []
