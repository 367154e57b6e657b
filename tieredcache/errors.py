"""The one exception tree of tieredcache.

Every exception the library raises derives from :class:`TieredCacheError`.
Errors from redis-py, confluent-kafka or httpx are translated at the edge with
``raise ... from exc`` so the original stays attached::

    TieredCacheError
    ├── ConfigurationError          a constructor or decorator argument is wrong
    ├── MissingExtraError           an optional dependency is not installed (also ImportError)
    ├── TenantError
    │   ├── TenantRequiredError     a call had no tenant in scope and none passed
    │   └── InvalidTenantError      a tenant id that could forge another tenant's key
    ├── InvalidKeyError             a tag or key part that cannot be scoped safely
    ├── SerializationError
    │   ├── EncodeError             a value the serializer cannot encode
    │   └── DecodeError             a stored entry that fails to verify or decode
    ├── BackendError                a layer (Redis, CDN) failed; carries layer and operation
    │   ├── BackendUnavailableError the layer's circuit breaker is open
    │   ├── BackendTimeoutError     the layer did not answer in time
    │   └── RateLimitedError        the layer refused for now (a CDN's 429): not a fault
    ├── LoaderTimeoutError          the loader exceeded its hard timeout and no stale value exists
    └── WriteBackError              the write-back journal failed or holds a bad entry
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "InvalidKeyError",
    "InvalidTenantError",
    "LoaderTimeoutError",
    "MissingExtraError",
    "RateLimitedError",
    "SerializationError",
    "TenantError",
    "TenantRequiredError",
    "TieredCacheError",
    "WriteBackError",
]


class TieredCacheError(Exception):
    """Base of every error tieredcache raises."""


class ConfigurationError(TieredCacheError, ValueError):
    """A configuration value is invalid; the message names the field."""


class MissingExtraError(TieredCacheError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"{module!r} is not installed; install it with: pip install 'tieredcache[{extra}]'"
        )
        self.extra = extra


class TenantError(TieredCacheError):
    """Base of the tenant errors."""


class TenantRequiredError(TenantError):
    """A cached call ran with no tenant: there is no shared, tenant-less entry."""

    def __init__(self, function: str) -> None:
        super().__init__(
            f"{function} needs a tenant: wrap the call in `with tenant_scope('<id>'):` "
            "or give the function a `tenant` parameter; there are no shared, tenant-less entries"
        )
        self.function = function


class InvalidTenantError(TenantError, ValueError):
    """A tenant id was rejected; the message says which rule it broke."""

    def __init__(self, tenant: object, reason: str) -> None:
        super().__init__(f"invalid tenant id {tenant!r}: {reason}")
        self.tenant = tenant
        self.reason = reason


class InvalidKeyError(TieredCacheError, ValueError):
    """A tag or key part was rejected; the message names it and the rule."""


class SerializationError(TieredCacheError):
    """Base of the encode/decode errors."""


class EncodeError(SerializationError, TypeError):
    """A value could not be encoded for a shared layer."""


class DecodeError(SerializationError):
    """A stored entry failed to verify or decode; it is treated as a miss and deleted."""


class BackendError(TieredCacheError):
    """A cache layer failed. ``layer`` and ``operation`` say which and what."""

    def __init__(self, layer: str, operation: str, detail: str) -> None:
        super().__init__(f"layer {layer!r} failed during {operation}: {detail}")
        self.layer = layer
        self.operation = operation


class BackendUnavailableError(BackendError):
    """The layer's circuit breaker is open; the call was not attempted."""


class BackendTimeoutError(BackendError):
    """The layer did not answer within its timeout."""


class RateLimitedError(BackendError):
    """The layer refused the call for now (a CDN's 429, a client-side budget): send it
    again after ``retry_after`` seconds. Not a fault: it does not trip the breaker."""

    def __init__(self, layer: str, operation: str, detail: str, retry_after: float) -> None:
        super().__init__(layer, operation, detail)
        self.retry_after = retry_after


class LoaderTimeoutError(TieredCacheError, TimeoutError):
    """The loader ran past its hard timeout and there was no stale value to serve."""

    def __init__(self, function: str, key: str, timeout: float) -> None:
        super().__init__(f"loader {function} for key {key!r} exceeded its hard timeout {timeout}s")
        self.function = function
        self.key = key
        self.timeout = timeout


class WriteBackError(TieredCacheError):
    """The write-back journal failed (a write was not acknowledged, or a read or ack
    failed) or holds an entry that cannot be used."""
