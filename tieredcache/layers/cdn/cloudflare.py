"""Purge Cloudflare by cache tag: ``POST /zones/{zone}/purge_cache`` with
``{"tags": [...]}``, at most 100 tags a request, Bearer token auth.

Cloudflare rate-limits purge requests with a token bucket per plan; the purger
keeps the same bucket client-side (``CLOUDFLARE_PLANS``) so it waits or reports
:class:`~.errors.PurgeRateLimitedError` before Cloudflare answers 429 (and still
honours a 429's ``Retry-After`` when another client shares the zone's budget).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import httpx

from ...errors import ConfigurationError
from .base import Purger, RequestFailedError
from .limits import TokenBucket
from .model import PurgeAck, PurgeRequest, Secret, batches
from .surrogate import CLOUDFLARE

__all__ = ["CLOUDFLARE_PLANS", "CloudflarePurger"]

MAX_TAGS_PER_REQUEST: Final = 100
# plan -> (bucket size, requests refilled per second)
CLOUDFLARE_PLANS: Final[Mapping[str, tuple[int, float]]] = {
    "free": (25, 5 / 60),
    "pro": (25, 5.0),
    "business": (50, 10.0),
    "enterprise": (500, 50.0),
}


class CloudflarePurger(Purger):
    """Purge cache tags in one Cloudflare zone, within the plan's rate limit.

    >>> CloudflarePurger("ZONE", api_token="secret", plan="pro").bucket.capacity
    25
    """

    scheme = CLOUDFLARE
    keys_per_token = MAX_TAGS_PER_REQUEST

    def __init__(
        self,
        zone_id: str,
        api_token: str | Secret,
        *,
        plan: str = "free",
        base_url: str = "https://api.cloudflare.com/client/v4",
        name: str = "cloudflare",
        clock: Callable[[], float] = time.monotonic,
        bucket: TokenBucket | None = None,
        **options: Any,
    ) -> None:
        if plan not in CLOUDFLARE_PLANS:
            raise ConfigurationError(
                f"unknown Cloudflare plan {plan!r}; one of {sorted(CLOUDFLARE_PLANS)}"
            )
        if bucket is None:
            capacity, rate = CLOUDFLARE_PLANS[plan]
            bucket = TokenBucket(capacity, rate, clock)
        super().__init__(name=name, clock=clock, bucket=bucket, **options)
        self.zone_id = zone_id
        self.plan = plan
        self.base_url = base_url.rstrip("/")
        self._api_token = api_token if isinstance(api_token, Secret) else Secret(api_token)

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        # Cloudflare has no soft purge by tag: soft is treated as a purge.
        url = f"{self.base_url}/zones/{self.zone_id}/purge_cache"
        headers = {"Content-Type": "application/json"}
        return [
            PurgeRequest("POST", url, json.dumps({"tags": list(b)}).encode(), b, url, headers)
            for b in batches(keys, MAX_TAGS_PER_REQUEST)
        ]

    def _authorize(self, request: PurgeRequest) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {self._api_token.reveal()}"}

    def _acknowledge(self, request: PurgeRequest, response: httpx.Response) -> PurgeAck:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict) or body.get("success") is not True:
            raise RequestFailedError(f"Cloudflare did not confirm: {response.text[:200]!r}")
        result = body.get("result") or {}
        purge_id = result.get("id") if isinstance(result, dict) else None
        return PurgeAck(request.target, request.keys, response.status_code, purge_id=purge_id)
