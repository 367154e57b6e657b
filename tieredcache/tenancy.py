"""Tenant scope: a ContextVar that every cached call reads.

A tenant id becomes part of every key and tag, so it must never be able to
forge another tenant's key: ids are restricted to ``[A-Za-z0-9._-]``, 1 to 64
characters, starting with a letter or digit. The separators used in keys
(``:``, ``{``, ``}``, ``|``), Redis glob wildcards (``*``, ``?``, ``[``),
whitespace and control characters are all outside that alphabet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import InvalidTenantError

__all__ = ["current_tenant", "tenant_scope", "validate_tenant"]

MAX_TENANT_LENGTH = 64
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_current: ContextVar[str | None] = ContextVar("tieredcache_tenant", default=None)
# Validation results are memoised: the hot path passes the same few ids again and again.
_valid: dict[str, str] = {}
_VALID_MEMO_LIMIT = 10_000


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` if it is a safe tenant id, else raise :class:`InvalidTenantError`.

    >>> validate_tenant("acme-eu.1")
    'acme-eu.1'
    """
    if type(tenant) is str and tenant in _valid:
        return tenant
    if not isinstance(tenant, str):
        raise InvalidTenantError(tenant, f"must be a str, not {type(tenant).__name__}")
    if not tenant:
        raise InvalidTenantError(tenant, "must not be empty")
    if len(tenant) > MAX_TENANT_LENGTH:
        raise InvalidTenantError(tenant, f"longer than {MAX_TENANT_LENGTH} characters")
    if not _TENANT_RE.match(tenant):
        bad = next((c for c in tenant if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
        if bad is None:
            reason = "must start with a letter or digit"
        else:
            reason = f"character {bad!r} is not allowed (use letters, digits, '.', '_', '-')"
        raise InvalidTenantError(tenant, reason)
    if len(_valid) < _VALID_MEMO_LIMIT:
        _valid[tenant] = tenant
    return tenant


@contextmanager
def tenant_scope(tenant: str) -> Iterator[str]:
    """Run the block with ``tenant`` as the current tenant; restores the previous one after.

    Works in threads and in asyncio tasks (each task copies the context)::

        with tenant_scope("acme"):
            product = get_product(42)   # cached under tenant "acme"
    """
    token = _current.set(validate_tenant(tenant))
    try:
        yield tenant
    finally:
        _current.reset(token)


def current_tenant() -> str | None:
    """The tenant in scope, or ``None``."""
    return _current.get()


def get_tenant_var() -> ContextVar[str | None]:
    """The ContextVar itself, for middleware that sets it with tokens."""
    return _current
