"""The in-process layer: a bounded LRU of slots, with per-entry TTL and a tag index.

Values are kept as Python objects, so a hit costs one dict lookup: callers
that mutate a returned object mutate the cached one (as with
``functools.lru_cache``). Entries carry their own ``stale_until``; an entry
past it is a miss and is dropped when touched, and LRU order evicts expired
entries first in practice because nobody touches them.

Reads take no lock: the hit path is ``_map.get(alias)`` and an append of the
alias to a bounded buffer of recent reads (as Caffeine's read buffer does),
both single atomic operations. The buffer is replayed into the LRU order under
the lock before the next insert, which is the only time order matters.

Layout, chosen by measuring with tracemalloc (``benchmarks/bench_memory.py``,
100,000 decorated entries): the layer's own objects cost ~155 B per entry, down
from ~305 B; the whole entry, values aside, ~534 B (was ~708 B; cachetools'
TTLCache ~326 B). Where the bytes went, and what changed:

- One dict, ``_map``, from the lookup key (the decorator's alias tuple, or the
  full key when there is none) to a :class:`_Slot`, read without a lock (52 B
  an entry). ``_by_key`` maps the full key to the alias for aliased entries
  only (38 B: str keys make a compact dict); a key without an alias is found in
  ``_map`` itself. Before: a cachetools ``LRUCache`` (a dict, a size dict and
  an ``OrderedDict``, ~210 B) *plus* a mirror dict for lock-free reads (52 B),
  plus a full key -> aliases dict (38 B).
- LRU order is a doubly linked list threaded through the slots (two pointer
  fields, 16 B), not an ``OrderedDict`` (a node and an index slot, ~55 B).
  Adjacent slots reference each other and slots are untracked by the garbage
  collector, so those cycles are broken by hand: on unlink, in ``clear()``,
  and when the layer is collected (``__del__``).
- A slot is a ``gc=False`` msgspec struct of six pointers (64 B, no GC header,
  never walked by a full collection): the value and ``refresh_at`` (the hit
  path reads them), the :class:`~tieredcache.entry.Entry`, the full key (or
  ``(full key, *tags)``: most entries have no tags, so no field of their own),
  and the two links. The slot no longer holds its alias (``_by_key`` has it).
- With no stale window ``stale_until`` equals ``fresh_until``; the layer keeps
  one float object for both (24 B).
- Tag sets hold slots, not key strings; tag names are interned, so entries
  sharing a tag share its string.

What remains is not the layer's to drop: the ``Entry`` with its floats (~128
B; :meth:`MemoryLayer.get` returns the stored ``Entry`` object itself, which the
layer contract pins), the full key string (~75 B, needed for exact lookups by
key), the decorator's alias tuple and the argument tuple in it (~120 B), and
the ``refresh_at`` float (24 B).

A key has at most one slot and a slot one alias: storing a key drops its
previous slot (``f(1)`` and ``f(x=1)`` are aliases of one key, and the older
one holds an older value).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import msgspec

from ..entry import Entry
from ..errors import ConfigurationError
from ..keys import CacheKey, Tag

__all__ = ["MemoryLayer"]


class _Slot(msgspec.Struct, gc=False, eq=False):
    """One stored entry, read lock-free by the hit path (``value``, ``refresh_at``).

    ``refresh_at``: before this a hit needs no further thought; after it the
    caller looks at ``entry`` for expiry and early refresh. ``ident``: the full
    key, or ``(full key, *tags)`` for a tagged entry (one field instead of two:
    most entries have no tags). ``prev``/``next``: LRU order, changed under the
    lock only. Untracked by the garbage collector (see the module docstring);
    compared and hashed by identity (tag sets hold slots).
    """

    value: Any
    refresh_at: float
    entry: Entry
    ident: str | tuple[str, ...]
    prev: Any = None
    next: Any = None


def _key_of(slot: _Slot) -> str:
    ident = slot.ident
    return ident if type(ident) is str else ident[0]


def _tag_group(full_tag: str) -> str:
    """``namespace:name`` of a tag ``namespace:tenant:name`` (namespace and tenant hold
    no colon), the key of its all-tenant group."""
    namespace, _, rest = full_tag.partition(":")
    return namespace + ":" + rest.partition(":")[2]


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
        self._map: dict[Hashable, _Slot] = {}  # alias (or full key) -> slot; read lock-free
        self._by_key: dict[str, Hashable] = {}  # full key -> alias, for aliased slots only
        self._recent: deque[Hashable] = deque(maxlen=recency_buffer)
        # LRU order: root.next is the least recently used slot, root.prev the most.
        self._root = _Slot(None, 0.0, Entry(None, 0.0, 0.0, 0.0), "")
        self._root.prev = self._root.next = self._root
        self._by_tag: dict[str, set[_Slot]] = {}
        self._tag_groups: dict[str, set[str]] = {}  # "namespace:name" -> full tag names
        self._suspended = False
        # Lease bookkeeping: a sequence number bumped by every invalidation, and the
        # number at which each recently invalidated key/tag was last invalidated.
        self._seq = 0
        # Oldest invalidation first (a repeated one moves to the end); reads do not
        # reorder it, so it is a plain OrderedDict rather than an LRU.
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._max_invalidated = max_invalidation_memory
        self._watermark = 0

    def __del__(self) -> None:
        root = self.__dict__.get("_root")
        if root is not None:  # slots are untracked: their links would never be freed
            self._unlink_all()
            root.prev = root.next = None

    # -- slot upkeep (lock held) ------------------------------------------------
    def _unlink_all(self) -> None:
        root = self._root
        node = root.next
        while node is not root and node is not None:
            node.prev, node.next, node = None, None, node.next
        root.prev = root.next = root

    def _replay_recent(self) -> None:
        recent, get, root = self._recent, self._map.get, self._root
        while recent:
            slot = get(recent.popleft())
            if slot is None or slot.next is root or slot.next is None:
                continue
            before, after = slot.prev, slot.next
            before.next = after
            after.prev = before
            last = root.prev
            last.next = root.prev = slot
            slot.prev = last
            slot.next = root

    def _drop(self, slot: _Slot) -> None:
        ident = slot.ident
        key = ident if type(ident) is str else ident[0]
        alias = self._by_key.get(key, key)
        if self._map.get(alias) is slot:
            del self._map[alias]
            if alias is not key:
                del self._by_key[key]
        before, after = slot.prev, slot.next
        if before is not None:
            before.next = after
            after.prev = before
            slot.prev = slot.next = None
        if type(ident) is tuple:
            for tag in ident[1:]:
                members = self._by_tag.get(tag)
                if members is not None:
                    members.discard(slot)
                    if not members:
                        del self._by_tag[tag]
                        self._ungroup(tag)

    def _ungroup(self, tag: str) -> None:
        group = _tag_group(tag)
        names = self._tag_groups.get(group)
        if names is not None:
            names.discard(tag)
            if not names:
                del self._tag_groups[group]

    def _slot_of(self, full_key: str) -> _Slot | None:
        slot = self._map.get(self._by_key.get(full_key, full_key))
        if slot is not None and _key_of(slot) != full_key:
            return None  # a string alias of another key (the engine's aliases are tuples)
        return slot

    def _mark_invalidated(self, name: str) -> None:
        self._seq += 1
        invalidated = self._invalidated
        if invalidated.pop(name, None) is None and len(invalidated) >= self._max_invalidated:
            _, oldest = invalidated.popitem(last=False)
            self._watermark = max(self._watermark, oldest)
        invalidated[name] = self._seq

    def _lease_valid(self, lease: int, full_key: str, tags: Sequence[Tag]) -> bool:
        if self._seq <= lease:
            return True  # nothing at all was invalidated since the lease was taken
        if self._watermark > lease:
            return False
        get = self._invalidated.get
        if get("k:" + full_key, 0) > lease:
            return False
        for tag in tags:
            if get("t:" + tag.full, 0) > lease:
                return False
            if get("e:" + tag.namespace + ":" + tag.name, 0) > lease:
                return False
        return True

    # -- StorageLayer -----------------------------------------------------------
    def _get_locked(self, full_key: str, now: float) -> Entry | None:
        slot = self._slot_of(full_key)
        if slot is None:
            return None
        entry = slot.entry
        if entry.stale_until <= now:
            self._drop(slot)
            return None
        return entry

    def get(self, key: CacheKey) -> Entry | None:
        now = self.timer()
        with self.lock:
            return self._get_locked(key.full, now)

    def get_many(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        return [self.get(key) for key in keys]

    def lease(self, key: CacheKey | None = None, tags: Sequence[Tag] = ()) -> int:
        """A fill token: fills with it are refused after a later invalidation."""
        return self._seq

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Entry | None, int]:
        now = self.timer()
        with self.lock:
            return self._get_locked(key.full, now), self._seq

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
        """Store ``entry`` (``value`` is ignored: this layer keeps ``entry.value``).

        ``alias`` is an extra lookup key (the decorator's argument tuple);
        ``refresh_at`` is when hits should start considering an early refresh.

        ``bump`` marks the key invalidated after storing, so fills whose lease
        predates this write are refused (a write beats a fill in flight).
        False when refused: a lease overtaken, an entry already stale, or the
        layer :meth:`suspended <suspend>`.
        """
        if entry.stale_until <= self.timer():
            return False
        full = key.full
        if alias is None or alias == full:
            alias = full
        fresh_until = entry.fresh_until
        if refresh_at is None or refresh_at >= fresh_until:
            refresh_at = fresh_until
        if entry.stale_until == fresh_until and type(entry.stale_until) is type(fresh_until):
            # The same value as one float object, not two (no stale window: the
            # default). Floats are immutable, so no reader can tell.
            entry.stale_until = fresh_until
        ident: str | tuple[str, ...] = full
        if tags:
            ident = (full, *(sys.intern(tag.full) for tag in tags))
        with self.lock:
            if self._suspended:
                return False
            if lease is not None and not self._lease_valid(lease, full, tags):
                return False
            if bump:
                self._mark_invalidated("k:" + full)
            # The alias's old slot may be another key's (a new version of the key);
            # the key's old slot may sit under another alias (f(1), then f(x=1)).
            old = self._map.get(alias)
            if old is not None:
                self._drop(old)
            old = self._slot_of(full)
            if old is not None:
                self._drop(old)
            self._replay_recent()
            root = self._root
            while len(self._map) >= self.maxsize and root.next is not root:
                self.evictions += 1
                self._drop(root.next)
            last = root.prev
            slot = _Slot(entry.value, refresh_at, entry, ident, last, root)
            last.next = root.prev = slot
            self._map[alias] = slot
            if alias is not full:
                self._by_key[full] = alias
            for tag in ident[1:] if type(ident) is tuple else ():
                members = self._by_tag.get(tag)
                if members is None:
                    members = self._by_tag[tag] = set()
                    self._tag_groups.setdefault(_tag_group(tag), set()).add(tag)
                members.add(slot)
        return True

    def delete(self, keys: Sequence[CacheKey]) -> None:
        with self.lock:
            for key in keys:
                self._mark_invalidated("k:" + key.full)
                slot = self._slot_of(key.full)
                if slot is not None:
                    self._drop(slot)

    def delete_tags(self, tags: Sequence[Tag]) -> None:
        with self.lock:
            for tag in tags:
                self._mark_invalidated("t:" + tag.full)
                self._drop_tag(tag.full)

    def _drop_tag(self, full_tag: str) -> None:
        for slot in tuple(self._by_tag.get(full_tag, ())):
            self._drop(slot)

    def delete_tag_everywhere(self, namespace: str, name: str) -> None:
        """Drop every entry tagged ``name`` in any tenant of ``namespace``, in this
        process only (an all-tenant invalidation; nothing is sent anywhere).

        Fills whose lease predates the call are refused for that tag in every
        tenant, including tenants that hold no such entry yet.

        >>> layer = MemoryLayer()
        >>> layer.delete_tag_everywhere("shop", "catalog")
        """
        with self.lock:
            self._mark_invalidated("e:" + namespace + ":" + name)
            for full_tag in tuple(self._tag_groups.get(namespace + ":" + name, ())):
                self._drop_tag(full_tag)

    def clear(self) -> None:
        with self.lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        self._seq += 1
        self._watermark = self._seq  # every fill in flight is refused
        self._map.clear()  # the same dict: the hit path holds its .get
        self._by_key.clear()
        self._recent.clear()
        self._unlink_all()
        self._by_tag.clear()
        self._tag_groups.clear()

    def suspend(self) -> None:
        """Drop everything and refuse every ``set`` until :meth:`resume`.

        For when this process cannot hear invalidations (the replica broadcast
        is down): it must not serve what it holds, nor keep what it loads. Reads
        then miss, and fills in flight are refused as after :meth:`clear`.

        >>> layer = MemoryLayer()
        >>> layer.suspend()
        >>> layer.suspended
        True
        """
        with self.lock:
            self._suspended = True
            self._clear_locked()

    def resume(self) -> None:
        """Clear again (anything stored meanwhile could not have been invalidated;
        fills that began while suspended are refused) and accept sets again.

        >>> layer = MemoryLayer()
        >>> layer.suspend(); layer.resume()
        >>> layer.suspended
        False
        """
        with self.lock:
            self._clear_locked()
            self._suspended = False

    @property
    def suspended(self) -> bool:
        """Whether sets are refused (between :meth:`suspend` and :meth:`resume`)."""
        return self._suspended

    def __len__(self) -> int:
        return len(self._map)

    def hit_lookup(self) -> tuple[Callable[[Hashable], _Slot | None], Callable[[Hashable], None]]:
        """(lookup by alias, note a hit) for the decorator's hit path: a dict lookup,
        and an append to the recency buffer (both atomic, no lock)."""
        return self._map.get, self._recent.append

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
