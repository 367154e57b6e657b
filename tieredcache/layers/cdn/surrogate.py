"""Surrogate keys: how a tenant-scoped :class:`~tieredcache.keys.Tag` is named at a CDN.

The same functions build the response header (``response_header``) and the purge
side (``purge_keys``), so both sides always agree on the encoding.

Encoding, per :class:`SurrogateScheme`:

* A tag's key text is ``namespace:tenant:name`` (its ``Tag.full``): tenant-prefixed.
  Namespace and tenant cannot hold ``:``, so the prefix is unambiguous.
* Case-sensitive vendors (Fastly, Varnish) get that text unchanged.
* Vendors that compare tags case-insensitively (Cloudflare, Akamai) get an
  injective lowercase escape: every character outside the scheme's safe alphabet
  (which never holds ``_`` or an uppercase letter) becomes ``_`` plus its two
  lowercase hex digits. ``Acme`` -> ``_41cme``, ``acme`` -> ``acme``, ``_`` -> ``_5f``.
  The code is prefix-free, so two different tags never share a key.
* A key longer than the vendor allows is replaced by a digest form
  ``<escaped namespace:tenant:>~<base32 BLAKE2b of the name>`` (``~`` is in no
  escaped output, so digests never collide with plain keys); never a silent cut.

Reserved keys (tag names cannot contain ``*``, ``#`` or ``~``, so none collides
with a tag):

* ``namespace:tenant:*`` the *tenant key*, on every response: purges a whole tenant.
* ``namespace:tenant:~`` the *overflow key*: when a response's tags would exceed a
  header limit, the response carries only the tenant key, the overflow key and any
  table keys instead of its tags, and ``purge_keys`` always adds the overflow key of
  each tenant it purges. Over-invalidation of the rare overflowed response is the
  price of never serving it stale.
* ``namespace:tenant:#<digest>`` a cache key's own surrogate (``cache_key_key``).
* ``namespace:*:table`` a tenant-less *table key* (``table_key``) for all-tenant
  invalidation; ``*`` is not a valid tenant id.

Example::

    >>> from tieredcache.keys import Tag
    >>> tag_key(CLOUDFLARE, Tag("shop", "Acme", "product:1"))
    'shop:_41cme:product:1'
    >>> response_header(FASTLY, [Tag("shop", "acme", "product:1")])
    ('Surrogate-Key', 'shop:acme:product:1 shop:acme:*')
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ...errors import ConfigurationError
from ...keys import CacheKey, Tag, validate_namespace, validate_tag_name

__all__ = [
    "AKAMAI",
    "CLOUDFLARE",
    "FASTLY",
    "VARNISH",
    "SurrogateScheme",
    "cache_key_key",
    "purge_keys",
    "response_header",
    "table_key",
    "tag_key",
    "tenant_key",
]

_LOWER_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.:/=@+-*#")
_AKAMAI_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


@dataclass(frozen=True, slots=True)
class SurrogateScheme:
    """One vendor's surrogate-key rules.

    ``safe`` is None for a case-sensitive vendor (keys pass unchanged); otherwise
    the characters that pass unescaped. Lengths count bytes when
    ``length_unit == "bytes"`` and characters otherwise (keys are ASCII either way).

    >>> FASTLY.header, FASTLY.separator
    ('Surrogate-Key', ' ')
    """

    vendor: str
    header: str
    separator: str
    max_key_length: int
    max_header_length: int
    max_keys_per_object: int | None
    safe: frozenset[str] | None
    length_unit: Literal["bytes", "chars"] = "chars"

    def __repr__(self) -> str:
        return f"SurrogateScheme({self.vendor!r})"


FASTLY: Final = SurrogateScheme("fastly", "Surrogate-Key", " ", 1024, 16384, None, None, "bytes")
# Varnish's own limit: a backend response header line must fit http_resp_hdr_len (8 KiB).
VARNISH: Final = SurrogateScheme("varnish", "xkey", " ", 1024, 8000, None, None, "bytes")
CLOUDFLARE: Final = SurrogateScheme(
    "cloudflare", "Cache-Tag", ",", 1024, 16 * 1024, None, _LOWER_SAFE
)
AKAMAI: Final = SurrogateScheme("akamai", "Edge-Cache-Tag", ",", 128, 128 * 129, 128, _AKAMAI_SAFE)


def _escape(scheme: SurrogateScheme, text: str) -> str:
    safe = scheme.safe
    if safe is None:
        return text
    return "".join(c if c in safe else f"_{ord(c):02x}" for c in text)


def _length(scheme: SurrogateScheme, text: str) -> int:
    return len(text.encode()) if scheme.length_unit == "bytes" else len(text)


def _digest(text: str) -> str:
    raw = hashlib.blake2b(text.encode(), digest_size=15).digest()
    return base64.b32encode(raw).decode().lower()


def _encode(scheme: SurrogateScheme, prefix: str, rest: str) -> str:
    # prefix is "namespace:tenant:" (or "namespace:*:"); rest is what follows.
    key = _escape(scheme, prefix + rest)
    if _length(scheme, key) <= scheme.max_key_length:
        return key
    short = f"{_escape(scheme, prefix)}~{_digest(rest)}"
    if _length(scheme, short) <= scheme.max_key_length:
        return short
    return f"~{_digest(prefix + rest)}"


def tag_key(scheme: SurrogateScheme, tag: Tag) -> str:
    """The surrogate key for ``tag`` at this vendor (the same on both sides).

    >>> tag_key(AKAMAI, Tag("shop", "acme", "product:1"))
    'shop_3aacme_3aproduct_3a1'
    """
    return _encode(scheme, f"{tag.namespace}:{tag.tenant}:", tag.name)


def tenant_key(scheme: SurrogateScheme, namespace: str, tenant: str) -> str:
    """The key every response of a tenant carries: purging it drops the whole tenant.

    >>> tenant_key(FASTLY, "shop", "acme")
    'shop:acme:*'
    """
    return _encode(scheme, f"{namespace}:{tenant}:", "*")


def _overflow_key(scheme: SurrogateScheme, namespace: str, tenant: str) -> str:
    return _encode(scheme, f"{namespace}:{tenant}:", "~")


def table_key(scheme: SurrogateScheme, namespace: str, table: str) -> str:
    """A tenant-less key for a table, to invalidate it for every tenant at once.

    >>> table_key(FASTLY, "shop", "orders")
    'shop:*:orders'
    """
    validate_namespace(namespace)
    validate_tag_name(table)
    return _encode(scheme, f"{namespace}:*:", table)


def cache_key_key(scheme: SurrogateScheme, key: CacheKey) -> str:
    """The surrogate key of one cache key: tenant-prefixed digest of ``key.full``.

    >>> cache_key_key(FASTLY, CacheKey("shop", "acme", "p:1")).startswith("shop:acme:#")
    True
    """
    return _encode(scheme, f"{key.namespace}:{key.tenant}:", "#" + _digest(key.full))


def purge_keys(scheme: SurrogateScheme, tags: Iterable[Tag]) -> list[str]:
    """The keys to purge for ``tags``: each tag's key plus its tenant's overflow key.

    Order is kept and duplicates dropped.

    >>> purge_keys(FASTLY, [Tag("shop", "acme", "a"), Tag("shop", "acme", "b")])
    ['shop:acme:a', 'shop:acme:b', 'shop:acme:~']
    """
    keys: dict[str, None] = {}
    overflow: dict[str, None] = {}
    for tag in tags:
        keys[tag_key(scheme, tag)] = None
        overflow[_overflow_key(scheme, tag.namespace, tag.tenant)] = None
    keys.update(overflow)
    return list(keys)


def response_header(
    scheme: SurrogateScheme,
    tags: Sequence[Tag],
    *,
    keys: Sequence[CacheKey] = (),
    tables: Sequence[tuple[str, str]] = (),
) -> tuple[str, str]:
    """``(header_name, header_value)`` that tags a CDN response with ``tags``.

    ``keys`` adds the cache keys' own surrogates; ``tables`` adds ``(namespace,
    table)`` table keys. When the value would pass the vendor's header length or
    per-object key count, the tags and cache keys are replaced by each tenant's
    tenant and overflow keys (see the module docstring): coarser, never cut.

    >>> response_header(CLOUDFLARE, [Tag("shop", "Acme", "p")])
    ('Cache-Tag', 'shop:_41cme:p,shop:_41cme:*')
    """
    fine: dict[str, None] = {}
    tenants: dict[tuple[str, str], None] = {}
    for tag in tags:
        fine[tag_key(scheme, tag)] = None
        tenants[(tag.namespace, tag.tenant)] = None
    for key in keys:
        fine[cache_key_key(scheme, key)] = None
        tenants[(key.namespace, key.tenant)] = None
    coarse = {tenant_key(scheme, ns, t): None for ns, t in tenants}
    table_keys = {table_key(scheme, ns, table): None for ns, table in tables}
    chosen = [*fine, *coarse, *table_keys]
    if not _fits(scheme, chosen):
        overflow = {_overflow_key(scheme, ns, t): None for ns, t in tenants}
        chosen = [*coarse, *overflow, *table_keys]
        if not _fits(scheme, chosen):
            raise ConfigurationError(
                f"{scheme.vendor}: even the coarse surrogate keys of this response "
                f"({len(chosen)} keys over {len(tenants)} tenants) exceed the header limit"
            )
    return scheme.header, scheme.separator.join(chosen)


def _fits(scheme: SurrogateScheme, keys: Sequence[str]) -> bool:
    if scheme.max_keys_per_object is not None and len(keys) > scheme.max_keys_per_object:
        return False
    return _length(scheme, scheme.separator.join(keys)) <= scheme.max_header_length
