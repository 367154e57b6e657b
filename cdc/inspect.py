"""Check CDC rules against the live database schema before trusting them.

:func:`validate_rules_against_db` returns a list of problems, each one sentence
naming the table and column, so a deploy step can print them all at once.
"""

from __future__ import annotations

from cdc.rules import Rules

__all__ = ["validate_rules_against_db"]

_COLUMNS = """
SELECT a.attname
FROM pg_attribute a
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_PRIMARY_KEY = """
SELECT a.attname
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %(oid)s AND i.indisprimary
"""
_TABLE = """
SELECT c.oid, c.relreplident
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND c.relkind IN ('r', 'p')
"""
_IDENTITY = {"d": "DEFAULT", "f": "FULL", "i": "USING INDEX", "n": "NOTHING"}


def validate_rules_against_db(dsn: str, rules: Rules) -> list[str]:
    """Problems with ``rules`` for the database at ``dsn`` (an empty list: all good).

    Checks that each table and every column a rule reads exists; that the tenant
    column is in the primary key or the table has ``REPLICA IDENTITY FULL``
    (else an update's old tenant is unknown; allowed with
    ``allow_all_tenant_fallback``, which then invalidates all tenants); and that a
    rule claiming ``replica_identity = "full"`` is right, since it trusts every
    column of ``before``.

    >>> validate_rules_against_db(dsn, rules)  # doctest: +SKIP
    ["public.products: tag template 'category:{cat}' uses column cat, which does not exist"]
    """
    import psycopg

    problems: list[str] = []
    with psycopg.connect(dsn) as conn:
        for name, rule in rules.tables.items():
            schema, table = name.split(".", 1)
            row = conn.execute(_TABLE, {"schema": schema, "table": table}).fetchone()
            if row is None:
                problems.append(f"{name}: no such table in the database")
                continue
            oid, identity = row[0], str(row[1])
            columns = {r[0] for r in conn.execute(_COLUMNS, {"oid": oid})}
            primary_key = {r[0] for r in conn.execute(_PRIMARY_KEY, {"oid": oid})}
            if rule.tenant_column not in columns:
                problems.append(f"{name}: the tenant column {rule.tenant_column!r} does not exist")
            for template in rule.templates:
                problems.extend(
                    f"{name}: tag template {template.template!r} uses column {field!r}, "
                    "which does not exist"
                    for field in template.fields
                    if field not in columns
                )
            problems.extend(
                f"{name}: column_types names column {column!r}, which does not exist"
                for column in rule.column_types
                if column not in columns
            )
            full = identity == "f"
            if identity == "n":
                problems.append(
                    f"{name}: REPLICA IDENTITY NOTHING sends no old values; "
                    "use DEFAULT (with a primary key) or FULL"
                )
            if rule.replica_identity == "full" and not full:
                problems.append(
                    f"{name}: the rule says replica_identity = 'full' but the table is "
                    f"REPLICA IDENTITY {_IDENTITY.get(identity, identity)}; run ALTER TABLE "
                    f"{name} REPLICA IDENTITY FULL or set replica_identity = 'default'"
                )
            if (
                rule.tenant_column in columns
                and rule.tenant_column not in primary_key
                and not full
                and not rule.allow_all_tenant_fallback
            ):
                problems.append(
                    f"{name}: the tenant column {rule.tenant_column!r} is not in the primary "
                    "key and the table is not REPLICA IDENTITY FULL, so an update's old tenant "
                    "is unknown; add it to the key, ALTER TABLE ... REPLICA IDENTITY FULL, "
                    "or set allow_all_tenant_fallback = true (invalidates all tenants)"
                )
    return problems
