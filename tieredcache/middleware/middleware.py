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
   are returned unstored (see :func:`_refusal`). ``POST``/``PUT``/``PATCH``/
   ``DELETE``: the app runs, and a successful answer invalidates every cached
   variant of the URL (its URL tag) before the client gets it.

The tenant comes from ``tenant_resolver`` and is set on the tenant ContextVar
with a token around the app call (reset in ``finally``): decorated functions the
app calls see it too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import InvalidTenantError
from ..keys import Tag
from ..layers.cdn.surrogate import SurrogateScheme, response_header
from ..tenancy import get_tenant_var, validate_tenant
from . import _http
from ._capture import Capture
from ._http import RawHeaders, header
from .routes import CacheRoute, CacheRoutes, RouteMatch, url_tag

__all__ = ["CdnConfig", "HttpCache", "TieredCacheMiddleware"]

log = logging.getLogger("tieredcache.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_NO_STORE_CDN = [(b"cdn-cache-control", b"no-store"), (b"surrogate-control", b"no-store")]
_MISS = (b"x-cache", b"MISS")
_OURS = frozenset({b"x-cache"})
_CDN_ONLY = frozenset({b"x-cache", b"surrogate-key", b"xkey", b"cache-tag", b"edge-cache-tag"})
_STATE = {"hit": b"HIT", "stale": b"STALE", "miss": b"MISS"}


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


@dataclass(frozen=True, slots=True)
class CdnConfig:
    """The CDN in front of the app.

    ``scheme`` names the vendor's surrogate-key header and encoding (``VARNISH``,
    ``FASTLY``, ``CLOUDFLARE``, ``AKAMAI`` from :mod:`tieredcache.layers.cdn`).
    ``keys_tenant``: the CDN's cache key includes the tenant (a host per tenant,
    or a header it keys on), so pages of a tenant resolved from credentials may
    still be shared there; otherwise such pages are ``private`` towards the CDN.
    """

    scheme: SurrogateScheme
    keys_tenant: bool = False


class _NotStored(Exception):
    """A fill's response must not be stored, and is an error (5xx): raised so the
    engine serves a stale entry if it has one (stale-if-error)."""

    def __init__(self, capture: Capture) -> None:
        super().__init__(f"the app answered {capture.status}")
        self.capture = capture


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
        tenant_vary = getattr(tenant_resolver, "vary", None)
        self._tenant_vary = tenant_vary.lower().encode() if tenant_vary else None
        self.default_tenant = validate_tenant(default_tenant)
        self.cdn = cdn
        self.date = date
        self.timer = timer
        self._tenant_var = get_tenant_var()
        self._revalidating: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._route_headers: dict[tuple[int, bool], tuple[RawHeaders, bytes]] = {}

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
        auth = header(headers, b"authorization")
        if auth is not None and route.scope == "shared":
            await self._bypass(scope, receive, send)  # a user's page is no shared page
            return
        user = auth if auth is not None and route.scope == "user" else None
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
            return await self._fill(fill_scope, route, tenant, key, tags, capture)

        capture.owner_waiting = True
        try:
            value, outcome = await self.cache.aget_or_load(
                key, load, ttl=route.ttl, tags=tags, tenant=tenant, name=route.name, **route.policy
            )
        except _NotStored as exc:
            if exc.capture is capture:
                await self._send_captured(capture, send, head)
            else:  # another request's 5xx: answer this one from the app
                await self._bypass(scope, receive, send)
            return
        finally:
            capture.owner_waiting = False
        if capture.streaming:
            await capture.attach(self._unstored_send(send), receive, head)
            return
        if value is None:
            if capture.complete:
                await self._send_captured(capture, send, head)
            else:  # coalesced onto a fill that stored nothing: run the app ourselves
                await self._bypass(scope, receive, send)
            return
        if (
            route.revalidate
            and outcome.state != "miss"
            and outcome.age >= route.revalidate_interval
            and _asks_no_cache(headers)
        ):
            value, outcome = await self._revalidate(route, tenant, key, tags, fill_scope)
            if value is None:
                await self._bypass(scope, receive, send)
                return
        await self._send_entry(value, outcome, route, headers, private, send, head)

    async def _revalidate(
        self, route: CacheRoute, tenant: str, key: str, tags: list[str], fill_scope: Scope
    ) -> tuple[Any, Any]:
        """A client's ``no-cache``: drop the entry and load it again, once per key
        however many clients ask at the same time."""
        flight = (tenant, key)
        running = self._revalidating.get(flight)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._revalidating[flight] = future
        try:
            await self.cache.ainvalidate(keys=[key], tenant=tenant)
            capture = Capture(route.max_body)

            async def load() -> Any:
                return await self._fill(fill_scope, route, tenant, key, tags, capture)

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
            except _NotStored:
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
            del self._revalidating[flight]

    async def _fill(
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
            raise _NotStored(capture)
        refusal = _refusal(route, scope, capture)
        if refusal is not None:
            log.debug("tieredcache: %s %s not stored: %s", tenant, key, refusal)
            return None
        stored = [(k, v) for k, v in capture.headers if k not in _http.NOT_STORED]
        etag = _http.make_etag(self.cache.namespace, tenant, key, capture.status, capture.body)
        cdn: RawHeaders = []
        if self.cdn is not None:
            name, value = response_header(
                self.cdn.scheme,
                [Tag(self.cache.namespace, tenant, t) for t in tags],
                tables=[(self.cache.namespace, route.table_name)] if route.table_name else (),
            )
            cdn.append((name.lower().encode(), value.encode()))
        vary = _http.vary_names(header(capture.headers, b"vary"))
        return (capture.status, stored, capture.body, etag, cdn, ",".join(vary))

    # ------------------------------------------------------------------ answers

    def _cache_headers(self, route: CacheRoute, private: bool) -> tuple[RawHeaders, bytes]:
        """(Cache-Control, CDN-Cache-Control, Surrogate-Control; the Vary base) of a route."""
        cached = self._route_headers.get((id(route), private))
        if cached is not None:
            return cached
        browser_ttl = route.ttl if route.browser_ttl is None else route.browser_ttl
        cdn_ttl = route.ttl if route.cdn_ttl is None else route.cdn_ttl
        extra = ""
        if route.stale_while_revalidate:
            extra += f", stale-while-revalidate={int(route.stale_while_revalidate)}"
        if route.stale_if_error:
            extra += f", stale-if-error={int(route.stale_if_error)}"
        if private:
            headers = [
                (b"cache-control", f"private, max-age={int(browser_ttl)}{extra}".encode()),
                (b"cdn-cache-control", b"private"),
                (b"surrogate-control", b"no-store"),
            ]
        else:
            headers = [
                (b"cache-control", f"public, max-age={int(browser_ttl)}{extra}".encode()),
                (b"cdn-cache-control", f"max-age={int(cdn_ttl)}{extra}".encode()),
                (b"surrogate-control", f"max-age={int(cdn_ttl)}".encode()),
            ]
        names = list(route.vary)
        if self._tenant_vary is not None and self._tenant_vary.decode() not in {
            n.lower() for n in names
        }:
            names.append(self.resolver.vary)  # type: ignore[union-attr]
        vary = ", ".join(names).encode()
        result = (headers, vary)
        self._route_headers[(id(route), private)] = result
        return result

    async def _send_entry(
        self,
        entry: Any,
        outcome: Any,
        route: CacheRoute,
        request_headers: RawHeaders,
        private: bool,
        send: Send,
        head: bool,
    ) -> None:
        status, stored, body, etag, cdn, app_vary = entry
        base, vary = self._cache_headers(route, private)
        age = int(outcome.age)
        browser_ttl = route.ttl if route.browser_ttl is None else route.browser_ttl
        now = self.timer()
        common: RawHeaders = [(b"etag", etag), *base]
        if app_vary:
            known = {n.strip().lower() for n in vary.decode().split(",") if n.strip()}
            extra = [n for n in app_vary.split(",") if n not in known]
            if extra:
                vary = (
                    b", ".join([vary, *(n.encode() for n in extra)])
                    if vary
                    else (", ".join(extra).encode())
                )
        if vary:
            common.append((b"vary", vary))
        if self.date:
            common.append((b"date", _http.http_date(now)))
        common.append((b"expires", _http.http_date(now + max(0, browser_ttl - age))))
        common.append((b"age", str(age).encode()))
        common.append((b"x-cache", _STATE.get(outcome.state, b"MISS")))
        if not private:
            common.extend(cdn)
        inm = header(request_headers, b"if-none-match")
        if inm is not None and 200 <= status < 300 and _http.etag_matches(inm, etag):
            await send({"type": "http.response.start", "status": 304, "headers": common})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [*stored, *common, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _send_captured(self, capture: Capture, send: Send, head: bool) -> None:
        """A filled response that was not stored, as the app sent it (marked unstored)."""
        out = self._unstored_send(send)
        await out(capture.messages[0])
        await out({"type": "http.response.body", "body": b"" if head else capture.body})

    def _unstored_send(self, send: Send) -> Send:
        """Mark a response the cache did not store: MISS, and no-store towards the CDN;
        surrogate keys the app set are dropped when no CDN is configured to strip them."""
        strip = _CDN_ONLY if self.cdn is None else _OURS

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k not in strip]
                names = {k for k, _ in headers}
                headers.extend(h for h in _NO_STORE_CDN if h[0] not in names)
                headers.append(_MISS)
                message = {**message, "headers": headers}
            await send(message)

        return marked

    async def _bypass(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, self._unstored_send(send))


def _asks_no_cache(headers: RawHeaders) -> bool:
    if "no-cache" in _http.directives(header(headers, b"cache-control")):
        return True
    pragma = header(headers, b"pragma")
    return pragma is not None and b"no-cache" in pragma.lower()


def _refusal(route: CacheRoute, scope: Scope, capture: Capture) -> str | None:
    """Why a complete, non-5xx response must not be stored in a shared entry, or None."""
    status = capture.status
    if status not in _http.STORABLE_STATUSES:
        return f"status {status}"  # 206, 4xx a request header can provoke (CPDoS)...
    if status in (404, 410) and not _http.clean_request(scope["headers"]):
        return f"{status} to a request with oversized or odd headers (CPDoS)"
    headers = capture.headers
    found = {k for k, _ in headers}
    if b"set-cookie" in found:
        return "Set-Cookie"
    cache_control = _http.directives(header(headers, b"cache-control"))
    if cache_control & {"private", "no-store", "no-cache"}:
        return "Cache-Control " + ", ".join(sorted(cache_control & {"private", "no-store"}))
    vary = _http.vary_names(header(headers, b"vary"))
    keyed = {name.decode() for name in route.vary_raw}
    if "*" in vary or any(name not in keyed for name in vary):
        return f"Vary names headers the route does not key ({', '.join(vary)})"
    if len(capture.body) > route.max_body:
        return f"body over {route.max_body} bytes"
    suffix = _http.static_suffix(scope["path"])
    if suffix is not None and not _http.content_type_matches(
        suffix, header(headers, b"content-type")
    ):
        return f"path ends in {suffix} but the content type differs (web cache deception)"
    return None
