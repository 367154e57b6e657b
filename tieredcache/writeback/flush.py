"""One flusher round without I/O: a generator that yields journal and store operations.

:func:`flush_round` holds every decision a flusher makes (what to dead-letter,
how to coalesce, when to retry, when to store records alone); the sync and
async flushers (:mod:`.sync`, :mod:`.aio`) only carry the operations out, a
few lines each, as :mod:`tieredcache.runners` does for the read flows.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ConfigurationError, TieredCacheError
from .records import FlushReport, WriteRecord, journal_order

__all__ = [
    "Ack",
    "DeadLetter",
    "FlushOp",
    "FlushRound",
    "FlushSettings",
    "Read",
    "Sleep",
    "Store",
    "Touch",
    "flush_round",
]


# -- operations: what the round asks of the journal, the store and the clock ------------
@dataclass(slots=True)
class Read:
    """Take up to ``count`` entries (crashed flushers' first), waiting up to ``block`` s.
    Receives the list of records."""

    count: int
    block: float


@dataclass(slots=True)
class Store:
    """Call ``store(records)``. Receives None, or the exception the store raised."""

    records: list[WriteRecord]


@dataclass(slots=True)
class Ack:
    """Delete the flushed entries from the journal."""

    records: list[WriteRecord]


@dataclass(slots=True)
class Touch:
    """Reset the entries' idle time: still ours, not to be claimed by another flusher."""

    records: list[WriteRecord]


@dataclass(slots=True)
class DeadLetter:
    """Move the entry to the dead-letter stream (and drop its key if it was the newest)."""

    record: WriteRecord
    reason: str


@dataclass(slots=True)
class Sleep:
    """Pause before a retry. Receives False when the flusher is stopped without waiting."""

    seconds: float


FlushOp = Read | Store | Ack | Touch | DeadLetter | Sleep
FlushRound = Generator[FlushOp, Any, FlushReport]


@dataclass(frozen=True, slots=True)
class FlushSettings:
    """A flusher's knobs, checked once; see :meth:`tieredcache.WriteBack.flusher`."""

    batch_size: int
    max_attempts: int
    max_deliveries: int
    backoff: float
    max_backoff: float
    block: float
    error_pause: float
    jitter: Callable[[], float]

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 1000:  # one script call acks the batch: bounded args
            raise ConfigurationError(f"batch_size must be 1..1000, got {self.batch_size}")
        if self.max_attempts < 1 or self.max_deliveries < 1:
            raise ConfigurationError("max_attempts and max_deliveries must be >= 1")
        if min(self.backoff, self.max_backoff, self.block, self.error_pause) < 0:
            raise ConfigurationError("backoff, max_backoff, block and error_pause must be >= 0")

    def delay(self, failures: int) -> float:
        """Exponential backoff with jitter in [d/2, d): spread out, never zero."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return ceiling / 2 + self.jitter() * ceiling / 2


def _dead(record: WriteRecord, reason: str, report: FlushReport) -> Generator[FlushOp, Any, None]:
    reason = reason if len(reason) <= 1000 else reason[:999] + "…"
    yield DeadLetter(record, reason)
    report.dead.append(replace(record, error=reason))


def flush_round(s: FlushSettings, decode: Callable[[WriteRecord], Any], block: float) -> FlushRound:
    """One flusher round: yields journal and store operations, receives their results.

    A ``Store`` gets back None or the exception the store raised; a ``Sleep``
    gets back False when the flusher is being stopped without waiting.
    """
    taken: list[WriteRecord] = yield Read(s.batch_size, block)
    report = FlushReport(read=len(taken))
    good: list[WriteRecord] = []
    for record in sorted(taken, key=journal_order):
        if record.deliveries > s.max_deliveries:
            reason = (
                f"handed out {record.deliveries} times and never flushed "
                "(did it crash the flushers that took it?)"
            )
        else:
            try:
                good.append(replace(record, value=decode(record)))
                continue
            except TieredCacheError as exc:
                reason = str(exc)
        yield from _dead(record, reason, report)
    newest: dict[str, WriteRecord] = {}
    older: dict[str, list[WriteRecord]] = {}
    for record in good:
        if record.key in newest:
            older.setdefault(record.key, []).append(newest[record.key])
        newest[record.key] = record
    batch = sorted(newest.values(), key=journal_order)
    report.coalesced = len(good) - len(batch)
    if not batch:
        return report
    error: BaseException | None = None
    for attempt in range(1, s.max_attempts + 1):
        if attempt > 1:
            report.retries += 1
            if not (yield Sleep(s.delay(attempt - 1))):
                report.aborted = True
                return report
            yield Touch(good)  # still ours: not to be claimed by another flusher
        batch = [replace(record, attempts=attempt) for record in batch]
        error = yield Store(batch)
        if error is None:
            yield Ack(good)
            report.stored += len(batch)
            return report
    # Still failing: store each record alone, once, so one bad record cannot sink the rest.
    failed: list[tuple[WriteRecord, BaseException]] = []
    if len(batch) == 1:
        assert error is not None
        failed.append((batch[0], error))
    else:
        for record in batch:
            record = replace(record, attempts=record.attempts + 1)
            alone = yield Store([record])
            if alone is None:
                yield Ack([record, *older.get(record.key, [])])
                report.stored += 1
            else:
                failed.append((record, alone))
    for record, failure in failed:
        reason = f"store failed {record.attempts} times: {type(failure).__name__}: {failure}"
        yield from _dead(record, reason, report)
        if record.key in older:
            yield Ack(older[record.key])  # superseded by the dead letter, which holds the value
    return report
