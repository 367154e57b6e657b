"""How changed rows become cache invalidations, declared once per table.

A :class:`TableRule` names the tenant column, the tag templates (the same
:class:`~tieredcache.tags.TagTemplate` objects the ``cached(tags=...)`` decorators
use) and the namespaces to invalidate. :meth:`Rules.invalidations` maps one
:class:`~cdc.debezium.ChangeEvent` to a set of :class:`Invalidation`:

* both sides of a change: ``before`` and ``after`` are mapped, so a row moving
  to another tenant or category invalidates where it was and where it is;
* what is not known is invalidated wider, never guessed: a TOASTed value
  (:data:`~cdc.debezium.UNKNOWN`), an ``update`` without ``before`` (default
  replica identity) for templates on non-key columns, and the non-key columns of
  a ``delete``'s ``before`` (Debezium fills them with defaults such as ``""``)
  widen to the table's tag for that tenant, or for all tenants when the tenant
  itself is not known;
* ``truncate`` invalidates the table for all tenants; snapshot reads are skipped
  unless ``include_snapshot``; logical messages with ``message_prefix`` carry
  explicit invalidations (``{"tenant": "acme", "tags": ["product:1"]}``).

>>> rules = Rules([TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])])
>>> from cdc.debezium import ChangeEvent, Op
>>> event = ChangeEvent(Op.CREATE, "t", "public.products", None, {"tenant_id": "acme", "id": 1},
...                     key={"tenant_id": "acme", "id": 1})
>>> sorted(rules.invalidations(event))
[Invalidation(namespace='shop', tenant='acme', tag='product:1')]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from cdc.debezium import UNKNOWN, ChangeEvent, Op, convert_value, known_type
from tieredcache.errors import ConfigurationError, InvalidKeyError, TieredCacheError
from tieredcache.keys import validate_namespace, validate_tag_name
from tieredcache.tags import TagTemplate, format_tag_value
from tieredcache.tenancy import validate_tenant

__all__ = ["Invalidation", "Rules", "TableRule", "UnmappableEventError"]

_MISSING: Final = object()
OnUnknown = Literal["table", "error"]


class UnmappableEventError(TieredCacheError):
    """An event cannot be mapped and the rule's ``on_unknown`` is ``"error"``."""


@dataclass(frozen=True, order=True, slots=True)
class Invalidation:
    """Invalidate ``tag`` in ``namespace`` for ``tenant`` (``None``: every tenant)."""

    namespace: str
    tenant: str | None
    tag: str


@dataclass(frozen=True)
class TableRule:
    """How the rows of one table map to tags.

    ``table_tag`` (default ``table:<schema.table>``) is the tag every cached entry
    built from this table should carry: it is what a wider invalidation uses.
    ``replica_identity`` says what ``before`` holds: ``"full"`` trusts every
    column of it, ``"default"`` only the key columns (check it against the
    database with :func:`cdc.inspect.validate_rules_against_db`).
    ``column_types`` converts schemaless values (``{"released": "date"}``, see
    :data:`cdc.debezium.TYPE_ALIASES`) so tags render as the application's would.
    """

    table: str
    tenant_column: str
    tags: Sequence[TagTemplate | str]
    namespaces: Sequence[str]
    table_tag: str | None = None
    on_unknown: OnUnknown = "table"
    replica_identity: Literal["default", "full"] = "default"
    column_types: Mapping[str, str] = field(default_factory=dict)
    #: Accept a tenant column outside the primary key without REPLICA IDENTITY
    #: FULL: an update's old tenant is then unknown and invalidates all tenants.
    allow_all_tenant_fallback: bool = False

    def __post_init__(self) -> None:
        where = f"rule for table {self.table!r}"
        if self.table.count(".") != 1:
            raise ConfigurationError(f"{where}: the table must be written schema.table")
        if not self.namespaces or isinstance(self.namespaces, str):
            raise ConfigurationError(f"{where}: namespaces must be a non-empty list")
        for ns in self.namespaces:
            validate_namespace(ns)
        templates = tuple(t if isinstance(t, TagTemplate) else TagTemplate(t) for t in self.tags)
        object.__setattr__(self, "tags", templates)
        object.__setattr__(self, "namespaces", tuple(self.namespaces))
        try:
            table_tag = validate_tag_name(self.table_tag or f"table:{self.table}")
        except InvalidKeyError as exc:
            raise ConfigurationError(f"{where}: table_tag: {exc}") from None
        object.__setattr__(self, "table_tag", table_tag)
        for column, kind in self.column_types.items():
            if not known_type(kind):
                raise ConfigurationError(
                    f"{where}: column_types.{column} = {kind!r} is not a known type "
                    "(decimal, uuid, date, timestamp, timestamp_ms, timestamp_ns, "
                    "timestamptz, time, or a Debezium logical type name)"
                )
        if self.on_unknown not in ("table", "error"):
            raise ConfigurationError(f"{where}: on_unknown must be 'table' or 'error'")
        if self.replica_identity not in ("default", "full"):
            raise ConfigurationError(f"{where}: replica_identity must be 'default' or 'full'")

    @property
    def templates(self) -> tuple[TagTemplate, ...]:
        return tuple(t for t in self.tags if isinstance(t, TagTemplate))

    @property
    def columns(self) -> set[str]:
        """Every column the rule reads."""
        return {self.tenant_column, *(f for t in self.templates for f in t.fields)}


class Rules:
    """All table rules plus the logical-message settings.

    ``message_namespaces`` default to every namespace named by a table rule;
    ``message_prefix=None`` ignores logical messages.
    """

    def __init__(
        self,
        tables: Iterable[TableRule],
        *,
        message_prefix: str | None = "tieredcache",
        message_namespaces: Sequence[str] | None = None,
        include_snapshot: bool = False,
        dsn: str | None = None,
    ) -> None:
        self.dsn = dsn  # where validate_rules_against_db may look, if the file said
        self.tables: dict[str, TableRule] = {}
        for rule in tables:
            if rule.table in self.tables:
                raise ConfigurationError(f"two rules for table {rule.table!r}")
            self.tables[rule.table] = rule
        self.message_prefix = message_prefix
        every = sorted({ns for rule in self.tables.values() for ns in rule.namespaces})
        self.message_namespaces = tuple(
            validate_namespace(ns) for ns in message_namespaces or every
        )
        self.include_snapshot = include_snapshot

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Rules:
        """Load rules from a TOML file (see :mod:`cdc._toml` for the format)."""
        from cdc._toml import load_rules

        return load_rules(path, env=env)

    def invalidations(self, event: ChangeEvent) -> set[Invalidation]:
        """The invalidations ``event`` calls for (empty for tables without a rule)."""
        if event.op is Op.MESSAGE:
            return self._message(event)
        rule = self.tables.get(event.table or "")
        if rule is None or (event.op is Op.READ and not self.include_snapshot):
            return set()
        if event.op is Op.TRUNCATE:
            return _table_wide(rule, None)
        key_columns = set(event.key or ())
        found: set[Invalidation] = set()
        if event.after is not None:
            found |= _row(rule, event, event.after, trusted=None)
        if event.before is not None:
            trusted = None if rule.replica_identity == "full" else key_columns
            found |= _row(rule, event, event.before, trusted=trusted)
        elif event.op is Op.UPDATE and event.after is not None:
            found |= _unknown_before(rule, event, event.after, key_columns)
        return found

    def _message(self, event: ChangeEvent) -> set[Invalidation]:
        message = event.message
        if message is None or message.prefix != self.message_prefix:
            return set()
        where = f"logical message {message.prefix!r} (lsn {event.lsn})"
        try:
            content = message.json()
        except msgspec.DecodeError as exc:
            raise UnmappableEventError(f"{where}: content is not JSON: {exc}") from exc
        if not isinstance(content, dict) or not isinstance(content.get("tags"), list):
            raise UnmappableEventError(f'{where}: expected {{"tenant": ..., "tags": [...]}}')
        namespaces = content.get("namespaces", self.message_namespaces)
        try:
            tenant = None if content.get("tenant") is None else validate_tenant(content["tenant"])
            tags = [validate_tag_name(t) for t in content["tags"]]
            namespaces = [validate_namespace(ns) for ns in namespaces]
        except (TieredCacheError, ValueError, TypeError) as exc:
            raise UnmappableEventError(f"{where}: {exc}") from exc
        return {Invalidation(ns, tenant, tag) for ns in namespaces for tag in tags}


def _table_wide(rule: TableRule, tenant: str | None) -> set[Invalidation]:
    assert rule.table_tag is not None
    return {Invalidation(ns, tenant, rule.table_tag) for ns in rule.namespaces}


def _unmappable(rule: TableRule, event: ChangeEvent, why: str) -> set[Invalidation]:
    if rule.on_unknown == "error":
        raise UnmappableEventError(f"{rule.table} op {event.op.value!r} (lsn {event.lsn}): {why}")
    return _table_wide(rule, None)


def _value(rule: TableRule, row: Mapping[str, Any], column: str, trusted: set[str] | None) -> Any:
    """The column's value, converted; UNKNOWN if untrusted or TOASTed; _MISSING if absent."""
    if column not in row:
        return _MISSING
    if trusted is not None and column not in trusted:
        return UNKNOWN
    value = row[column]
    kind = rule.column_types.get(column)
    return value if kind is None or value is UNKNOWN else convert_value(value, kind)


def _row(
    rule: TableRule, event: ChangeEvent, row: Mapping[str, Any], trusted: set[str] | None
) -> set[Invalidation]:
    try:
        raw_tenant = _value(rule, row, rule.tenant_column, trusted)
        if raw_tenant is _MISSING:
            return _unmappable(rule, event, f"no tenant column {rule.tenant_column!r}")
        if raw_tenant is UNKNOWN or raw_tenant is None:
            # Whose row it was is not known (or it is nobody's): every tenant.
            return _table_wide(rule, None)
        tenant = validate_tenant(format_tag_value(raw_tenant))
        found: set[Invalidation] = set()
        for template in rule.templates:
            values = {f: _value(rule, row, f, trusted) for f in template.fields}
            if any(v is _MISSING for v in values.values()):
                missing = [f for f, v in values.items() if v is _MISSING]
                return _unmappable(rule, event, f"{template.template!r} needs {missing}")
            if any(v is UNKNOWN for v in values.values()):
                found |= _table_wide(rule, tenant)
                continue
            tag = template.render_if_present(values)
            if tag is not None:
                found.update(Invalidation(ns, tenant, tag) for ns in rule.namespaces)
        return found
    except (InvalidKeyError, TieredCacheError, ValueError, TypeError) as exc:
        if isinstance(exc, UnmappableEventError):
            raise
        return _unmappable(rule, event, str(exc))


def _unknown_before(
    rule: TableRule, event: ChangeEvent, after: Mapping[str, Any], key_columns: set[str]
) -> set[Invalidation]:
    """An update without ``before``: old values of non-key columns are unknown.

    Key columns did not change (a key change arrives as delete + create), so a
    template on key columns alone rendered from ``after`` is the old tag too.
    """
    if all(set(t.fields) <= key_columns for t in rule.templates):
        return set()
    if rule.tenant_column not in key_columns:
        return _table_wide(rule, None)  # the row may have come from another tenant
    old = {c: (after[c] if c in key_columns else UNKNOWN) for c in after}
    return _row(rule, event, old, trusted=None)
