"""The in-process layer: a bounded LRU (cachetools) with per-entry TTL and a tag index.

Values are kept as Python objects, so a hit costs one dict lookup: callers
that mutate a returned object mutate the cached one (as with
``functools.lru_cache``). Entries carry their own ``stale_until``; an entry
past it is a miss and is dropped when touched, and LRU order evicts expired
entries first in practice because nobody touches them.

Reads take no lock. A cachetools ``LRUCache`` owns size and eviction order,
and a plain dict mirrors it for lookups; a hit only appends its key to a
bounded buffer of recent reads (as Caffeine's read buffer does), and the
buffer is replayed into the LRU order under the lock before the next insert,
which is the only time order matters. Both the dict lookup and the append are
single atomic operations.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import cachetools
import msgspec

from ..entry import Entry
from ..errors import ConfigurationError
from ..keys import CacheKey, Tag

__all__ = ["MemoryLayer"]


class _Slot(msgspec.Struct, gc=False):
    """One stored entry; ``value`` and ``refresh_at`` are copied out for the hot path.

    ``refresh_at``: before this a hit needs no further thought; after it the
    caller checks for expiry and early refresh. Untracked by the garbage
    collector, like :class:`~tieredcache.entry.Entry`, and for the same reason.
    """

    entry: Entry
    value: Any
    full_key: str
    tags: tuple[str, ...]
    refresh_at: float


def _each(aliases: Any) -> Any:
    """The aliases of a key: most keys have one, stored bare (a set per key would be
    one more object for every full garbage collection to walk)."""
    return aliases if type(aliases) is set else (aliases,)


class _IndexedLRU(cachetools.LRUCache[Hashable, _Slot]):
    """An LRU that tells its owner about evictions so the indexes stay in step."""

    def __init__(self, maxsize: int, on_evict: Callable[[Hashable, _Slot], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Hashable, _Slot]:
        key, slot = super().popitem()
        self._on_evict(key, slot)
        return key, slot


class MemoryLayer:
    """In-process LRU layer, thread-safe, with tag invalidation and fill leases.

    >>> from tieredcache import MemoryLayer, TieredCache
    >>> cache = TieredCache(namespace="shop", layers=[MemoryLayer(maxsize=10_000)])

    ``timer`` is the wall clock used for expiry; inject a fake in tests.
    ``max_invalidation_memory`` bounds how many recent invalidations are kept
    to refuse stale fills; past it the oldest are folded into one watermark,
    which refuses more fills (safe) rather than fewer.
    """

    stores_objects = True

    def __init__(
        self,
        maxsize: int = 10_000,
        *,
        name: str = "memory",
        timer: Callable[[], float] = time.time,
        max_invalidation_memory: int = 100_000,
        recency_buffer: int = 4096,
    ) -> None:
        if maxsize <= 0:
            raise ConfigurationError(f"MemoryLayer maxsize must be positive, got {maxsize}")
        self.name = name
        self.timer = timer
        self.maxsize = maxsize
        self.lock = threading.Lock()
        self.evictions = 0
        self._data = _IndexedLRU(maxsize, self._evicted)
        self._fast: dict[Hashable, _Slot] = {}  # lock-free read mirror of _data
        self._recent: deque[Hashable] = deque(maxlen=recency_buffer)
        self._by_key: dict[str, Any] = {}  # full key -> its alias, or a set of aliases
        self._by_tag: dict[str, set[str]] = {}
        # Lease bookkeeping: a sequence number bumped by every invalidation, and the
        # number at which each recently invalidated key/tag was last invalidated.
        self._seq = 0
        # Oldest invalidation first (a repeated one moves to the end); reads do not
        # reorder it, so it is a plain OrderedDict rather than an LRU.
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._max_invalidated = max_invalidation_memory
        self._watermark = 0

    # -- index upkeep (lock held) --------------------------------------------
    def _replay_recent(self) -> None:
        recent, data = self._recent, self._data
        while recent:
            alias = recent.popleft()
            if alias in data:
                data[alias]

    def _evicted(self, alias: Hashable, slot: _Slot) -> None:
        self.evictions += 1
        self._fast.pop(alias, None)
        self._unindex(alias, slot)

    def _unindex(self, alias: Hashable, slot: _Slot) -> None:
        aliases = self._by_key.get(slot.full_key)
        if aliases is None:
            return
        if type(aliases) is set:
            aliases.discard(alias)
            if aliases:
                return
        elif aliases != alias:
            return
        del self._by_key[slot.full_key]
        for tag in slot.tags:
            members = self._by_tag.get(tag)
            if members is not None:
                members.discard(slot.full_key)
                if not members:
                    del self._by_tag[tag]

    def _drop_full_key(self, full_key: str) -> int:
        aliases = self._by_key.pop(full_key, None)
        if aliases is None:
            return 0
        aliases = _each(aliases)
        tags: tuple[str, ...] = ()
        for alias in aliases:
            self._fast.pop(alias, None)
            slot = self._data.pop(alias, None)
            if slot is not None:
                tags = slot.tags
        for tag in tags:
            members = self._by_tag.get(tag)
            if members is not None:
                members.discard(full_key)
                if not members:
                    del self._by_tag[tag]
        return len(aliases)

    def _mark_invalidated(self, name: str) -> None:
        self._seq += 1
        invalidated = self._invalidated
        if invalidated.pop(name, None) is None and len(invalidated) >= self._max_invalidated:
            _, oldest = invalidated.popitem(last=False)
            self._watermark = max(self._watermark, oldest)
        invalidated[name] = self._seq

    def _lease_valid(self, lease: int, full_key: str, tags: Sequence[str]) -> bool:
        if self._seq <= lease:
            return True  # nothing at all was invalidated since the lease was taken
        if self._watermark > lease:
            return False
        get = self._invalidated.get
        if get("k:" + full_key, 0) > lease:
            return False
        return all(get("t:" + tag, 0) <= lease for tag in tags)

    # -- StorageLayer -----------------------------------------------------------
    def get(self, key: CacheKey) -> Entry | None:
        now = self.timer()
        with self.lock:
            aliases = self._by_key.get(key.full)
            if aliases is None:
                return None
            for alias in _each(aliases):
                slot = self._fast.get(alias)
                if slot is not None:
                    if slot.entry.stale_until <= now:
                        self._drop_full_key(key.full)
                        return None
                    return slot.entry
        return None

    def get_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        return [self.get(key) for key in keys]

    def lease(self, key: CacheKey | None = None, tags: Sequence[Tag] = ()) -> int:
        """A fill token: fills with it are refused after a later invalidation."""
        return self._seq

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Entry | None, int]:
        with self.lock:
            token = self._seq
        return self.get(key), token

    def set(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
        alias: Hashable | None = None,
        refresh_at: float | None = None,
    ) -> bool:
        """Store ``entry`` (``value`` is ignored: this layer keeps the Entry itself).

        ``alias`` is an extra lookup key (the decorator's argument tuple);
        ``refresh_at`` is when hits should start considering an early refresh.

        ``bump`` marks the key invalidated after storing, so fills whose lease
        predates this write are refused (a write beats a fill in flight).
        """
        if entry.stale_until <= self.timer():
            return False
        tag_names = tuple(tag.full for tag in tags)
        full = key.full
        alias = full if alias is None else alias
        with self.lock:
            if lease is not None and not self._lease_valid(lease, full, tag_names):
                return False
            if bump:
                self._mark_invalidated("k:" + full)
            # Other aliases of this key (f(1) and f(x=1)) hold older values now.
            old = self._fast.get(alias)
            if old is not None and old.full_key != full:
                self._drop_full_key(old.full_key)
            self._drop_full_key(full)
            self._replay_recent()
            refresh_at = entry.fresh_until if refresh_at is None else refresh_at
            slot = _Slot(entry, entry.value, full, tag_names, min(refresh_at, entry.fresh_until))
            self._data[alias] = slot  # may evict the least recently used entries first
            self._fast[alias] = slot
            aliases = self._by_key.get(full)
            if aliases is None:
                self._by_key[full] = alias
            elif type(aliases) is set:
                aliases.add(alias)
            elif aliases != alias:
                self._by_key[full] = {aliases, alias}
            for tag in tag_names:
                self._by_tag.setdefault(tag, set()).add(full)
        return True

    def delete(self, keys: Sequence[CacheKey]) -> None:
        with self.lock:
            for key in keys:
                self._mark_invalidated("k:" + key.full)
                self._drop_full_key(key.full)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        with self.lock:
            for tag in tags:
                self._mark_invalidated("t:" + tag.full)
                for full_key in self._by_tag.pop(tag.full, set()).copy():
                    self._drop_full_key(full_key)

    def clear(self) -> None:
        with self.lock:
            self._seq += 1
            self._watermark = self._seq
            self._data.clear()
            self._fast.clear()
            self._recent.clear()
            self._by_key.clear()
            self._by_tag.clear()

    def __len__(self) -> int:
        return len(self._data)

    def hit_lookup(self) -> tuple[Callable[[Hashable], _Slot | None], Callable[[Hashable], None]]:
        """(lookup by alias, note a hit) for the decorator's hit path: a dict lookup on
        the lock-free mirror, and an append to the recency buffer (both atomic)."""
        return self._fast.get, self._recent.append

    def close(self) -> None:
        self.clear()

    # -- async twins: no I/O, so they run inline --------------------------------
    async def aget(self, key: CacheKey) -> Entry | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        return self.get_many(keys)

    async def alease(self, key: CacheKey | None = None, tags: Sequence[Tag] = ()) -> int:
        return self._seq

    async def aget_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Entry | None, int]:
        return self.get_with_lease(key, tags)

    async def aset(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
        alias: Hashable | None = None,
        refresh_at: float | None = None,
    ) -> bool:
        return self.set(key, value, entry, tags, lease, bump, alias, refresh_at)

    async def adelete(self, keys: Sequence[CacheKey]) -> None:
        self.delete(keys)

    async def adelete_tags(self, tags: Sequence[Tag]) -> None:
        self.delete_tags(tags)

    async def aclose(self) -> None:
        self.close()
