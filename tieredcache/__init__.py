"""tieredcache: tenant-scoped tiered caching for multi-tenant services.

    from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope

    cache = TieredCache(namespace="shop", layers=[MemoryLayer(), RedisLayer(url="redis://...")])

    @cache.cached(ttl=60, tags=lambda product_id: [f"product:{product_id}"])
    async def get_product(product_id: int) -> dict: ...

    with tenant_scope("acme"):
        await get_product(42)

Importing the package does no work: no cache, no connection, no thread.
"""

from ._engine.result import InvalidationResult, LayerFailure, ReadOutcome
from ._function.types import AsyncCachedFunction, CachedFunction
from .breaker import CircuitBreaker
from .cache import Invalidation, TieredCache
from .entry import Entry
from .errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    InvalidKeyError,
    InvalidTenantError,
    LoaderTimeoutError,
    MissingExtraError,
    RateLimitedError,
    SerializationError,
    TenantError,
    TenantRequiredError,
    TieredCacheError,
    WriteBackError,
)
from .keys import CacheKey, Tag
from .layers.base import InvalidationLayer, StorageLayer
from .layers.memory import MemoryLayer
from .layers.redis import RedisLayer
from .metrics import CacheStats, LayerStats, LoaderStats
from .policy import Policy
from .serde import JsonSerializer, MsgpackSerializer, PickleSerializer, Serializer
from .tags import TagTemplate
from .tenancy import current_tenant, tenant_scope, validate_tenant
from .writeback import (
    AsyncFlusher,
    AsyncJournal,
    AsyncRedisStreamJournal,
    AsyncWriteBack,
    Flusher,
    FlushReport,
    Journal,
    RedisStreamJournal,
    WriteBack,
    WriteRecord,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncCachedFunction",
    "AsyncFlusher",
    "AsyncJournal",
    "AsyncRedisStreamJournal",
    "AsyncWriteBack",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CacheKey",
    "CacheStats",
    "CachedFunction",
    "CircuitBreaker",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "Entry",
    "FlushReport",
    "Flusher",
    "InvalidKeyError",
    "InvalidTenantError",
    "Invalidation",
    "InvalidationLayer",
    "InvalidationResult",
    "Journal",
    "JsonSerializer",
    "LayerFailure",
    "LayerStats",
    "LoaderStats",
    "LoaderTimeoutError",
    "MemoryLayer",
    "MissingExtraError",
    "MsgpackSerializer",
    "PickleSerializer",
    "Policy",
    "RateLimitedError",
    "ReadOutcome",
    "RedisLayer",
    "RedisStreamJournal",
    "SerializationError",
    "Serializer",
    "StorageLayer",
    "Tag",
    "TagTemplate",
    "TenantError",
    "TenantRequiredError",
    "TieredCache",
    "TieredCacheError",
    "WriteBack",
    "WriteBackError",
    "WriteRecord",
    "current_tenant",
    "tenant_scope",
    "validate_tenant",
]
