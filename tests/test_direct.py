"""The sync fast path: per-thread sockets for GET and EVALSHA, against real Redis."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest
import redis
import redis.exceptions

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.layers.redis.wire.direct import DirectClient, DirectConnections, connection_params

pytestmark = pytest.mark.redis


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_the_sync_store_of_a_plain_redis_url_uses_it(redis_url: str) -> None:
    layer = RedisLayer(url=redis_url)
    assert isinstance(layer.sync_store().client, DirectClient)
    assert not isinstance(
        RedisLayer(url=redis_url, fast_path=False).sync_store().client, DirectClient
    )
    assert connection_params(redis.Redis.from_url("rediss://127.0.0.1:1/0"), False) is None
    layer.close()


def test_each_thread_has_its_own_socket_and_reads_its_own_replies(redis_url: str) -> None:
    client = DirectClient(
        redis.Redis.from_url(redis_url),
        connection_params(redis.Redis.from_url(redis_url), False) or {},
    )
    client.client.mset({f"dt:{n}": n for n in range(8)})
    errors: list[BaseException] = []
    sockets: set[int] = set()

    def read(n: int) -> None:
        try:
            for _ in range(200):
                assert client.get(f"dt:{n}") == str(n).encode()
            sockets.add(id(client.connections._local.conn))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(sockets) == 8
    client.close()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get("dt:0")  # closed for good


def test_an_error_reply_is_raised_and_the_socket_stays_usable(redis_url: str) -> None:
    base = redis.Redis.from_url(redis_url)
    client = DirectClient(base, connection_params(base, False) or {})
    base.set("dt:x", b"1")
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    conn = client.connections._local.conn
    assert client.get("dt:x") == b"1"
    assert client.connections._local.conn is conn
    script = client.register_script("return ARGV[1] .. '!'")
    base.script_flush()
    assert script(args=["hi"]) == b"hi!"  # NOSCRIPT: loaded again, then run
    client.close()


def test_a_restarted_server_is_reconnected_to(fresh_redis_server: Any) -> None:
    connections = DirectConnections(port=_port(fresh_redis_server.url))
    assert connections.execute("SET", "k", "v") == b"OK"
    fresh_redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        connections.execute("GET", "k")
    fresh_redis_server.restart()
    assert connections.execute("PING") == b"PONG"
    connections.close()


def test_a_silent_server_times_out_and_the_next_command_reconnects() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    answer = threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=reply, args=(conn,), daemon=True).start()

    def reply(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1024):
                if answer.is_set():
                    conn.sendall(b"+PONG\r\n")

    threading.Thread(target=serve, daemon=True).start()
    connections = DirectConnections(port=listener.getsockname()[1], timeout=0.2)
    began = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        connections.execute("PING")
    assert 0.15 < time.monotonic() - began < 1.0
    answer.set()
    assert connections.execute("PING") == b"PONG"
    assert len(accepted) == 2  # the timed-out socket was dropped
    connections.close()
    listener.close()


def test_auth_and_db_selection(fresh_redis_server: Any) -> None:
    """The per-thread socket sends AUTH and SELECT from the URL; a wrong password raises
    AuthenticationError."""
    host_port = fresh_redis_server.url.split("//", 1)[1].split("/", 1)[0]
    redis.Redis.from_url(fresh_redis_server.url).config_set("requirepass", "s3cret")
    admin = redis.Redis.from_url(f"redis://:s3cret@{host_port}/3")
    admin.set("in-db-3", b"yes")
    good = redis.Redis.from_url(f"redis://:s3cret@{host_port}/3")
    client = DirectClient(good, connection_params(good, False) or {})
    assert client.get("in-db-3") == b"yes"
    bad = redis.Redis.from_url(f"redis://:nope@{host_port}/3")
    wrong = DirectClient(bad, connection_params(bad, False) or {})
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.get("in-db-3")
    client.close()
    wrong.close()
    admin.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_socket(redis_url: str) -> None:
    connections = DirectConnections(port=_port(redis_url))
    connections.execute("SET", "dt:fork", "parent")
    parent_socket = connections._local.conn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must not talk on the parent's socket
        ok = connections.execute("GET", "dt:fork") == b"parent"
        ok = ok and connections._local.conn is not parent_socket
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert connections.execute("GET", "dt:fork") == b"parent"  # the parent's, intact
    assert connections._local.conn is parent_socket
    connections.close()


def test_a_sync_cache_reads_and_fills_through_it(redis_url: str) -> None:
    memory = MemoryLayer()
    layer = RedisLayer(url=redis_url, key_prefix="dt")
    cache = TieredCache("dt", [memory, layer], broadcast=False)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def item(n: int) -> dict[str, int]:
        calls.append(n)
        return {"n": n}

    with tenant_scope("acme"):
        assert [item(n) for n in range(20)] == [{"n": n} for n in range(20)]
        memory.clear()
        assert [item(n) for n in range(20)] == [{"n": n} for n in range(20)]
    assert calls == list(range(20))
    stats = cache.stats().layers["redis"]
    assert (stats.hits, stats.errors) == (20, 0)
    cache.close()


def test_the_socket_of_a_thread_that_ended_is_closed(redis_url: str) -> None:
    import gc

    base = redis.Redis.from_url(redis_url)
    client = DirectClient(base, connection_params(base, False) or {})
    base.set("dt:t", b"1")

    def read() -> None:
        assert client.get("dt:t") == b"1"

    for _ in range(30):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    gc.collect()
    assert len(client.connections._open) == 0  # one per live thread, none per dead one
    client.close()


def test_a_client_with_a_credential_provider_keeps_redis_py(fresh_redis_server: Any) -> None:
    from redis.credentials import UsernamePasswordCredentialProvider

    redis.Redis.from_url(fresh_redis_server.url).config_set("requirepass", "s3cret")
    host, port = fresh_redis_server.url.split("//", 1)[1].split("/", 1)[0].split(":")
    provider = UsernamePasswordCredentialProvider(password="s3cret")
    client = redis.Redis(host=host, port=int(port), credential_provider=provider)
    assert connection_params(client, False) is None  # fetched per connection: not ours
    layer = RedisLayer(client=client)
    cache = TieredCache("dt", [layer], broadcast=False)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def item(n: int) -> int:
        calls.append(n)
        return n

    with tenant_scope("acme"):
        assert [item(1), item(1), item(1)] == [1, 1, 1]
    assert calls == [1]
    assert cache.stats().layers["redis"].errors == 0
    cache.close()
