"""Liveness of the replica subscription (issue 9 #3, issue 10 "broadcast you can rely on").

A subscription can die silently (half-open TCP behind a NAT or load balancer):
the subscriber must notice within a bound (PING / PONG), say so (``on_down``),
reconnect, resync the in-process layers and say so (``on_up``). A message it
cannot decode triggers a resync; a publish-only broadcast starts no thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope
from tieredcache.keys import CacheKey
from tieredcache.layers.redis.broadcast import Replicas
from tieredcache.testing import wait_until

pytestmark = pytest.mark.redis


class BlackHoleProxy:
    """A TCP proxy in front of Redis that can go silent: :meth:`black_hole` makes every
    open connection swallow what either side sends without closing anything (a
    half-open flow), and connections opened meanwhile do the same; after
    :meth:`heal`, new connections are forwarded again (the swallowed ones stay dead,
    as a forgotten NAT flow does)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.healthy = True
        self._flows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def black_hole(self) -> None:
        with self._lock:
            self.healthy = False
            for flow in self._flows:
                flow["dead"] = True

    def heal(self) -> None:
        with self._lock:
            self.healthy = True

    def _accept(self) -> None:
        while not self._closed:
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                flow = {"dead": not self.healthy, "sockets": (client, upstream)}
                self._flows.append(flow)
            thread = threading.Thread(target=self._pump, args=(flow,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, flow: dict[str, Any]) -> None:
        client, upstream = flow["sockets"]
        peer = {client: upstream, upstream: client}
        try:
            while not self._closed:
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not flow["dead"]:
                        peer[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                sock.close()

    def close(self) -> None:
        self._closed = True
        for thread in self._threads:
            thread.join(timeout=2)
        self.listener.close()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    return host, int(port)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[BlackHoleProxy]:
    proxy = BlackHoleProxy(_address(redis_url))
    yield proxy
    proxy.close()


class Recorder:
    """The callbacks of a :class:`Replicas`, in the order they came."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.invalidated: list[str] = []

    def invalidate(self, keys: Any, tags: Any) -> None:
        self.invalidated.extend(k.full for k in keys)

    def replicas(self, layer: RedisLayer, namespace: str, **options: Any) -> Replicas:
        return Replicas(
            layer,
            namespace,
            self.invalidate,
            lambda: self.events.append("resync"),
            on_down=lambda: self.events.append("down"),
            on_up=lambda: self.events.append("up"),
            **options,
        )


def _publish_from_elsewhere(url: str, channel: str, full_key: str) -> None:
    """Another replica's invalidation, straight to Redis (not through the proxy)."""
    client = redis.Redis.from_url(url)
    message = b'{"o":"elsewhere","k":["%s"]}' % full_key.encode()
    client.publish(channel, message)
    client.close()


def test_a_black_holed_subscription_goes_down_within_the_bound_and_comes_back(
    redis_url: str, proxy: BlackHoleProxy
) -> None:
    """Half-open: on_down within ping_interval + ping_timeout, invalidations meanwhile
    are lost; after the proxy heals, a new subscription, a resync, then on_up."""
    layer = RedisLayer(url=proxy.url, key_prefix="bh")
    recorder = Recorder()
    replicas = recorder.replicas(layer, "bh", ping_interval=0.1, ping_timeout=0.3)
    try:
        assert replicas.connect(2.0)
        channel = replicas.channel
        wait_until(lambda: "up" in recorder.events, message="first subscription up")
        assert replicas.up
        _publish_from_elsewhere(redis_url, channel, "bh:acme:k1")
        wait_until(lambda: recorder.invalidated == ["bh:acme:k1"], message="heard k1")
        recorder.events.clear()

        proxy.black_hole()
        lost_at = time.monotonic()
        wait_until(lambda: "down" in recorder.events, timeout=3.0, message="on_down")
        noticed = time.monotonic() - lost_at
        assert not replicas.up
        # The bound is 0.4 s (+ one 0.1 s poll); 3 s of slack keeps a loaded box honest.
        assert noticed < 3.0
        _publish_from_elsewhere(redis_url, channel, "bh:acme:lost")  # nobody hears it

        proxy.heal()
        wait_until(lambda: recorder.events[-1:] == ["up"], timeout=5.0, message="on_up")
        assert recorder.events == ["down", "resync", "up"]  # cleared before trusted again
        assert replicas.up
        _publish_from_elsewhere(redis_url, channel, "bh:acme:k2")
        wait_until(lambda: "bh:acme:k2" in recorder.invalidated, message="heard k2")
        assert "bh:acme:lost" not in recorder.invalidated
    finally:
        replicas.stop()
        layer.close()


def test_a_cache_behind_a_black_hole_clears_its_in_process_layer(
    redis_url: str, proxy: BlackHoleProxy
) -> None:
    """The cache's own wiring, default liveness settings: what was cached in
    process before the subscription died is gone once it is back."""
    memory = MemoryLayer()
    cache = TieredCache("bhc", [memory, RedisLayer(url=proxy.url, key_prefix="bhc")])

    @cache.cached(ttl=60)
    def load(item: int) -> int:
        return item

    try:
        assert cache.connect(2.0)
        with tenant_scope("acme"):
            assert load(1) == 1
        assert len(memory) == 1
        notifier = cache._replicas.notifier()
        proxy.black_hole()
        wait_until(lambda: not notifier.ready.is_set(), timeout=5.0, message="noticed")
        # While it cannot hear the other replicas, this process keeps nothing in-process.
        wait_until(lambda: memory.suspended, timeout=5.0, message="in-process layer suspended")
        assert len(memory) == 0
        proxy.heal()
        wait_until(lambda: notifier.ready.is_set(), timeout=5.0, message="subscribed again")
        wait_until(lambda: not memory.suspended, timeout=5.0, message="in-process layer back")
        assert len(memory) == 0
        with tenant_scope("acme"):
            assert load(1) == 1
        assert len(memory) == 1
    finally:
        cache.close()


def test_an_undecodable_invalidation_message_resyncs(redis_url: str) -> None:
    """What a message that cannot be decoded said is unknown: everything in process
    may be stale, so it is cleared; the subscription itself stays up."""
    layer = RedisLayer(url=redis_url, key_prefix="bad")
    recorder = Recorder()
    replicas = Replicas(layer, "bad", recorder.invalidate, lambda: recorder.events.append("resync"))
    client = redis.Redis.from_url(redis_url)
    try:
        assert replicas.connect(2.0)
        recorder.events.clear()
        channel = replicas.notifier().inval_channel
        for garbage in (b"\xff not json", b'{"k": "not a list"}', b'{"k": ["no-colons"]}'):
            client.publish(channel, garbage)
        wait_until(lambda: recorder.events.count("resync") == 3, message="three resyncs")
        notifier = replicas.notifier()
        assert notifier is not None and notifier.ready.is_set()
        assert notifier.undecodable == 3
        _publish_from_elsewhere(redis_url, channel, "bad:acme:k")
        wait_until(lambda: recorder.invalidated == ["bad:acme:k"], message="still listening")
    finally:
        client.close()
        replicas.stop()
        layer.close()


def _notifier_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tieredcache-notifier")]


def test_publish_only_publishes_and_starts_no_subscriber(redis_url: str) -> None:
    """The CDC worker's mode: invalidations reach the replicas, no thread is started."""
    before = _notifier_threads()
    layer = RedisLayer(url=redis_url, key_prefix="po")
    recorder = Recorder()
    replicas = recorder.replicas(layer, "po", publish_only=True)
    listener = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    try:
        listener.subscribe(replicas.channel)
        listener.get_message(timeout=1.0)  # the confirmation
        assert replicas.connect(1.0)
        assert replicas.notifier() is None
        assert replicas.publish([CacheKey("po", "acme", "f:1")], [])
        message = wait_until(lambda: listener.get_message(timeout=0.1), message="published")
        assert b"po:acme:f:1" in message["data"]
        assert _notifier_threads() == before
        assert not replicas.up and recorder.events == []
    finally:
        listener.close()
        replicas.stop()
        layer.close()


async def test_publish_only_apublish_starts_no_subscriber(redis_url: str) -> None:
    before = _notifier_threads()
    layer = RedisLayer(url=redis_url, key_prefix="po")
    replicas = Replicas(layer, "po", lambda k, t: None, lambda: None, publish_only=True)
    try:
        assert await replicas.apublish([CacheKey("po", "acme", "f:1")], [])
        assert _notifier_threads() == before
    finally:
        replicas.stop()
        await layer.aclose()
        with contextlib.suppress(Exception):
            layer.close()
