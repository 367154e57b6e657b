"""Shared pytest fixtures.

The first section holds only the *service* fixtures: real Redis, Redis Cluster and
PostgreSQL servers started on free 127.0.0.1 ports by ``scripts.services`` (local
processes, or testcontainers when Docker answers; ``TIEREDCACHE_USE_DOCKER=0/1``
forces it). Library fixtures go in their own section below it, not mixed in.
Nothing here installs anything: ``scripts/bootstrap.sh`` installs the servers.

A service that cannot start makes the tests that need it FAIL with the reason and
the server's log tail; they are never skipped.

Fixtures:

* ``redis_server`` (session): one standalone Redis for the whole run.
* ``redis_url`` (function): FLUSHALLs ``redis_server`` and returns its URL
  ("redis://127.0.0.1:PORT/0"); restarts the server if an earlier test killed it.
* ``redis_cluster`` (session): one 3-master Redis Cluster, all 16384 slots assigned.
* ``redis_cluster_nodes`` (function): FLUSHALLs every master and returns
  ``[(host, port), ...]``.
* ``postgres_server`` (session): a throwaway PostgreSQL 15 (``.dsn``,
  ``wal_level=logical``).
* ``fresh_redis_server`` (function): a dedicated, started Redis for a test that
  kills or restarts it; stopped afterwards. Extra ``redis-server`` arguments come
  by indirect parametrization::

      @pytest.mark.parametrize(
          "fresh_redis_server", [["--appendonly", "yes", "--appendfsync", "always"]],
          indirect=True,
      )
      def test_survives_restart(fresh_redis_server): ...

Library fixtures:

* ``clock`` (function): a ``tieredcache.testing.FakeClock`` at a fixed start.
* ``fill_lock_released`` (function): ``await fill_lock_released(layer, key)`` is
  whether the key's fill lock on that RedisLayer is gone within a second. Kept for
  ``tests/test_fastmiss.py`` until it becomes the parity suite; new tests write
  ``await await_until(lambda: layer.afill_lock_held(key), expect=False)``.

Waiting: tests wait for work on other threads, tasks or processes with
``tieredcache.testing.wait_until`` / ``await_until`` and move time with
``FakeClock``; a bare ``sleep`` is only for a delay that is itself under test (a
slow loader, a lock held for a while).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import pytest

from scripts import services
from scripts.services import PostgresServer, RedisClusterService, RedisService, ServiceError
from tieredcache.testing import FakeClock, await_until

if TYPE_CHECKING:
    from tieredcache import CacheKey, RedisLayer

# --------------------------------------------------------------------------- services


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a killed run, a CI time-out) ends the run like Ctrl-C does, so the
    fixtures' teardown stops the servers; the default action would leave them running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


_S = TypeVar("_S", RedisService, RedisClusterService, PostgresServer)


def _start(service: _S, what: str) -> _S:
    try:
        return service.start()
    except ServiceError as exc:
        reason = str(exc)
    # Outside the except block, so the report shows the reason without a chained traceback.
    pytest.fail(f"could not start {what}: {reason}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisService]:
    """One standalone Redis for the session; use ``redis_url`` to get it flushed."""
    server = _start(services.redis_server(), "Redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisService) -> str:
    """URL of the session Redis, emptied (FLUSHALL) before the test."""
    try:
        services.flushall(redis_server.host, redis_server.port)
    except Exception:  # redis.ConnectionError (an OSError or not), ServiceError
        # An earlier test stopped or killed the shared server: bring it back, same port.
        try:
            redis_server.restart()
            services.flushall(redis_server.host, redis_server.port)
        except Exception as exc:
            pytest.fail(f"the session Redis at {redis_server.url} is unusable: {exc}")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterService]:
    """One 3-master Redis Cluster for the session; every slot is assigned."""
    cluster = _start(services.redis_cluster(), "Redis Cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_nodes(redis_cluster: RedisClusterService) -> list[tuple[str, int]]:
    """``(host, port)`` of every cluster master, all emptied (FLUSHALL) before the test."""
    nodes = redis_cluster.nodes
    for host, port in nodes:
        try:
            services.flushall(host, port)
        except Exception as exc:
            pytest.fail(f"cannot flush Redis Cluster node {host}:{port}: {exc}")
    return nodes


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL 15 for the session (``.dsn``, logical replication on)."""
    server = _start(PostgresServer(), "PostgreSQL")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_server(request: pytest.FixtureRequest) -> Iterator[RedisService]:
    """A started Redis of the test's own, free to kill and restart; stopped afterwards.

    ``request.param`` (indirect parametrization) is a list of extra
    ``redis-server`` arguments, e.g. to turn on AOF persistence.
    """
    extra_args: list[str] = list(getattr(request, "param", []))
    server = _start(services.redis_server(extra_args=extra_args), "Redis")
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- library


@pytest.fixture
def clock() -> FakeClock:
    """The fake clock for TTL, stale-window and XFetch tests: moved, never slept on."""
    return FakeClock()


@pytest.fixture
def fill_lock_released() -> Callable[[RedisLayer, CacheKey], Awaitable[bool]]:
    """Whether a key's fill lock is gone within a second: a release handed to a
    background task (a cancelled or failed load) lands a few loop turns later."""

    async def released(layer: RedisLayer, key: CacheKey) -> bool:
        try:
            await await_until(lambda: layer.afill_lock_held(key), expect=False, timeout=1.0)
        except AssertionError:
            return False
        return True

    return released
