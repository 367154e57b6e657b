"""Column values of Debezium records: logical types to Python values, TOAST to UNKNOWN.

Conversions give the types :mod:`tieredcache.tags` formats canonically:
``Decimal`` (precise base64 + scale, variable-scale structs, string decimals),
``UUID``, ``date``, naive ``datetime`` for ``timestamp`` (micro/milli/nano;
nanoseconds are truncated to microseconds), aware UTC ``datetime`` for
``timestamptz`` and ``time``. Re-exported by :mod:`cdc.debezium`.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "TOAST_PLACEHOLDER",
    "TYPE_ALIASES",
    "UNKNOWN",
    "convert_value",
    "is_toast_placeholder",
    "known_type",
]

TOAST_PLACEHOLDER: Final = "__debezium_unavailable_value"
# The same placeholder for bytea columns (binary.handling.mode=base64).
_TOAST_B64: Final = base64.b64encode(TOAST_PLACEHOLDER.encode()).decode()
_EPOCH: Final = dt.datetime(1970, 1, 1)
_EPOCH_DATE: Final = dt.date(1970, 1, 1)


class _Unknown:
    """The type of :data:`UNKNOWN` (one instance)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __bool__(self) -> bool:
        return False


#: A column value Debezium did not send (TOAST placeholder): it may be anything.
UNKNOWN: Final = _Unknown()


def _decimal_from_bytes(encoded: str, scale: int) -> Decimal:
    raw = base64.b64decode(encoded, validate=True)
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-scale)


def _zoned(text: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(text)  # 3.11 accepts the trailing Z
    return parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed


def _zoned_time(text: str) -> dt.time:
    return dt.time.fromisoformat(text)


def _epoch_time(value: int, per_second: int) -> dt.time:
    micros = value * 1_000_000 // per_second
    return (_EPOCH + dt.timedelta(microseconds=micros)).time()


def _epoch_ts(value: int, per_second: int) -> dt.datetime:
    # Nanoseconds are truncated to microseconds: Python's datetime has no finer unit.
    return _EPOCH + dt.timedelta(microseconds=value * 1_000_000 // per_second)


_CONVERTERS: Final[dict[str, Callable[[Any, Mapping[str, str]], Any]]] = {
    "org.apache.kafka.connect.data.Decimal": lambda v, p: _decimal_from_bytes(
        v, int(p.get("scale", "0"))
    ),
    "io.debezium.data.VariableScaleDecimal": lambda v, p: _decimal_from_bytes(
        v["value"], int(v["scale"])
    ),
    "io.debezium.data.Uuid": lambda v, p: uuid.UUID(v),
    "io.debezium.time.Date": lambda v, p: _EPOCH_DATE + dt.timedelta(days=v),
    "org.apache.kafka.connect.data.Date": lambda v, p: _EPOCH_DATE + dt.timedelta(days=v),
    "io.debezium.time.Timestamp": lambda v, p: _epoch_ts(v, 1_000),
    "org.apache.kafka.connect.data.Timestamp": lambda v, p: _epoch_ts(v, 1_000),
    "io.debezium.time.MicroTimestamp": lambda v, p: _epoch_ts(v, 1_000_000),
    "io.debezium.time.NanoTimestamp": lambda v, p: _epoch_ts(v, 1_000_000_000),
    "io.debezium.time.ZonedTimestamp": lambda v, p: _zoned(v),
    "io.debezium.time.Time": lambda v, p: _epoch_time(v, 1_000),
    "org.apache.kafka.connect.data.Time": lambda v, p: _epoch_time(v, 1_000),
    "io.debezium.time.MicroTime": lambda v, p: _epoch_time(v, 1_000_000),
    "io.debezium.time.NanoTime": lambda v, p: _epoch_time(v, 1_000_000_000),
    "io.debezium.time.ZonedTime": lambda v, p: _zoned_time(v),
    # decimal.handling.mode=string has no logical name; rules may still say "decimal".
    "decimal": lambda v, p: Decimal(v) if isinstance(v, str | int) else Decimal(repr(v)),
}
#: Short names for rules' column types (schemaless records), to Debezium logical names.
TYPE_ALIASES: Final = {
    "decimal": "decimal",
    "uuid": "io.debezium.data.Uuid",
    "date": "io.debezium.time.Date",
    "timestamp": "io.debezium.time.MicroTimestamp",
    "timestamp_ms": "io.debezium.time.Timestamp",
    "timestamp_ns": "io.debezium.time.NanoTimestamp",
    "timestamptz": "io.debezium.time.ZonedTimestamp",
    "time": "io.debezium.time.MicroTime",
}


def known_type(name: str) -> bool:
    """Whether ``name`` is a short alias or a Debezium logical type we convert."""
    return name in TYPE_ALIASES or name in _CONVERTERS


def is_toast_placeholder(value: object) -> bool:
    """Whether ``value`` is Debezium's unchanged-TOAST placeholder (text, bytea, array)."""
    if isinstance(value, str):
        return value in (TOAST_PLACEHOLDER, _TOAST_B64)
    if isinstance(value, list) and value:
        return all(is_toast_placeholder(v) for v in value)
    return False


def convert_value(value: Any, logical: str | None, parameters: Mapping[str, str] = {}) -> Any:
    """Convert one column value by its Debezium logical type name (or a short alias).

    ``None`` stays ``None``; the TOAST placeholder becomes :data:`UNKNOWN`; an
    unknown logical name leaves the value as is. Raises ``ValueError`` (or
    ``TypeError``) for a value that does not fit its type.

    >>> convert_value(19753, "io.debezium.time.Date")
    datetime.date(2024, 1, 31)
    >>> convert_value("BOI=", "org.apache.kafka.connect.data.Decimal", {"scale": "2"})
    Decimal('12.50')
    >>> convert_value("__debezium_unavailable_value", "decimal")
    UNKNOWN
    """
    if value is None:
        return None
    if is_toast_placeholder(value):
        return UNKNOWN
    if logical is None:
        return value
    converter = _CONVERTERS.get(TYPE_ALIASES.get(logical, logical))
    return value if converter is None else converter(value, parameters)
