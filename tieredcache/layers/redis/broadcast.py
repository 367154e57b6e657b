"""Redis pub/sub between replicas: invalidations for every in-process layer, fill wake-ups.

One daemon thread per cache subscribes to two channels of its namespace:

- ``{prefix}:inval:{namespace}``: JSON ``{"o": origin, "k": [keys], "t": [tags]}``.
  Every replica drops those keys and tags from its in-process layers. The CDC
  worker publishes the same messages.
- ``{prefix}:fills:{namespace}``: a full key, published when a fill lock that
  a process marked as waited for is released; the waiting processes wake up
  instead of polling. Fills nobody waits for are not published, so the traffic
  on this channel is the contended fills, not every fill.

The subscriber starts on first use; that request waits for it at most as long
as Redis may take to connect. Invalidations from other replicas can be missed
before it is subscribed and while a broken subscription reconnects, so when
the subscription comes up late or comes back, the in-process layers are
cleared: a cold L1 is slower, a stale one is wrong. ``TieredCache.connect()``
subscribes up front.

Liveness. A subscription can die silently: behind a NAT or a load balancer that
forgets the flow, the socket stays open and simply receives nothing (half-open
TCP), and a subscriber that only listens would wait forever while every other
replica's invalidations are lost. So the subscriber PINGs on its own connection
every ``ping_interval`` seconds; a PONG that does not come back within
``ping_timeout`` (or subscription confirmations that do not, when subscribing)
declares the subscription dead: ``on_down`` is called at once, the connection is
torn down and made again, and once the new subscription is confirmed the
in-process layers are resynced and ``on_up`` is called. Between the two, this
process has no way to hear invalidations, so whoever wires ``on_down`` should
stop serving from (and filling) its in-process layers. TCP keepalive is set on
the subscription's socket as well, so the kernel also notices a dead peer. A
message on the invalidation channel that cannot be decoded triggers a resync
too: what it said is unknown, so anything may be stale.

``publish_only=True`` (the CDC worker): invalidations are published, and no
subscriber thread is ever started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ...keys import CacheKey, Tag
from .keyspace import fills_channel, invalidation_channel

if TYPE_CHECKING:
    from . import RedisLayer

__all__ = ["InvalidationMessage", "Notifier", "Replicas"]

log = logging.getLogger("tieredcache.broadcast")


class InvalidationMessage(msgspec.Struct, omit_defaults=True):
    """The wire form of a broadcast invalidation (keys and tags as ``namespace:tenant:...``)."""

    o: str = ""
    k: list[str] = []
    t: list[str] = []


def parse_key(full: str) -> CacheKey:
    namespace, tenant, body = full.split(":", 2)
    return CacheKey(namespace, tenant, body)


def parse_tag(full: str) -> Tag:
    namespace, tenant, name = full.split(":", 2)
    return Tag(namespace, tenant, name)


class _Waiter:
    __slots__ = ("event", "futures", "refs")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.refs = 0

    def wake(self) -> None:
        self.event.set()
        for loop, future in self.futures:
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _SubscriptionLostError(Exception):
    """The subscription did not prove itself alive in time (internal: it reconnects)."""


def _call(callback: Callable[[], None], what: str) -> None:
    try:
        callback()
    except Exception:  # a broken callback must not stop the subscriber thread
        log.exception("tieredcache broadcast %s callback failed", what)


class Notifier:
    """The subscriber thread of one cache; see the module docstring.

    ``on_resync(reason)``: invalidations may have been missed (``reason`` is None
    for the first subscription, which the caller may skip if nothing was cached
    before it). ``on_down()`` / ``on_up()``: the subscription stopped / started
    being proven alive (see the module docstring).
    """

    def __init__(
        self,
        make_pubsub: Callable[[], Any],
        *,
        prefix: str,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[str | None], None],
        on_error: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
        on_up: Callable[[], None] = lambda: None,
        reconnect_delay: float = 0.5,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        keepalive: bool = True,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")
        self.origin = uuid.uuid4().hex
        self.inval_channel = invalidation_channel(prefix, namespace)
        self.fills_channel = fills_channel(prefix, namespace)
        self._make_pubsub = make_pubsub
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._on_error = on_error
        self._on_down = on_down
        self._on_up = on_up
        self._reconnect_delay = reconnect_delay
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.keepalive = keepalive
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set while the subscription is proven alive
        self._thread: threading.Thread | None = None
        self._pings = 0
        # Counters, for tests and metrics: resyncs after the first subscription,
        # subscriptions declared dead (no PONG, no confirmation, an error), messages
        # that could not be decoded.
        self.resyncs = 0
        self.losses = 0
        self.undecodable = 0

    @property
    def up(self) -> bool:
        """Whether the subscription is proven alive now."""
        return self.ready.is_set()

    # -- lifecycle ---------------------------------------------------------
    def start(self, wait: float = 2.0) -> bool:
        """Start the thread once; wait up to ``wait`` s for the subscription."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"tieredcache-notifier-{self.inval_channel}", daemon=True
                )
                self._thread.start()
        return self.ready.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=3)
        self._thread = None

    def _run(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._make_pubsub()
                pubsub.subscribe(self.inval_channel, self.fills_channel)
                self._set_keepalive(pubsub)
                self._confirm(pubsub)
                if self._stop.is_set():
                    return
                # Subscribed first, then cleared: an invalidation published from now on
                # reaches this process, and anything cached before may be stale.
                if connected_before:
                    self.resyncs += 1
                self._on_resync("reconnected" if connected_before else None)
                connected_before = True
                self.ready.set()
                _call(self._on_up, "on_up")
                self._listen(pubsub)
            except Exception as exc:  # any failure: reconnect after a pause
                was_up = self.ready.is_set()
                self.ready.clear()
                self.losses += 1
                if was_up:
                    _call(self._on_down, "on_down")
                self._on_error()
                log.warning("tieredcache notifier lost its subscription: %s", exc)
                self._stop.wait(self._reconnect_delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken one may fail too
                        pubsub.close()

    def _confirm(self, pubsub: Any) -> None:
        """Wait for both subscription confirmations, at most ``ping_timeout``."""
        deadline = time.monotonic() + self.ping_timeout
        confirmed = 0
        while confirmed < 2 and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _SubscriptionLostError(
                    f"no subscription confirmation within {self.ping_timeout} s"
                )
            message = pubsub.get_message(timeout=min(remaining, 0.1))
            if message and message.get("type") == "subscribe":
                confirmed += 1

    def _listen(self, pubsub: Any) -> None:
        """Dispatch messages and PING every ``ping_interval``; raise when a PONG is late."""
        next_ping = time.monotonic() + self.ping_interval
        pending: bytes | None = None  # the token of the PING awaiting its PONG
        sent_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if pending is None and now >= next_ping:
                self._pings += 1
                token = f"tc-live-{self.origin}-{self._pings}"
                pubsub.ping(token)
                pending, sent_at = token.encode(), now
            elif pending is not None and now - sent_at > self.ping_timeout:
                raise _SubscriptionLostError(
                    f"no PONG within {self.ping_timeout} s on {self.inval_channel}"
                )
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "message":
                self._dispatch(message["channel"], message["data"])
            elif kind == "pong" and pending is not None:
                data = message.get("data")
                if (data.encode() if isinstance(data, str) else data) == pending:
                    pending = None
                    next_ping = time.monotonic() + self.ping_interval

    def _set_keepalive(self, pubsub: Any) -> None:
        """TCP keepalive on the subscription's socket: the kernel probes an idle peer
        too (best effort: a Unix socket, or a client without ``_sock``, has none)."""
        sock = getattr(getattr(pubsub, "connection", None), "_sock", None)
        if not self.keepalive or not isinstance(sock, socket.socket):
            return
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        idle = max(1, int(self.ping_interval + self.ping_timeout))
        options = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
            # Data sent (a PING) and not acknowledged for this long kills the connection.
            (
                socket.IPPROTO_TCP,
                getattr(socket, "TCP_USER_TIMEOUT", None),
                int((self.ping_interval + self.ping_timeout) * 1000),
            ),
        ]
        for level, option, value in options:
            if option is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, option, value)

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode(errors="replace")
        raw = data.encode() if isinstance(data, str) else data
        if channel == self.fills_channel:
            with self._lock:
                waiter = self._waiters.get(raw.decode(errors="replace"))
            if waiter is not None:
                waiter.wake()
            return
        try:
            message = msgspec.json.decode(raw, type=InvalidationMessage)
            if message.o == self.origin:
                return
            keys = [parse_key(k) for k in message.k]
            tags = [parse_tag(t) for t in message.t]
        except (msgspec.DecodeError, ValueError) as exc:
            # Someone meant to invalidate something; what is unknown, so all of it.
            self.undecodable += 1
            log.warning(
                "tieredcache could not decode an invalidation message %r (%s); "
                "clearing the in-process layers",
                raw[:200],
                exc,
            )
            self._on_error()
            self.resyncs += 1
            self._on_resync("undecodable message")
            return
        self._on_invalidate(keys, tags)

    # -- fill waiters ---------------------------------------------------------
    def _waiter(self, full_key: str) -> _Waiter:
        waiter = self._waiters.get(full_key)
        if waiter is None or waiter.event.is_set():
            waiter = self._waiters[full_key] = _Waiter()
        waiter.refs += 1
        return waiter

    def register(self, full_key: str) -> _Waiter:
        """A waiter woken when the fill lock of ``full_key`` is released."""
        with self._lock:
            return self._waiter(full_key)

    def register_async(self, full_key: str) -> tuple[_Waiter, asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            waiter = self._waiter(full_key)
            waiter.futures.append((loop, future))
        return waiter, future

    def unregister(self, full_key: str, waiter: _Waiter) -> None:
        with self._lock:
            waiter.refs -= 1
            waiter.futures = [(loop, f) for loop, f in waiter.futures if not f.done()]
            if waiter.refs <= 0 and self._waiters.get(full_key) is waiter:
                del self._waiters[full_key]

    def encode_invalidation(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bytes:
        message = InvalidationMessage(self.origin, [k.full for k in keys], [t.full for t in tags])
        return msgspec.json.encode(message)


class Replicas:
    """One cache's side of the broadcast: its subscriber, and its invalidations to
    the other replicas.

    ``on_invalidate`` drops what another replica invalidated from this process;
    ``on_resync`` clears this process's in-process layers when invalidations may
    have been missed (a late or renewed subscription, an undecodable message).
    ``on_down`` is called when a subscription that was up stops being proven
    alive (no PONG within ``ping_timeout``, an error), ``on_up`` when a
    subscription is proven again, after ``on_resync``: between the two this
    process hears nothing, so its in-process layers should be bypassed. Both are
    called on the subscriber thread; before the first subscription the state is
    down (see :attr:`up`). ``publish_only=True`` publishes and never starts a
    subscriber (``notifier()`` is None).

    >>> replicas = Replicas(  # doctest: +SKIP
    ...     layer, "app", drop, clear, on_down=bypass, on_up=resume
    ... )
    """

    def __init__(
        self,
        redis: RedisLayer,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[], None],
        *,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
        publish_only: bool = False,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        keepalive: bool = True,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("Replicas ping_interval and ping_timeout must be positive")
        self.redis = redis
        self.namespace = namespace
        self.publish_only = publish_only
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.keepalive = keepalive
        self.origin = uuid.uuid4().hex
        self.channel = invalidation_channel(redis.keyspace.prefix, namespace)
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._on_down = on_down or (lambda: None)
        self._on_up = on_up or (lambda: None)
        self._notifier: Notifier | None = None
        self._subscribed_late = True
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        """Whether this process hears the other replicas now (a subscription proven
        alive); False before the first subscription, and always when publish-only."""
        notifier = self._notifier
        return notifier is not None and notifier.up

    def health(self) -> dict[str, float]:
        """The subscription's record: ``up`` (1/0), ``losses`` (subscriptions found
        dead), ``resyncs`` (in-process layers cleared for it), ``undecodable``."""
        notifier = self._notifier
        if notifier is None:
            return {"up": 0.0, "losses": 0.0, "resyncs": 0.0, "undecodable": 0.0}
        return {
            "up": 1.0 if notifier.up else 0.0,
            "losses": float(notifier.losses),
            "resyncs": float(notifier.resyncs),
            "undecodable": float(notifier.undecodable),
        }

    def notifier(self) -> Notifier | None:
        notifier = self._notifier
        if notifier is None and not self.publish_only:
            redis = self.redis
            with self._lock:
                if self._notifier is None:
                    self._notifier = Notifier(
                        lambda: redis.sync_store().client.pubsub(),
                        prefix=redis.keyspace.prefix,
                        namespace=self.namespace,
                        on_invalidate=self._on_invalidate,
                        on_resync=self._resync,
                        on_down=self._down,
                        on_up=self._on_up,
                        ping_interval=self.ping_interval,
                        ping_timeout=self.ping_timeout,
                        keepalive=self.keepalive,
                    )
                    self._notifier.origin = self.origin
                    # The first request waits for the subscription at most as long as
                    # Redis may take to connect (a few ms when it is up). If that runs
                    # out, what was cached before it is dropped once it is up.
                    self._subscribed_late = not self._notifier.start(wait=redis._timeouts[1])
                notifier = self._notifier
        return notifier

    def connect(self, timeout: float) -> bool:
        """Start the subscriber and wait up to ``timeout`` for it (True when
        publish-only: there is nothing to subscribe to)."""
        notifier = self.notifier()
        return True if notifier is None else notifier.ready.wait(timeout)

    def _down(self) -> None:
        log.warning(
            "tieredcache %s: broadcast subscription lost; invalidations from other "
            "replicas are not heard until it is back",
            self.namespace,
        )
        self._on_down()

    def _resync(self, reason: str | None) -> None:
        if reason is None and not self._subscribed_late:
            return  # subscribed before anything was cached: nothing was missed
        if reason is not None:
            log.warning(
                "tieredcache %s: broadcast %s; clearing in-process layers",
                self.namespace,
                reason,
            )
        self._on_resync()

    def _encode(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bytes:
        message = InvalidationMessage(self.origin, [k.full for k in keys], [t.full for t in tags])
        return msgspec.json.encode(message)

    def publish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        """Tell the other replicas to drop ``keys`` and ``tags`` (BackendError if Redis
        did not take it)."""
        self.notifier()  # a replica hears others from its first invalidation on
        self.redis.sync_store().publish(self.channel, self._encode(keys, tags))
        return True

    async def apublish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        self.notifier()
        await self.redis.async_store().publish(self.channel, self._encode(keys, tags))
        return True

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
