"""TagTemplate: one canonical rendering shared by cached(tags=...) and the CDC rules."""

from __future__ import annotations

import datetime as dt
import doctest
import inspect
import uuid
from decimal import Decimal

import pytest

import tieredcache.tags
from tieredcache.errors import ConfigurationError, InvalidKeyError
from tieredcache.tags import (
    MissingTagFieldError,
    TagTemplate,
    TagTemplateError,
    TagValueError,
    format_tag_value,
)


def test_doctests_pass() -> None:
    """The examples in the module's docstrings are true."""
    result = doctest.testmod(tieredcache.tags)
    assert result.failed == 0 and result.attempted > 0


def test_fields_in_order_without_duplicates() -> None:
    assert TagTemplate("p:{tenant_id}:{id}:{id}").fields == ("tenant_id", "id")


def test_static_template_has_no_fields() -> None:
    assert TagTemplate("products").render({}) == "products"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (42, "42"),
        (-7, "-7"),
        (True, "true"),
        (False, "false"),
        ("sku-1", "sku-1"),
        (Decimal("12.50"), "12.5"),
        (Decimal("12.5"), "12.5"),
        (Decimal("100"), "100"),
        (Decimal("1E+2"), "100"),
        (Decimal("-0.00"), "0"),
        (Decimal("0.000001"), "0.000001"),
        (0.1, "0.1"),
        (3.0, "3"),
        (uuid.UUID("0B5E5F8A-3C4D-4E5F-8A9B-0C1D2E3F4A5B"), "0b5e5f8a-3c4d-4e5f-8a9b-0c1d2e3f4a5b"),
        (dt.date(2024, 1, 31), "2024-01-31"),
        (dt.datetime(2024, 1, 31, 10, 0), "2024-01-31T100000"),
        (dt.datetime(2024, 1, 31, 10, 0, 0, 123456), "2024-01-31T100000.123456"),
        (
            dt.datetime(2024, 1, 31, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2024-01-31T100000Z",
        ),
        (dt.datetime(2024, 1, 31, 10, tzinfo=dt.UTC), "2024-01-31T100000Z"),
        (dt.time(10, 30), "103000"),
    ],
)
def test_canonical_formatting(value: object, text: str) -> None:
    """Each type has exactly one text form; equal values render equally."""
    assert format_tag_value(value) == text


def test_equal_decimals_and_ints_render_alike() -> None:
    """A DB numeric 12.00 and an application int 12 give the same tag."""
    t = TagTemplate("price:{p}")
    assert t.render({"p": Decimal("12.00")}) == t.render({"p": 12}) == "price:12"


@pytest.mark.parametrize("value", [None, b"x", [1], {"a": 1}, object(), Decimal("NaN")])
def test_unsupported_values_are_refused(value: object) -> None:
    with pytest.raises(TagValueError):
        format_tag_value(value)


@pytest.mark.parametrize("value", ["a:b", "a b", "a,b", "", "é"])
def test_values_with_separator_or_foreign_characters_are_refused(value: str) -> None:
    """A value with ':' could forge another row's tag ('{a}:{b}' with a='x:y')."""
    with pytest.raises(TagValueError, match=r"tag template 'x:\{a\}', \{a\}"):
        TagTemplate("x:{a}").render({"a": value})


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("p:{a.b}", "not a plain name"),
        ("p:{a[0]}", "not a plain name"),
        ("p:{a!r}", "conversion"),
        ("p:{a:>3}", "format spec"),
        ("p:{}", "positional"),
        ("p:{0}", "not a plain name"),
        ("p:{a", "expected '}'"),
        ("p {a}", "must be 1-200 characters"),
        ("", "non-empty"),
    ],
)
def test_bad_templates_are_refused(template: str, problem: str) -> None:
    with pytest.raises(TagTemplateError, match=problem):
        TagTemplate(template)


def test_template_error_is_a_configuration_error() -> None:
    assert issubclass(TagTemplateError, ConfigurationError)
    assert issubclass(TagValueError, InvalidKeyError)


def test_missing_field_names_template_and_field() -> None:
    with pytest.raises(MissingTagFieldError) as info:
        TagTemplate("category:{category_id}").render({"id": 1})
    assert str(info.value) == (
        "tag template 'category:{category_id}' needs a value for {category_id}; none given"
    )
    assert info.value.field == "category_id"
    assert isinstance(info.value, KeyError)


def test_none_is_refused_by_render_but_skipped_by_render_if_present() -> None:
    t = TagTemplate("category:{category_id}")
    with pytest.raises(TagValueError, match="NoneType"):
        t.render({"category_id": None})
    assert t.render_if_present({"category_id": None}) is None
    assert t.render_if_present({}) is None
    assert t.render_if_present({"category_id": 3}) == "category:3"


def test_render_from_bound_arguments() -> None:
    """The decorator renders from a call's bound arguments, defaults applied."""

    def get_product(tenant: str, id: int, region: str = "eu") -> None: ...

    bound = inspect.signature(get_product).bind("acme", 5)
    bound.apply_defaults()
    assert TagTemplate("product:{region}:{id}").render(bound.arguments) == "product:eu:5"


def test_check_fields_against_parameters() -> None:
    t = TagTemplate("product:{id}")
    t.check_fields(["tenant", "id"], where="get_product()")
    with pytest.raises(TagTemplateError, match=r"uses \{id\}, which get\(\) does not have"):
        t.check_fields(["pid"], where="get()")


def test_too_long_rendering_is_refused() -> None:
    with pytest.raises(TagValueError, match="1-200"):
        TagTemplate("p:{a}").render({"a": "x" * 300})


def test_templates_compare_by_text() -> None:
    assert TagTemplate("p:{id}") == TagTemplate("p:{id}")
    assert len({TagTemplate("p:{id}"), TagTemplate("p:{id}")}) == 1
    assert repr(TagTemplate("p:{id}")) == "TagTemplate('p:{id}')"


def test_the_decorator_renders_the_same_tag_templates_as_the_cdc_rules() -> None:
    """@cache.cached(tags=[TagTemplate(...)]) tags each entry from the call's arguments
    (defaults applied, keyword or positional), so invalidating the tag a CDC rule
    renders from the row drops exactly that entry."""
    from tieredcache import MemoryLayer, TieredCache, tenant_scope

    product = TagTemplate("product:{product_id}")
    cache = TieredCache("tt", [MemoryLayer()])
    loads: list[int] = []

    @cache.cached(ttl=60, tags=[product, "table:products"])
    def get_product(product_id: int, lang: str = "en") -> int:
        loads.append(product_id)
        return product_id

    with tenant_scope("acme"):
        get_product(1), get_product(product_id=2), get_product(1)
        assert loads == [1, 2]
        cache.invalidate(tags=[product.render({"product_id": 1})])
        get_product(1), get_product(2)
        assert loads == [1, 2, 1]
        cache.invalidate(tags=["table:products"])
        get_product(2)
        assert loads == [1, 2, 1, 2]


def test_a_tag_template_naming_no_parameter_fails_at_decoration() -> None:
    from tieredcache import MemoryLayer, TieredCache

    cache = TieredCache("tt", [MemoryLayer()])
    with pytest.raises(TagTemplateError, match="get_product"):

        @cache.cached(ttl=60, tags=[TagTemplate("product:{pid}")])
        def get_product(product_id: int) -> int:
            return product_id
