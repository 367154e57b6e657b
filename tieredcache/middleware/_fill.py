"""Filling an entry: run the app as the cache's loader and turn its response into
an entry, and a client's ``Cache-Control: no-cache`` reload, coalesced per key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol

from ..tenancy import get_tenant_var
from ._capture import Capture
from ._response import Responder, refusal
from .routes import CacheRoute


class HttpCache(Protocol):
    """What the middleware needs of :class:`~tieredcache.TieredCache`."""

    namespace: str

    async def aget_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        tags: Iterable[str] = (),
        tenant: str | None = None,
        name: str = ...,
        **policy: Any,
    ) -> tuple[Any, Any]: ...

    async def ainvalidate(
        self, keys: Iterable[str] = (), *, tags: Iterable[str] = (), tenant: str | None = None
    ) -> Any: ...


log = logging.getLogger("tieredcache.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class NotStored(Exception):
    """A fill's response must not be stored, and is an error (5xx): raised so the
    engine serves a stale entry if it has one (stale-if-error)."""

    def __init__(self, capture: Capture) -> None:
        super().__init__(f"the app answered {capture.status}")
        self.capture = capture


class Filler:
    """Runs the app for one middleware's fills (its app, cache and responder)."""

    def __init__(self, app: ASGIApp, cache: HttpCache, out: Responder) -> None:
        self.app = app
        self.cache = cache
        self.out = out
        self._tenant_var = get_tenant_var()
        self._flights: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def revalidate(
        self, route: CacheRoute, tenant: str, key: str, tags: list[str], fill_scope: Scope
    ) -> tuple[Any, Any]:
        """A client's ``no-cache``: drop the entry and load it again, once per key
        however many clients ask at the same time."""
        flight = (tenant, key)
        running = self._flights.get(flight)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._flights[flight] = future
        try:
            await self.cache.ainvalidate(keys=[key], tenant=tenant)
            capture = Capture(route.max_body)

            async def load() -> Any:
                return await self.fill(fill_scope, route, tenant, key, tags, capture)

            try:
                result = await self.cache.aget_or_load(
                    key,
                    load,
                    ttl=route.ttl,
                    tags=tags,
                    tenant=tenant,
                    name=route.name,
                    **route.policy,
                )
            except NotStored:
                result = (None, None)
            if capture.streaming:
                capture.abandon()
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: followers re-raise it, nobody else must log it
            raise
        finally:
            del self._flights[flight]

    async def fill(
        self,
        scope: Scope,
        route: CacheRoute,
        tenant: str,
        key: str,
        tags: list[str],
        capture: Capture,
    ) -> Any:
        """The loader: run the app as GET and turn its response into an entry, or None."""
        received = False

        async def receive() -> Message:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # a fill has no client to disconnect
            raise AssertionError("unreachable")

        token = self._tenant_var.set(tenant)
        try:
            await capture.run(self.app(scope, receive, capture.send))
        finally:
            self._tenant_var.reset(token)
        if capture.streaming:
            if not capture.owner_waiting:
                capture.abandon()
            return None
        if capture.status >= 500:
            raise NotStored(capture)
        refused = refusal(route, scope["headers"], scope["path"], capture)
        if refused is not None:
            log.debug("tieredcache: %s %s not stored: %s", tenant, key, refused)
            return None
        return self.out.entry(route, tenant, key, tags, capture)
