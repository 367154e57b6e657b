"""Cache keys and tags, always scoped to a namespace and a tenant.

A key's text form is ``namespace:tenant:body``. Namespace and tenant are
restricted to ``[A-Za-z0-9._-]`` so the first two colons always delimit them:
no body and no tag name can make one tenant's key equal another's.

Keys built from function arguments are deterministic across processes and
hash seeds (msgpack with sorted maps, then BLAKE2b; never ``hash()``), do not
depend on keyword order or on whether a default was passed, and are bounded in
length: short int/str argument lists stay readable, anything else is digested.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import msgspec

from .errors import ConfigurationError, InvalidKeyError
from .tenancy import validate_tenant

__all__ = ["CacheKey", "FunctionKeyBuilder", "Tag", "validate_namespace", "validate_tag_name"]

MAX_TAG_LENGTH: Final = 200
MAX_BODY_LENGTH: Final = 512
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# Tag names travel in CDN surrogate-key headers (space or comma separated) and in Redis keys.
_TAG_RE = re.compile(rf"[A-Za-z0-9._:/=@+-]{{1,{MAX_TAG_LENGTH}}}\Z")
_READABLE_STR_RE = re.compile(r"[A-Za-z0-9._-]{0,48}\Z")
_READABLE_LIMIT: Final = 64


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is a valid namespace (same alphabet as tenant ids)."""
    if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
        raise ConfigurationError(
            f"namespace {namespace!r} must be 1-64 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return namespace


def validate_tag_name(name: str) -> str:
    """Return ``name`` if it is a valid tag name, else raise :class:`InvalidKeyError`."""
    if not isinstance(name, str) or not _TAG_RE.match(name):
        raise InvalidKeyError(
            f"tag {name!r} must be 1-{MAX_TAG_LENGTH} characters of [A-Za-z0-9._:/=@+-] "
            "(no spaces or commas: tags travel in CDN surrogate-key headers)"
        )
    return name


class CacheKey:
    """A tenant-scoped cache key. ``str(key)`` is ``namespace:tenant:body``.

    >>> str(CacheKey("shop", "acme", "product:42"))
    'shop:acme:product:42'
    """

    __slots__ = ("body", "full", "namespace", "tenant")

    def __init__(self, namespace: str, tenant: str, body: str) -> None:
        if not body or len(body) > MAX_BODY_LENGTH or not body.isprintable() or " " in body:
            raise InvalidKeyError(
                f"key body {body!r} for tenant {tenant!r} must be 1-{MAX_BODY_LENGTH} "
                "printable characters without spaces"
            )
        self.namespace = namespace
        self.tenant = tenant
        self.body = body
        self.full = f"{namespace}:{tenant}:{body}"

    def __str__(self) -> str:
        return self.full

    def __repr__(self) -> str:
        return f"CacheKey({self.full!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and other.full == self.full

    def __hash__(self) -> int:
        return hash(self.full)


class Tag:
    """A tenant-scoped tag. ``str(tag)`` is ``namespace:tenant:name``; the CDN sees the same."""

    __slots__ = ("full", "name", "namespace", "tenant")

    def __init__(self, namespace: str, tenant: str, name: str) -> None:
        self.namespace = namespace
        self.tenant = tenant
        self.name = validate_tag_name(name)
        self.full = f"{namespace}:{tenant}:{name}"

    def __str__(self) -> str:
        return self.full

    def __repr__(self) -> str:
        return f"Tag({self.full!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and other.full == self.full

    def __hash__(self) -> int:
        return hash(self.full)


def make_tags(namespace: str, tenant: str, names: Iterable[str]) -> tuple[Tag, ...]:
    """Scope tag names to a tenant, dropping duplicates but keeping order."""
    seen: dict[str, Tag] = {}
    for name in names:
        if name not in seen:
            seen[name] = Tag(namespace, tenant, name)
    return tuple(seen.values())


_encoder = msgspec.msgpack.Encoder(order="deterministic")


def _readable(values: Sequence[Any]) -> str | None:
    parts = []
    for value in values:
        kind = type(value)
        if kind is int:
            parts.append(f"i{value}")
        elif kind is str and _READABLE_STR_RE.match(value):
            parts.append(f"s{value}")
        elif value is None:
            parts.append("n")
        else:
            return None
    text = ",".join(parts)
    return text if len(text) <= _READABLE_LIMIT else None


class FunctionKeyBuilder:
    """Builds keys for one function from its call arguments.

    Arguments are bound to the signature with defaults applied, so ``f(1)``,
    ``f(x=1)`` and ``f(1, flag=False)`` (when ``flag`` defaults to False) share
    one key. ``ignore`` names parameters left out of the key (``self``/``cls``
    are left out by default when they come first).

    ``key`` (``cached(key=...)``) gives the body from the arguments instead; a
    ``version`` other than 1 is appended to it (``product:42@v2``), so a version
    bump never reads entries of the old shape, with or without ``key=``.
    """

    __slots__ = (
        "_ignore",
        "_ignored_positions",
        "_key",
        "_positional_count",
        "_prefix",
        "_signature",
        "_version_suffix",
        "function_name",
        "tenant_param",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str,
        version: int | str,
        ignore: Iterable[str] = (),
        tenant_param: str | None = None,
        key: Callable[..., str] | None = None,
    ) -> None:
        self.function_name = name
        self._key = key
        # Version 1 leaves a key= body as given (the documented body of existing keys).
        self._version_suffix = "" if str(version) == "1" else f"@v{version}"
        try:
            self._signature = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of {name}: {exc}") from exc
        params = list(self._signature.parameters)
        ignored = set(ignore)
        if params and params[0] in ("self", "cls"):
            ignored.add(params[0])
        if tenant_param is None and "tenant" in params:
            tenant_param = "tenant"
        if tenant_param is not None:
            if tenant_param not in params:
                raise ConfigurationError(
                    f"tenant_param {tenant_param!r} is not a parameter of {name}"
                )
            ignored.add(tenant_param)
        unknown = ignored - set(params)
        if unknown:
            raise ConfigurationError(
                f"ignore names unknown parameters of {name}: {sorted(unknown)}"
            )
        self._ignore = frozenset(ignored)
        self.tenant_param = tenant_param
        # When every parameter is plain positional and all of them are passed
        # positionally, binding (and applying defaults) changes nothing: skip it.
        kinds = [p.kind for p in self._signature.parameters.values()]
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._positional_count = len(kinds) if all(k in plain for k in kinds) else -1
        self._ignored_positions = frozenset(i for i, p in enumerate(params) if p in ignored)
        body_prefix = f"{name}:v{version}"
        if len(body_prefix) > 160:
            body_prefix = hashlib.blake2b(body_prefix.encode(), digest_size=12).hexdigest()
        self._prefix = body_prefix

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.function_name}(): {exc}") from None
        bound.apply_defaults()
        return bound

    def tenant_from(self, bound: inspect.BoundArguments) -> str | None:
        if self.tenant_param is None:
            return None
        value = bound.arguments[self.tenant_param]
        return None if value is None else validate_tenant(value)

    def body_for(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """The key body for a call's arguments (see :meth:`body`), or the ``key=``
        function's body with the version (see :meth:`custom_body`)."""
        if self._key is not None:
            return self.custom_body(self._key(*args, **kwargs))
        if not kwargs and len(args) == self._positional_count:
            skip = self._ignored_positions
            return self._encode([a for i, a in enumerate(args) if i not in skip] if skip else args)
        return self.body(self.bind(args, kwargs))

    def custom_body(self, body: str) -> str:
        """A ``key=`` function's ``body`` with this function's version (unchanged at 1)."""
        if not isinstance(body, str):
            raise InvalidKeyError(
                f"the key= function of {self.function_name} returned {type(body).__name__}, not str"
            )
        return body + self._version_suffix if self._version_suffix else body

    def body(self, bound: inspect.BoundArguments) -> str:
        """The key body ``name:vVERSION:ARGS`` for bound arguments."""
        values: list[Any] = []
        for param, value in bound.arguments.items():
            if param in self._ignore:
                continue
            kind = self._signature.parameters[param].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                values.append(dict(sorted(value.items())))
            else:
                values.append(value)
        return self._encode(values)

    def _encode(self, values: Sequence[Any]) -> str:
        readable = _readable(values)
        if readable is not None:
            return f"{self._prefix}:{readable}"
        try:
            encoded = _encoder.encode(list(values))
        except (TypeError, OverflowError, RecursionError) as exc:
            # msgpack holds ints of -2**63..2**64-1 only (OverflowError beyond), and a
            # structure nested too deep raises RecursionError: an argument the key
            # cannot hold, like an unencodable type.
            raise InvalidKeyError(
                f"cannot build a key for {self.function_name}: {exc}; pass key=... to "
                "cached() or ignore=... for that parameter"
            ) from exc
        return f"{self._prefix}:h{hashlib.blake2b(encoded, digest_size=16).hexdigest()}"
