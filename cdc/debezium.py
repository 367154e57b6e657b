"""Decode Debezium change records (as read from Kafka) into typed :class:`ChangeEvent` s.

:func:`decode_record` takes what a Kafka consumer hands over (topic, key and value
bytes, headers, partition, offset) and returns either a :class:`ChangeEvent` or an
:class:`Ignored` (tombstone, heartbeat, transaction metadata: acknowledge and move
on). Anything else raises :class:`EventDecodeError` naming topic, partition and
offset, so the worker can stop or dead-letter that exact record.

Both converter shapes are accepted: ``{"schema": ..., "payload": ...}`` (schemas
enabled) and the bare payload. With a schema, column values are converted by
their Debezium logical type (:func:`convert_value`): ``Decimal`` for precise and
string decimals, ``UUID``, ``date``, naive ``datetime`` for ``timestamp``, aware
(UTC) ``datetime`` for ``timestamptz`` -- the types :mod:`tieredcache.tags`
formats canonically. Without a schema a value stays as JSON gave it (a date is
an int of days); rules declare those columns' types to convert them.

A TOASTed column that an update did not touch arrives as Debezium's placeholder
``__debezium_unavailable_value``: it becomes :data:`UNKNOWN`, never a tag value.

>>> event = decode_record(
...     "shop.public.products", b'{"id": 1}',
...     b'{"op": "u", "before": null, "after": {"id": 1, "name": "saw"},'
...     b' "source": {"schema": "public", "table": "products", "ts_ms": 1, "snapshot": "false"}}')
>>> event.op, event.table, event.after
(<Op.UPDATE: 'u'>, 'public.products', {'id': 1, 'name': 'saw'})
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from cdc._values import (
    TOAST_PLACEHOLDER,
    TYPE_ALIASES,
    UNKNOWN,
    convert_value,
    is_toast_placeholder,
    known_type,
)
from tieredcache.errors import TieredCacheError

__all__ = [
    "TOAST_PLACEHOLDER",
    "UNKNOWN",
    "ChangeEvent",
    "EventDecodeError",
    "Ignored",
    "LogicalMessage",
    "Op",
    "TYPE_ALIASES",
    "convert_value",
    "decode_record",
    "is_toast_placeholder",
    "known_type",
]

HEARTBEAT_TOPIC_PREFIX: Final = "__debezium-heartbeat"


class Op(enum.StrEnum):
    """Debezium's ``op`` codes."""

    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a snapshot row
    TRUNCATE = "t"
    MESSAGE = "m"  # pg_logical_emit_message


class EventDecodeError(TieredCacheError, ValueError):
    """A record is not a Debezium envelope we understand; names topic/partition/offset."""

    def __init__(
        self, problem: str, *, topic: str, partition: int | None = None, offset: int | None = None
    ) -> None:
        where = topic if partition is None else f"{topic}[{partition}]"
        if offset is not None:
            where += f"@{offset}"
        super().__init__(f"cannot decode the Debezium record at {where}: {problem}")
        self.problem = problem
        self.topic = topic
        self.partition = partition
        self.offset = offset


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """The payload of ``pg_logical_emit_message(transactional, prefix, content)``."""

    prefix: str
    content: bytes

    def json(self) -> Any:
        """``content`` parsed as JSON (raises ``msgspec.DecodeError`` if it is not)."""
        return msgspec.json.decode(self.content)


class ChangeEvent(msgspec.Struct, frozen=True):
    """One decoded change (a frozen struct: built in C, a few hundred ns).

    ``table`` is ``schema.table`` (``None`` for a logical message); ``before`` and
    ``after`` map column names to converted values (or :data:`UNKNOWN`); ``key``
    is the record key (the primary-key columns). ``snapshot`` is true for rows
    read by a snapshot (``source.snapshot`` other than ``false``);
    ``snapshot_marker`` keeps Debezium's own word (``first``, ``last``, ``incremental``...).
    """

    op: Op
    topic: str
    table: str | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    key: Mapping[str, Any] | None = None
    ts_ms: int | None = None
    snapshot: bool = False
    snapshot_marker: str = "false"
    tx_id: int | None = None
    lsn: int | None = None
    message: LogicalMessage | None = None
    headers: Mapping[str, bytes | None] = msgspec.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ignored:
    """A record that carries no change: acknowledge it and move on."""

    reason: Literal["tombstone", "heartbeat", "transaction"]
    topic: str


# --------------------------------------------------------------------------- envelopes


def _field_types(schema: Any, name: str) -> dict[str, tuple[str | None, dict[str, str]]] | None:
    """Logical type and parameters of each column of the ``before``/``after`` struct."""
    if not isinstance(schema, dict):
        return None
    for struct in schema.get("fields") or ():
        if isinstance(struct, dict) and struct.get("field") == name:
            return {
                f["field"]: (f.get("name"), f.get("parameters") or {})
                for f in struct.get("fields") or ()
                if isinstance(f, dict) and "field" in f
            }
    return None


def _row(
    raw: Any, types: Mapping[str, tuple[str | None, dict[str, str]]] | None, side: str
) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{side!r} is a JSON {_kind(raw)}, not an object")
    if types is None:
        # No schema: values stay as JSON gave them, but for the TOAST placeholder
        # (a string, or a list of them). Most rows have neither: keep the dict.
        for value in raw.values():
            if value.__class__ is list or (value.__class__ is str and value in _PLACEHOLDERS):
                break
        else:
            return raw
    row: dict[str, Any] = {}
    for column, value in raw.items():
        logical, params = types.get(column, (None, {})) if types is not None else (None, {})
        try:
            row[column] = convert_value(value, logical, params)
        except (ValueError, TypeError, KeyError, ArithmeticError, binascii.Error) as exc:
            raise ValueError(
                f"{side}.{column} = {value!r} is not a valid {logical or 'value'}: {exc}"
            ) from None
    return row


def _unwrap(document: Any) -> tuple[Any, Any]:
    """Split ``{"schema", "payload"}`` (schemas enabled) into its parts; else no schema."""
    if (
        document.__class__ is dict
        and len(document) == 2
        and "payload" in document
        and "schema" in document
    ):
        return document["payload"], document["schema"]
    return document, None


def _snapshot(value: Any) -> tuple[bool, str]:
    # Debezium writes "true", "first", "first_in_data_collection", "last", "incremental",
    # "false"... (and older versions and other converters a boolean or nothing at all).
    if value is None or value is False:
        return False, "false"
    if value is True:
        return True, "true"
    if isinstance(value, str):
        marker = value.lower()
        return marker != "false", marker
    raise ValueError(f"source.snapshot is {value!r}, neither a string nor a boolean")


def _optional_int(source: Mapping[str, Any], name: str) -> int | None:
    value = source.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"source.{name} is {value!r}, not an integer")
    return value


_JSON_KINDS: Final = {"list": "array", "str": "string", "int": "number", "float": "number",
                      "bool": "boolean", "NoneType": "null", "dict": "object"}  # fmt: skip


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value).__name__, type(value).__name__)


_PLACEHOLDERS: Final = frozenset(
    (TOAST_PLACEHOLDER, base64.b64encode(TOAST_PLACEHOLDER.encode()).decode())
)
_decode = msgspec.json.Decoder().decode


def _decode_json(data: bytes, what: str) -> Any:
    try:
        return _decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"the {what} is not valid JSON ({exc}; {len(data)} bytes)") from None


def _message(payload: Mapping[str, Any]) -> LogicalMessage:
    message = payload.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("prefix"), str):
        raise ValueError("an op 'm' record without message.prefix")
    content = message.get("content")
    if content is None:
        return LogicalMessage(message["prefix"], b"")
    if not isinstance(content, str):
        raise ValueError(f"message.content is a JSON {_kind(content)}, not base64 text")
    try:
        return LogicalMessage(message["prefix"], base64.b64decode(content, validate=True))
    except binascii.Error as exc:
        raise ValueError(f"message.content is not base64: {exc}") from None


def _envelope(
    topic: str, key: bytes | None, value: bytes, headers: Mapping[str, bytes | None]
) -> ChangeEvent | Ignored:
    payload, schema = _unwrap(_decode_json(value, "value"))
    if not isinstance(payload, dict):
        raise ValueError(f"the value is a JSON {_kind(payload)}, not an object")
    if "op" not in payload:
        if "status" in payload and "id" in payload:  # BEGIN/END on <prefix>.transaction
            return Ignored("transaction", topic)
        raise ValueError(f"no 'op' field (fields: {', '.join(sorted(payload)) or 'none'})")
    try:
        op = Op(payload["op"])
    except ValueError:
        raise ValueError(f"unknown op {payload['op']!r}") from None
    source = payload.get("source")
    if not isinstance(source, dict):
        raise ValueError("no 'source' object")
    snapshot, marker = _snapshot(source.get("snapshot"))
    key_doc = None if key is None else _unwrap(_decode_json(key, "key"))[0]
    if key_doc is not None and not isinstance(key_doc, dict):
        raise ValueError(f"the key is a JSON {_kind(key_doc)}, not an object")
    ts_ms = _optional_int(source, "ts_ms")
    tx_id = _optional_int(source, "txId")
    lsn = _optional_int(source, "lsn")
    if op is Op.MESSAGE:
        return ChangeEvent(
            op, topic, None, None, None, key_doc, ts_ms, snapshot, marker, tx_id, lsn,
            _message(payload), headers,
        )  # fmt: skip
    schema_name, table = source.get("schema"), source.get("table")
    if not isinstance(table, str) or not table:
        raise ValueError("source.table is missing")
    before = _row(payload.get("before"), _field_types(schema, "before"), "before")
    after = _row(payload.get("after"), _field_types(schema, "after"), "after")
    if op in (Op.CREATE, Op.READ) and after is None:
        raise ValueError(f"op {op.value!r} without 'after'")
    if op is Op.DELETE and before is None:
        raise ValueError("op 'd' without 'before'")
    if op is Op.UPDATE and after is None:
        raise ValueError("op 'u' without 'after'")
    qualified = f"{schema_name}.{table}" if schema_name else table
    return ChangeEvent(
        op, topic, qualified, before, after, key_doc, ts_ms, snapshot, marker, tx_id, lsn,
        None, headers,
    )  # fmt: skip


def decode_record(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    *,
    headers: Iterable[tuple[str, bytes | None]] | None = None,
    partition: int | None = None,
    offset: int | None = None,
    heartbeat_prefix: str = HEARTBEAT_TOPIC_PREFIX,
    transaction_topic: str | None = None,
) -> ChangeEvent | Ignored:
    """Decode one Kafka record from a Debezium topic.

    A ``None`` value is a tombstone (log compaction's delete marker after a
    delete), records on ``__debezium-heartbeat.*`` are heartbeats, and
    transaction BEGIN/END records are recognised by their fields (or by topic,
    ``<topic.prefix>.transaction``, when ``transaction_topic`` is given): all three
    are :class:`Ignored`. ``heartbeat_prefix`` follows Debezium's
    ``topic.heartbeat.prefix``. ``headers`` takes confluent-kafka's ``msg.headers()``.

    >>> decode_record("shop.public.products", b'{"id": 1}', None)
    Ignored(reason='tombstone', topic='shop.public.products')
    """
    if topic.startswith(heartbeat_prefix):
        return Ignored("heartbeat", topic)
    if topic == transaction_topic:
        return Ignored("transaction", topic)
    if value is None:
        return Ignored("tombstone", topic)
    try:
        return _envelope(topic, key, value, {} if headers is None else dict(headers))
    except ValueError as exc:
        raise EventDecodeError(str(exc), topic=topic, partition=partition, offset=offset) from exc
