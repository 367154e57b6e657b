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
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

import msgspec

from cdc.debezium import UNKNOWN, ChangeEvent, Op, convert_value, known_type
from tieredcache.errors import ConfigurationError, InvalidKeyError, TieredCacheError
from tieredcache.keys import MAX_TAG_LENGTH, validate_namespace, validate_tag_name
from tieredcache.tags import TagTemplate, TagValueError, format_tag_value
from tieredcache.tenancy import validate_tenant

__all__ = ["Invalidation", "Rules", "TableRule", "UnmappableEventError"]

_MISSING: Final = object()
OnUnknown = Literal["table", "error"]


class UnmappableEventError(TieredCacheError):
    """An event cannot be mapped and the rule's ``on_unknown`` is ``"error"``."""


class Invalidation(NamedTuple):
    """Invalidate ``tag`` in ``namespace`` for ``tenant`` (``None``: every tenant).

    A named tuple: immutable, ordered and hashable like a frozen dataclass, and
    built and hashed in C (the worker makes a few per event).
    """

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
        self._plans = {table: _Plan(rule) for table, rule in self.tables.items()}
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
        plan = self._plans.get(event.table or "")
        if plan is None or (event.op is Op.READ and not self.include_snapshot):
            return set()
        if event.op is Op.TRUNCATE:
            return set(plan.all_tenants)
        key_columns = set(event.key or ())
        found: set[Invalidation] = set()
        if event.after is not None:
            found |= _row(plan, event, event.after, trusted=None)
        if event.before is not None:
            trusted = None if plan.rule.replica_identity == "full" else key_columns
            found |= _row(plan, event, event.before, trusted=trusted)
        elif event.op is Op.UPDATE and event.after is not None:
            found |= _unknown_before(plan, event, event.after, key_columns)
        return found

    def skips(self, event: ChangeEvent) -> bool:
        """Whether ``event`` is a snapshot read these rules skip (``include_snapshot``
        off): it invalidates nothing, so nothing of it was invalidated either."""
        return event.op is Op.READ and not self.include_snapshot

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


class _Plan:
    """A rule compiled for the hot path: templates split into literal text and fields,
    the all-tenant invalidations built once."""

    __slots__ = ("all_tenants", "key_only", "namespaces", "rule", "table_tag", "templates")

    def __init__(self, rule: TableRule) -> None:
        assert rule.table_tag is not None
        self.rule = rule
        self.table_tag = rule.table_tag
        self.namespaces = tuple(rule.namespaces)
        self.all_tenants = frozenset(
            Invalidation(ns, None, rule.table_tag) for ns in rule.namespaces
        )
        self.templates = tuple(_Template(t) for t in rule.templates)
        self.key_only = [frozenset(t.fields) for t in self.templates]

    def table_wide(self, tenant: str | None) -> set[Invalidation]:
        if tenant is None:
            return set(self.all_tenants)
        return {Invalidation(ns, tenant, self.table_tag) for ns in self.namespaces}


class _Template:
    """A :class:`~tieredcache.tags.TagTemplate` as (literal, field) parts; renders the
    same text as ``TagTemplate.render`` (:func:`_text` is ``format_tag_value``)."""

    __slots__ = ("fields", "parts", "template")

    def __init__(self, template: TagTemplate) -> None:
        self.template = template.template
        self.fields = template.fields
        self.parts = tuple(
            (literal, field) for literal, field, _, _ in string.Formatter().parse(template.template)
        )

    def render(self, values: Mapping[str, Any]) -> str:
        out: list[str] = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                try:
                    out.append(_text(values[name]))
                except TagValueError as exc:
                    raise TagValueError(
                        f"tag template {self.template!r}, {{{name}}}: {exc}"
                    ) from None
        tag = "".join(out)
        # Each value is of the tag-value alphabet (a subset of the tag alphabet) and the
        # literal text was validated with the template: only the length can be wrong.
        if len(tag) > MAX_TAG_LENGTH:
            try:
                validate_tag_name(tag)
            except InvalidKeyError as exc:
                raise TagValueError(f"tag template {self.template!r}: {exc}") from None
        return tag


# Strings already known to be valid tag values (tenant ids, category codes...): most
# rows repeat a few, and the check is a regular expression. Bounded; cleared when full.
_valid_texts: set[str] = set()
_VALID_TEXTS_MAX: Final = 65536


def _text(value: Any) -> str:
    """``format_tag_value(value)``, with its two commonest cases short-cut."""
    kind = value.__class__
    if kind is int:
        return str(value)
    if kind is str:
        if value in _valid_texts:
            return value  # type: ignore[no-any-return]
        text = format_tag_value(value)
        if len(_valid_texts) >= _VALID_TEXTS_MAX:
            _valid_texts.clear()
        _valid_texts.add(text)
        return text
    return format_tag_value(value)


def _unmappable(plan: _Plan, event: ChangeEvent, why: str) -> set[Invalidation]:
    rule = plan.rule
    if rule.on_unknown == "error":
        raise UnmappableEventError(f"{rule.table} op {event.op.value!r} (lsn {event.lsn}): {why}")
    return set(plan.all_tenants)


def _row(
    plan: _Plan, event: ChangeEvent, row: Mapping[str, Any], trusted: set[str] | None
) -> set[Invalidation]:
    """Map one side of a change. A value is UNKNOWN when ``trusted`` does not list its
    column (or it was TOASTed), missing when the row has no such column."""
    rule = plan.rule
    types = rule.column_types
    try:
        column = rule.tenant_column
        if column not in row:
            return _unmappable(plan, event, f"no tenant column {column!r}")
        raw_tenant = UNKNOWN if trusted is not None and column not in trusted else row[column]
        if raw_tenant is not UNKNOWN and column in types:
            raw_tenant = convert_value(raw_tenant, types[column])
        if raw_tenant is UNKNOWN or raw_tenant is None:
            # Whose row it was is not known (or it is nobody's): every tenant.
            return set(plan.all_tenants)
        tenant = validate_tenant(_text(raw_tenant))
        found: set[Invalidation] = set()
        for template in plan.templates:
            values: dict[str, Any] = {}
            missing: list[str] = []
            unknown = null = False
            for name in template.fields:
                if name not in row:
                    missing.append(name)
                    continue
                if trusted is not None and name not in trusted:
                    unknown = True
                    continue
                value = row[name]
                if value is not UNKNOWN and name in types:
                    value = convert_value(value, types[name])
                if value is UNKNOWN:
                    unknown = True
                elif value is None:
                    null = True  # a NULL foreign key: the row has no such tag
                values[name] = value
            if missing:
                return _unmappable(plan, event, f"{template.template!r} needs {missing}")
            if unknown:
                found |= plan.table_wide(tenant)
            elif not null:
                tag = template.render(values)
                for ns in plan.namespaces:
                    found.add(Invalidation(ns, tenant, tag))
        return found
    except (InvalidKeyError, TieredCacheError, ValueError, TypeError) as exc:
        if isinstance(exc, UnmappableEventError):
            raise
        return _unmappable(plan, event, str(exc))


def _unknown_before(
    plan: _Plan, event: ChangeEvent, after: Mapping[str, Any], key_columns: set[str]
) -> set[Invalidation]:
    """An update without ``before``: old values of non-key columns are unknown.

    Key columns did not change (a key change arrives as delete + create), so a
    template on key columns alone rendered from ``after`` is the old tag too.
    """
    if all(fields <= key_columns for fields in plan.key_only):
        return set()
    if plan.rule.tenant_column not in key_columns:
        return set(plan.all_tenants)  # the row may have come from another tenant
    # The old row is ``after`` with only its key columns known.
    return _row(plan, event, after, trusted=key_columns)
