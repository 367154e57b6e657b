"""How cache keys and tags map to Redis key names (pure, no I/O).

Every name carries the hash tag ``{namespace:tenant:bucket}``. On Redis
Cluster all names with one hash tag live in one slot, so a value, its tag-set
memberships and the generations that guard its fill are written by one Lua
script atomically. ``bucket`` is ``crc32(body) % tenant_slots``: with one
bucket a tenant lives on one shard; with more, a large tenant spreads over up
to that many slots, and a tag invalidation runs once per bucket.

    {prefix}:{ns:tenant:b}:v:<body>   value
    {prefix}:{ns:tenant:b}:gk:<body>  key generation (bumped by invalidation)
    {prefix}:{ns:tenant:b}:kt:<body>  the value's tag-set names (to leave old tags)
    {prefix}:{ns:tenant:b}:t:<tag>    tag set: value names carrying the tag
    {prefix}:{ns:tenant:b}:gt:<tag>   tag generation (created by a lease, bumped if it exists)
    {prefix}:{ns:tenant:b}:l:<body>   fill lock
"""

from __future__ import annotations

import binascii
import re
import zlib
from collections.abc import Sequence

from ...errors import ConfigurationError
from ...keys import CacheKey, Tag

__all__ = ["RedisKeyspace"]


def invalidation_channel(prefix: str, namespace: str) -> str:
    """The pub/sub channel of a namespace's replica invalidations."""
    return f"{prefix}:inval:{namespace}"


def fills_channel(prefix: str, namespace: str) -> str:
    """The pub/sub channel on which released fill locks wake their waiters."""
    return f"{prefix}:fills:{namespace}"


def hash_slot(name: str) -> int:
    """The Redis Cluster hash slot of ``name`` (CRC16-XMODEM of its hash tag, the text
    between the first ``{`` and the next ``}`` if not empty, else of the whole name)."""
    raw = name.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % 16384


# Tenants whose slot prefixes are remembered (see RedisKeyspace.tenant_slots_of).
TENANT_CACHE_MAX = 65536


class RedisKeyspace:
    __slots__ = ("_tenant_cache", "prefix", "tenant_slots")

    def __init__(self, prefix: str, tenant_slots: int) -> None:
        if tenant_slots < 1 or tenant_slots > 1024:
            raise ConfigurationError(f"tenant_slots must be 1..1024, got {tenant_slots}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", prefix):
            raise ConfigurationError(f"key_prefix {prefix!r} must be 1-32 of [A-Za-z0-9._-]")
        self.prefix = prefix
        self.tenant_slots = tenant_slots
        self._tenant_cache: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}

    def bucket_of(self, key: CacheKey) -> int:
        if self.tenant_slots == 1:
            return 0
        return zlib.crc32(key.body.encode()) % self.tenant_slots

    def _slot(self, namespace: str, tenant: str, bucket: int) -> str:
        return f"{self.prefix}:{{{namespace}:{tenant}:{bucket}}}"

    def slot_of(self, key: CacheKey) -> str:
        return self._slot(key.namespace, key.tenant, self.bucket_of(key))

    def value(self, key: CacheKey) -> str:
        return f"{self.slot_of(key)}:v:{key.body}"

    def key_generation(self, key: CacheKey) -> str:
        return f"{self.slot_of(key)}:gk:{key.body}"

    def lock(self, key: CacheKey) -> str:
        return f"{self.slot_of(key)}:l:{key.body}"

    def fills_channel(self, namespace: str) -> str:
        """Where a released fill lock wakes its waiters (see ``broadcast.py``)."""
        return fills_channel(self.prefix, namespace)

    def epochs(self, namespace: str) -> str:
        """The hash of a namespace's all-tenant invalidations: tag name -> when."""
        return f"{self.prefix}:epochs:{namespace}"

    def settings(self, namespace: str) -> str:
        """The hash in which an application publishes its keyspace settings, so that
        a CDC worker can check it invalidates the same names."""
        return f"{self.prefix}:settings:{namespace}"

    def tag_names_in(self, slot: str, tags: Sequence[Tag]) -> tuple[list[str], list[str]]:
        """Tag-set names and tag-generation names of ``tags`` within one slot."""
        if not tags:
            return [], []
        return [f"{slot}:t:{t.name}" for t in tags], [f"{slot}:gt:{t.name}" for t in tags]

    def key_groups(self, keys: Sequence[CacheKey]) -> list[tuple[list[str], list[str], list[str]]]:
        """Keys grouped per slot: (value names, key-generation names, key-tags names)."""
        groups: dict[str, tuple[list[str], list[str], list[str]]] = {}
        for key in keys:
            slot = self.slot_of(key)
            values, gens, key_tags = groups.setdefault(slot, ([], [], []))
            values.append(f"{slot}:v:{key.body}")
            gens.append(f"{slot}:gk:{key.body}")
            key_tags.append(f"{slot}:kt:{key.body}")
        return list(groups.values())

    def tenant_slots_of(self, namespace: str, tenant: str) -> tuple[tuple[str, int], ...]:
        """Every slot of a tenant: (name prefix, cluster hash slot) per bucket. Built
        once per tenant (a batch invalidation needs all of them for each tenant)."""
        cache = self._tenant_cache
        found = cache.get((namespace, tenant))
        if found is None:
            if len(cache) >= TENANT_CACHE_MAX:
                cache.clear()
            found = tuple(
                (name, hash_slot(name))
                for name in (self._slot(namespace, tenant, b) for b in range(self.tenant_slots))
            )
            cache[(namespace, tenant)] = found
        return found

    def tag_batches(
        self, tags: Sequence[Tag]
    ) -> list[tuple[tuple[tuple[str, int], ...], list[str]]]:
        """Tags grouped per tenant: (every slot of the tenant, see :meth:`tenant_slots_of`,
        the tag names). A tag is invalidated in each slot of its tenant."""
        by_tenant: dict[tuple[str, str], list[str]] = {}
        for tag in tags:
            names = by_tenant.get((tag.namespace, tag.tenant))
            if names is None:
                by_tenant[(tag.namespace, tag.tenant)] = [tag.name]
            else:
                names.append(tag.name)
        return [
            (self.tenant_slots_of(ns, tenant), names) for (ns, tenant), names in by_tenant.items()
        ]
