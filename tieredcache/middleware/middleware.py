"""``TieredCacheMiddleware``: a pure-ASGI HTTP cache in front of a Starlette/FastAPI app.

Per request, in order:

1. Not HTTP, or no :class:`~.routes.CacheRoute` matches the path: the app runs
   untouched (with the tenant in scope); no cache call is made.
2. Headers that could poison a shared entry (``X-Forwarded-Host``,
   ``X-Original-URL``, method overrides...) and the unkeyed query parameters are
   removed from the scope the app sees, so the page depends only on what is keyed.
3. ``GET`` / ``HEAD``: the entry is read or filled through ``cache.aget_or_load``
   (single-flight per process, a fill lock across processes); the loader runs the
   app (as ``GET``) and captures its response. Responses that must not be shared
   are returned unstored (see ``_response.refusal``). ``POST``/``PUT``/``PATCH``/
   ``DELETE``: the app runs, and a successful answer invalidates every cached
   variant of the URL (its URL tag) before the client gets it.

Credentials are ``Authorization`` and any cookie the route does not name in
``CacheRoute(cookies=...)`` (it may be a session): on a ``scope="shared"`` route a
request carrying them bypasses the cache, on ``"user"`` they are keyed.

The tenant comes from ``tenant_resolver`` (a function or a coroutine function) and
is set on the tenant ContextVar with a token around the app call (reset in
``finally``): decorated functions the app calls see it too.

Compression: put ``GZipMiddleware`` *inside* this middleware, so the cache stores
what the client receives, and key the route on it with
``vary=["Accept-Encoding"]``; each encoding then is its own entry with its own
ETag. With Starlette's ``add_middleware`` the middleware added last is outermost::

    app.add_middleware(GZipMiddleware)                  # inner: runs on a fill
    app.add_middleware(TieredCacheMiddleware, ...)      # outer: sees the request first

Never the other way round: a GZip outside the cache would compress a cached
identity body on the way out and send it under the identity ETag, so a gzip and
an identity response would share a strong ETag and a 304 could swap them.
Running the app to fill an entry is in ``_fill``; the response side (what is
stored, the entry, the answers) in ``_response``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ..errors import InvalidTenantError
from ..tenancy import get_tenant_var, validate_tenant
from . import _http
from ._capture import Capture
from ._fill import Filler, HttpCache, NotStored
from ._response import CdnConfig, Responder, asks_no_cache
from .routes import CacheRoute, CacheRoutes, RouteMatch, url_tag

__all__ = ["CdnConfig", "HttpCache", "TieredCacheMiddleware"]

log = logging.getLogger("tieredcache.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class TieredCacheMiddleware:
    """Cache whole HTTP responses of declared routes in a :class:`~tieredcache.TieredCache`.

    >>> from starlette.applications import Starlette
    >>> from tieredcache import MemoryLayer, TieredCache
    >>> cache = TieredCache("web", [MemoryLayer()])
    >>> routes = CacheRoutes([CacheRoute("/products/{id:int}", ttl=60, tags=["product:{id}"])])
    >>> app = TieredCacheMiddleware(Starlette(), cache=cache, routes=routes)

    ``date``: add a ``Date`` header (turn it off when the server adds one, as
    uvicorn does unless started with ``date_header=False``). ``timer`` is the wall
    clock for ``Date`` and ``Expires``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cache: HttpCache,
        routes: CacheRoutes | Iterable[CacheRoute],
        tenant_resolver: Callable[[Scope], Any] | None = None,
        default_tenant: str = "public",
        cdn: CdnConfig | None = None,
        date: bool = True,
        timer: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.cache = cache
        self.routes = routes if isinstance(routes, CacheRoutes) else CacheRoutes(routes)
        self.resolver = tenant_resolver
        self._async_resolver = tenant_resolver is not None and (
            inspect.iscoroutinefunction(tenant_resolver)
            or inspect.iscoroutinefunction(type(tenant_resolver).__call__)
        )
        self._credentials = bool(getattr(tenant_resolver, "from_credentials", True))
        self.default_tenant = validate_tenant(default_tenant)
        self.cdn = cdn
        self._tenant_var = get_tenant_var()
        vary = getattr(tenant_resolver, "vary", None)
        self._out = Responder(cache.namespace, cdn, date, timer, vary)
        self._filler = Filler(app, cache, self._out)

    # ------------------------------------------------------------------ entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            tenant = await self._resolve(scope)
        except InvalidTenantError as exc:
            log.info("tieredcache: request with an invalid tenant, not cached: %s", exc)
            tenant, match = None, None
        else:
            match = self.routes.match(scope["path"])
        if match is not None:
            scope = self._sanitised(scope, match.route)
        token = self._tenant_var.set(tenant) if tenant is not None else None
        try:
            if match is None:
                await self.app(scope, receive, send)
            elif scope["method"] in ("GET", "HEAD"):
                await self._read(scope, receive, send, match, tenant or self.default_tenant)
            elif scope["method"] in _UNSAFE:
                await self._write(scope, receive, send, tenant or self.default_tenant)
            else:
                await self.app(scope, receive, send)
        finally:
            if token is not None:
                self._tenant_var.reset(token)

    async def _resolve(self, scope: Scope) -> str | None:
        if self.resolver is None:
            return None
        tenant = self.resolver(scope)
        if self._async_resolver or inspect.isawaitable(tenant):
            tenant = await tenant
        return None if tenant is None else validate_tenant(tenant)

    def _sanitised(self, scope: Scope, route: CacheRoute) -> Scope:
        """The scope the app sees: poisoning-prone headers and unkeyed query params gone."""
        kept = route.kept_inputs
        headers = [
            (k, v) for k, v in scope["headers"] if k not in _http.UNKEYED_INPUTS or k in kept
        ]
        scope = dict(scope)
        scope["headers"] = headers
        scope["query_string"] = route.normalise_query(scope.get("query_string", b""))
        return scope

    # ------------------------------------------------------------------ writes

    async def _write(self, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        status = 0
        tag = url_tag(scope["path"])

        async def invalidating_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and 200 <= status < 400
            ):
                # Before the client hears "done": its next GET must not see the old page.
                await self.cache.ainvalidate(tags=[tag], tenant=tenant)
            await send(message)

        await self.app(scope, receive, invalidating_send)

    # ------------------------------------------------------------------ reads

    async def _read(
        self, scope: Scope, receive: Receive, send: Send, match: RouteMatch, tenant: str
    ) -> None:
        route = match.route
        headers = scope["headers"]
        who = _http.credentials(headers, route.cookies_raw)
        if who is not None and route.scope == "shared":
            await self._bypass(scope, receive, send)  # a user's page is no shared page
            return
        user = who if who is not None and route.scope == "user" else None
        key = route.key_body(scope["path"], scope["query_string"], headers, user)
        tags = route.tag_names(match.params, scope["path"])
        private = user is not None or (
            self.resolver is not None
            and self._credentials
            and not (self.cdn is not None and self.cdn.keys_tenant)
        )
        head = scope["method"] == "HEAD"
        capture = Capture(route.max_body)
        fill_scope = dict(scope)
        fill_scope["method"] = "GET"

        async def load() -> Any:
            return await self._filler.fill(fill_scope, route, tenant, key, tags, capture)

        capture.owner_waiting = True
        try:
            value, outcome = await self.cache.aget_or_load(
                key, load, ttl=route.ttl, tags=tags, tenant=tenant, name=route.name, **route.policy
            )
        except NotStored as exc:
            if exc.capture is capture:
                await self._out.send_captured(capture, send, head)
            else:  # another request's 5xx: answer this one from the app
                await self._bypass(scope, receive, send)
            return
        finally:
            capture.owner_waiting = False
        if capture.streaming:
            await capture.attach(self._out.unstored(send), receive, head)
            return
        if value is None:
            if capture.complete:
                await self._out.send_captured(capture, send, head)
            else:  # coalesced onto a fill that stored nothing: run the app ourselves
                await self._bypass(scope, receive, send)
            return
        if (
            route.revalidate
            and outcome.state != "miss"
            and outcome.age >= route.revalidate_interval
            and asks_no_cache(headers)
        ):
            value, outcome = await self._filler.revalidate(route, tenant, key, tags, fill_scope)
            if value is None:
                await self._bypass(scope, receive, send)
                return
        await self._out.send_entry(value, outcome, route, headers, private, send, head)

    async def _bypass(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, self._out.unstored(send))
