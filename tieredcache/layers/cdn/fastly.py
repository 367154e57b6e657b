"""Purge Fastly by surrogate key: ``POST /service/{id}/purge`` with
``{"surrogate_keys": [...]}``, at most 256 keys a request, ``Fastly-Key`` auth,
``Fastly-Soft-Purge: 1`` for a soft purge (mark stale, serve while revalidating).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .base import Purger
from .model import PurgeRequest, Secret, batches
from .surrogate import FASTLY

__all__ = ["FastlyPurger"]

MAX_KEYS_PER_REQUEST: Final = 256


class FastlyPurger(Purger):
    """Batch surrogate-key purges for one Fastly service.

    >>> FastlyPurger("SVC", api_key="secret")
    FastlyPurger(name='fastly')
    """

    scheme = FASTLY

    def __init__(
        self,
        service_id: str,
        api_key: str | Secret,
        *,
        base_url: str = "https://api.fastly.com",
        name: str = "fastly",
        **options: Any,
    ) -> None:
        super().__init__(name=name, **options)
        self.service_id = service_id
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key if isinstance(api_key, Secret) else Secret(api_key)

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if soft:
            headers["Fastly-Soft-Purge"] = "1"
        url = f"{self.base_url}/service/{self.service_id}/purge"
        return [
            PurgeRequest(
                "POST", url, json.dumps({"surrogate_keys": list(b)}).encode(), b, url, headers
            )
            for b in batches(keys, MAX_KEYS_PER_REQUEST)
        ]

    def _authorize(self, request: PurgeRequest) -> Mapping[str, str]:
        return {"Fastly-Key": self._api_key.reveal()}
