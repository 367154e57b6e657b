"""The service fixtures start real servers that behave as the other tests assume."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from redis.cluster import RedisCluster

from scripts.services import (
    CLUSTER_SLOTS,
    PostgresServer,
    RedisClusterService,
    RedisServer,
    RedisService,
    ServiceError,
    redis_command,
)

AOF = ["--appendonly", "yes", "--appendfsync", "always"]


@pytest.mark.cluster
def test_cluster_assigns_all_slots_to_the_masters(
    redis_cluster_nodes: list[tuple[str, int]],
) -> None:
    """CLUSTER SLOTS covers 0..16383 exactly once, spread over all 3 masters."""
    host, port = redis_cluster_nodes[0]
    ranges = redis_command(host, port, "CLUSTER", "SLOTS")
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
        sizes = [redis_command(host, port, "DBSIZE") for host, port in redis_cluster_nodes]
        assert all(isinstance(size, int) and size > 0 for size in sizes)
        assert sum(size for size in sizes if isinstance(size, int)) == 100
    finally:
        client.close()


@pytest.mark.redis
def test_redis_url_points_to_an_empty_server(redis_url: str, redis_server: RedisService) -> None:
    """redis_url is the session server's URL and the server starts each test empty."""
    assert redis_url == redis_server.url == f"redis://{redis_server.host}:{redis_server.port}/0"
    assert redis_command(redis_server.host, redis_server.port, "DBSIZE") == 0
    redis_command(redis_server.host, redis_server.port, "SET", "left-behind", "1")


@pytest.mark.redis
def test_kill_then_restart_keeps_the_port_and_answers_ping(
    fresh_redis_server: RedisService,
) -> None:
    """After SIGKILL the server is down; restart() brings it back on the same port."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    fresh_redis_server.kill()
    with pytest.raises(OSError):
        redis_command(host, port, "PING", timeout=0.5)
    fresh_redis_server.restart()
    assert fresh_redis_server.port == port
    assert redis_command(host, port, "PING") == "PONG"


@pytest.mark.redis
@pytest.mark.parametrize("fresh_redis_server", [AOF], indirect=True)
def test_data_survives_kill_when_aof_is_on(fresh_redis_server: RedisService) -> None:
    """With appendfsync always, a key written before SIGKILL is there after restart."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    redis_command(host, port, "SET", "durable", "yes")
    fresh_redis_server.kill()
    fresh_redis_server.restart()
    assert redis_command(host, port, "GET", "durable") == b"yes"


@pytest.mark.redis
def test_default_server_forgets_data_on_restart(fresh_redis_server: RedisService) -> None:
    """Without persistence a restarted server is empty (tests rely on a clean restart)."""
    host, port = fresh_redis_server.host, fresh_redis_server.port
    redis_command(host, port, "SET", "volatile", "1")
    fresh_redis_server.restart()
    assert redis_command(host, port, "DBSIZE") == 0


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
