"""Redis commands of the Redis layer, written once (async) and generated into sync.

Edit this file, then run ``python scripts/unasync.py``; CI checks that
``_sync/redis_store.py`` is up to date. Names come from
:class:`~tieredcache.layers.redis_keyspace.RedisKeyspace`; redis-py errors are
translated here, at the edge, into :class:`~tieredcache.errors.BackendError`.

Every multi-key script touches names of a single hash slot, which is what lets
them run on Redis Cluster; the one exception, the batch tag invalidation sent per
node (TAGS_NODE_LUA), declares it (a script flag) and touches only slots of the
node it runs on, or is refused and sent again per slot.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions

from ....errors import BackendError, BackendTimeoutError
from ....keys import CacheKey, Tag
from ..keyspace import RedisKeyspace

# A generation only ever grows, even across its own expiry: a missing generation
# restarts at the server clock in microseconds, never at a value an older lease
# could hold (INCR from nothing would give "1" again). Prepended to the scripts.
# The clock is read once per script run (a script is atomic: every bump of the run
# happens at that instant); a batch invalidation bumps hundreds of names per run.
BUMP_LUA = """
local now_us
local function bump(name, px)
  if not now_us then
    local now = redis.call('TIME')
    now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  end
  local next = math.max(tonumber(redis.call('GET', name) or '0') + 1, now_us)
  redis.call('SET', name, string.format('%.0f', next), 'PX', px)
end
"""

# Fill with a lease: refuse the write if the key's or a tag's generation moved
# since the lease was taken (an invalidation happened while the loader ran). The
# key's own tag list (kt) lets a re-fill with other tags leave the tag sets it no
# longer belongs to, so deleting an old tag never takes a newer value with it.
# A write (bump=1) also bumps the key generation, so fills that started before it
# are refused afterwards. With an unlock token, the fill lock is released in the
# same round trip (whether or not the fill was accepted) and, if a process marked
# that it waits for it (WATCH_LUA), the release is published to wake it.
# A tag set keeps the names of values that expired (nothing else removes them), and a
# tag refilled all the time never expires itself: each fill samples two members of
# each of its tag sets and drops those whose value is gone, which keeps such sets
# near their live size, as Redis's own expiry does by sampling.
# KEYS: value, key-gen, key-tags, lock, wait-mark, tag-set x n, tag-gen x n
# ARGV: payload, px, n, check(0/1), tag-set px, bump(0/1), gen px,
#       unlock token ('' = none), channel, message, expected key-gen, expected tag-gen x n
FILL_LUA = (
    BUMP_LUA
    + """
local n = tonumber(ARGV[3])
local function release()
  if ARGV[8] ~= '' and redis.call('GET', KEYS[4]) == ARGV[8] then
    redis.call('DEL', KEYS[4])
    if redis.call('DEL', KEYS[5]) == 1 then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
  end
end
if ARGV[4] == '1' then
  if (redis.call('GET', KEYS[2]) or '') ~= ARGV[11] then release() return 0 end
  for i = 1, n do
    if (redis.call('GET', KEYS[5 + n + i]) or '') ~= ARGV[11 + i] then release() return 0 end
  end
end
local wanted = {}
for i = 1, n do wanted[KEYS[5 + i]] = true end
for _, old in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not wanted[old] then redis.call('SREM', old, KEYS[1]) end
end
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[6] == '1' then bump(KEYS[2], ARGV[7]) end
local tag_px = tonumber(ARGV[5])
for i = 1, n do
  redis.call('SADD', KEYS[5 + i], KEYS[1])
  for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[5 + i], 2)) do
    if redis.call('EXISTS', member) == 0 then redis.call('SREM', KEYS[5 + i], member) end
  end
  if redis.call('PTTL', KEYS[5 + i]) < tag_px then redis.call('PEXPIRE', KEYS[5 + i], tag_px) end
  redis.call('SADD', KEYS[3], KEYS[5 + i])
end
if n > 0 then redis.call('PEXPIRE', KEYS[3], tag_px) end
release()
return 1
"""
)

# The tag generations of a lease (KEYS[first..], into out[i + shift]). A tag's
# generation exists only while a lease may hold it: a lease creates a missing one (at
# the server clock in microseconds, like a bump; PX = the layer's lease_ttl), and a tag
# invalidation bumps only those that exist (TAGS_LUA). A tag nobody leased since its
# last generation expired then costs an invalidation no write at all, which is most
# tags a CDC worker sees: without this, each invalidated tag created one generation per
# tenant slot (16 on a cluster), ~4x the Redis time of the whole invalidation. Every
# process that takes leases must create them (published as lease_protocol "2", see
# RedisLayer.settings): a lease that read "absent" and was not made to exist would
# survive an invalidation. Needs now_us (the caller's TIME).
LEASE_TAGS_LUA = """
local function lease_tags(out, first, shift, px)
  local now_s
  for i = first, #KEYS do
    local gen = redis.call('GET', KEYS[i])
    if not gen then
      now_s = now_s or string.format('%.0f', now_us)
      redis.call('SET', KEYS[i], now_s, 'PX', px)
      gen = now_s
    end
    out[i + shift] = gen
  end
end
"""

# Fill locks are taken only before the caller's deadline (ARGV[3], ms on the server
# clock, see AsyncRedisStore.deadline): a script that sat in a stalled server's
# input buffer runs after its caller gave up on the reply, and a lock it took then
# would be held for no one for the lock's whole PX, with other processes waiting
# for it. Too late, the lock is not taken and the reply says so (2), with the
# server time (ms) the caller calibrates its deadlines with.
LOCK_DEADLINE_LUA = (
    """
local now_us
local function lock(name)
  local now = redis.call('TIME')
  now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if ms > tonumber(ARGV[3]) then return 2, ms end
  return redis.call('SET', name, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0, ms
end
"""
    + LEASE_TAGS_LUA
)

# Take the fill lock and, in the same round trip, the generations that make up the
# lease of the fill that follows. KEYS: lock, key-gen, tag-gen x n
# ARGV: token, px, deadline, gen px   reply: {taken (1, 0, 2 = too late), server ms, gens...}
LOCK_LUA = (
    LOCK_DEADLINE_LUA
    + """
local taken, ms = lock(KEYS[1])
local out = {taken, ms, redis.call('GET', KEYS[2]) or false}
lease_tags(out, 3, 1, ARGV[4])
return out
"""
)

# A read that, when the key is absent, also takes the fill lock and the lease (as
# LOCK_LUA) in the same round trip; a present value is returned alone, lock-free.
# A value name holding another type (someone's LPUSH) would fail every read with
# WRONGTYPE, forever: it is deleted here and read as an empty, undecodable entry,
# which callers count as one error and a miss, like any corrupt entry.
# KEYS: value, lock, key-gen, tag-gen x n   ARGV: token, px, deadline, gen px
# reply: {value} or {false, taken (1, 0, 2 = too late), server ms, gens...}
GET_OR_LOCK_LUA = (
    LOCK_DEADLINE_LUA
    + """
local value = redis.pcall('GET', KEYS[1])
if type(value) == 'table' then
  if not string.find(value.err, 'WRONGTYPE', 1, true) then return value end
  redis.call('DEL', KEYS[1])
  return {''}
end
if value then return {value} end
local taken, ms = lock(KEYS[2])
local out = {false, taken, ms, redis.call('GET', KEYS[3]) or false}
lease_tags(out, 4, 1, ARGV[4])
return out
"""
)

# A lease without a fill lock: the key's generation and the tag generations (created
# if missing, see LEASE_TAGS_LUA). KEYS: key-gen, tag-gen x n   ARGV: gen px
LEASE_LUA = (
    """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
"""
    + LEASE_TAGS_LUA
    + """
local out = {redis.call('GET', KEYS[1]) or false}
lease_tags(out, 2, 0, ARGV[1])
return out
"""
)

# Invalidate keys of one slot: drop values and their tag memberships, bump generations.
# KEYS: value x n, key-gen x n, key-tags x n   ARGV: n, gen px
DELETE_KEYS_LUA = (
    BUMP_LUA
    + """
local n = tonumber(ARGV[1])
local dropped = 0
for i = 1, n do
  dropped = dropped + redis.call('DEL', KEYS[i])
  local key_tags = redis.call('SMEMBERS', KEYS[2 * n + i])
  if #key_tags > 0 then  -- an empty set does not exist: nothing to delete
    for _, tag in ipairs(key_tags) do redis.call('SREM', tag, KEYS[i]) end
    redis.call('DEL', KEYS[2 * n + i])
  end
  bump(KEYS[n + i], ARGV[2])
end
return dropped
"""
)

# Invalidate tags in some slots: in each, drop every member value of the tag's set (and
# its memberships in other tags) and the set, and bump the tag's generation. A batch
# invalidation sends each tenant's tags once for all of its slots (tenant_slots of
# them): the script builds the names (slot prefix + ':t:' / ':gt:' + tag) itself, so a
# tag costs the wire a name, not two names per slot. Member names share their set's
# slot. Most tags have nothing cached and no lease: one EXISTS (per 1000 sets) says
# whether any set is there to empty, one MGET reads the generations, and only those
# that exist are bumped (a missing one guards no lease: see LEASE_TAGS_LUA), so such a
# tag costs no write at all. A bump is BUMP_LUA's, the clock read once for the run:
# to now (formatted once) unless it is already there or beyond (a clock stepped back).
# KEYS: a name in the first slot (routes the call; not written)
# ARGV: gen px, then groups of (s, slot prefix x s, n, tag x n)
# Sent one slot per call (TAGS_LUA), the names it touches are all in its declared key's
# slot, as a script without flags must keep them. Sent as TAGS_NODE_LUA, one call
# carries many slots of one node (flag allow-cross-slot-keys, Redis >= 7.0): the server
# still refuses any name of a slot it does not serve (moved, migrating, importing)
# with an error, and the caller then sends every slot again, one per call, following
# redirections; bumping twice invalidates nothing more.
TAGS_LUA = """
local call = redis.call
local px = ARGV[1]
local now = call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local now_s = string.format('%.0f', now_us)
local dropped = 0
local function empty(set)
  local members = redis.call('SMEMBERS', set)
  for _, member in ipairs(members) do
    dropped = dropped + redis.call('DEL', member)
    local cut = string.find(member, '}:v:', 1, true)
    if cut then
      local key_tags = string.sub(member, 1, cut) .. ':kt:' .. string.sub(member, cut + 4)
      for _, tag in ipairs(redis.call('SMEMBERS', key_tags)) do
        if tag ~= set then redis.call('SREM', tag, member) end
      end
      redis.call('DEL', key_tags)
    end
  end
  if #members > 0 then redis.call('DEL', set) end  -- an empty set does not exist
end
local i = 2
while i <= #ARGV do
  local s = tonumber(ARGV[i])
  local first = i + s + 2
  local last = first + tonumber(ARGV[i + s + 1]) - 1
  for j = i + 1, i + s do
    local slot = ARGV[j]
    for c = first, last, 1000 do
      local stop = math.min(c + 999, last)
      local sets = {}
      for k = c, stop do sets[k - c + 1] = slot .. ':t:' .. ARGV[k] end
      if call('EXISTS', unpack(sets)) > 0 then
        for _, set in ipairs(sets) do empty(set) end
      end
      local gens = {}
      for k = c, stop do gens[k - c + 1] = slot .. ':gt:' .. ARGV[k] end
      local olds = call('MGET', unpack(gens))
      for k = 1, #gens do
        local old = olds[k]
        if old then
          if tonumber(old) < now_us then
            call('SET', gens[k], now_s, 'PX', px)
          else
            call('SET', gens[k], string.format('%.0f', tonumber(old) + 1), 'PX', px)
          end
        end
      end
    end
  end
  i = last + 1
end
return dropped
"""
TAGS_NODE_LUA = "#!lua flags=allow-cross-slot-keys\n" + TAGS_LUA.lstrip("\n")

# Compare-and-delete release of a fill lock, waking waiters (if any) through pub/sub.
# KEYS: lock, wait-mark   ARGV: token, channel, message
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0
"""

# A process about to wait for a fill lock: if the lock is held, leave a mark so its
# release is published (no waiter, no message: fills are not broadcast to every
# process). The waiter subscribes before it calls this, so no release is missed.
# KEYS: lock, wait-mark   ARGV: px (how long the waiter waits)
WATCH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
end
return 1
"""


def translate(layer: str, operation: str, exc: BaseException) -> BackendError:
    """The BackendError for a redis-py or socket error (raised ``from exc`` by callers)."""
    if isinstance(exc, redis.exceptions.TimeoutError):
        return BackendTimeoutError(layer, operation, str(exc) or "timed out")
    return BackendError(layer, operation, f"{type(exc).__name__}: {exc}")


ERRORS = (redis.exceptions.RedisError, OSError)
# What a read returns for a value name of another Redis type: an entry too short to
# decode, so it is counted as one error, deleted and read as a miss (GET_OR_LOCK_LUA
# deletes it itself, in the same script). Such a name would otherwise fail every
# read with WRONGTYPE and keep the breaker open.
WRONG_TYPE_VALUE = b""
# Unanswered lock attempts remembered for release, and released per lock call.
UNANSWERED_MAX = 4096
UNANSWERED_BATCH = 16
# Tag-slot pairs (one tag in one slot) per call of TAGS_NODE_LUA. A node serves no one
# else while a script runs: 256 hold it ~0.35 ms when no generation is live (a lookup
# each) and ~1.4 ms when every one is (a bump each: the worst case, kept bounded);
# 1024 was ~5% faster for the CDC worker when every call wrote its generations.
NODE_CALL_WORK = 256

log = logging.getLogger("tieredcache.redis")
# Script calls of a pipeline: (node, None on standalone Redis; [numkeys, *keys, *args]).
Calls = list[tuple[Any, list[Any]]]


def _wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("WRONGTYPE")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AsyncRedisStore:
    """The Redis commands of the layer on one redis-py client (standalone or cluster)."""

    def __init__(
        self,
        client: Any,
        *,
        cluster: bool,
        keyspace: RedisKeyspace,
        layer: str,
        gen_px: int,
        lock_window: float = 0.5,
    ) -> None:
        self.client = client
        # How long after a lock attempt's call its script may still take the lock: the
        # longest a command waits here before it is written (a connection being set up)
        # plus how long its reply is waited for. A script run later took a lock nobody
        # would learn of (the reply's deadline has passed), so it takes none.
        self.lock_window_ms = lock_window * 1000
        # Server clock (Redis TIME, ms) minus this process's monotonic clock (ms), as
        # an upper bound: each lock reply gives one (server time when the script ran
        # minus the time of the call, >= the true offset), and the lowest is kept.
        # It starts as if the wall clocks agreed; a lock refused as too late whose
        # reply still arrived (the estimate was low: a clock stepped, a failover)
        # resets it to that reply's measure.
        self.clock_offset_ms = (time.time() - time.monotonic()) * 1000
        # Lock attempts whose reply never came (timeout, lost connection), as (when to
        # release, key, token): one that ran in time took the lock for no one. Each is
        # released once its deadline is well past (a script still queued then takes
        # nothing), by the next lock attempt that gets a reply.
        self.unanswered: collections.deque[tuple[float, CacheKey, str]] = collections.deque(
            maxlen=UNANSWERED_MAX
        )
        self.cluster = cluster
        self.keyspace = keyspace
        self.layer = layer
        self.gen_px = gen_px
        self._fill = client.register_script(FILL_LUA)
        self._lock = client.register_script(LOCK_LUA)
        self._lease = client.register_script(LEASE_LUA)
        self._delete_keys = client.register_script(DELETE_KEYS_LUA)
        self._tags = client.register_script(TAGS_LUA)
        self._tags_node = client.register_script(TAGS_NODE_LUA)
        # Whether a batch of tags goes out as one call per node (TAGS_NODE_LUA); off
        # for good when the server cannot load that script (Redis < 7.0: no flags).
        self.tags_by_node = True
        # Node calls refused (a slot not where the client thought): sent per slot.
        self.tags_by_node_refused = 0
        self._release = client.register_script(RELEASE_LUA)
        self._watch = client.register_script(WATCH_LUA)
        self._get_or_lock = client.register_script(GET_OR_LOCK_LUA)

    async def get(self, key: CacheKey) -> bytes | None:
        """A plain GET: a hit costs what a raw GET costs. A value name of another type
        reads as :data:`WRONG_TYPE_VALUE`; the cache drops it as it drops any entry
        that does not decode (counted as one error, deleted, reloaded)."""
        try:
            value: bytes | None = await self.client.get(self.keyspace.value(key))
        except ERRORS as exc:
            if _wrong_type(exc):
                return WRONG_TYPE_VALUE
            raise translate(self.layer, "get", exc) from exc
        return value

    def deadline(self) -> tuple[float, int]:
        """(now, the last server time in ms at which a lock attempt made now may
        still take the lock): ``lock_window`` later, on the server clock as calibrated
        from earlier replies (monotonic ms for ``now``)."""
        now = time.monotonic() * 1000
        return now, int(now + self.clock_offset_ms + self.lock_window_ms)

    def _unanswered(self, key: CacheKey, token: str, sent_ms: float) -> None:
        # Twice the window: past the deadline as the server reckons it, whatever the
        # error of the calibrated offset (a script queued behind the release is late).
        self.unanswered.append((sent_ms + 2 * self.lock_window_ms, key, token))

    async def release_unanswered(self, now_ms: float) -> None:
        """Release (compare-and-delete) up to UNANSWERED_BATCH fill locks of attempts
        that got no reply and whose deadline has passed. Best effort: a failure leaves
        them for the next call (Redis is still away)."""
        unanswered = self.unanswered
        for _ in range(UNANSWERED_BATCH):
            if not unanswered or unanswered[0][0] > now_ms:
                return
            _, key, token = unanswered[0]
            try:
                await self.release_lock(key, token)
            except BackendError:
                return
            unanswered.popleft()

    def _taken(self, flag: int, server_ms: int, sent_ms: float) -> bool | None:
        """The lock verdict of a script reply: True, False (held by another), or None
        (refused as too late although this reply arrived: load without the lock)."""
        measured = server_ms - sent_ms
        if flag == 2:
            self.clock_offset_ms = measured
            return None
        if measured < self.clock_offset_ms:
            self.clock_offset_ms = measured
        return flag == 1

    async def get_many(self, keys: Sequence[CacheKey]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self.keyspace.value(key) for key in keys]
        try:
            if self.cluster:
                # Groups names by slot: one MGET per slot, pipelined per node.
                values: list[bytes | None] = await self.client.mget_nonatomic(names)
            else:
                values = await self.client.mget(names)
        except ERRORS as exc:
            raise translate(self.layer, "get_many", exc) from exc
        return values

    async def generations(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[bytes | None, ...]:
        """The generations guarding a fill of ``key`` (its own and its tags'): one GET,
        or with tags one LEASE_LUA call (a missing tag generation is created)."""
        slot = self.keyspace.slot_of(key)
        key_gen = f"{slot}:gk:{key.body}"
        try:
            if not tags:
                return (await self.client.get(key_gen),)
            _, tag_gens = self.keyspace.tag_names_in(slot, tags)
            values = await self._lease(keys=[key_gen, *tag_gens], args=[self.gen_px])
        except ERRORS as exc:
            raise translate(self.layer, "lease", exc) from exc
        return tuple(values)

    async def lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, px: int
    ) -> tuple[bool | None, tuple[bytes | None, ...]]:
        """Try the fill lock; returns whether it was taken (None: refused as too late,
        see LOCK_DEADLINE_LUA) and the fill's generations."""
        slot = self.keyspace.slot_of(key)
        _, tag_gens = self.keyspace.tag_names_in(slot, tags)
        names = [f"{slot}:l:{key.body}", f"{slot}:gk:{key.body}", *tag_gens]
        sent, deadline = self.deadline()
        try:
            result = await self._lock(keys=names, args=[token, px, deadline, self.gen_px])
        except ERRORS as exc:
            self._unanswered(key, token, sent)
            raise translate(self.layer, "lock", exc) from exc
        if self.unanswered:
            await self.release_unanswered(sent)
        gens = tuple(result[2:]) + (None,) * (len(names) + 1 - len(result))
        return self._taken(result[0], result[1], sent), gens

    async def get_or_lock(
        self, key: CacheKey, tags: Sequence[Tag], token: str, px: int, taken_at: float
    ) -> tuple[bytes | None, bool | None, tuple[tuple[bytes | None, ...], float] | None]:
        """(value, None, None) if present, else (None, lock taken, lease): the lease is
        the fill's generations and ``taken_at`` (the layer's lease, built here so that
        the layer's method needs no coroutine of its own). ``taken`` is None when the
        script ran too late to take the lock (see LOCK_DEADLINE_LUA)."""
        slot = self.keyspace.slot_of(key)
        _, tag_gens = self.keyspace.tag_names_in(slot, tags)
        names = [f"{slot}:v:{key.body}", f"{slot}:l:{key.body}", f"{slot}:gk:{key.body}"]
        names.extend(tag_gens)
        sent, deadline = self.deadline()
        try:
            result = await self._get_or_lock(keys=names, args=[token, px, deadline, self.gen_px])
        except ERRORS as exc:
            self._unanswered(key, token, sent)
            raise translate(self.layer, "get", exc) from exc
        if self.unanswered:
            await self.release_unanswered(sent)
        if result[0] is not None:
            return result[0], None, None
        gens = tuple(result[3:]) + (None,) * (len(names) + 1 - len(result))
        return None, self._taken(result[1], result[2], sent), (gens, taken_at)

    async def set(
        self,
        key: CacheKey,
        payload: bytes,
        px: int,
        tags: Sequence[Tag],
        lease: Sequence[bytes | None] | None,
        tag_set_px: int,
        bump: bool = False,
        unlock: str | None = None,
    ) -> bool:
        slot = self.keyspace.slot_of(key)
        tag_sets, tag_gens = self.keyspace.tag_names_in(slot, tags)
        check = 0 if lease is None else 1
        channel = self.keyspace.fills_channel(key.namespace)
        args: list[Any] = [
            payload, px, len(tags), check, tag_set_px, int(bump), self.gen_px,
            unlock or "", channel, key.full,
        ]  # fmt: skip
        if lease is not None:
            args.extend(b"" if g is None else g for g in lease)
        names = [
            f"{slot}:v:{key.body}",
            f"{slot}:gk:{key.body}",
            f"{slot}:kt:{key.body}",
            f"{slot}:l:{key.body}",
            f"{slot}:w:{key.body}",
            *tag_sets,
            *tag_gens,
        ]
        try:
            result = await self._fill(keys=names, args=args)
        except ERRORS as exc:
            raise translate(self.layer, "set", exc) from exc
        return bool(result)

    async def _run(self, script: Any, build: Callable[[], Calls]) -> int:
        """EVALSHA ``script`` once per call ``(node, [numkeys, *keys, *args])`` of
        ``build()`` (called once the client knows the cluster's slots), all in
        one pipeline: one round trip on standalone Redis, one per node on a cluster
        (redis-py's cluster pipeline sends each node its scripts together). ``node``
        (None on standalone Redis) is named up front: left to find the keys itself,
        redis-py's sync cluster pipeline asks the server (COMMAND GETKEYS, one round
        trip per script); a redirection is still followed, by the call's first key.
        A server without the script (flushed, failed over) gets it, and the pipeline is
        sent again: running a script twice invalidates nothing more. Raises redis-py's
        errors (callers translate them)."""
        for attempt in range(2):
            # The context manager resets the pipeline, returning its connection even
            # when execute() fails half-way (Redis down).
            async with self.client.pipeline(transaction=False) as pipe:
                sha = script.sha
                for node, args in build():
                    if node is None:
                        pipe.execute_command("EVALSHA", sha, *args)
                    else:
                        pipe.execute_command("EVALSHA", sha, *args, target_nodes=node)
                try:
                    results = await pipe.execute()
                except redis.exceptions.NoScriptError:
                    if attempt:
                        raise
                    try:
                        script.sha = await self.client.script_load(script.script)
                    except redis.exceptions.ResponseError as exc:
                        # Redis 6 does not compile a shebang ("Error compiling script"),
                        # a server without the flag says "Unexpected flag in script
                        # shebang": such a server is sent each slot alone from now on.
                        refused = str(exc).lower()
                        if script is self._tags_node and (
                            "compiling" in refused or "shebang" in refused
                        ):
                            self.tags_by_node = False
                        raise
                    continue
            return sum(int(result) for result in results)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _per_slot(self, operation: str, script: Any, build: Callable[[], Calls]) -> int:
        try:
            return await self._run(script, build)
        except (*ERRORS, redis.exceptions.RedisClusterException) as exc:
            raise translate(self.layer, operation, exc) from exc

    def _node_of(self, name: str) -> Any:
        return self.client.get_node_from_key(name) if self.cluster else None

    async def delete(self, keys: Sequence[CacheKey]) -> int:
        if not keys:
            return 0

        def build() -> Calls:
            calls: Calls = []
            for values, gens, key_tags in self.keyspace.key_groups(keys):
                n = len(values)
                args = [3 * n, *values, *gens, *key_tags, n, self.gen_px]
                calls.append((self._node_of(values[0]), args))
            return calls

        return await self._per_slot("delete", self._delete_keys, build)

    async def delete_tags(self, tags: Sequence[Tag]) -> int:
        """Invalidate ``tags`` in every slot of their tenants (TAGS_LUA): one call per
        node and per NODE_CALL_WORK tag-slots; per slot if the server refuses."""
        if not tags:
            return 0
        batches = self.keyspace.tag_batches(tags)
        if self.tags_by_node:
            try:
                return await self._run(self._tags_node, lambda: self._node_calls(batches))
            except (redis.exceptions.ResponseError, KeyError) as exc:
                # A slot that is not where the client placed it (moved, migrating,
                # importing, failed over; not in the client's map at all: KeyError) or
                # a server without script flags: each slot again, alone, on the
                # per-slot path that follows redirections.
                self.tags_by_node_refused += 1
                log.info("%s: tags sent per slot (%s)", self.layer, exc)
            except (*ERRORS, redis.exceptions.RedisClusterException) as exc:
                raise translate(self.layer, "delete_tags", exc) from exc

        def build() -> Calls:
            calls: Calls = []
            px = self.gen_px
            for slots, names in batches:
                tail = [len(names), *names]
                for prefix, _ in slots:
                    calls.append((self._node_of(prefix), [1, prefix, px, 1, prefix, *tail]))
            return calls

        return await self._per_slot("delete_tags", self._tags, build)

    def _node_calls(self, batches: Sequence[tuple[Sequence[tuple[str, int]], list[str]]]) -> Calls:
        """The calls of TAGS_NODE_LUA for ``batches`` (see RedisKeyspace.tag_batches):
        each node's slots together, about NODE_CALL_WORK tag-slots per call."""
        per_node: dict[Any, list[tuple[list[str], list[str]]]] = {}
        if self.cluster:
            # The client's slot map, read directly: get_node_from_slot (a lock and a
            # deprecation wrapper per call) was a third of the client's time per batch.
            # A slot not in it raises KeyError (sent per slot, see delete_tags).
            slot_map = self.client.nodes_manager.slots_cache
            for slots, names in batches:
                here: dict[Any, list[str]] = {}
                for prefix, slot in slots:
                    node = slot_map[slot][0]
                    prefixes = here.get(node)
                    if prefixes is None:
                        here[node] = prefixes = []
                        per_node.setdefault(node, []).append((prefixes, names))
                    prefixes.append(prefix)
        else:
            per_node[None] = [([prefix for prefix, _ in slots], names) for slots, names in batches]
        calls: Calls = []
        px = self.gen_px
        for node, groups in per_node.items():
            args: list[Any] = []
            work = 0
            for prefixes, names in groups:
                n = len(names)
                start = 0
                while start < len(prefixes):
                    part = prefixes[start : start + max(1, (NODE_CALL_WORK - work) // n)]
                    if not args:
                        args = [1, part[0], px]
                    args.append(len(part))
                    args += part
                    args.append(n)
                    args += names
                    work += len(part) * n
                    start += len(part)
                    if work >= NODE_CALL_WORK:
                        calls.append((node, args))
                        args, work = [], 0
            if args:
                calls.append((node, args))
        return calls

    async def release_lock(self, key: CacheKey, token: str) -> bool:
        channel = self.keyspace.fills_channel(key.namespace)
        try:
            slot = self.keyspace.slot_of(key)
            released = await self._release(
                keys=[f"{slot}:l:{key.body}", f"{slot}:w:{key.body}"],
                args=[token, channel, key.full],
            )
        except ERRORS as exc:
            raise translate(self.layer, "unlock", exc) from exc
        return bool(released)

    async def lock_held(self, key: CacheKey) -> bool:
        try:
            return bool(await self.client.exists(self.keyspace.lock(key)))
        except ERRORS as exc:
            raise translate(self.layer, "lock", exc) from exc

    async def watch_lock(self, key: CacheKey, px: int) -> bool:
        """Whether the fill lock is held; if so, its release is published for ``px`` ms."""
        slot = self.keyspace.slot_of(key)
        try:
            held = await self._watch(
                keys=[f"{slot}:l:{key.body}", f"{slot}:w:{key.body}"], args=[px]
            )
        except ERRORS as exc:
            raise translate(self.layer, "lock", exc) from exc
        return bool(held)

    async def publish(self, channel: str, message: bytes) -> None:
        try:
            await self.client.publish(channel, message)
        except ERRORS as exc:
            raise translate(self.layer, "publish", exc) from exc

    async def hash_set(self, name: str, mapping: dict[str, str]) -> None:
        """HSET ``mapping`` into the hash ``name`` (namespace state: epochs, settings)."""
        try:
            await self.client.hset(name, mapping=mapping)
        except ERRORS as exc:
            raise translate(self.layer, "hset", exc) from exc

    async def hash_get(self, name: str) -> dict[str, str]:
        try:
            raw = await self.client.hgetall(name)
        except ERRORS as exc:
            raise translate(self.layer, "hgetall", exc) from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    async def hash_get_then_set(
        self, get_name: str, set_name: str, mapping: dict[str, str]
    ) -> dict[str, str]:
        """HGETALL ``get_name`` and HSET ``mapping`` into ``set_name``, one round trip."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(get_name)
                pipe.hset(set_name, mapping=mapping)
                raw, _ = await pipe.execute()
        except ERRORS as exc:
            raise translate(self.layer, "hgetall", exc) from exc
        return {_text(k): _text(v) for k, v in raw.items()}

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except ERRORS as exc:
            raise translate(self.layer, "ping", exc) from exc

    async def close(self) -> None:
        await self.client.aclose()
