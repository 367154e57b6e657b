"""Redis commands of the Redis layer, written once (async) and generated into sync.

Edit this file, then run ``python scripts/unasync.py``; CI checks that
``_sync/redis_store.py`` is up to date. Names come from
:class:`~tieredcache.layers.redis_keyspace.RedisKeyspace`; redis-py errors are
translated here, at the edge, into :class:`~tieredcache.errors.BackendError`.

Every multi-key script touches names of a single hash slot, which is what lets
them run on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.exceptions

from ...errors import BackendError, BackendTimeoutError
from ...keys import CacheKey, Tag
from ..redis_keyspace import RedisKeyspace

# Fill with a lease: refuse the write if the key's or a tag's generation moved
# since the miss (an invalidation happened while the loader ran). The key's own
# tag list (kt) lets a re-fill with other tags leave the tag sets it no longer
# belongs to, so deleting an old tag never takes a newer value with it.
# A write (bump=1) also bumps the key generation, so fills that started before it
# are refused afterwards.
# KEYS: value, key-gen, key-tags, tag-set x n, tag-gen x n
# ARGV: payload, px, n, check(0/1), tag-set px, bump(0/1), gen px,
#       expected key-gen, expected tag-gen x n
FILL_LUA = """
local n = tonumber(ARGV[3])
if ARGV[4] == '1' then
  if (redis.call('GET', KEYS[2]) or '') ~= ARGV[8] then return 0 end
  for i = 1, n do
    if (redis.call('GET', KEYS[3 + n + i]) or '') ~= ARGV[8 + i] then return 0 end
  end
end
local wanted = {}
for i = 1, n do wanted[KEYS[3 + i]] = true end
for _, old in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not wanted[old] then redis.call('SREM', old, KEYS[1]) end
end
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[6] == '1' then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
local tag_px = tonumber(ARGV[5])
for i = 1, n do
  redis.call('SADD', KEYS[3 + i], KEYS[1])
  if redis.call('PTTL', KEYS[3 + i]) < tag_px then redis.call('PEXPIRE', KEYS[3 + i], tag_px) end
  redis.call('SADD', KEYS[3], KEYS[3 + i])
end
if n > 0 then redis.call('PEXPIRE', KEYS[3], tag_px) end
return 1
"""

# Invalidate keys of one slot: drop values and their tag memberships, bump generations.
# KEYS: value x n, key-gen x n, key-tags x n   ARGV: n, gen px
DELETE_KEYS_LUA = """
local n = tonumber(ARGV[1])
local dropped = 0
for i = 1, n do
  dropped = dropped + redis.call('DEL', KEYS[i])
  for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2 * n + i])) do
    redis.call('SREM', tag, KEYS[i])
  end
  redis.call('DEL', KEYS[2 * n + i])
  redis.call('INCR', KEYS[n + i])
  redis.call('PEXPIRE', KEYS[n + i], ARGV[2])
end
return dropped
"""

# Invalidate tags of one slot: drop every member value (and its memberships in other
# tags) and the set, bump the tag generation. Member names share this slot's hash tag.
# KEYS: tag-set x n, tag-gen x n   ARGV: n, gen px
DELETE_TAGS_LUA = """
local n = tonumber(ARGV[1])
local dropped = 0
for i = 1, n do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    dropped = dropped + redis.call('DEL', member)
    local cut = string.find(member, '}:v:', 1, true)
    if cut then
      local key_tags = string.sub(member, 1, cut) .. ':kt:' .. string.sub(member, cut + 4)
      for _, tag in ipairs(redis.call('SMEMBERS', key_tags)) do
        if tag ~= KEYS[i] then redis.call('SREM', tag, member) end
      end
      redis.call('DEL', key_tags)
    end
  end
  redis.call('DEL', KEYS[i])
  redis.call('INCR', KEYS[n + i])
  redis.call('PEXPIRE', KEYS[n + i], ARGV[2])
end
return dropped
"""

# Compare-and-delete release of a fill lock, waking waiters through pub/sub.
# KEYS: lock   ARGV: token, channel, message
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


@contextmanager
def translate_errors(layer: str, operation: str) -> Iterator[None]:
    try:
        yield
    except redis.exceptions.TimeoutError as exc:
        raise BackendTimeoutError(layer, operation, str(exc) or "timed out") from exc
    except redis.exceptions.RedisError as exc:
        raise BackendError(layer, operation, f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise BackendError(layer, operation, f"{type(exc).__name__}: {exc}") from exc


class AsyncRedisStore:
    """The Redis commands of the layer on one redis-py client (standalone or cluster)."""

    def __init__(
        self, client: Any, *, cluster: bool, keyspace: RedisKeyspace, layer: str, gen_px: int
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.keyspace = keyspace
        self.layer = layer
        self.gen_px = gen_px
        self._fill = client.register_script(FILL_LUA)
        self._delete_keys = client.register_script(DELETE_KEYS_LUA)
        self._delete_tags = client.register_script(DELETE_TAGS_LUA)
        self._release = client.register_script(RELEASE_LUA)

    async def get(self, key: CacheKey) -> bytes | None:
        with translate_errors(self.layer, "get"):
            value: bytes | None = await self.client.get(self.keyspace.value(key))
        return value

    async def get_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self.keyspace.value(key) for key in keys]
        with translate_errors(self.layer, "get_many"):
            if self.cluster:
                # Groups names by slot: one MGET per slot, pipelined per node.
                values: list[bytes | None] = await self.client.mget_nonatomic(names)
            else:
                values = await self.client.mget(names)
        return values

    async def get_with_lease(
        self, key: CacheKey, tags: Sequence[Tag]
    ) -> tuple[bytes | None, tuple[bytes | None, ...]]:
        """The value and the generations guarding its fill: one MGET, one slot."""
        slot = self.keyspace.slot_of(key)
        _, tag_gens = self.keyspace.tag_names_in(slot, tags)
        names = [f"{slot}:v:{key.body}", f"{slot}:gk:{key.body}", *tag_gens]
        with translate_errors(self.layer, "get"):
            values = await self.client.mget(names)
        return values[0], tuple(values[1:])

    async def set(
        self,
        key: CacheKey,
        payload: bytes,
        px: int,
        tags: Sequence[Tag],
        lease: Sequence[bytes | None] | None,
        tag_set_px: int,
        bump: bool = False,
    ) -> bool:
        slot = self.keyspace.slot_of(key)
        tag_sets, tag_gens = self.keyspace.tag_names_in(slot, tags)
        check = 0 if lease is None else 1
        args: list[Any] = [payload, px, len(tags), check, tag_set_px, int(bump), self.gen_px]
        if lease is not None:
            args.extend(b"" if g is None else g for g in lease)
        names = [
            f"{slot}:v:{key.body}",
            f"{slot}:gk:{key.body}",
            f"{slot}:kt:{key.body}",
            *tag_sets,
            *tag_gens,
        ]
        with translate_errors(self.layer, "set"):
            result = await self._fill(keys=names, args=args)
        return bool(result)

    async def _per_slot(
        self, operation: str, script: Any, groups: Sequence[Sequence[list[str]]]
    ) -> int:
        """Run ``script`` once per slot group (its name lists concatenated), pipelined
        on standalone Redis; on a cluster each group goes to its own node."""
        total = 0
        with translate_errors(self.layer, operation):
            if self.cluster:
                for group in groups:
                    keys = [name for names in group for name in names]
                    total += int(await script(keys=keys, args=[len(group[0]), self.gen_px]))
                return total
            # The context manager resets the pipeline, returning its connection even
            # when execute() fails half-way (Redis down).
            async with self.client.pipeline(transaction=False) as pipe:
                for group in groups:
                    keys = [name for names in group for name in names]
                    await script(keys=keys, args=[len(group[0]), self.gen_px], client=pipe)
                for result in await pipe.execute():
                    total += int(result)
        return total

    async def delete(self, keys: Sequence[CacheKey]) -> int:
        if not keys:
            return 0
        return await self._per_slot("delete", self._delete_keys, self.keyspace.key_groups(keys))

    async def delete_tags(self, tags: Sequence[Tag]) -> int:
        if not tags:
            return 0
        groups = self.keyspace.tag_groups(tags)
        return await self._per_slot("delete_tags", self._delete_tags, groups)

    async def acquire_lock(self, key: CacheKey, token: str, px: int) -> bool:
        with translate_errors(self.layer, "lock"):
            return bool(await self.client.set(self.keyspace.lock(key), token, nx=True, px=px))

    async def release_lock(self, key: CacheKey, token: str, channel: str) -> bool:
        with translate_errors(self.layer, "unlock"):
            released = await self._release(
                keys=[self.keyspace.lock(key)], args=[token, channel, key.full]
            )
        return bool(released)

    async def lock_held(self, key: CacheKey) -> bool:
        with translate_errors(self.layer, "lock"):
            return bool(await self.client.exists(self.keyspace.lock(key)))

    async def publish(self, channel: str, message: bytes) -> None:
        with translate_errors(self.layer, "publish"):
            await self.client.publish(channel, message)

    async def ping(self) -> bool:
        with translate_errors(self.layer, "ping"):
            return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
