"""Load :class:`cdc.rules.Rules` from a TOML file.

Format::

    [cdc]
    message_prefix = "tieredcache"      # optional; "" turns logical messages off
    message_namespaces = ["shop"]       # optional; default: every rule's namespaces
    include_snapshot = false            # optional
    dsn = "postgresql://cdc:${CDC_DB_PASSWORD}@db/app"   # optional, for validation

    [tables."public.products"]
    tenant_column = "tenant_id"
    tags = ["product:{id}", "category:{category_id}"]
    namespaces = ["shop"]
    on_unknown = "table"                # or "error"
    replica_identity = "default"        # or "full"
    table_tag = "table:products"        # optional
    column_types = { released = "date" }
    allow_all_tenant_fallback = false

Secrets stay out of the file: ``${NAME}`` in any string is replaced by the
environment variable ``NAME`` (a missing one is an error naming it). Every error
names the file, the table and the field.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdc.rules import Rules, TableRule
from tieredcache.errors import ConfigurationError

__all__ = ["RulesFileError", "load_rules"]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CDC_KEYS = {"message_prefix", "message_namespaces", "include_snapshot", "dsn"}
_TABLE_KEYS = {
    "tenant_column": str,
    "tags": list,
    "namespaces": list,
    "on_unknown": str,
    "replica_identity": str,
    "table_tag": str,
    "column_types": dict,
    "allow_all_tenant_fallback": bool,
}
_REQUIRED = ("tenant_column", "tags", "namespaces")


class RulesFileError(ConfigurationError):
    """A rules file is unreadable or wrong; the message names file, table and field."""


def _substitute(value: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise RulesFileError(f"{where}: environment variable {name} is not set")
            return env[name]

        return _ENV_RE.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _substitute(v, env, f"{where}.{k}") for k, v in value.items()}
    return value


def _table_rule(path: Path, table: str, data: Any) -> TableRule:
    where = f"{path}: [tables.{table!r}]"
    if not isinstance(data, dict):
        raise RulesFileError(f"{where} must be a table")
    unknown = set(data) - set(_TABLE_KEYS)
    if unknown:
        raise RulesFileError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(_TABLE_KEYS)}"
        )
    for name in _REQUIRED:
        if name not in data:
            raise RulesFileError(f"{where}: field {name!r} is required")
    for name, value in data.items():
        if not isinstance(value, _TABLE_KEYS[name]):
            kind = _TABLE_KEYS[name].__name__
            raise RulesFileError(f"{where}.{name}: expected a {kind}, got {value!r}")
    try:
        return TableRule(table=table, **data)
    except ConfigurationError as exc:
        raise RulesFileError(f"{where}: {exc}") from None


def load_rules(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Rules:
    """Read rules from ``path``; ``env`` defaults to ``os.environ``.

    The ``[cdc] dsn`` (after substitution) is kept as ``rules.dsn``.
    """
    file = Path(path)
    environment = os.environ if env is None else env
    try:
        raw = tomllib.loads(file.read_text())
    except OSError as exc:
        raise RulesFileError(f"{file}: cannot read the rules file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RulesFileError(f"{file}: not valid TOML: {exc}") from exc
    # [kafka], [cache], [worker], [inspector] belong to the worker (cdc/config.py).
    unknown = set(raw) - {"cdc", "tables", "kafka", "cache", "worker", "inspector"}
    if unknown:
        raise RulesFileError(f"{file}: unknown section(s) {', '.join(sorted(unknown))}")
    data = _substitute(raw, environment, str(file))
    settings = data.get("cdc", {})
    bad = set(settings) - _CDC_KEYS
    if bad:
        raise RulesFileError(f"{file}: [cdc] unknown field(s) {', '.join(sorted(bad))}")
    tables = data.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise RulesFileError(f'{file}: no [tables."schema.table"] sections')
    rules_list = [_table_rule(file, name, body) for name, body in tables.items()]
    try:
        rules = Rules(
            rules_list,
            message_prefix=settings.get("message_prefix", "tieredcache") or None,
            message_namespaces=settings.get("message_namespaces"),
            include_snapshot=bool(settings.get("include_snapshot", False)),
            dsn=settings.get("dsn"),
        )
    except ConfigurationError as exc:
        raise RulesFileError(f"{file}: [cdc] {exc}") from None
    return rules
