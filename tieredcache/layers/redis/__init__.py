"""The Redis layer: standalone Redis or Redis Cluster, from sync and async code.

One :class:`RedisLayer` serves both sync and async callers: it builds a sync
client and, per event loop, an async client, lazily on first use (no
connection is opened by the constructor). The commands themselves live once
in ``_async/store.py`` (``_sync/store.py`` is generated from it); the wire
code of the fast path is in ``wire/``; ``keyspace.py`` says how keys map to
cluster slots, and ``broadcast.py`` how replicas hear each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..._perloop import PerLoop
from ...entry import Entry
from ...errors import BackendError, ConfigurationError, MissingExtraError
from ...keys import CacheKey, Tag
from .keyspace import RedisKeyspace

# How leases and invalidations share tag generations (see settings()).
LEASE_PROTOCOL = "2"

if TYPE_CHECKING:  # the stores import redis-py: loaded on first use, so the extra stays optional
    from ._async.store import AsyncRedisStore
    from ._sync.store import RedisStore
    from .broadcast import Replicas

__all__ = ["RedisLayer"]

RedisLease = tuple[tuple[bytes | None, ...], float]


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError("redis", "redis") from exc
    return redis


class RedisLayer:
    """A shared layer on Redis or Redis Cluster.

    >>> layer = RedisLayer(url="redis://127.0.0.1:6379/0")               # standalone
    >>> layer = RedisLayer(cluster_nodes=[("127.0.0.1", 7000)])          # Redis Cluster

    ``socket_timeout`` and ``connect_timeout`` bound every command: a slow
    Redis is a miss, not a slow request. Up to ``max_connections`` per client
    (one sync, one per event loop); beyond that a call waits up to
    ``pool_timeout`` for a free connection. redis-py's own retries are off; the
    cache's circuit breaker decides when to try again. ``tenant_slots``
    spreads one tenant over that many hash slots (default 1 standalone, 16 on a
    cluster). ``lease_ttl`` is how long an invalidation is remembered to refuse
    a stale fill, so it must exceed your slowest loader.

    ``fast_path`` (default on): the commands of reads and fills (GET and the
    scripts) bypass redis-py's per-command machinery. Async: one multiplexed
    connection per event loop carries every task's commands, written together
    while replies are outstanding (:mod:`tieredcache.layers.multiplex`); on a
    cluster or over TLS, redis-py pipelines gathered per loop turn instead.
    Sync: a socket per thread (:mod:`tieredcache.layers.direct`), standalone
    and plain sockets only. A client with a ``credential_provider`` keeps
    redis-py throughout. Everything else always uses redis-py.
    """

    stores_objects = False

    def __init__(
        self,
        url: str | None = None,
        *,
        cluster_nodes: Sequence[tuple[str, int]] | None = None,
        client: Any = None,
        async_client_factory: Callable[[], Any] | None = None,
        name: str = "redis",
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        key_prefix: str = "tc",
        tenant_slots: int | None = None,
        lease_ttl: float = 600.0,
        max_connections: int = 256,
        pool_timeout: float = 1.0,
        fast_path: bool = True,
        timer: Callable[[], float] = time.time,
    ) -> None:
        given = sum(x is not None for x in (url, cluster_nodes, client))
        if given != 1:
            raise ConfigurationError(
                "RedisLayer needs exactly one of url=, cluster_nodes=, client="
            )
        if url is not None and urlparse(url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(
                f"RedisLayer url {url!r} must start with redis://, rediss:// or unix://"
            )
        if socket_timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError(
                "RedisLayer socket_timeout and connect_timeout must be positive"
            )
        self.name = name
        self.url = url
        self.cluster_nodes = list(cluster_nodes) if cluster_nodes else None
        self.cluster = self.cluster_nodes is not None or _is_cluster_client(client)
        self.keyspace = RedisKeyspace(key_prefix, tenant_slots or (16 if self.cluster else 1))
        self.lease_ttl = lease_ttl
        self.timer = timer
        self._timeouts = (socket_timeout, connect_timeout)
        self._max_connections = max_connections
        self._pool_timeout = pool_timeout
        self.fast_path = fast_path
        self._client = client
        self._async_client_factory = async_client_factory
        self._sync_store: RedisStore | None = None
        self._async_stores: PerLoop[AsyncRedisStore] = PerLoop()
        self._lock = threading.Lock()

    # -- clients ---------------------------------------------------------------
    def _client_kwargs(self, asynchronous: bool) -> dict[str, Any]:
        from redis.backoff import NoBackoff

        if asynchronous:
            from redis.asyncio.retry import Retry
        else:
            from redis.retry import Retry  # type: ignore[assignment]
        socket_timeout, connect_timeout = self._timeouts
        return {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
        }

    def _build(self, asynchronous: bool) -> Any:
        redis = _import_redis()
        module = redis.asyncio if asynchronous else redis
        kwargs = self._client_kwargs(asynchronous)
        try:
            if self.cluster_nodes is not None:
                cluster_mod = module.cluster
                nodes = [cluster_mod.ClusterNode(host, port) for host, port in self.cluster_nodes]
                return cluster_mod.RedisCluster(
                    startup_nodes=nodes, max_connections=self._max_connections, **kwargs
                )
            # A blocking pool: a burst beyond max_connections waits up to pool_timeout
            # for a connection instead of failing (a non-blocking pool raises
            # MaxConnectionsError at once, and a lost fill is a reload later).
            pool = module.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self._max_connections,
                timeout=self._pool_timeout,
                **kwargs,
            )
            return module.Redis.from_pool(pool)  # the client owns (and closes) the pool
        except (redis.exceptions.RedisError, OSError, ValueError) as exc:
            raise BackendError(self.name, "connect", f"{type(exc).__name__}: {exc}") from exc

    def sync_store(self) -> RedisStore:
        store = self._sync_store
        if store is None:
            with self._lock:
                if self._sync_store is None:
                    _import_redis()
                    from ._sync.store import RedisStore

                    client = self._client if self._client is not None else self._build(False)
                    if self.fast_path:
                        from .wire.direct import DirectClient, connection_params

                        params = connection_params(client, asynchronous=False)
                        if params is not None:
                            client = DirectClient(client, params)
                    self._sync_store = RedisStore(
                        client,
                        cluster=self.cluster,
                        keyspace=self.keyspace,
                        layer=self.name,
                        gen_px=int(self.lease_ttl * 1000),
                        lock_window=self._lock_window(),
                    )
                store = self._sync_store
        return store

    def async_store(self) -> AsyncRedisStore:
        return self._async_stores.get(self._new_async_store)

    def _new_async_store(self) -> AsyncRedisStore:
        _import_redis()
        from ._async.store import AsyncRedisStore

        if self._async_client_factory is not None:
            client = self._async_client_factory()
        elif self._client is not None:
            raise ConfigurationError(
                f"RedisLayer {self.name!r} was given a sync client; pass "
                "async_client_factory= to use it from async code"
            )
        else:
            client = self._build(True)
        if self.fast_path:
            from .wire.autopipeline import AutoPipeline

            client = AutoPipeline(client)
        return AsyncRedisStore(
            client,
            cluster=self.cluster,
            keyspace=self.keyspace,
            layer=self.name,
            gen_px=int(self.lease_ttl * 1000),
            lock_window=self._lock_window(),
        )

    def _lock_window(self) -> float:
        """How long after a lock attempt's call Redis may still take the lock: a command
        waits up to connect_timeout to be written, then socket_timeout for its reply.
        Later, its caller has given up on it, and a lock taken then would be held for
        no one for the whole lock_ttl (see LOCK_DEADLINE_LUA in the store)."""
        socket_timeout, connect_timeout = self._timeouts
        return socket_timeout + connect_timeout

    # -- namespace state: all-tenant invalidations, published settings -----------
    def record_epochs(self, namespace: str, epochs: Mapping[str, float]) -> bool:
        """Remember all-tenant invalidations (tag name -> when) for processes that
        start or resubscribe later; see ``LayerStack.epochs``."""
        self.sync_store().hash_set(self.keyspace.epochs(namespace), _floats(epochs))
        return True

    async def arecord_epochs(self, namespace: str, epochs: Mapping[str, float]) -> bool:
        await self.async_store().hash_set(self.keyspace.epochs(namespace), _floats(epochs))
        return True

    def load_epochs(self, namespace: str, publish_settings: bool = False) -> dict[str, float]:
        """The all-tenant invalidations of ``namespace``; with ``publish_settings``, also
        publish this application's keyspace settings (one round trip for both)."""
        store, keyspace = self.sync_store(), self.keyspace
        if publish_settings:
            raw = store.hash_get_then_set(
                keyspace.epochs(namespace), keyspace.settings(namespace), self.settings()
            )
        else:
            raw = store.hash_get(keyspace.epochs(namespace))
        return {name: float(at) for name, at in raw.items()}

    def settings(self) -> dict[str, str]:
        """The keyspace settings that decide Redis names, and the lease protocol: a
        worker must use the same. ``lease_protocol`` "2": leases create the tag
        generations they read, so invalidations bump only those that exist (see
        LEASE_TAGS_LUA in the store); an application that does not publish it
        predates that, and relies on every invalidation creating them."""
        return {
            "key_prefix": self.keyspace.prefix,
            "tenant_slots": str(self.keyspace.tenant_slots),
            "cluster": "1" if self.cluster else "0",
            "lease_protocol": LEASE_PROTOCOL,
        }

    def check_settings(self, namespace: str, unpublished_ok: bool = False) -> list[str]:
        """Problems that would make this layer invalidate names nobody reads: what an
        application published for ``namespace`` under this key prefix differs, or
        nothing was published (another prefix or namespace?), unless ``unpublished_ok``
        (a running worker: a Redis restarted without its data has lost them until an
        application starts again)."""
        published = self.sync_store().hash_get(self.keyspace.settings(namespace))
        if not published:
            if unpublished_ok:
                return []
            return [
                f"layer {self.name!r}: no application published keyspace settings for "
                f"namespace {namespace!r} under key prefix {self.keyspace.prefix!r} "
                "(check namespace and key_prefix, or start the application first)"
            ]
        problems = []
        for field, mine in self.settings().items():
            theirs = published.get(field)
            if field == "lease_protocol" and theirs != mine:
                problems.append(
                    f"layer {self.name!r}: the application (namespace {namespace!r}) "
                    f"takes leases by protocol {theirs or '1'!r}, this process by "
                    f"{mine!r}: invalidations from here would not refuse its fills "
                    "of stale values (processes of both protocols must not share a key "
                    "prefix: see the README)"
                )
            elif theirs is not None and theirs != mine:
                problems.append(
                    f"layer {self.name!r}: {field} is {mine!r} here but {theirs!r} in the "
                    f"application (namespace {namespace!r}): invalidations would miss its keys"
                )
        return problems

    # -- health ------------------------------------------------------------------
    def health(self) -> dict[str, float]:
        """What the fast path's connections saw, over every event loop: ``timeouts``
        (the server said nothing for socket_timeout), ``backlogged`` (replies that
        were late only because the caller's own event loop was busy: not counted as
        failures) and ``loop_lag_max`` (seconds the deadline check ran late)."""
        out = {"timeouts": 0.0, "backlogged": 0.0, "loop_lag_max": 0.0}
        for store in self._async_stores.values():
            multiplexed = getattr(store.client, "multiplexed", None)
            if multiplexed is None:
                continue
            out["timeouts"] += multiplexed.timeouts
            out["backlogged"] += multiplexed.backlogged
            out["loop_lag_max"] = max(out["loop_lag_max"], multiplexed.lag_max)
        return out

    # -- replica broadcast ----------------------------------------------------
    def replicas(
        self,
        namespace: str,
        on_invalidate: Callable[[Sequence[CacheKey], Sequence[Tag]], None],
        on_resync: Callable[[], None],
        **options: Any,
    ) -> Replicas:
        """The pub/sub broadcast of ``namespace`` over this Redis (see ``broadcast.py``);
        ``publish_only=True``: send invalidations, run no subscriber (a CDC worker)."""
        from .broadcast import Replicas

        return Replicas(self, namespace, on_invalidate, on_resync, **options)

    # -- leases and TTLs -----------------------------------------------------
    def _fill_px(self, entry: Entry, lease: RedisLease | None) -> int | None:
        """A fill's TTL in ms (its tag sets live a minute longer), or None when its
        lease is older than ``lease_ttl``: it may predate a generation that has
        expired since, so the fill is refused. One clock read for both."""
        now = self.timer()
        if lease is not None and now - lease[1] > self.lease_ttl:
            return None
        return max(1, int((entry.stale_until - now) * 1000))

    # -- StorageLayer (sync) -------------------------------------------------
    def get(self, key: CacheKey) -> bytes | None:
        """One GET: a hit costs what a raw GET costs. The lease comes separately."""
        return self.sync_store().get(key)

    def get_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        return self.sync_store().get_many(keys)

    def lease(self, key: CacheKey, tags: Sequence[Tag]) -> RedisLease:
        """The generations of ``key`` and ``tags`` now: a fill with them is refused
        if either is invalidated before it lands."""
        taken_at = self.timer()
        return self.sync_store().generations(key, tags), taken_at

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[bytes | None, RedisLease]:
        lease = self.lease(key, tags)
        return self.get(key), lease

    def acquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool | None, RedisLease]:
        """Take the per-key fill lock (SET NX PX) and the fill's lease in one round trip.
        Taken: True; held by another: False; None: Redis ran the attempt too late, after
        a stall (the lock is then not taken: load without it, nobody waits for it)."""
        taken_at = self.timer()
        got, gens = self.sync_store().lock(key, tags, token, int(ttl * 1000))
        return got, (gens, taken_at)

    def get_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bytes | None, bool | None, RedisLease | None]:
        """GET, and if the key is absent take its fill lock and lease in the same
        round trip -> (value, taken, lease); taken and lease are None on a hit, and
        taken is None on a miss whose lock attempt Redis ran too late (as
        :meth:`acquire_fill_lock`)."""
        return self.sync_store().get_or_lock(key, tags, token, int(ttl * 1000), self.timer())

    def release_fill_lock(self, key: CacheKey, token: str) -> bool:
        """Compare-and-delete the fill lock and wake the processes waiting for it."""
        return self.sync_store().release_lock(key, token)

    def fill_lock_held(self, key: CacheKey) -> bool:
        return self.sync_store().lock_held(key)

    def watch_fill_lock(self, key: CacheKey, wait: float) -> bool:
        """Whether the fill lock of ``key`` is held; if so, its release is published
        (on the fills channel) to the processes waiting for it, for ``wait`` seconds.
        Fills nobody waits for are not published."""
        return self.sync_store().watch_lock(key, max(1, int(wait * 1000)))

    def set(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: RedisLease | None = None,
        bump: bool = False,
        unlock: str | None = None,
    ) -> bool:
        """Store ``value``; with a lease, only if nothing was invalidated since it.
        ``unlock`` releases the fill lock in the same round trip."""
        px = self._fill_px(entry, lease)
        if px is None:
            if unlock is not None:
                self.release_fill_lock(key, unlock)
            return False
        gens = None if lease is None else lease[0]
        return self.sync_store().set(key, value, px, tags, gens, px + 60_000, bump, unlock)

    def delete(self, keys: Sequence[CacheKey]) -> None:
        self.sync_store().delete(keys)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        self.sync_store().delete_tags(tags)

    def close(self) -> None:
        store, self._sync_store = self._sync_store, None
        if store is not None and self._client is None:
            store.close()

    # -- StorageLayer (async) ------------------------------------------------
    async def aget(self, key: CacheKey) -> bytes | None:
        return await self.async_store().get(key)

    async def aget_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        return await self.async_store().get_many(keys)

    async def alease(self, key: CacheKey, tags: Sequence[Tag]) -> RedisLease:
        taken_at = self.timer()
        return await self.async_store().generations(key, tags), taken_at

    async def aget_with_lease(
        self, key: CacheKey, tags: Sequence[Tag]
    ) -> tuple[bytes | None, RedisLease]:
        lease = await self.alease(key, tags)
        return await self.aget(key), lease

    async def aacquire_fill_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> tuple[bool | None, RedisLease]:
        taken_at = self.timer()
        got, gens = await self.async_store().lock(key, tags, token, int(ttl * 1000))
        return got, (gens, taken_at)

    # aget_or_lock_fill and aset are plain functions returning the store's coroutine:
    # no frame of their own per miss (they are awaited all the same).
    def aget_or_lock_fill(
        self, key: CacheKey, tags: Sequence[Tag], token: str, ttl: float
    ) -> Coroutine[Any, Any, tuple[bytes | None, bool | None, RedisLease | None]]:
        store = self.async_store()
        return store.get_or_lock(key, tags, token, int(ttl * 1000), self.timer())

    async def arelease_fill_lock(self, key: CacheKey, token: str) -> bool:
        return await self.async_store().release_lock(key, token)

    async def afill_lock_held(self, key: CacheKey) -> bool:
        return await self.async_store().lock_held(key)

    async def awatch_fill_lock(self, key: CacheKey, wait: float) -> bool:
        return await self.async_store().watch_lock(key, max(1, int(wait * 1000)))

    def aset(
        self,
        key: CacheKey,
        value: bytes,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: RedisLease | None = None,
        bump: bool = False,
        unlock: str | None = None,
    ) -> Coroutine[Any, Any, bool]:
        px = self._fill_px(entry, lease)
        if px is None:
            return self._arefuse_fill(key, unlock)
        gens = None if lease is None else lease[0]
        return self.async_store().set(key, value, px, tags, gens, px + 60_000, bump, unlock)

    async def _arefuse_fill(self, key: CacheKey, unlock: str | None) -> bool:
        if unlock is not None:
            await self.arelease_fill_lock(key, unlock)
        return False

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        await self.async_store().delete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        await self.async_store().delete_tags(tags)

    async def aclose(self) -> None:
        store = self._async_stores.pop()
        if store is not None:
            await store.close()
        self.close()


def _floats(epochs: Mapping[str, float]) -> dict[str, str]:
    return {name: repr(float(at)) for name, at in epochs.items()}


def _is_cluster_client(client: Any) -> bool:
    return client is not None and type(client).__name__ == "RedisCluster"
