"""Tenant resolvers for :class:`~tieredcache.middleware.TieredCacheMiddleware`.

A resolver is any callable ``resolver(scope) -> str | None`` (or an awaitable of
it). Two optional attributes tell the middleware where the tenant came from:

- ``from_credentials`` (default True for any callable): the tenant is derived
  from who the client is (a token, a session). Unless the CDN keys on it
  (``CdnConfig(keys_tenant=True)``) the CDN is told ``private``: it would
  otherwise serve one tenant's page to the next client.
- ``vary``: a request header the tenant is read from; it is keyed and named in
  ``Vary``, so a CDN keys on it too.

A raw client header is *not* a credential: anyone can send ``X-Tenant: other``.
:class:`HeaderTenant` therefore refuses to be built unless you declare the header
trusted (set by your own proxy, which drops the client's copy).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from ..tenancy import validate_tenant

__all__ = ["HeaderTenant"]


class HeaderTenant:
    """Read the tenant from a request header that your edge proxy sets.

    >>> HeaderTenant("X-Tenant", trusted=True)({"headers": [(b"x-tenant", b"acme")]})
    'acme'
    >>> HeaderTenant("X-Tenant", trusted=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tieredcache.errors.ConfigurationError: HeaderTenant('X-Tenant'): a client can send ...
    """

    from_credentials = False

    def __init__(self, header: str, *, trusted: bool) -> None:
        if trusted is not True:
            raise ConfigurationError(
                f"HeaderTenant({header!r}): a client can send any value in a header; pass "
                "trusted=True only if a proxy in front of the app sets it and drops the "
                "client's own copy, or resolve the tenant from the credentials instead"
            )
        self.vary = header
        self._name = header.lower().encode("latin-1")

    def __call__(self, scope: Any) -> str | None:
        for key, value in scope["headers"]:
            if key == self._name:
                return validate_tenant(value.decode("latin-1"))
        return None

    def __repr__(self) -> str:
        return f"HeaderTenant({self.vary!r}, trusted=True)"
