"""Serialization of entries in shared layers: safe defaults, typed decoding, signed pickle.

Every Redis check reads Redis directly with redis-py, so what the cache stored (or
deleted) is observed, not inferred.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis

from tieredcache import (
    CacheKey,
    ConfigurationError,
    JsonSerializer,
    MemoryLayer,
    MsgpackSerializer,
    PickleSerializer,
    RedisLayer,
    Serializer,
    TieredCache,
    tenant_scope,
)
from tieredcache.entry import Entry
from tieredcache.errors import DecodeError, EncodeError
from tieredcache.serde import EntryCodec

pytestmark = pytest.mark.redis

SECRET = b"s" * 32
OLD_SECRET = b"o" * 32


@dataclass
class Point:
    x: int
    y: int


class Item(msgspec.Struct):
    sku: str
    price: float
    tags: list[str] = []


class Opaque:
    """A value no msgpack/JSON encoder knows."""

    def __init__(self, n: int) -> None:
        self.n = n


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """redis-py on the test's (emptied) Redis, to look at what the cache stored."""
    made = redis.Redis.from_url(redis_url)
    yield made
    made.close()


_namespaces = itertools.count()


@pytest.fixture
def make_cache(redis_url: str) -> Iterator[Callable[..., TieredCache]]:
    """Builds caches on the test's Redis; ``memory=True`` puts a MemoryLayer in front."""
    made: list[TieredCache] = []

    def build(namespace: str = "serde", *, memory: bool = False, **options: Any) -> TieredCache:
        layers: list[MemoryLayer | RedisLayer] = [MemoryLayer()] if memory else []
        layers.append(RedisLayer(url=redis_url))
        options.setdefault("broadcast", False)
        cache = TieredCache(namespace=namespace, layers=layers, **options)
        made.append(cache)
        return cache

    yield build
    for cache in made:
        cache.close()


def value_name(cache: TieredCache, key: CacheKey) -> str:
    """The Redis name of ``key``'s value in ``cache``'s Redis layer."""
    layer = cache.layers[-1]
    assert isinstance(layer, RedisLayer)
    return layer.keyspace.value(key)


def value_names(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(match="*:v:*"))


# -- msgpack (default) and typed decoding ----------------------------------------------


def test_msgpack_is_the_default_and_round_trips_plain_values(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """Without a serializer the cache stores msgpack; nested plain values come back equal
    from Redis in another cache instance (another process) without calling the loader."""
    value = {"s": "text", "i": -3, "f": 2.5, "b": True, "n": None, "l": [1, [2, "3"]], "d": {}}
    writer, reader = make_cache(), make_cache()
    assert writer._codec.serializer.name == "msgpack"
    calls: list[str] = []

    def loader(cache: TieredCache) -> Callable[[str], dict[str, Any]]:
        @cache.cached(ttl=60, name="doc")
        def doc(doc_id: str) -> dict[str, Any]:
            calls.append(doc_id)
            return value

        return doc

    with tenant_scope("acme"):
        assert loader(writer)("d1") == value
        assert loader(reader)("d1") == value
    assert calls == ["d1"]
    raw = client.get(value_name(writer, CacheKey("serde", "acme", "doc:v1:sd1")))
    assert raw is not None and raw.endswith(msgspec.msgpack.encode(value))


@dataclass
class TypedCase:
    name: str
    value: Any


def test_values_decode_into_the_return_annotation(make_cache: Callable[..., TieredCache]) -> None:
    """Read back from Redis, values are rebuilt as the annotated type: dataclass,
    msgspec.Struct, list of dataclasses, datetime, UUID, tuple."""
    cache = make_cache()
    calls: list[str] = []
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")

    @cache.cached(ttl=60, name="point")
    def point(n: int) -> Point:
        calls.append("point")
        return Point(n, n + 1)

    @cache.cached(ttl=60, name="item")
    def item(sku: str) -> Item:
        calls.append("item")
        return Item(sku=sku, price=9.5, tags=["a"])

    @cache.cached(ttl=60, name="points")
    def points(n: int) -> list[Point]:
        calls.append("points")
        return [Point(i, i) for i in range(n)]

    @cache.cached(ttl=60, name="when")
    def created(n: int) -> dt.datetime:
        calls.append("when")
        return when

    @cache.cached(ttl=60, name="ident")
    def owner(n: int) -> uuid.UUID:
        calls.append("ident")
        return ident

    @cache.cached(ttl=60, name="pair")
    def pair(n: int) -> tuple[int, str]:
        calls.append("pair")
        return (n, "x")

    with tenant_scope("acme"):
        for _ in range(2):  # the first call fills Redis, the second decodes from it
            assert point(1) == Point(1, 2) and type(point(1)) is Point
            got_item = item("a-1")
            assert type(got_item) is Item and got_item == Item("a-1", 9.5, ["a"])
            assert points(2) == [Point(0, 0), Point(1, 1)]
            assert all(type(p) is Point for p in points(2))
            assert created(1) == when and type(created(1)) is dt.datetime
            assert owner(1) == ident and type(owner(1)) is uuid.UUID
            assert pair(1) == (1, "x") and type(pair(1)) is tuple
    assert sorted(calls) == sorted(["point", "item", "points", "when", "ident", "pair"])


def test_without_annotation_values_decode_into_plain_types(
    make_cache: Callable[..., TieredCache],
) -> None:
    """A function without a return annotation gets a dataclass back as a plain dict."""
    cache = make_cache()

    @cache.cached(ttl=60, name="untyped")
    def untyped(n):  # type: ignore[no-untyped-def]
        return Point(n, n)

    with tenant_scope("acme"):
        assert untyped(3) == Point(3, 3)  # the loader's own object on the miss
        assert untyped(3) == {"x": 3, "y": 3}  # decoded from Redis without a type


# -- JSON -------------------------------------------------------------------------------


def test_json_serializer_stores_readable_json_and_decodes_typed(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """serializer=JsonSerializer() puts JSON text after the header and decodes into the
    annotated type."""
    cache = make_cache(serializer=JsonSerializer())
    calls: list[int] = []

    @cache.cached(ttl=60, name="point")
    def point(n: int) -> Point:
        calls.append(n)
        return Point(n, 2 * n)

    with tenant_scope("acme"):
        assert point(4) == Point(4, 8)
        again = point(4)
        raw = client.get(value_name(cache, point.key(4)))
    assert type(again) is Point and again == Point(4, 8)
    assert calls == [4]
    assert raw is not None and raw.endswith(b'{"x":4,"y":8}')


# -- pickle and signing -----------------------------------------------------------------


def test_pickle_without_signing_secrets_is_a_configuration_error() -> None:
    """PickleSerializer executes code on load: without signing_secrets the cache refuses it."""
    with pytest.raises(ConfigurationError, match="signing_secrets"):
        TieredCache(namespace="serde", layers=[MemoryLayer()], serializer=PickleSerializer())


def test_short_signing_secret_is_a_configuration_error() -> None:
    """A signing secret under 16 bytes is refused."""
    with pytest.raises(ConfigurationError, match="16 bytes"):
        TieredCache(
            namespace="serde",
            layers=[MemoryLayer()],
            serializer=PickleSerializer(),
            signing_secrets=[b"short"],
        )


def test_signed_pickle_round_trips_values_msgpack_cannot_encode(
    make_cache: Callable[..., TieredCache],
) -> None:
    """With secrets, pickle stores arbitrary objects and a second instance reads them back."""
    writer = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET])
    reader = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET])
    calls: list[int] = []

    def decorate(cache: TieredCache) -> Callable[[int], Opaque]:
        @cache.cached(ttl=60, name="opaque")
        def opaque(n: int) -> Opaque:
            calls.append(n)
            return Opaque(n)

        return opaque

    with tenant_scope("acme"):
        assert decorate(writer)(7).n == 7
        got = decorate(reader)(7)
    assert isinstance(got, Opaque) and got.n == 7
    assert calls == [7]


SIGNED = [
    pytest.param(PickleSerializer, id="pickle"),
    pytest.param(MsgpackSerializer, id="msgpack"),
]


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0x01])


def _extend_fresh_until(raw: bytes) -> bytes:
    # Header: b"TC" u8 u8 then created f64 at offset 4, fresh_until f64 at offset 12.
    fresh = raw[12:20]
    return raw[:12] + bytes([fresh[0] ^ 0x01]) + fresh[1:] + raw[20:]


TAMPERINGS: list[Any] = [
    pytest.param(_flip_last_byte, id="payload"),
    pytest.param(_extend_fresh_until, id="header"),
    pytest.param(lambda raw: raw[:10], id="truncated"),
    pytest.param(lambda raw: b"\x00garbage" * 8, id="garbage"),
    pytest.param(lambda raw: raw[:20], id="truncated-header"),
]


@pytest.mark.parametrize("serializer", SIGNED)
@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_tampered_signed_entry_is_a_miss_and_is_deleted_from_redis(
    make_cache: Callable[..., TieredCache],
    client: redis.Redis,
    serializer: Callable[[], Serializer],
    tamper: Callable[[bytes], bytes],
) -> None:
    """A tampered, truncated or garbage entry is a miss for cache.get(), counted as a
    Redis miss, and deleted from Redis."""
    cache = make_cache(serializer=serializer(), signing_secrets=[SECRET])
    cache.set("doc", {"v": 1}, ttl=60, tenant="acme")
    name = value_name(cache, CacheKey("serde", "acme", "doc"))
    raw = client.get(name)
    assert raw is not None
    assert cache.get("doc", tenant="acme") == {"v": 1}
    client.set(name, tamper(raw), px=60_000)
    misses = cache.stats().layers["redis"].misses

    assert cache.get("doc", tenant="acme", default="MISS") == "MISS"
    assert cache.stats().layers["redis"].misses == misses + 1
    assert client.exists(name) == 0


@pytest.mark.parametrize("serializer", SIGNED)
@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_tampered_signed_entry_makes_the_decorated_call_run_the_loader(
    make_cache: Callable[..., TieredCache],
    client: redis.Redis,
    serializer: Callable[[], Serializer],
    tamper: Callable[[bytes], bytes],
) -> None:
    """A decorated call that meets a tampered entry calls the loader and returns its value."""
    cache = make_cache(serializer=serializer(), signing_secrets=[SECRET])
    calls: list[int] = []

    @cache.cached(ttl=60, name="doc")
    def doc(n: int) -> dict[str, int]:
        calls.append(n)
        return {"v": n, "call": len(calls)}

    with tenant_scope("acme"):
        assert doc(1) == {"v": 1, "call": 1}
        name = value_name(cache, doc.key(1))
        raw = client.get(name)
        assert raw is not None
        client.set(name, tamper(raw), px=60_000)
        assert doc(1) == {"v": 1, "call": 2}
    assert client.get(name) != tamper(raw)


@pytest.mark.parametrize("tamper", [TAMPERINGS[0], TAMPERINGS[2], TAMPERINGS[3]])
def test_tampered_entry_is_counted_as_a_redis_error(
    make_cache: Callable[..., TieredCache],
    client: redis.Redis,
    tamper: Callable[[bytes], bytes],
) -> None:
    """An entry that fails verification or decoding shows in stats() as an error of the
    Redis layer (as an un-encodable value does), not only as an ordinary miss."""
    cache = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET])
    cache.set("doc", {"v": 1}, ttl=60, tenant="acme")
    name = value_name(cache, CacheKey("serde", "acme", "doc"))
    raw = client.get(name)
    assert raw is not None
    client.set(name, tamper(raw), px=60_000)
    assert cache.get("doc", tenant="acme") is None
    assert cache.stats().layers["redis"].errors == 1


def test_corrupt_entry_is_replaced_by_the_reloaded_value(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """After a tampered entry is dropped, the loader's fresh value is stored in its place:
    the call after that is served from Redis without loading again."""
    cache = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET])
    calls: list[int] = []

    @cache.cached(ttl=60, name="doc")
    def doc(n: int) -> dict[str, int]:
        calls.append(n)
        return {"v": n}

    with tenant_scope("acme"):
        doc(1)
        name = value_name(cache, doc.key(1))
        raw = client.get(name)
        assert raw is not None
        client.set(name, _flip_last_byte(raw), px=60_000)
        assert doc(1) == {"v": 1}
        assert calls == [1, 1]
        stored = client.get(name)
        assert stored is not None, "the reloaded value was not written back to Redis"
        assert doc(1) == {"v": 1}
    assert calls == [1, 1]


@pytest.mark.parametrize("serializer", SIGNED)
def test_entry_copied_under_another_tenants_key_does_not_verify(
    make_cache: Callable[..., TieredCache],
    client: redis.Redis,
    serializer: Callable[[], Serializer],
) -> None:
    """The signature binds the full key: acme's signed entry copied to globex's Redis key is a
    miss for globex (deleted; the loader runs for globex); acme's own entry still verifies."""
    cache = make_cache(serializer=serializer(), signing_secrets=[SECRET])
    calls: list[str | None] = []

    @cache.cached(ttl=60, name="secret")
    def secret(n: int) -> str:
        from tieredcache import current_tenant

        calls.append(current_tenant())
        return f"{current_tenant()}-secret-{n}"

    with tenant_scope("acme"):
        assert secret(1) == "acme-secret-1"
        acme_name = value_name(cache, secret.key(1))
    with tenant_scope("globex"):
        globex_name = value_name(cache, secret.key(1))
    assert acme_name != globex_name
    raw = client.get(acme_name)
    assert raw is not None
    client.set(globex_name, raw, px=60_000)
    assert cache.get("secret:v1:i1", tenant="globex") is None
    assert client.exists(globex_name) == 0

    client.set(globex_name, raw, px=60_000)
    with tenant_scope("globex"):
        assert secret(1) == "globex-secret-1"
    with tenant_scope("acme"):
        assert secret(1) == "acme-secret-1"
    assert calls == ["acme", "globex"]


def test_rotated_secrets_verify_old_entries_and_sign_with_the_first(
    make_cache: Callable[..., TieredCache],
) -> None:
    """signing_secrets=[new, old] reads entries signed with old; [new] alone does not."""
    old = make_cache(serializer=PickleSerializer(), signing_secrets=[OLD_SECRET])
    rotated = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET, OLD_SECRET])
    new_only = make_cache(serializer=PickleSerializer(), signing_secrets=[SECRET])
    old.set("k", "signed-with-old", ttl=60, tenant="acme")
    assert rotated.get("k", tenant="acme") == "signed-with-old"
    assert new_only.get("k", tenant="acme") is None
    rotated.set("k2", "signed-with-new", ttl=60, tenant="acme")
    assert new_only.get("k2", tenant="acme") == "signed-with-new"


def test_unsigned_entry_is_refused_when_signing_is_required(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """An entry written without a signature (e.g. by a misconfigured replica) is a miss for a
    signing cache and is deleted."""
    unsigned = make_cache()
    signing = make_cache(signing_secrets=[SECRET])
    unsigned.set("k", "unsigned", ttl=60, tenant="acme")
    assert signing.get("k", tenant="acme") is None
    assert client.exists(value_name(signing, CacheKey("serde", "acme", "k"))) == 0


def test_codec_rejects_bad_entries_with_decode_error_naming_the_key() -> None:
    """EntryCodec.decode raises DecodeError (naming the key) for every kind of bad entry."""
    codec = EntryCodec(PickleSerializer(), [SECRET])
    entry = Entry({"v": 1}, 1.0, 2.0, 3.0, 0.5)
    data = codec.encode("ns:acme:k", entry)
    decoded = codec.decode("ns:acme:k", data, pickle_loads)
    assert decoded == entry
    for bad_key, bad_data in [
        ("ns:globex:k", data),
        ("ns:acme:k", _flip_last_byte(data)),
        ("ns:acme:k", _extend_fresh_until(data)),
        ("ns:acme:k", data[:5]),
        ("ns:acme:k", b"XX" + data[2:]),
    ]:
        with pytest.raises(DecodeError, match=bad_key):
            codec.decode(bad_key, bad_data, pickle_loads)
    with pytest.raises(EncodeError):
        EntryCodec(MsgpackSerializer()).encode("ns:acme:k", Entry(Opaque(1), 1.0, 2.0, 3.0))


def pickle_loads(data: bytes) -> Any:
    import pickle

    return pickle.loads(data)


# -- values that cannot be encoded ---------------------------------------------------------


def test_unencodable_value_is_returned_and_kept_in_l1_but_not_written_to_redis(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """A value msgpack cannot encode is still returned and served from the memory layer;
    Redis never receives it, and the Redis layer counts an error."""
    cache = make_cache(memory=True)
    calls: list[int] = []

    @cache.cached(ttl=60, name="opaque")
    def opaque(n: int) -> Opaque:
        calls.append(n)
        return Opaque(n)

    with tenant_scope("acme"):
        first = opaque(1)
        second = opaque(1)
    assert isinstance(first, Opaque) and first.n == 1
    assert second is first
    assert calls == [1]
    assert value_names(client) == []
    stats = cache.stats()
    assert stats.layers["memory"].hits == 1
    assert stats.layers["redis"].errors >= 1


def test_explicit_set_of_an_unencodable_value_stays_in_l1_only(
    make_cache: Callable[..., TieredCache], client: redis.Redis
) -> None:
    """cache.set() with an un-encodable value keeps it in memory and writes nothing to Redis."""
    cache = make_cache(memory=True)
    value = Opaque(5)
    cache.set("opaque", value, ttl=60, tenant="acme")
    assert cache.get("opaque", tenant="acme") is value
    assert value_names(client) == []
