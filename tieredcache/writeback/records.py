"""What write-back hands around: a journaled write and a flusher's report.

A :class:`WriteRecord` is one acknowledged write as the journal keeps it and
your store receives it; its journal id orders it (``journal_order``) and
gives the store its idempotence guard (``version``). A :class:`FlushReport`
counts what a flusher round or a drain did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import WriteBackError

__all__ = ["FlushReport", "WriteRecord", "id_parts", "journal_order"]

# ``version`` is ``ms << 20 | seq``: a 64-bit integer until the year 2248.
_SEQ_BITS = 20


def id_parts(entry_id: str) -> tuple[int, int]:
    """``(ms, seq)`` of a journal id ``"<ms>-<seq>"``; :class:`WriteBackError` if malformed."""
    ms, sep, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq) if sep else 0
    except ValueError:
        raise WriteBackError(f"journal id {entry_id!r} is not '<ms>-<seq>'") from None


def journal_order(record: WriteRecord) -> tuple[int, int]:
    """Sort key in journal order; a malformed id sorts first (the decode check dead-letters it)."""
    try:
        return id_parts(record.id)
    except WriteBackError:
        return (-1, -1)


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One acknowledged write, as your store receives it.

    ``id`` is the journal id (``"<ms>-<seq>"``, increasing per namespace) and
    ``version`` the same order as one integer (``ms << 20 | seq``, fits a
    BIGINT until 2248): compare it in the store to make writes idempotent.
    ``key`` is the full cache key (``namespace:tenant:body``), ``reader`` the
    cached function's name, ``value`` the decoded value (typed by the reader's
    return annotation when this process made its writer, else plain data) and
    ``payload`` its encoded form. ``attempts`` counts the store calls that
    included it, ``deliveries`` how often the journal handed it out (above 1
    after a flusher crashed); ``error`` is the dead-letter reason.

    >>> def store(records: list[WriteRecord]) -> None:      # doctest: +SKIP
    ...     for r in records:
    ...         upsert(r.tenant, r.body, r.value, r.version)  # WHERE version < new
    """

    id: str
    tenant: str
    key: str
    reader: str
    payload: bytes
    serializer: str
    value: Any = None
    attempts: int = 0
    deliveries: int = 1
    error: str | None = None

    @property
    def body(self) -> str:
        """The key without ``namespace:tenant:``, as ``cache.get`` takes it."""
        return self.key.split(":", 2)[-1]

    @property
    def version(self) -> int:
        """The journal order as one 64-bit integer, for the store's idempotence guard."""
        ms, seq = id_parts(self.id)
        if seq >> _SEQ_BITS:
            raise WriteBackError(f"journal id {self.id} does not fit a 64-bit version")
        return ms << _SEQ_BITS | seq


@dataclass(slots=True)
class FlushReport:
    """What a flusher round (or a drain) did.

    ``read``: entries taken from the journal; ``stored``: records the store
    accepted; ``coalesced``: writes skipped because a later write to the same
    key was in the batch; ``retries``: store calls repeated after a failure;
    ``dead``: records dead-lettered (``error`` says why); ``aborted``: stopped
    while retrying, the batch stays in the journal for the next flusher.

    >>> report = flusher.drain()                 # doctest: +SKIP
    >>> assert not report.dead, report.dead      # doctest: +SKIP
    """

    read: int = 0
    stored: int = 0
    coalesced: int = 0
    retries: int = 0
    dead: list[WriteRecord] = field(default_factory=list)
    aborted: bool = False

    def add(self, other: FlushReport) -> None:
        """Add ``other``'s counts to this report (a drain sums its rounds)."""
        self.read += other.read
        self.stored += other.stored
        self.coalesced += other.coalesced
        self.retries += other.retries
        self.dead.extend(other.dead)
        self.aborted = self.aborted or other.aborted
