"""Tag templates: one declaration of a tag, shared by ``cached(tags=...)`` and the CDC rules.

A template such as ``"product:{id}"`` names its placeholders; the decorator renders
it from a call's bound arguments and the CDC worker renders it from a changed
row, so both sides produce the same tag for the same value only if they format
values the same way. This module is that one formatting (:func:`format_tag_value`):

================  ==========================================  =================
value type        canonical text                              example
================  ==========================================  =================
``bool``          ``true`` / ``false``                        ``true``
``int``           decimal digits, ``-`` sign                  ``-42``
``Decimal``       plain notation, no exponent, no trailing    ``12.5`` (from
                  zeros (``12.50`` and ``12.5`` are equal)    ``Decimal("12.50")``)
``float``         as the Decimal of its shortest repr         ``0.1``, ``3``
``str``           unchanged                                   ``sku-1``
``UUID``          lowercase, hyphenated                       ``0b5e...-...``
``date``          ISO 8601                                    ``2024-01-31``
``datetime``      ISO 8601 without colons; naive as is,       ``2024-01-31T100000Z``
                  aware converted to UTC with a ``Z``;
                  microseconds only when non-zero
``time``          ISO 8601 without colons (offset kept)       ``103000``
================  ==========================================  =================

Colons are dropped from times because ``:`` separates a tag's parts (below).
Anything else (``None``, bytes, lists) is refused: a tag must not depend on a
``repr``. A rendered value may use only the tag alphabet of
:func:`tieredcache.keys.validate_tag_name` minus ``:``, the separator between a
tag's parts, so ``"{a}:{b}"`` rendered from ``a="x:y"`` can never equal a tag
of another row.

>>> TagTemplate("product:{id}").render({"id": 42})
'product:42'
>>> TagTemplate("price:{sku}:{amount}").render({"sku": "a-1", "amount": Decimal("9.90")})
'price:a-1:9.9'
"""

from __future__ import annotations

import datetime as dt
import re
import string
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Final

from .errors import ConfigurationError, InvalidKeyError
from .keys import validate_tag_name

__all__ = [
    "MissingTagFieldError",
    "TagTemplate",
    "TagTemplateError",
    "TagValueError",
    "format_tag_value",
]

TAG_SEPARATOR: Final = ":"
# The tag alphabet of keys.py without the separator.
_VALUE_RE = re.compile(r"[A-Za-z0-9._/=@+-]+\Z")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TagTemplateError(ConfigurationError):
    """A tag template is malformed (format spec, conversion, attribute access...)."""


class TagValueError(InvalidKeyError):
    """A value cannot be put into a tag (unsupported type, forbidden character)."""


class MissingTagFieldError(TagValueError, KeyError):
    """A template placeholder has no value in the mapping it is rendered from."""

    def __init__(self, template: str, field: str) -> None:
        super().__init__(f"tag template {template!r} needs a value for {{{field}}}; none given")
        self.template = template
        self.field = field

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _format_decimal(value: Decimal) -> str:
    if not value.is_finite():
        raise TagValueError(f"{value} is not a finite number")
    if value.is_zero():
        return "0"  # Decimal("-0.00") and 0 are the same row value
    return format(value.normalize(), "f")


def _format_datetime(value: dt.datetime) -> str:
    if value.utcoffset() is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat().replace(TAG_SEPARATOR, "") + "Z"
    return value.isoformat().replace(TAG_SEPARATOR, "")


def format_tag_value(value: object) -> str:
    """Format one value the canonical way (see the module docstring for the table).

    >>> format_tag_value(Decimal("12.50")), format_tag_value(dt.date(2024, 1, 31))
    ('12.5', '2024-01-31')
    >>> format_tag_value(dt.datetime(2024, 1, 31, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    '2024-01-31T100000Z'
    """
    # bool before int: bool is an int subclass, and True must not render as 1.
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(int(value))
    elif isinstance(value, str):
        text = value
    elif isinstance(value, Decimal):
        text = _format_decimal(value)
    elif isinstance(value, float):
        text = _format_decimal(Decimal(repr(value)))
    elif isinstance(value, uuid.UUID):
        text = str(value)
    elif isinstance(value, dt.datetime):  # before date: datetime is a date subclass
        text = _format_datetime(value)
    elif isinstance(value, dt.date):
        text = value.isoformat()
    elif isinstance(value, dt.time):
        text = value.isoformat().replace(TAG_SEPARATOR, "")
    else:
        raise TagValueError(f"cannot put a {type(value).__name__} ({value!r}) into a tag")
    if not _VALUE_RE.match(text):
        raise TagValueError(
            f"tag value {text!r} must be non-empty and use only [A-Za-z0-9._/=@+-] "
            f"(no {TAG_SEPARATOR!r}: it separates a tag's parts)"
        )
    return text


class TagTemplate:
    """A tag with named placeholders, e.g. ``TagTemplate("category:{category_id}")``.

    Placeholders are plain names (``{id}``); format specs, conversions, attribute
    and index access and positional fields are refused, so that rendering depends
    only on :func:`format_tag_value`.

    >>> t = TagTemplate("category:{category_id}")
    >>> t.fields
    ('category_id',)
    >>> t.render({"category_id": 7, "other": "ignored"})
    'category:7'
    >>> TagTemplate("product:{id!r}")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tieredcache.tags.TagTemplateError: tag template 'product:{id!r}': {id!r} has a conversion...
    """

    __slots__ = ("_parts", "fields", "template")

    def __init__(self, template: str) -> None:
        if not isinstance(template, str) or not template:
            raise TagTemplateError(f"a tag template must be a non-empty str, not {template!r}")
        self.template = template
        parts: list[tuple[str, str | None]] = []
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise TagTemplateError(f"tag template {template!r}: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                shown = "{" + field + (f"!{conversion}" if conversion else "")
                shown += (f":{spec}" if spec else "") + "}"
                problem = None
                if conversion:
                    problem = "has a conversion"
                elif spec:
                    problem = "has a format spec"
                elif not field:
                    problem = "is positional"
                elif not _FIELD_RE.match(field):
                    problem = "is not a plain name (no attribute or index access)"
                if problem:
                    raise TagTemplateError(
                        f"tag template {template!r}: {shown} {problem}; use a plain {{name}}"
                    )
                if field not in fields:
                    fields.append(field)
            parts.append((literal, field))
        self._parts = tuple(parts)
        self.fields: tuple[str, ...] = tuple(fields)
        # The literal text must be valid on its own: render with a harmless value.
        probe = "".join(lit + ("0" if f is not None else "") for lit, f in parts)
        try:
            validate_tag_name(probe)
        except InvalidKeyError as exc:
            raise TagTemplateError(f"tag template {template!r}: {exc}") from None

    def render(self, values: Mapping[str, Any]) -> str:
        """Render from a mapping (a row, or ``inspect.BoundArguments.arguments``).

        Raises :class:`MissingTagFieldError` for an absent field and
        :class:`TagValueError` for a value that cannot be formatted (including ``None``).
        """
        out: list[str] = []
        for literal, field in self._parts:
            out.append(literal)
            if field is None:
                continue
            try:
                value = values[field]
            except KeyError:
                raise MissingTagFieldError(self.template, field) from None
            try:
                out.append(format_tag_value(value))
            except TagValueError as exc:
                raise TagValueError(f"tag template {self.template!r}, {{{field}}}: {exc}") from None
        try:
            return validate_tag_name("".join(out))
        except InvalidKeyError as exc:  # e.g. longer than the tag limit
            raise TagValueError(f"tag template {self.template!r}: {exc}") from None

    def render_if_present(self, values: Mapping[str, Any]) -> str | None:
        """Like :meth:`render`, but ``None`` when a field is absent or NULL.

        A NULL foreign key means the row belongs to no category, so there is no tag.

        >>> TagTemplate("category:{category_id}").render_if_present({"category_id": None})
        """
        if any(values.get(field) is None for field in self.fields):
            return None
        return self.render(values)

    def check_fields(self, available: Iterable[str], *, where: str) -> None:
        """Raise :class:`TagTemplateError` if a placeholder is not in ``available``.

        The decorator passes a function's parameter names; the CDC rules pass a
        table's columns. ``where`` names them in the message.

        >>> TagTemplate("product:{pid}").check_fields(["id"], where="get_product()")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tieredcache.tags.TagTemplateError: ...which get_product() does not have (it has: id)
        """
        names = list(available)
        missing = [f for f in self.fields if f not in names]
        if missing:
            listed = ", ".join("{" + f + "}" for f in missing)
            raise TagTemplateError(
                f"tag template {self.template!r} uses {listed}, which {where} does not have "
                f"(it has: {', '.join(names) or 'nothing'})"
            )

    def __repr__(self) -> str:
        return f"TagTemplate({self.template!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TagTemplate) and other.template == self.template

    def __hash__(self) -> int:
        return hash(self.template)
