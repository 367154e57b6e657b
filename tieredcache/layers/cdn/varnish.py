"""Purge Varnish nodes running vmod xkey.

Each node gets ``PURGE /`` with ``xkey-purge: k1 k2`` (``xkey-softpurge`` when
soft). The VCL (see ``scripts/varnish_service.py``) answers 200 with the number
of objects in an ``xkey-purged`` header; each node's count is its own
:class:`~.base.PurgeAck`. One node failing does not stop the others; the call
then raises :class:`~tieredcache.errors.BackendError` naming the failed nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import httpx

from ...errors import ConfigurationError
from .base import Purger
from .model import PurgeAck, PurgeRequest, batches
from .surrogate import VARNISH

__all__ = ["VarnishPurger"]

# A request header line must fit Varnish's http_req_hdr_len (8 KiB by default).
_MAX_HEADER: Final = 7000


class VarnishPurger(Purger):
    """Purge surrogate keys on every Varnish node.

    >>> purger = VarnishPurger(["http://127.0.0.1:6081"])
    >>> purger
    VarnishPurger(name='varnish')
    """

    scheme = VARNISH

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        name: str = "varnish",
        max_header_bytes: int = _MAX_HEADER,
        **options: Any,
    ) -> None:
        if not nodes:
            raise ConfigurationError("VarnishPurger needs at least one node URL")
        super().__init__(name=name, **options)
        self.nodes = tuple(n.rstrip("/") for n in nodes)
        self.max_header_bytes = max_header_bytes

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        header = "xkey-softpurge" if soft else "xkey-purge"
        groups = batches(keys, 10_000, self.max_header_bytes, lambda k: len(k.encode()) + 1)
        return [
            PurgeRequest("PURGE", f"{node}/", b"", group, node, {header: " ".join(group)})
            for group in groups
            for node in self.nodes
        ]

    def _acknowledge(self, request: PurgeRequest, response: httpx.Response) -> PurgeAck:
        count = response.headers.get("xkey-purged")
        return PurgeAck(
            request.target,
            request.keys,
            response.status_code,
            purged=int(count) if count is not None and count.isdigit() else None,
        )
