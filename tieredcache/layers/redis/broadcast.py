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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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


class Notifier:
    """The subscriber thread of one cache; see the module docstring."""

    def __init__(
        self,
        make_pubsub: Callable[[], Any],
        *,
        prefix: str,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[bool], None],
        on_error: Callable[[], None] = lambda: None,
        reconnect_delay: float = 0.5,
    ) -> None:
        self.origin = uuid.uuid4().hex
        self.inval_channel = invalidation_channel(prefix, namespace)
        self.fills_channel = fills_channel(prefix, namespace)
        self._make_pubsub = make_pubsub
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._on_error = on_error
        self._reconnect_delay = reconnect_delay
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.resyncs = 0

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
                # Wait for both subscription confirmations before declaring readiness.
                confirmed = 0
                while confirmed < 2 and not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "subscribe":
                        confirmed += 1
                if connected_before:
                    self.resyncs += 1
                self._on_resync(connected_before)
                connected_before = True
                self.ready.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["channel"], message["data"])
            except Exception as exc:  # any failure: reconnect after a pause
                self.ready.clear()
                self._on_error()
                log.warning("tieredcache notifier lost its subscription: %s", exc)
                self._stop.wait(self._reconnect_delay)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a broken one may fail too
                        pubsub.close()

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode()
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
            log.warning(
                "tieredcache ignored a malformed invalidation message %r: %s", raw[:200], exc
            )
            self._on_error()
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
    the other replicas. ``on_invalidate`` drops what another replica invalidated
    from this process; ``on_resync`` clears this process's in-process layers when
    invalidations may have been missed."""

    def __init__(
        self,
        redis: RedisLayer,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[], None],
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._notifier: Notifier | None = None
        self._subscribed_late = True
        self._lock = threading.Lock()

    def notifier(self) -> Notifier | None:
        notifier = self._notifier
        if notifier is None:
            redis = self.redis
            with self._lock:
                if self._notifier is None:
                    self._notifier = Notifier(
                        lambda: redis.sync_store().client.pubsub(),
                        prefix=redis.keyspace.prefix,
                        namespace=self.namespace,
                        on_invalidate=self._on_invalidate,
                        on_resync=self._resync,
                    )
                    # The first request waits for the subscription at most as long as
                    # Redis may take to connect (a few ms when it is up). If that runs
                    # out, what was cached before it is dropped once it is up.
                    self._subscribed_late = not self._notifier.start(wait=redis._timeouts[1])
                notifier = self._notifier
        return notifier

    def connect(self, timeout: float) -> bool:
        notifier = self.notifier()
        return True if notifier is None else notifier.ready.wait(timeout)

    def _resync(self, reconnected: bool) -> None:
        if not reconnected and not self._subscribed_late:
            return  # subscribed before anything was cached: nothing was missed
        if reconnected:
            log.warning(
                "tieredcache %s: broadcast reconnected; clearing in-process layers",
                self.namespace,
            )
        self._on_resync()

    def publish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        """Tell the other replicas to drop ``keys`` and ``tags`` (BackendError if Redis
        did not take it)."""
        notifier = self.notifier()
        if notifier is None:
            return True
        message = notifier.encode_invalidation(keys, tags)
        self.redis.sync_store().publish(notifier.inval_channel, message)
        return True

    async def apublish(self, keys: Sequence[CacheKey], tags: Sequence[Tag]) -> bool:
        notifier = self.notifier()
        if notifier is None:
            return True
        message = notifier.encode_invalidation(keys, tags)
        await self.redis.async_store().publish(notifier.inval_channel, message)
        return True

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.stop()
            self._notifier = None
