"""The CDN purge layer: surrogate keys and purgers for Varnish, Fastly, Cloudflare, Akamai.

``surrogate`` names tags at each CDN (response headers and purges agree);
``base`` holds the shared, sans-I/O purge flow with a sync and an async driver;
one module per vendor; ``layer`` the invalidate-only :class:`CdnPurgeLayer`, whose
calls return a :class:`PurgeTicket` (``ticket``) that settles with their outcome.

Example::

    from tieredcache.layers.cdn import CdnPurgeLayer, FastlyPurger

    layer = CdnPurgeLayer(FastlyPurger("SERVICE", api_key="..."), name="fastly")

httpx is needed (``pip install 'tieredcache[http]'``); importing this package
without it raises :class:`~tieredcache.errors.MissingExtraError`.
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ...errors import MissingExtraError

    raise MissingExtraError("http", "httpx") from exc

from .akamai import AkamaiPurger
from .base import Purger
from .cloudflare import CLOUDFLARE_PLANS, CloudflarePurger
from .edgegrid import edgegrid_authorization, edgegrid_timestamp
from .errors import PurgeRateLimitedError
from .fastly import FastlyPurger
from .layer import CdnPurgeLayer
from .limits import RetryPolicy, TokenBucket
from .model import PurgeAck, PurgeRequest, PurgeResult, Secret
from .surrogate import (
    AKAMAI,
    CLOUDFLARE,
    FASTLY,
    VARNISH,
    SurrogateScheme,
    cache_key_key,
    purge_keys,
    response_header,
    table_key,
    tag_key,
    tenant_key,
)
from .ticket import PurgeOutcome, PurgeTicket
from .varnish import VarnishPurger

__all__ = [
    "AKAMAI",
    "AkamaiPurger",
    "CLOUDFLARE",
    "CLOUDFLARE_PLANS",
    "CdnPurgeLayer",
    "CloudflarePurger",
    "FASTLY",
    "FastlyPurger",
    "PurgeAck",
    "PurgeOutcome",
    "PurgeRateLimitedError",
    "PurgeRequest",
    "PurgeResult",
    "PurgeTicket",
    "Purger",
    "RetryPolicy",
    "Secret",
    "SurrogateScheme",
    "TokenBucket",
    "VARNISH",
    "VarnishPurger",
    "cache_key_key",
    "edgegrid_authorization",
    "edgegrid_timestamp",
    "purge_keys",
    "response_header",
    "table_key",
    "tag_key",
    "tenant_key",
]
