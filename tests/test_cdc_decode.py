"""Decoding real Debezium 3.6 envelopes (tests/cdc_recordings, see scripts/record_cdc_envelopes.py).

``plain_*`` files were recorded with converter.schemas.enable=false and
decimal.handling.mode=string, ``schema_*`` with schemas enabled and precise decimals.
"""

from __future__ import annotations

import datetime as dt
import doctest
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import cdc._values
import cdc.debezium
from cdc.debezium import (
    TOAST_PLACEHOLDER,
    TYPE_ALIASES,
    UNKNOWN,
    ChangeEvent,
    EventDecodeError,
    Ignored,
    Op,
    convert_value,
    decode_record,
)
from tieredcache.tags import TagTemplate

RECORDINGS = Path(__file__).parent / "cdc_recordings"
VARIANTS = ["plain", "schema"]


def records(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((RECORDINGS / f"{name}.json").read_text())
    return data


def decode(record: dict[str, Any]) -> ChangeEvent | Ignored:
    return decode_record(
        record["topic"],
        None if record["key"] is None else record["key"].encode(),
        None if record["value"] is None else record["value"].encode(),
        partition=record["partition"],
        offset=record["offset"],
    )


def decoded(name: str) -> list[ChangeEvent | Ignored]:
    return [decode(r) for r in records(name)]


def event(name: str, index: int = 0) -> ChangeEvent:
    result = decoded(name)[index]
    assert isinstance(result, ChangeEvent), result
    return result


@pytest.mark.parametrize("module", [cdc.debezium, cdc._values])
def test_doctests_pass(module: Any) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_every_recording_decodes() -> None:
    """No recorded record raises: each is a ChangeEvent or an Ignored."""
    files = sorted(RECORDINGS.glob("*.json"))
    assert len(files) >= 20
    for file in files:
        for record in records(file.stem):
            assert isinstance(decode(record), ChangeEvent | Ignored), file.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_insert(variant: str) -> None:
    e = event(f"{variant}_insert")
    assert (e.op, e.table, e.before, e.snapshot, e.snapshot_marker) == (
        Op.CREATE,
        "public.products",
        None,
        False,
        "false",
    )
    assert e.key == {"tenant_id": "acme", "id": 2}
    assert e.after is not None
    assert (e.after["tenant_id"], e.after["id"], e.after["category_id"]) == ("acme", 2, 7)
    assert isinstance(e.tx_id, int) and isinstance(e.lsn, int) and isinstance(e.ts_ms, int)
    assert e.topic == "tieredcache.public.products"


def test_schema_values_are_typed() -> None:
    """With the schema wrapper, logical types give Decimal, UUID, date and datetimes."""
    after = event("schema_insert").after
    assert after is not None
    assert after["price"] == Decimal("12.50")  # precise mode: base64 bytes + scale 2
    assert after["ratio"] == Decimal("0.125")  # VariableScaleDecimal struct
    assert after["sku"] == uuid.UUID("0b5e5f8a-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
    assert after["released"] == dt.date(2024, 1, 31)
    assert after["created"] == dt.datetime(2024, 1, 31, 10, 0, 0, 123456)
    assert after["updated_at"] == dt.datetime(2024, 1, 31, 10, tzinfo=dt.UTC)


def test_plain_values_stay_raw_and_convert_by_alias_to_the_schema_values() -> None:
    """Schemaless values are JSON as sent; the rules' type aliases reach the same values."""
    plain, typed = event("plain_insert").after, event("schema_insert").after
    assert plain is not None and typed is not None
    assert (plain["price"], plain["released"]) == ("12.50", 19753)
    kinds = {
        "price": "decimal",
        "ratio": "decimal",
        "sku": "uuid",
        "released": "date",
        "created": "timestamp",
        "updated_at": "timestamptz",
    }
    for column, kind in kinds.items():
        assert convert_value(plain[column], kind) == typed[column], column


def test_typed_values_render_as_the_application_would() -> None:
    after = event("schema_insert").after
    assert after is not None
    t = TagTemplate("p:{price}:{sku}:{released}:{created}:{updated_at}")
    assert t.render(after) == (
        "p:12.5:0b5e5f8a-3c4d-4e5f-8a9b-0c1d2e3f4a5b:2024-01-31:"
        "2024-01-31T100000.123456:2024-01-31T100000Z"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_default_identity_has_no_before_and_unknown_toast(variant: str) -> None:
    e = event(f"{variant}_update_default_identity_toast")
    assert e.op is Op.UPDATE and e.before is None and e.after is not None
    assert e.after["name"] == "big saw"
    assert e.after["description"] is UNKNOWN  # the unchanged TOASTed column


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_replica_identity_full_has_whole_before(variant: str) -> None:
    e = event(f"{variant}_update_replica_identity_full")
    assert e.table == "public.categories"
    assert e.before == {"tenant_id": "acme", "id": 7, "name": "tools"}
    assert e.after == {"tenant_id": "acme", "id": 7, "name": "hand tools"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_delete_then_tombstone(variant: str) -> None:
    delete, tombstone = decoded(f"{variant}_delete")
    assert isinstance(delete, ChangeEvent) and delete.op is Op.DELETE and delete.after is None
    assert delete.before is not None and delete.before["id"] == 1
    assert tombstone == Ignored("tombstone", "tieredcache.public.products")


@pytest.mark.parametrize("variant", VARIANTS)
def test_primary_key_change_is_delete_plus_create(variant: str) -> None:
    results = decoded(f"{variant}_primary_key_change")
    ops = sorted(r.op.value if isinstance(r, ChangeEvent) else r.reason for r in results)
    assert ops == ["c", "d", "tombstone"]
    by_op = {r.op: r for r in results if isinstance(r, ChangeEvent)}
    assert by_op[Op.DELETE].key == {"tenant_id": "acme", "id": 2}
    assert by_op[Op.CREATE].key == {"tenant_id": "globex", "id": 2}


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncate(variant: str) -> None:
    e = event(f"{variant}_truncate")
    assert (e.op, e.table, e.before, e.after, e.key) == (
        Op.TRUNCATE,
        "public.categories",
        None,
        None,
        None,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_logical_message(variant: str) -> None:
    e = event(f"{variant}_logical_message")
    assert e.op is Op.MESSAGE and e.table is None and e.message is not None
    assert e.topic == "tieredcache.message"
    assert e.message.prefix == "tieredcache"
    assert e.message.json() == {"tenant": "acme", "tags": ["product:1", "category:7"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_reads(variant: str) -> None:
    events = [r for r in decoded(f"{variant}_snapshot_read") if isinstance(r, ChangeEvent)]
    assert {e.op for e in events} == {Op.READ}
    assert all(e.snapshot for e in events)
    assert {e.snapshot_marker for e in events} == {"first", "last"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_heartbeat_is_ignored(variant: str) -> None:
    assert decoded(f"{variant}_heartbeat") == [
        Ignored("heartbeat", "__debezium-heartbeat.tieredcache")
    ]


def test_transaction_metadata_is_ignored() -> None:
    assert (
        decoded("schema_transaction_metadata")
        == [Ignored("transaction", "tieredcache.transaction")] * 2
    )


def test_custom_heartbeat_prefix_and_transaction_topic() -> None:
    assert decode_record("hb.x", None, b"{}", heartbeat_prefix="hb.") == Ignored(
        "heartbeat", "hb.x"
    )
    tx = decode_record("p.transaction", None, b"{}", transaction_topic="p.transaction")
    assert tx == Ignored("transaction", "p.transaction")


def test_transaction_block_does_not_confuse_the_event() -> None:
    """With provide.transaction.metadata the envelope's transaction block is just carried."""
    assert event("schema_insert").op is Op.CREATE


def _envelope(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "op": "c",
        "before": None,
        "after": {"id": 1},
        "source": {"schema": "public", "table": "t", "ts_ms": 5, "snapshot": "false"},
    }
    base.update(fields)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    ("snapshot", "flag", "marker"),
    [
        ("true", True, "true"),
        ("first", True, "first"),
        ("last", True, "last"),
        ("in-data-collection", True, "in-data-collection"),
        ("first_in_data_collection", True, "first_in_data_collection"),
        ("incremental", True, "incremental"),
        ("false", False, "false"),
        ("FALSE", False, "false"),
        (True, True, "true"),
        (False, False, "false"),
        (None, False, "false"),
    ],
)
def test_snapshot_forms(snapshot: object, flag: bool, marker: str) -> None:
    source = {"schema": "public", "table": "t", "snapshot": snapshot}
    e = decode_record("x.public.t", None, _envelope(op="r", source=source))
    assert isinstance(e, ChangeEvent)
    assert (e.snapshot, e.snapshot_marker) == (flag, marker)


def test_toast_placeholder_in_text_bytea_and_arrays_is_unknown() -> None:
    after = {
        "a": TOAST_PLACEHOLDER,
        "b": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==",
        "c": [TOAST_PLACEHOLDER],
        "d": "ok",
        "e": None,
    }
    e = decode_record("x.public.t", None, _envelope(after=after))
    assert isinstance(e, ChangeEvent) and e.after is not None
    assert [e.after[k] for k in "abcde"] == [UNKNOWN, UNKNOWN, UNKNOWN, "ok", None]
    assert not UNKNOWN and repr(UNKNOWN) == "UNKNOWN"


def test_nano_and_milli_temporal_types() -> None:
    assert convert_value(1706695200123456789, "timestamp_ns") == dt.datetime(
        2024, 1, 31, 10, 0, 0, 123456
    )
    assert convert_value(1706695200123, "timestamp_ms") == dt.datetime(
        2024, 1, 31, 10, 0, 0, 123000
    )
    assert convert_value(37800000000, "time") == dt.time(10, 30)
    assert convert_value(37800000, "io.debezium.time.Time") == dt.time(10, 30)
    assert convert_value("10:30:00Z", "io.debezium.time.ZonedTime") == dt.time(
        10, 30, tzinfo=dt.UTC
    )
    assert convert_value("-5", "decimal") == Decimal(-5)
    assert convert_value(
        "/w==", "org.apache.kafka.connect.data.Decimal", {"scale": "1"}
    ) == Decimal("-0.1")
    assert set(TYPE_ALIASES) >= {"decimal", "uuid", "date", "timestamp", "timestamptz"}


def test_without_schema_wrapper_key_and_value_are_plain_objects() -> None:
    wrapped = json.dumps({"schema": {"type": "struct"}, "payload": {"id": 1}}).encode()
    e = decode_record("x.public.t", wrapped, _envelope())
    assert isinstance(e, ChangeEvent) and e.key == {"id": 1} and e.table == "public.t"


def test_headers_are_kept() -> None:
    e = decode_record("x.public.t", None, _envelope(), headers=[("h", b"1")])
    assert isinstance(e, ChangeEvent) and e.headers == {"h": b"1"}


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("name", ["plain_insert", "schema_insert", "plain_truncate"])
def test_truncated_bytes_name_topic_partition_offset(name: str) -> None:
    record = records(name)[0]
    value = record["value"].encode()[: len(record["value"]) // 2]
    with pytest.raises(EventDecodeError) as info:
        decode_record(record["topic"], None, value, partition=3, offset=1234)
    message = str(info.value)
    assert message.startswith(f"cannot decode the Debezium record at {record['topic']}[3]@1234: ")
    assert "not valid JSON" in message
    assert (info.value.topic, info.value.partition, info.value.offset) == (record["topic"], 3, 1234)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON array, not an object"),
        (b'{"before": null}', "no 'op' field (fields: before)"),
        (_envelope(op="x"), "unknown op 'x'"),
        (_envelope(source=None), "no 'source' object"),
        (_envelope(source={"schema": "public"}), "source.table is missing"),
        (_envelope(after=None), "op 'c' without 'after'"),
        (_envelope(op="d", before=None), "op 'd' without 'before'"),
        (_envelope(op="u", after=None), "op 'u' without 'after'"),
        (_envelope(after=[1]), "'after' is a JSON array, not an object"),
        (_envelope(source={"table": "t", "snapshot": 3}), "source.snapshot is 3"),
        (_envelope(source={"table": "t", "txId": "x"}), "source.txId is 'x'"),
        (_envelope(op="m", message={"prefix": "p", "content": "%%%"}), "not base64"),
        (_envelope(op="m", message={}), "without message.prefix"),
    ],
)
def test_malformed_values_raise_with_context(value: bytes, problem: str) -> None:
    with pytest.raises(EventDecodeError, match=r"at t\[0\]@9: .*") as info:
        decode_record("t", None, value, partition=0, offset=9)
    assert problem in str(info.value)


def test_malformed_key_raises() -> None:
    with pytest.raises(EventDecodeError, match="the key is not valid JSON"):
        decode_record("t", b"{", _envelope())


def test_bad_typed_value_names_column_and_type() -> None:
    record = json.loads(records("schema_insert")[0]["value"])
    record["payload"]["after"]["price"] = "not base64!"
    with pytest.raises(
        EventDecodeError, match=r"after\.price = 'not base64!' is not a valid org\.apache"
    ):
        decode_record("t", None, json.dumps(record).encode())


def test_offset_only_context() -> None:
    with pytest.raises(EventDecodeError, match=r"record at t@5: "):
        decode_record("t", None, b"{", offset=5)
