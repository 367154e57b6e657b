"""Keys built from function arguments: deterministic, canonical, bounded, versioned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tieredcache import (
    CacheKey,
    ConfigurationError,
    InvalidKeyError,
    MemoryLayer,
    Tag,
    TieredCache,
    tenant_scope,
)
from tieredcache.keys import MAX_BODY_LENGTH

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache() -> Iterator[TieredCache]:
    made = TieredCache(namespace="keys", layers=[MemoryLayer()])
    yield made
    made.close()


@pytest.fixture(autouse=True)
def _acme() -> Iterator[None]:
    with tenant_scope("acme"):
        yield


# -- determinism across processes ------------------------------------------------------

KEY_SCRIPT = r"""
import json
from tieredcache import MemoryLayer, TieredCache, tenant_scope

cache = TieredCache(namespace="keys", layers=[MemoryLayer()])

@cache.cached(ttl=60, name="catalog.search")
def search(query, filters=None, *extra, limit=10, **options):
    return None

CASES = [
    ((42,), {}),
    (("shoes",), {"limit": 5}),
    (("x" * 300,), {}),
    (("q", {"colour": "red", "size": [40, 41], "brand": {"b": 1, "a": 2}}), {}),
    (("q", {"zeta", "alpha", "mid", "beta", "omega"}), {}),
    (("q", frozenset({"k1", "k2", "k3", "k4"})), {}),
    (("q", None, 1.5, b"raw", (1, "two"), None), {"sort": "price", "page": 3}),
    (("q", [{"z": 1, "y": 2, "x": 3}]), {"opt_b": 2, "opt_a": 1}),
]

with tenant_scope("acme"):
    print(json.dumps([search.key(*args, **kwargs).full for args, kwargs in CASES]))
"""


def _bodies_in_subprocess(hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    keys: list[str] = json.loads(result.stdout)
    return keys


def test_keys_are_identical_across_processes_and_hash_seeds() -> None:
    """The same calls give the same keys in processes with different PYTHONHASHSEED
    (dicts, sets and frozensets included) and in this process."""
    first = _bodies_in_subprocess("1")
    second = _bodies_in_subprocess("4242")
    third = _bodies_in_subprocess("random")
    assert first == second == third
    assert len(set(first)) == len(first)
    namespace: dict[str, Any] = {}
    exec(compile(KEY_SCRIPT.replace("print(", "RESULT = ("), "<keys>", "exec"), namespace)
    assert json.loads(namespace["RESULT"]) == first


# -- canonical form --------------------------------------------------------------------


def test_keyword_order_positional_or_keyword_and_explicit_defaults_share_one_key(
    cache: TieredCache,
) -> None:
    """f(1, 2), f(a=1, b=2), f(b=2, a=1) and f(1, 2, flag=False) (the default) are one entry."""
    calls: list[tuple[int, int, bool]] = []

    @cache.cached(ttl=60, name="f")
    def f(a: int, b: int, flag: bool = False) -> int:
        calls.append((a, b, flag))
        return a + b

    variants = [
        f.key(1, 2),
        f.key(a=1, b=2),
        f.key(b=2, a=1),
        f.key(1, b=2),
        f.key(1, 2, False),
        f.key(1, 2, flag=False),
        f.key(flag=False, b=2, a=1),
    ]
    assert len(set(variants)) == 1
    assert f(1, 2) == f(b=2, a=1) == f(1, 2, flag=False) == f(a=1, b=2) == 3
    assert calls == [(1, 2, False)]
    assert f.key(1, 2, flag=True) != variants[0]


def test_var_keyword_arguments_are_order_independent(cache: TieredCache) -> None:
    """**kwargs passed in different orders map to one key."""

    @cache.cached(ttl=60, name="query")
    def query(table: str, **where: Any) -> str:
        return table

    assert query.key("t", a=1, b="x", c=[1]) == query.key("t", c=[1], b="x", a=1)
    assert query.key("t", a=1) != query.key("t", a=2)


def test_dict_arguments_are_order_independent(cache: TieredCache) -> None:
    """Dicts equal as dicts but built in another insertion order give one key."""

    @cache.cached(ttl=60, name="dicts")
    def f(filters: dict[str, Any]) -> int:
        return len(filters)

    assert f.key({"a": 1, "b": {"y": 2, "x": 1}}) == f.key({"b": {"x": 1, "y": 2}, "a": 1})


def test_unhashable_arguments_work_and_are_cached(cache: TieredCache) -> None:
    """Lists and dicts as arguments are keyed by content and served from the cache."""
    calls: list[Any] = []

    @cache.cached(ttl=60, name="unhashable")
    def f(ids: list[int], filters: dict[str, Any]) -> int:
        calls.append((ids, filters))
        return sum(ids)

    assert f([1, 2, 3], {"a": 1, "b": 2}) == 6
    assert f([1, 2, 3], {"b": 2, "a": 1}) == 6
    assert f(ids=[1, 2, 3], filters={"a": 1, "b": 2}) == 6
    assert len(calls) == 1
    assert f([1, 2], {"a": 1, "b": 2}) == 3
    assert len(calls) == 2
    assert f.invalidate([1, 2, 3], {"a": 1, "b": 2}).ok
    assert f([1, 2, 3], {"a": 1, "b": 2}) == 6
    assert len(calls) == 3


async def test_unhashable_arguments_work_for_async_functions(cache: TieredCache) -> None:
    """An async cached function with list/dict arguments caches by content too."""
    calls: list[Any] = []

    @cache.cached(ttl=60, name="aunhashable")
    async def f(ids: list[int], filters: dict[str, Any]) -> int:
        calls.append(ids)
        return len(ids)

    assert await f([1, 2], {"x": [1]}) == 2
    assert await f([1, 2], {"x": [1]}) == 2
    assert calls == [[1, 2]]


def test_different_arguments_give_different_keys(cache: TieredCache) -> None:
    """Values that differ (in value or type) never share a key body."""

    @cache.cached(ttl=60, name="distinct")
    def f(x: Any) -> Any:
        return x

    values: list[Any] = [
        1,
        "1",
        1.0,
        True,
        None,
        "None",
        "n",
        "",
        "i1",
        b"1",
        [1, 2],
        [2, 1],
        {"a": 1},
        {"a": 2},
        "x" * 100,
        "x" * 101,
    ]
    keys = [f.key(v) for v in values]
    assert len(set(keys)) == len(values)


def test_equal_but_differently_typed_arguments_are_separate_entries(cache: TieredCache) -> None:
    """f(1), f(1.0) and f(True) compare equal in Python but have different keys, so each
    is computed for its own argument and never served another's value (even from L1)."""
    calls: list[Any] = []

    @cache.cached(ttl=60, name="typed")
    def describe(x: Any) -> str:
        calls.append(x)
        return type(x).__name__

    assert len({describe.key(1), describe.key(1.0), describe.key(True)}) == 3
    assert describe(1) == "int"
    assert describe(1.0) == "float"
    assert describe(True) == "bool"
    assert [type(c) for c in calls] == [int, float, bool]


def test_invalidating_a_float_argument_drops_what_that_call_returns(cache: TieredCache) -> None:
    """After f.invalidate(1.0), the next f(1.0) runs the function: no entry keyed by an
    equal-comparing argument (f(1)) keeps answering it."""
    version = {"n": 0}

    @cache.cached(ttl=60, name="price")
    def price(x: float) -> int:
        version["n"] += 1
        return version["n"]

    price(1)
    first = price(1.0)
    assert price.invalidate(1.0).ok
    assert price(1.0) != first


def test_long_arguments_are_digested_to_a_bounded_key(cache: TieredCache) -> None:
    """A 10 000-character argument or a 5 000-item list gives a short digest body."""

    @cache.cached(ttl=60, name="catalog.search")
    def search(query: Any) -> int:
        return 1

    for arg in ("x" * 10_000, list(range(5_000)), {"k" * 500: "v" * 500}):
        body = search.key(arg).body
        assert body.startswith("catalog.search:v1:")
        assert len(body) <= 64, body
    assert search.key("x" * 10_000) != search.key("x" * 9_999 + "y")
    assert search("x" * 10_000) == 1


def test_short_int_and_str_arguments_stay_readable(cache: TieredCache) -> None:
    """Short int/str argument lists appear in the key body as they are (readable in Redis)."""

    @cache.cached(ttl=60, name="catalog.product")
    def product(product_id: int, locale: str) -> int:
        return product_id

    body = product.key(42, "en-GB").body
    assert body.startswith("catalog.product:v1:")
    assert "42" in body and "en-GB" in body


def test_a_very_long_function_name_still_gives_a_valid_bounded_key(cache: TieredCache) -> None:
    """A 300-character name is digested in the key so the body stays within the limit."""

    @cache.cached(ttl=60, name="n" * 300)
    def f(x: int) -> int:
        return x

    body = f.key(1).body
    assert len(body) <= MAX_BODY_LENGTH
    assert f(1) == 1


def test_version_is_in_the_key_and_separates_entries(cache: TieredCache) -> None:
    """version=2 shows in the body, and a v2 function never reads the v1 entry of one name."""

    @cache.cached(ttl=60, name="profile", version=1)
    def profile_v1(user_id: int) -> dict[str, Any]:
        return {"name": "old-shape"}

    @cache.cached(ttl=60, name="profile", version=2)
    def profile_v2(user_id: int) -> dict[str, Any]:
        return {"full_name": "new-shape"}

    assert ":v1:" in profile_v1.key(1).body
    assert ":v2:" in profile_v2.key(1).body
    assert profile_v1.key(1) != profile_v2.key(1)
    assert profile_v1(1) == {"name": "old-shape"}
    assert profile_v2(1) == {"full_name": "new-shape"}

    @cache.cached(ttl=60, name="profile", version="2024-06")
    def profile_v3(user_id: int) -> str:
        return "v3"

    assert ":v2024-06:" in profile_v3.key(1).body


def test_ignored_parameters_are_left_out_of_the_key(cache: TieredCache) -> None:
    """ignore=['request_id'] makes calls differing only in request_id share one entry."""
    calls: list[str] = []

    @cache.cached(ttl=60, name="ignored", ignore=["request_id", "logger"])
    def f(item: int, request_id: str, logger: object = None) -> int:
        calls.append(request_id)
        return item

    assert f.key(1, "r1") == f.key(1, "r2", logger=object())
    assert f(1, "r1") == f(1, "r2") == 1
    assert calls == ["r1"]
    assert f.key(1, "r1") != f.key(2, "r1")


def test_ignore_naming_an_unknown_parameter_is_a_configuration_error(cache: TieredCache) -> None:
    """ignore=['nope'] is refused at decoration time, naming the parameter."""
    with pytest.raises(ConfigurationError, match="nope"):

        @cache.cached(ttl=60, ignore=["nope"])
        def f(x: int) -> int:
            return x


def test_self_is_left_out_of_method_keys(cache: TieredCache) -> None:
    """Two instances calling a cached method with the same arguments share one key."""

    class Repo:
        @cache.cached(ttl=60, name="repo.get")
        def get(self, item_id: int) -> int:
            return item_id

    assert Repo.get.key(Repo(), 5) == Repo.get.key(Repo(), 5)
    assert Repo().get(5) == 5


def test_custom_key_function_gives_the_body(cache: TieredCache) -> None:
    """key=lambda product_id: f'product:{product_id}' is the body, scoped by namespace/tenant."""

    @cache.cached(ttl=60, key=lambda product_id: f"product:{product_id}")
    def product(product_id: int) -> int:
        return product_id

    assert product.key(42) == CacheKey("keys", "acme", "product:42")
    assert str(product.key(42)) == "keys:acme:product:42"
    with tenant_scope("globex"):
        assert str(product.key(42)) == "keys:globex:product:42"


def test_uncodable_argument_raises_invalid_key_error_naming_the_function(
    cache: TieredCache,
) -> None:
    """An argument msgpack cannot encode raises InvalidKeyError pointing to key=/ignore=."""

    @cache.cached(ttl=60, name="opaque")
    def f(thing: Any) -> int:
        return 1

    with pytest.raises(InvalidKeyError, match="opaque"):
        f(object())


@pytest.mark.parametrize("body", ["", "has space", "tab\there", "x" * (MAX_BODY_LENGTH + 1)])
def test_invalid_explicit_key_bodies_are_rejected(cache: TieredCache, body: str) -> None:
    """Explicit keys must be 1-512 printable characters without spaces."""
    with pytest.raises(InvalidKeyError):
        cache.set(body, 1, ttl=5)


@pytest.mark.parametrize("name", ["", "a b", "a,b", "ü", "x" * 201])
def test_invalid_tag_names_are_rejected(cache: TieredCache, name: str) -> None:
    """Tags must be 1-200 characters of [A-Za-z0-9._:/=@+-] (they travel in CDN headers)."""
    with pytest.raises(InvalidKeyError):
        cache.set("k", 1, ttl=5, tags=[name])
    with pytest.raises(InvalidKeyError):
        Tag("keys", "acme", name)


def test_key_and_tag_text_forms_are_namespace_tenant_scoped() -> None:
    """str(CacheKey) and str(Tag) are 'namespace:tenant:rest'; equality follows the text."""
    assert str(CacheKey("shop", "acme", "product:42")) == "shop:acme:product:42"
    assert str(Tag("shop", "acme", "product:42")) == "shop:acme:product:42"
    assert CacheKey("shop", "acme", "p") == CacheKey("shop", "acme", "p")
    assert CacheKey("shop", "acme", "p") != CacheKey("shop", "globex", "p")
    assert hash(CacheKey("shop", "acme", "p")) == hash(CacheKey("shop", "acme", "p"))
