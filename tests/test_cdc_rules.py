"""Change events to invalidations; rules from TOML; rules checked against a real PostgreSQL."""

from __future__ import annotations

import doctest
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import cdc.rules
from cdc._toml import RulesFileError, load_rules
from cdc.debezium import UNKNOWN, ChangeEvent, Ignored, LogicalMessage, Op, decode_record
from cdc.inspect import validate_rules_against_db
from cdc.rules import Invalidation, Rules, TableRule, UnmappableEventError
from scripts.services import PostgresServer, ServiceError
from tieredcache.errors import ConfigurationError
from tieredcache.tags import TagTemplate

RECORDINGS = Path(__file__).parent / "cdc_recordings"
VARIANTS = ["plain", "schema"]

PRODUCTS = TableRule(
    "public.products",
    tenant_column="tenant_id",
    tags=[TagTemplate("product:{id}"), "category:{category_id}"],
    namespaces=["shop"],
)
CATEGORIES = TableRule(
    "public.categories", "tenant_id", ["category:{id}"], ["shop"], replica_identity="full"
)
RULES = Rules([PRODUCTS, CATEGORIES])


def inv(tenant: str | None, tag: str, namespace: str = "shop") -> Invalidation:
    return Invalidation(namespace, tenant, tag)


def recorded(name: str) -> list[ChangeEvent]:
    out = []
    for r in json.loads((RECORDINGS / f"{name}.json").read_text()):
        e = decode_record(
            r["topic"],
            None if r["key"] is None else r["key"].encode(),
            None if r["value"] is None else r["value"].encode(),
        )
        if isinstance(e, ChangeEvent):
            out.append(e)
        else:
            assert isinstance(e, Ignored)
    return out


def mapped(name: str, rules: Rules = RULES) -> set[Invalidation]:
    found: set[Invalidation] = set()
    for e in recorded(name):
        found |= rules.invalidations(e)
    return found


def change(
    op: Op, before: Any = None, after: Any = None, key: Any = None, table: str = "public.products"
) -> ChangeEvent:
    return ChangeEvent(op, "t", table, before, after, key=key)


def test_doctests_pass() -> None:
    result = doctest.testmod(cdc.rules)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------- recorded events


@pytest.mark.parametrize("variant", VARIANTS)
def test_insert_maps_every_template(variant: str) -> None:
    assert mapped(f"{variant}_insert") == {inv("acme", "product:2"), inv("acme", "category:7")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_without_before_widens_for_non_key_templates(variant: str) -> None:
    """Default replica identity: the old category is unknown, so the tenant's table goes."""
    assert mapped(f"{variant}_update_default_identity_toast") == {
        inv("acme", "product:2"),
        inv("acme", "category:7"),
        inv("acme", "table:public.products"),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_with_full_identity_maps_both_sides(variant: str) -> None:
    assert mapped(f"{variant}_update_replica_identity_full") == {inv("acme", "category:7")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_primary_key_change_invalidates_old_and_new_tenant(variant: str) -> None:
    """Delete (old key) + create (new key); the delete's non-key columns are not trusted."""
    assert mapped(f"{variant}_primary_key_change") == {
        inv("acme", "product:2"),
        inv("acme", "table:public.products"),  # its category is unknown under DEFAULT identity
        inv("globex", "product:2"),
        inv("globex", "category:7"),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_delete_default_identity_distrusts_filler_values(variant: str) -> None:
    (delete,) = recorded(f"{variant}_delete")
    assert delete.before is not None and delete.before["name"] == ""  # Debezium's filler
    assert mapped(f"{variant}_delete") == {
        inv("acme", "product:1"),
        inv("acme", "table:public.products"),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_delete_full_identity(variant: str) -> None:
    assert mapped(f"{variant}_delete_replica_identity_full") == {inv("acme", "category:7")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncate_invalidates_the_table_for_all_tenants(variant: str) -> None:
    assert mapped(f"{variant}_truncate") == {inv(None, "table:public.categories")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logical_message_gives_explicit_invalidations(variant: str) -> None:
    assert mapped(f"{variant}_logical_message") == {
        inv("acme", "product:1"),
        inv("acme", "category:7"),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_reads_skipped_by_default(variant: str) -> None:
    assert mapped(f"{variant}_snapshot_read") == set()
    with_snapshot = Rules([PRODUCTS, CATEGORIES], include_snapshot=True)
    assert mapped(f"{variant}_snapshot_read", with_snapshot) == {
        inv("acme", "product:1"),
        inv("acme", "category:7"),
    }


def test_column_types_make_schemaless_tags_match_typed_ones() -> None:
    """plain (schemaless) and schema recordings give one tag once the rule names the types."""
    templates = ["released:{released}", "price:{price}", "sku:{sku}", "at:{updated_at}"]
    typed = Rules([TableRule("public.products", "tenant_id", templates, ["shop"])])
    hinted = Rules(
        [
            TableRule(
                "public.products",
                "tenant_id",
                templates,
                ["shop"],
                column_types={
                    "released": "date",
                    "price": "decimal",
                    "sku": "uuid",
                    "updated_at": "timestamptz",
                },
            )
        ]
    )
    expected = {
        inv("acme", "released:2024-01-31"),
        inv("acme", "price:12.5"),
        inv("acme", "sku:0b5e5f8a-3c4d-4e5f-8a9b-0c1d2e3f4a5b"),
        inv("acme", "at:2024-01-31T100000Z"),
    }
    assert mapped("schema_insert", typed) == expected
    assert mapped("plain_insert", hinted) == expected


# --------------------------------------------------------------------------- synthetic events

FULL = TableRule(
    "public.products",
    "tenant_id",
    ["product:{id}", "category:{category_id}"],
    ["shop", "admin"],
    replica_identity="full",
)
KEY = {"tenant_id": "acme", "id": 1}


def test_tenant_and_category_move_invalidates_both_sides_in_every_namespace() -> None:
    e = change(
        Op.UPDATE,
        before={"tenant_id": "acme", "id": 1, "category_id": 1},
        after={"tenant_id": "globex", "id": 1, "category_id": 2},
        key=KEY,
    )
    assert Rules([FULL]).invalidations(e) == {
        inv(t, tag, ns)
        for ns in ("shop", "admin")
        for t, tag in [
            ("acme", "product:1"),
            ("acme", "category:1"),
            ("globex", "product:1"),
            ("globex", "category:2"),
        ]
    }


def test_toast_in_a_template_field_widens_to_the_tenants_table() -> None:
    e = change(Op.CREATE, after={"tenant_id": "acme", "id": 1, "category_id": UNKNOWN})
    assert Rules([PRODUCTS]).invalidations(e) == {
        inv("acme", "product:1"),
        inv("acme", "table:public.products"),
    }


def test_unknown_tenant_widens_to_all_tenants() -> None:
    e = change(Op.CREATE, after={"tenant_id": UNKNOWN, "id": 1, "category_id": 2})
    assert Rules([PRODUCTS]).invalidations(e) == {inv(None, "table:public.products")}


def test_null_tenant_widens_to_all_tenants() -> None:
    e = change(Op.CREATE, after={"tenant_id": None, "id": 1, "category_id": 2})
    assert Rules([PRODUCTS]).invalidations(e) == {inv(None, "table:public.products")}


def test_update_without_before_and_tenant_outside_the_key_widens_to_all_tenants() -> None:
    e = change(Op.UPDATE, after={"tenant_id": "acme", "id": 1, "category_id": 2}, key={"id": 1})
    assert inv(None, "table:public.products") in Rules([PRODUCTS]).invalidations(e)


def test_update_without_before_on_key_only_templates_needs_nothing_wider() -> None:
    rule = TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])
    e = change(Op.UPDATE, after={"tenant_id": "acme", "id": 1}, key=KEY)
    assert Rules([rule]).invalidations(e) == {inv("acme", "product:1")}


def test_null_foreign_key_gives_no_tag() -> None:
    e = change(Op.CREATE, after={"tenant_id": "acme", "id": 1, "category_id": None})
    assert Rules([PRODUCTS]).invalidations(e) == {inv("acme", "product:1")}


def test_integer_tenant_ids_are_formatted_canonically() -> None:
    e = change(Op.CREATE, after={"tenant_id": 42, "id": 1, "category_id": None})
    assert Rules([PRODUCTS]).invalidations(e) == {inv("42", "product:1")}


@pytest.mark.parametrize(
    ("after", "why"),
    [
        ({"id": 1, "category_id": 1}, "no tenant column 'tenant_id'"),
        ({"tenant_id": "acme", "id": 1}, "'category:{category_id}' needs ['category_id']"),
        ({"tenant_id": "bad tenant", "id": 1, "category_id": 1}, "tenant"),
        ({"tenant_id": "acme", "id": "1:2", "category_id": 1}, "separates a tag's parts"),
    ],
)
def test_unmappable_rows_follow_on_unknown(after: dict[str, Any], why: str) -> None:
    e = change(Op.CREATE, after=after)
    assert Rules([PRODUCTS]).invalidations(e) == {inv(None, "table:public.products")}
    strict = TableRule("public.products", "tenant_id", PRODUCTS.tags, ["shop"], on_unknown="error")
    with pytest.raises(UnmappableEventError, match=r"public\.products op 'c'") as info:
        Rules([strict]).invalidations(e)
    assert why in str(info.value)


def test_tables_without_a_rule_map_to_nothing() -> None:
    e = change(Op.CREATE, after={"tenant_id": "acme", "id": 1}, table="public.other")
    assert RULES.invalidations(e) == set()


def _message(content: bytes, prefix: str = "tieredcache") -> ChangeEvent:
    return ChangeEvent(Op.MESSAGE, "t", None, None, None, message=LogicalMessage(prefix, content))


def test_messages_with_another_prefix_or_none_configured_are_ignored() -> None:
    assert RULES.invalidations(_message(b"{}", prefix="other")) == set()
    off = Rules([PRODUCTS], message_prefix=None)
    assert off.invalidations(_message(b'{"tenant": "a", "tags": ["x"]}')) == set()


def test_message_namespaces_and_all_tenant_messages() -> None:
    content = b'{"tenant": null, "tags": ["x"], "namespaces": ["admin"]}'
    assert RULES.invalidations(_message(content)) == {inv(None, "x", "admin")}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not json", "content is not JSON"),
        (b"[]", '{"tenant": ..., "tags": [...]}'),
        (b'{"tenant": "acme"}', '{"tenant": ..., "tags": [...]}'),
        (b'{"tenant": "a b", "tags": ["x"]}', "a b"),
        (b'{"tenant": "acme", "tags": ["a b"]}', "a b"),
    ],
)
def test_bad_messages_raise(content: bytes, problem: str) -> None:
    with pytest.raises(UnmappableEventError, match="logical message 'tieredcache'") as info:
        RULES.invalidations(_message(content))
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"table": "products"}, "schema.table"),
        ({"namespaces": []}, "namespaces must be a non-empty list"),
        ({"namespaces": "shop"}, "namespaces must be a non-empty list"),
        ({"namespaces": ["bad ns"]}, "namespace 'bad ns'"),
        ({"tags": ["p:{a.b}"]}, "not a plain name"),
        ({"on_unknown": "ignore"}, "on_unknown"),
        ({"replica_identity": "index"}, "replica_identity"),
        ({"table_tag": "has space"}, "tag 'has space'"),
        ({"column_types": {"d": "datum"}}, "column_types.d = 'datum' is not a known type"),
    ],
)
def test_bad_table_rules_are_refused(kwargs: dict[str, Any], problem: str) -> None:
    args: dict[str, Any] = {
        "table": "public.t",
        "tenant_column": "tenant_id",
        "tags": ["p:{id}"],
        "namespaces": ["shop"],
    }
    args.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        TableRule(**args)
    assert problem in str(info.value)


def test_duplicate_rules_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"two rules for table 'public\.products'"):
        Rules([PRODUCTS, PRODUCTS])


# --------------------------------------------------------------------------- TOML

GOOD_TOML = """
[cdc]
message_prefix = "inval"
dsn = "postgresql://cdc:${CDC_TEST_PASSWORD}@127.0.0.1/app"

[tables."public.products"]
tenant_column = "tenant_id"
tags = ["product:{id}", "category:{category_id}"]
namespaces = ["shop"]
column_types = { released = "date" }

[tables."public.categories"]
tenant_column = "tenant_id"
tags = ["category:{id}"]
namespaces = ["shop", "admin"]
replica_identity = "full"
on_unknown = "error"
table_tag = "categories"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_toml_rules_load(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, GOOD_TOML), env={"CDC_TEST_PASSWORD": "s3cret"})
    assert rules.dsn == "postgresql://cdc:s3cret@127.0.0.1/app"
    assert rules.message_prefix == "inval"
    assert rules.message_namespaces == ("admin", "shop")
    cats = rules.tables["public.categories"]
    assert (cats.replica_identity, cats.on_unknown, cats.table_tag) == (
        "full",
        "error",
        "categories",
    )
    assert rules.tables["public.products"].tags == (
        TagTemplate("product:{id}"),
        TagTemplate("category:{category_id}"),
    )
    assert mapped("plain_insert", rules) == {inv("acme", "product:2"), inv("acme", "category:7")}


def test_toml_env_comes_from_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_TEST_PASSWORD", "fromenv")
    assert "fromenv" in (Rules.from_toml(write(tmp_path, GOOD_TOML)).dsn or "")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (GOOD_TOML, "rules.toml.cdc.dsn: environment variable CDC_TEST_PASSWORD is not set"),
        ("[tables.x", "not valid TOML"),
        ("[other]\n", "unknown section(s) other"),
        ('[cdc]\nfoo = 1\n[tables."public.t"]\n', "[cdc] unknown field(s) foo"),
        ("[cdc]\n", 'no [tables."schema.table"] sections'),
        (
            '[tables."public.t"]\ntenant_column = "t"\ntags = []\n',
            "[tables.'public.t']: field 'namespaces' is required",
        ),
        (
            '[tables."public.t"]\ntenant_column = "t"\ntags = []\nnamespaces = ["a"]\ncolour = 1\n',
            "[tables.'public.t']: unknown field(s) colour",
        ),
        (
            '[tables."public.t"]\ntenant_column = 1\ntags = []\nnamespaces = ["a"]\n',
            "[tables.'public.t'].tenant_column: expected a str, got 1",
        ),
        (
            '[tables."public.t"]\ntenant_column = "t"\ntags = ["p:{a!r}"]\nnamespaces = ["a"]\n',
            "[tables.'public.t']: tag template 'p:{a!r}': {a!r} has a conversion",
        ),
        (
            '[tables."t"]\ntenant_column = "t"\ntags = []\nnamespaces = ["a"]\n',
            "the table must be written schema.table",
        ),
    ],
)
def test_toml_errors_name_file_table_and_field(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RulesFileError) as info:
        load_rules(path, env={})
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert problem in message, message


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.toml")


# --------------------------------------------------------------------------- against PostgreSQL

SCHEMA = """
CREATE TABLE products (tenant_id text, id int, category_id int, PRIMARY KEY (tenant_id, id));
CREATE TABLE categories (tenant_id text, id int, PRIMARY KEY (id));
ALTER TABLE categories REPLICA IDENTITY FULL;
CREATE TABLE orders (tenant_id text, id int PRIMARY KEY, customer_id int);
CREATE TABLE logs (tenant_id text, id int PRIMARY KEY);
ALTER TABLE logs REPLICA IDENTITY NOTHING;
"""


@pytest.fixture(scope="module")
def schema_dsn() -> Iterator[str]:
    """A PostgreSQL 15 with the tables above; fails (never skips) if it cannot start."""
    server = PostgresServer()
    try:
        server.start()
    except ServiceError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc}", pytrace=False)
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        yield server.dsn
    finally:
        server.stop()


@pytest.mark.postgres
def test_valid_rules_have_no_problems(schema_dsn: str) -> None:
    rules = Rules(
        [
            TableRule("public.products", "tenant_id", ["product:{id}", "c:{category_id}"], ["s"]),
            TableRule(
                "public.categories", "tenant_id", ["category:{id}"], ["s"], replica_identity="full"
            ),
            TableRule(
                "public.orders", "tenant_id", ["order:{id}"], ["s"], allow_all_tenant_fallback=True
            ),
        ]
    )
    assert validate_rules_against_db(schema_dsn, rules) == []


@pytest.mark.postgres
def test_problems_are_clear_sentences(schema_dsn: str) -> None:
    rules = Rules(
        [
            TableRule("public.missing", "tenant_id", ["m:{id}"], ["s"]),
            TableRule(
                "public.products",
                "tenant",
                ["product:{pid}"],
                ["s"],
                replica_identity="full",
                column_types={"price": "decimal"},
            ),
            TableRule("public.orders", "tenant_id", ["order:{id}"], ["s"]),
            TableRule("public.logs", "tenant_id", ["log:{id}"], ["s"]),
        ]
    )
    problems = validate_rules_against_db(schema_dsn, rules)
    assert problems[0] == "public.missing: no such table in the database"
    assert "public.products: the tenant column 'tenant' does not exist" in problems
    assert (
        "public.products: tag template 'product:{pid}' uses column 'pid', which does not exist"
        in problems
    )
    assert "public.products: column_types names column 'price', which does not exist" in problems
    assert any(
        p.startswith(
            "public.products: the rule says replica_identity = 'full' but the "
            "table is REPLICA IDENTITY DEFAULT"
        )
        for p in problems
    )
    assert any(
        p.startswith("public.orders: the tenant column 'tenant_id' is not in the primary key")
        for p in problems
    )
    assert any(p.startswith("public.logs: REPLICA IDENTITY NOTHING") for p in problems)
    assert len(problems) == 8  # logs also lacks the tenant in its key
