"""Per-partition progress of the worker: what the storage side and the CDN acknowledged.

The worker consumes a partition in order and hands each batch to the storage
layers (and the replica broadcast) and then, on its own thread, to the CDN. A
partition's committable offset is the lower of the two acknowledged offsets: the
CDN's work is queued only after the storage side acknowledged it, so the CDN's
progress never passes the storage side's, and a crash replays whatever the CDN
had not confirmed (invalidation is idempotent; at-least-once is the contract).

Every assignment of a partition gets a new *generation*. A batch is stamped with
the generations it was read under; an acknowledgement arriving after the
partition was revoked (or revoked and assigned again, which restarts reading at
the committed offset) is stale and ignored, so a commit can never cover
messages this member did not process in order.

>>> p = Progress(cdn=True)
>>> p.assign([("t", 0)])
>>> stamp = p.stamp({("t", 0): 10}, {("t", 0): 1_000})
>>> p.storage_acked(stamp); p.committable()
{}
>>> p.cdn_acked(stamp); p.committable()
{('t', 0): 10}
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Progress", "Stamp", "TopicPartition"]

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Stamp:
    """A batch's end offset per partition, with the generation it was read under."""

    offsets: Mapping[TopicPartition, tuple[int, int]]  # tp -> (generation, end offset)


@dataclass(slots=True)
class _State:
    generation: int
    storage: int | None = None
    cdn: int | None = None
    committed: int | None = None
    # (end offset, oldest source.ts_ms in that batch) of batches not yet committed.
    pending_ts: deque[tuple[int, int]] = field(default_factory=deque)


class Progress:
    """Thread-safe bookkeeping of acknowledged and committed offsets.

    ``cdn=False`` (no invalidation-only layer): the CDN side counts as acknowledged
    as soon as the storage side is.
    """

    def __init__(self, *, cdn: bool) -> None:
        self._cdn = cdn
        self._lock = threading.Lock()
        self._states: dict[TopicPartition, _State] = {}
        self._generation = 0

    # -- ownership ------------------------------------------------------------
    def assign(self, tps: Iterable[TopicPartition]) -> None:
        with self._lock:
            for tp in tps:
                self._generation += 1
                self._states[tp] = _State(self._generation)

    def release(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Forget ``tps``; return what may still be committed for them (on revoke)."""
        with self._lock:
            ready = self._committable_locked(tps)
            for tp in tps:
                self._states.pop(tp, None)
            return ready

    def owned(self) -> list[TopicPartition]:
        with self._lock:
            return list(self._states)

    def owns(self, tp: TopicPartition) -> bool:
        with self._lock:
            return tp in self._states

    # -- acknowledgements -----------------------------------------------------
    def stamp(
        self, end_offsets: Mapping[TopicPartition, int], oldest_ts_ms: Mapping[TopicPartition, int]
    ) -> Stamp:
        """Stamp a batch (only partitions still owned); remember its oldest event time."""
        with self._lock:
            offsets: dict[TopicPartition, tuple[int, int]] = {}
            for tp, end in end_offsets.items():
                state = self._states.get(tp)
                if state is None:
                    continue
                offsets[tp] = (state.generation, end)
                if tp in oldest_ts_ms:
                    state.pending_ts.append((end, oldest_ts_ms[tp]))
            return Stamp(offsets)

    def storage_acked(self, stamp: Stamp) -> None:
        self._ack(stamp, "storage")
        if not self._cdn:
            self._ack(stamp, "cdn")

    def cdn_acked(self, stamp: Stamp) -> None:
        self._ack(stamp, "cdn")

    def _ack(self, stamp: Stamp, side: str) -> None:
        with self._lock:
            for tp, (generation, end) in stamp.offsets.items():
                state = self._states.get(tp)
                if state is None or state.generation != generation:
                    continue  # revoked since: the next owner replays from the commit
                if side == "cdn":
                    # Never past the storage side: the CDN refetching from a layer that
                    # still holds the old value would cache it again, for its whole TTL.
                    if state.storage is None:
                        continue
                    end = min(end, state.storage)
                current = getattr(state, side)
                if current is None or end > current:
                    setattr(state, side, end)

    # -- commits --------------------------------------------------------------
    def committable(self) -> dict[TopicPartition, int]:
        """Offsets acknowledged by both sides and not committed yet."""
        with self._lock:
            return self._committable_locked(list(self._states))

    def _committable_locked(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        ready: dict[TopicPartition, int] = {}
        for tp in tps:
            state = self._states.get(tp)
            if state is None or state.storage is None or state.cdn is None:
                continue
            offset = min(state.storage, state.cdn)
            if state.committed is None or offset > state.committed:
                ready[tp] = offset
        return ready

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record a successful commit of ``offsets``."""
        with self._lock:
            for tp, offset in offsets.items():
                state = self._states.get(tp)
                if state is None:
                    continue
                state.committed = offset
                while state.pending_ts and state.pending_ts[0][0] <= offset:
                    state.pending_ts.popleft()

    def set_committed(self, tp: TopicPartition, offset: int) -> None:
        """The group's committed offset as read from the broker (before our first commit)."""
        with self._lock:
            state = self._states.get(tp)
            if state is not None and state.committed is None:
                state.committed = offset

    def snapshot(
        self,
    ) -> dict[TopicPartition, tuple[int | None, int | None, int | None, int | None]]:
        """Per partition: (storage, cdn, committed, oldest uncommitted source.ts_ms)."""
        with self._lock:
            return {
                tp: (
                    s.storage,
                    s.cdn,
                    s.committed,
                    min((ts for _, ts in s.pending_ts), default=None),
                )
                for tp, s in self._states.items()
            }
