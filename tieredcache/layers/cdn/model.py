"""The data a purge works with: requests, acknowledgements, results, secrets, batching.

No I/O here; ``base`` runs the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ...errors import ConfigurationError, InvalidKeyError

__all__ = ["PurgeAck", "PurgeRequest", "PurgeResult", "Secret", "batches"]


class Secret:
    """A credential that never shows itself in a repr, a str or a log line.

    >>> s = Secret("hunter2")
    >>> repr(s), s.reveal()
    ("Secret('********')", 'hunter2')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ConfigurationError("a CDN credential must not be empty")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    """One planned HTTP purge request (without per-attempt auth headers)."""

    method: str
    url: str
    body: bytes
    keys: tuple[str, ...]
    target: str
    headers: Mapping[str, str] = field(default_factory=dict)
    cost: int = 1


@dataclass(frozen=True, slots=True)
class PurgeAck:
    """A vendor's acknowledgement of one request.

    ``purged`` is the object count when the vendor reports it (Varnish);
    ``estimated_seconds`` the completion estimate when it reports one (Akamai).
    """

    target: str
    keys: tuple[str, ...]
    status: int
    purged: int | None = None
    estimated_seconds: float | None = None
    purge_id: str | None = None


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """All acknowledgements of one :meth:`Purger.purge` call.

    >>> PurgeResult((PurgeAck("n1", ("k",), 200, purged=2),)).purged
    2
    """

    acks: tuple[PurgeAck, ...]

    @property
    def purged(self) -> int | None:
        counts = [a.purged for a in self.acks if a.purged is not None]
        return sum(counts) if counts else None


def batches(
    keys: Sequence[str],
    max_count: int,
    max_size: int = 1 << 62,
    key_size: Callable[[str], int] = len,
    overhead: int = 0,
) -> list[tuple[str, ...]]:
    """Split ``keys`` in order into batches of at most ``max_count`` keys whose size,
    ``overhead + sum(key_size(k))`` (count separators in ``key_size``), is ``max_size``
    at most. Linear: each key is measured once.

    >>> batches(["a", "b", "c"], 2)
    [('a', 'b'), ('c',)]
    """
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    size = overhead
    for key in keys:
        item = key_size(key)
        if overhead + item > max_size:
            raise InvalidKeyError(
                f"surrogate key {key[:64]!r} alone exceeds a request ({max_size})"
            )
        if current and (len(current) >= max_count or size + item > max_size):
            out.append(tuple(current))
            current, size = [], overhead
        current.append(key)
        size += item
    if current:
        out.append(tuple(current))
    return out
