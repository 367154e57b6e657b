"""Purge Akamai by cache tag with Fast Purge v3.

``POST /ccu/v3/{invalidate|delete}/tag/{network}`` with ``{"objects": [...]}``,
signed with EdgeGrid; Akamai answers 201 with ``estimatedSeconds``. A soft purge
is ``invalidate`` (objects are marked stale and revalidated), a hard one
``delete``. Bodies are kept under 50 KB; tags are rate limited by a bucket of
5,000 refilled at 500 a minute, which the purger keeps client-side (each request
costs one token per tag).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import httpx

from ...errors import ConfigurationError
from .base import Purger
from .edgegrid import edgegrid_authorization, edgegrid_timestamp
from .limits import TokenBucket
from .model import PurgeAck, PurgeRequest, Secret, batches
from .surrogate import AKAMAI

__all__ = ["AkamaiPurger"]

MAX_BODY_BYTES: Final = 50_000
TAG_BUCKET: Final = 5000
TAG_REFILL_PER_SECOND: Final = 500 / 60
_NETWORKS: Final = ("production", "staging")


def _body(tags: Sequence[str]) -> bytes:
    return json.dumps({"objects": list(tags)}).encode()


def _json_size(tag: str) -> int:
    return len(json.dumps(tag).encode()) + 2  # the ", " separator


class AkamaiPurger(Purger):
    """Fast Purge v3 by cache tag, EdgeGrid-signed.

    >>> AkamaiPurger("https://akab-x.purge.akamaiapis.net", client_token="c",
    ...              client_secret="s", access_token="a")
    AkamaiPurger(name='akamai')
    """

    scheme = AKAMAI

    def __init__(
        self,
        base_url: str,
        *,
        client_token: str | Secret,
        client_secret: str | Secret,
        access_token: str | Secret,
        network: str = "production",
        name: str = "akamai",
        clock: Callable[[], float] = time.monotonic,
        bucket: TokenBucket | None = None,
        wallclock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = lambda: str(uuid.uuid4()),
        **options: Any,
    ) -> None:
        if network not in _NETWORKS:
            raise ConfigurationError(f"Akamai network must be one of {_NETWORKS}, not {network!r}")
        if bucket is None:
            bucket = TokenBucket(TAG_BUCKET, TAG_REFILL_PER_SECOND, clock)
        super().__init__(name=name, clock=clock, bucket=bucket, **options)
        self.base_url = base_url.rstrip("/")
        self.network = network
        self._credentials = tuple(
            s if isinstance(s, Secret) else Secret(s)
            for s in (client_token, client_secret, access_token)
        )
        self._wallclock = wallclock
        self._nonce = nonce

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        action = "invalidate" if soft else "delete"
        url = f"{self.base_url}/ccu/v3/{action}/tag/{self.network}"
        headers = {"Content-Type": "application/json"}
        capacity = int(self.bucket.capacity) if self.bucket is not None else TAG_BUCKET
        return [
            PurgeRequest("POST", url, _body(b), b, url, headers, cost=len(b))
            for b in batches(keys, capacity, MAX_BODY_BYTES, _json_size, len(_body([])))
        ]

    def _authorize(self, request: PurgeRequest) -> Mapping[str, str]:
        # A fresh timestamp and nonce per attempt: Akamai refuses replayed signatures.
        client_token, client_secret, access_token = (s.reveal() for s in self._credentials)
        header = edgegrid_authorization(
            method=request.method,
            url=request.url,
            body=request.body,
            client_token=client_token,
            client_secret=client_secret,
            access_token=access_token,
            timestamp=edgegrid_timestamp(self._wallclock()),
            nonce=self._nonce(),
        )
        return {"Authorization": header}

    def _acknowledge(self, request: PurgeRequest, response: httpx.Response) -> PurgeAck:
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        estimated = body.get("estimatedSeconds")
        return PurgeAck(
            request.target,
            request.keys,
            response.status_code,
            estimated_seconds=float(estimated) if isinstance(estimated, int | float) else None,
            purge_id=body.get("purgeId") if isinstance(body.get("purgeId"), str) else None,
        )
