"""HTTP response caching for Starlette and FastAPI: a pure-ASGI middleware.

Example::

    from tieredcache import MemoryLayer, RedisLayer, TieredCache
    from tieredcache.layers.cdn import VARNISH
    from tieredcache.middleware import CacheRoutes, CdnConfig, TieredCacheMiddleware

    cache = TieredCache("web", [MemoryLayer(), RedisLayer(url="redis://...")])
    routes = CacheRoutes()

    @routes.cache("/products/{id:int}", ttl=60, tags=["product:{id}"], query=["lang"])
    async def product(request): ...

    app.add_middleware(
        TieredCacheMiddleware, cache=cache, routes=routes, cdn=CdnConfig(VARNISH)
    )

Starlette is needed (``pip install 'tieredcache[http]'``); importing this package
without it raises :class:`~tieredcache.errors.MissingExtraError`.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import MissingExtraError

    raise MissingExtraError("http", "starlette") from exc

from .middleware import CdnConfig, HttpCache, TieredCacheMiddleware
from .routes import CacheRoute, CacheRoutes, url_tag
from .tenants import HeaderTenant

__all__ = [
    "CacheRoute",
    "CacheRoutes",
    "CdnConfig",
    "HeaderTenant",
    "HttpCache",
    "TieredCacheMiddleware",
    "url_tag",
]
