"""The service fixtures start real servers that behave as the other tests assume."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest
from redis import Redis
from redis.cluster import RedisCluster

from scripts.services import (
    CLUSTER_SLOTS,
    PostgresServer,
    RedisClusterService,
    RedisServer,
    RedisService,
    ServiceError,
    require,
)

AOF = ["--appendonly", "yes", "--appendfsync", "always"]


def _node(host: str, port: int) -> Redis:
    return Redis(host=host, port=port, socket_timeout=2)


@pytest.mark.cluster
def test_cluster_assigns_all_slots_to_the_masters(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    """CLUSTER SLOTS covers 0..16383 exactly once, spread over all 3 masters."""
    host, port = redis_cluster_nodes[0]
    with Redis(host=host, port=port) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    assert isinstance(ranges, list)
    covered: set[int] = set()
    owners: set[int] = set()
    for entry in ranges:
        assert isinstance(entry, list)
        start, end, master = entry[0], entry[1], entry[2]
        assert isinstance(start, int) and isinstance(end, int) and isinstance(master, list)
        owner_port = master[1]
        assert isinstance(owner_port, int)
        covered.update(range(start, end + 1))
        owners.add(owner_port)
    assert covered == set(range(CLUSTER_SLOTS))
    assert owners == {node_port for _, node_port in redis_cluster_nodes}


@pytest.mark.cluster
def test_cluster_serves_keys_in_every_slot_range(
    redis_cluster: RedisClusterService, redis_cluster_nodes: list[tuple[str, int]]
) -> None:
    """redis-py's RedisCluster sets and reads back 100 keys spread over all masters."""
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        for i in range(100):
            client.set(f"key:{i}", i)
        assert [client.get(f"key:{i}") for i in range(100)] == [str(i).encode() for i in range(100)]
        sizes = [_node(host, port).dbsize() for host, port in redis_cluster_nodes]
        assert all(isinstance(size, int) and size > 0 for size in sizes)
        assert sum(size for size in sizes if isinstance(size, int)) == 100
    finally:
        client.close()


@pytest.mark.redis
def test_redis_url_points_to_an_empty_server(redis_url: str, redis_server: RedisService) -> None:
    """redis_url is the session server's URL and the server starts each test empty."""
    assert redis_url == redis_server.url == f"redis://{redis_server.host}:{redis_server.port}/0"
    with _node(redis_server.host, redis_server.port) as client:
        assert client.dbsize() == 0
        assert client.set("left-behind", "1") is True


@pytest.mark.redis
def test_kill_then_restart_keeps_the_port_and_answers_ping(
    fresh_redis_server: RedisService,
) -> None:
    """After SIGKILL the server is down; restart() brings it back on the same port."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    fresh_redis_server.kill()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=0.5)
    fresh_redis_server.restart()
    assert fresh_redis_server.port == port
    with _node(host, port) as client:
        assert client.ping() is True


@pytest.mark.redis
@pytest.mark.parametrize("fresh_redis_server", [AOF], indirect=True)
def test_data_survives_kill_when_aof_is_on(fresh_redis_server: RedisService) -> None:
    """With appendfsync always, a key written before SIGKILL is there after restart."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    with _node(host, port) as client:
        assert client.set("durable", "yes") is True
    fresh_redis_server.kill()
    fresh_redis_server.restart()
    with _node(host, port) as client:
        assert client.get("durable") == b"yes"


@pytest.mark.redis
def test_default_server_forgets_data_on_restart(fresh_redis_server: RedisService) -> None:
    """Without persistence a restarted server is empty (tests rely on a clean restart)."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    with _node(host, port) as client:
        assert client.set("volatile", "1") is True
    fresh_redis_server.restart()
    with _node(host, port) as client:
        assert client.dbsize() == 0


def test_start_failure_raises_service_error_with_the_log_tail(tmp_path: Path) -> None:
    """A server that cannot start raises ServiceError quoting its own log, not a timeout."""
    server = RedisServer(extra_args=["--no-such-directive", "1"], workdir=tmp_path)
    with pytest.raises(ServiceError, match="no-such-directive"):
        server.start()
    assert not server.running


@pytest.mark.postgres
def test_postgres_accepts_a_query_with_logical_wal(postgres_server: PostgresServer) -> None:
    """The throwaway PostgreSQL answers over TCP and is ready for logical decoding."""
    with psycopg.connect(postgres_server.dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1, current_setting('wal_level')").fetchone()
    assert row == (1, "logical")


def test_a_missing_binary_is_an_error_naming_bootstrap_not_an_install() -> None:
    """Nothing installs system packages on demand: a missing server names bootstrap.sh."""
    with pytest.raises(ServiceError, match=r"scripts/bootstrap\.sh.*no-such-package"):
        require("tieredcache-no-such-binary", "no-such-package")


@pytest.mark.postgres
def test_postgres_restart_keeps_its_data_and_port() -> None:
    """PostgresServer.restart() (fast shutdown, start) keeps the data directory and port."""
    with PostgresServer() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int)")
        port = server.port
        server.restart()
        assert server.port == port
        with psycopg.connect(server.dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
